"""The KL family for teacher and student with the *same* vocabulary (README 'Methods').

With p = softmax(z / τ) for both models (τ = `temperature`, 2.0 in the reference scripts, no τ² factor),
per response position:

    forward          KL(p_t ‖ p_s)
    reverse          KL(p_s ‖ p_t)
    skewed_forward   KL(p_t ‖ λ p_t + (1−λ) p_s)          DistiLLM SKL, λ = 0.1
    skewed_reverse   KL(p_s ‖ λ p_s + (1−λ) p_t)          DistiLLM SRKL, λ = 0.1
    js               ½ KL(p_t ‖ m) + ½ KL(p_s ‖ m),  m = (p_t + p_s)/2
    adaptive         AKL (Wu et al. 2024): teacher probs sorted ascending, gap = |p_t − p_s|, the "tail"
                     is where the cumulative sorted teacher mass ≤ ½; weights g_head, g_tail of the gap:
                     (g_head·FKL + g_tail·RKL) / (g_head + g_tail), the weights held constant (detached) as
                     in the AKL and DSKD code: the gradient is that of a fixed mix of FKL and RKL

averaged over the positions where `mask` is true. Everything is in log space and `-inf`-safe (a zero
probability contributes 0, never NaN); computation in float32.

The teacher is either full logits [..., V] or a `TopKTeacher` (top-k log-probs at τ = 1, their ids, and
the log of the mass outside the top-k). The top-k form compares k + 1 buckets — the k tokens and one
"rest of the vocabulary" bucket, on both sides — so no mass is silently renormalised away. With τ ≠ 1
the teacher's tail bucket is tempered as if its mass were spread evenly over the V − k other tokens
(exact for τ = 1; the DSKD/DistiLLM references use full logits). With k = V it equals the full form.
Deliberate difference from DSKD's js_divergence: no +1e-9 inside the logs (log space instead).
"""

from __future__ import annotations

import math
import torch

from cot2align.losses.teacher import HeadTeacher, TopKTeacher, f32, flatten, index_rows, tempered_buckets
from cot2align.methods import KL_VARIANTS

VARIANTS = KL_VARIANTS     # written once, in the registry


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Σ p (log p − log q) over the last dim, with 0·log 0 = 0 (and no NaN gradient there)."""
    p = log_p.exp()
    support = p > 0
    diff = torch.where(support, log_p, 0.0) - torch.where(support, log_q, 0.0)
    return (p * diff).sum(-1)


def divergence(student_logp: torch.Tensor, teacher_logp: torch.Tensor, variant: str = "forward",
               skew_lambda: float = 0.1, adaptive_alpha: float = 0.5) -> torch.Tensor:
    """Per-position divergence between two log-distributions over the same buckets [..., V] -> [...]."""
    s, t = f32(student_logp), f32(teacher_logp)
    if variant == "forward":
        return _kl(t, s)
    if variant == "reverse":
        return _kl(s, t)
    if variant == "skewed_forward":
        mix = torch.logaddexp(t + math.log(skew_lambda), s + math.log1p(-skew_lambda))
        return _kl(t, mix)
    if variant == "skewed_reverse":
        mix = torch.logaddexp(s + math.log(skew_lambda), t + math.log1p(-skew_lambda))
        return _kl(s, mix)
    if variant == "js":
        mix = torch.logaddexp(t, s) - math.log(2.0)
        return 0.5 * _kl(t, mix) + 0.5 * _kl(s, mix)
    if variant == "adaptive":
        p_t, p_s = t.exp(), s.exp()
        sorted_t, order = p_t.sort(dim=-1)
        gap = (sorted_t - p_s.gather(-1, order)).abs()
        tail = (sorted_t.cumsum(-1) <= adaptive_alpha).to(gap.dtype)
        # the mixing weights are constants of the step, as in AKL's and DSKD's code (no gradient through them)
        g_head, g_tail = (gap * (1 - tail)).sum(-1).detach(), (gap * tail).sum(-1).detach()
        total = (g_head + g_tail).clamp_min(1e-12)
        return (g_head / total) * _kl(t, s) + (g_tail / total) * _kl(s, t)
    raise ValueError(f"kl variant: expected one of {', '.join(VARIANTS)}, got {variant!r}")


def topk_buckets(student_logits: torch.Tensor, teacher: TopKTeacher, temperature: float = 1.0):
    """(student, teacher) log-probs over the k + 1 buckets: the teacher's top-k tokens, then the rest."""
    s_logp = torch.log_softmax(f32(student_logits) / temperature, dim=-1)
    s_top = s_logp.gather(-1, teacher.ids)
    s_rest = s_logp.scatter(-1, teacher.ids, float("-inf")).logsumexp(-1, keepdim=True)
    return torch.cat([s_top, s_rest], dim=-1), tempered_buckets(teacher, temperature)


def kl_loss(student_logits: torch.Tensor, teacher, mask: torch.Tensor, variant: str = "forward",
            temperature: float = 2.0, skew_lambda: float = 0.1, adaptive_alpha: float = 0.5) -> torch.Tensor:
    """Mean divergence over masked positions. student_logits [B,T,V]; teacher: logits [B,T,V], HeadTeacher or TopKTeacher."""
    if variant not in VARIANTS:
        raise ValueError(f"kl variant: expected one of {', '.join(VARIANTS)}, got {variant!r}")
    v_s = student_logits.shape[-1]
    v_t = teacher.vocab_size if isinstance(teacher, (TopKTeacher, HeadTeacher)) else teacher.shape[-1]
    if v_s != v_t:
        raise ValueError(f"kl: the student vocabulary ({v_s}) differs from the teacher's ({v_t}); KL needs one shared "
                         "vocabulary — use uld, mined or dskd for models with different tokenizers")
    if isinstance(teacher, HeadTeacher):
        teacher = teacher.logits()
    if isinstance(teacher, TopKTeacher):
        s_logp, t_logp = topk_buckets(student_logits, teacher, temperature)
    else:
        s_logp = torch.log_softmax(f32(student_logits) / temperature, dim=-1)
        t_logp = torch.log_softmax(f32(teacher) / temperature, dim=-1)
    per_position = divergence(s_logp, t_logp, variant, skew_lambda, adaptive_alpha)
    mask = mask.bool()
    return (per_position * mask).sum() / mask.sum().clamp_min(1)


def teacher_dist_on_student(student, teacher):
    """For same-vocabulary KL: the teacher's distribution moved onto the student's response positions.

    With one shared tokenizer both sides tokenise the same texts identically, so the r-th response position
    of each side is the same token; the teacher's rows are scattered onto the student's masked positions.
    """
    s_mask, t_mask = student.mask.bool(), teacher.mask.bool()
    if not torch.equal(s_mask.sum(1), t_mask.sum(1)):
        raise ValueError("kl: the student and teacher response lengths differ; KL needs the same tokenizer on both sides")
    rows = index_rows(flatten(teacher.dist), t_mask.flatten().nonzero().squeeze(1))
    batch, length = s_mask.shape
    if isinstance(rows, TopKTeacher):
        k = rows.ids.shape[-1]
        logprobs = rows.logprobs.new_zeros(batch, length, k)
        ids = rows.ids.new_zeros(batch, length, k)
        tail = rows.tail.new_zeros(batch, length)
        logprobs[s_mask], ids[s_mask], tail[s_mask] = rows.logprobs, rows.ids, rows.tail
        return TopKTeacher(logprobs, ids.long(), tail, rows.vocab_size)
    logits = rows.logits() if isinstance(rows, HeadTeacher) else rows.float()
    out = logits.new_zeros(batch, length, logits.shape[-1])
    out[s_mask] = logits
    return out


def kd_term(student: dict, teacher: dict, views: list[str], heads, projectors, cfg):
    """L_KD of `--method kl` (methods.py): the divergence averaged over the views' response tokens."""
    total = sum(kl_loss(student[v].logits, teacher_dist_on_student(student[v], teacher[v]), student[v].mask,
                        cfg.kl_variant, cfg.kd_temperature, cfg.skew_lambda, cfg.adaptive_alpha) * student[v].mask.sum()
                for v in views)
    kd = total / sum(student[v].mask.sum() for v in views).clamp_min(1)
    return kd, {"kd/kl": kd}
