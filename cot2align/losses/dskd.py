"""Dual-Space Knowledge Distillation with cross-model attention (Zhang et al. 2024) (README 'Methods').

Over the response positions of the student (n rows, width d) and of the teacher (m rows, width D):

    Q = P_query([E_s(x); E_s(y)])                 [n, 2D]  student embeddings of input / target tokens
    K = norm([E_t(x_t); E_t(y_t)])                [m, 2D]  teacher's, norm(·) = · / std(·)
    A = Q Kᵀ / √(2D)                               padding entries masked out (weight exactly 0)
    t2s_h = softmax(A) · P_t2s(norm(h_t) + norm(E_t(y_t)))           teacher -> student space [n, d]
    t2s_logits = t2s_h · W_sᵀ                      (student LM head, held fixed)
    s2t_h = softmax(Aᵀ) · P_s2t(h_s)                                 student -> teacher space [m, D]

    t2s_ce = CE(t2s_logits, y)                    trains the projectors
    t2s_kd = D(z_s ‖ t2s_logits) on positions where argmax t2s_logits = y     (D: the chosen KL variant)
    s2t_kd = KL(p_t ‖ softmax(s2t_h · W_tᵀ))       (teacher LM head, held fixed; computed in vocab chunks)
    L_DSKD = t2s_ce + t2s_kd + s2t_kd

τ (2.0 in the reference scripts) divides both sides' logits in t2s_kd and s2t_kd. The student embeddings
in Q are detached, as are all teacher tensors; gradients reach the student through z_s (t2s_kd) and h_s
(s2t_kd), and the projectors through all three terms.

Deliberate differences from DSKD's code: the std normalisers are taken over the real (response) rows only,
not over padding too, so the loss does not depend on how a batch is padded; t2s terms are averaged over
student response tokens and s2t_kd over teacher response tokens (DSKD divides every sum by the student
token count); the s2t teacher can be the exact logits (recomputed from the cached hidden states) or the
cached top-k + tail.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from cot2align.losses.head_kl import head_forward_kl
from cot2align.losses.kl import divergence
from cot2align.losses.teacher import f32, select

_MASKED = -1e9


class DSKDProjectors(nn.Module):
    """t2s: Linear(D -> d), s2t: Linear(d -> D), query: Linear(2d -> 2D) (DSKD's projector_config)."""

    def __init__(self, student_dim: int, teacher_dim: int):
        super().__init__()
        self.t2s = nn.Linear(teacher_dim, student_dim)
        self.s2t = nn.Linear(student_dim, teacher_dim)
        self.query = nn.Linear(2 * student_dim, 2 * teacher_dim)


def _masked_std(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One std over every element of the real rows of x [B, M, D] (unbiased, as torch.std); 1 with no rows."""
    values = f32(x[mask])
    return values.std().clamp_min(1e-12) if values.numel() > 1 else values.new_ones(())


def cross_model_attention(query: torch.Tensor, key: torch.Tensor, student_mask: torch.Tensor,
                          teacher_mask: torch.Tensor) -> torch.Tensor:
    """Scores A [B, n, m] = Q Kᵀ / √(2D) in float32, with −1e9 wherever a student or teacher row is padding."""
    with torch.autocast(device_type=query.device.type, enabled=False):
        scores = f32(query) @ f32(key).transpose(1, 2) / math.sqrt(key.shape[-1])
    pair = student_mask.bool()[:, :, None] & teacher_mask.bool()[:, None, :]
    return scores.masked_fill(~pair, _MASKED)


def dskd_loss(*, student_logits: torch.Tensor, student_hidden: torch.Tensor, student_input_embeds: torch.Tensor,
              student_target_embeds: torch.Tensor, target_ids: torch.Tensor, student_mask: torch.Tensor,
              student_lm_head: torch.Tensor, teacher_hidden: torch.Tensor, teacher_input_embeds: torch.Tensor,
              teacher_target_embeds: torch.Tensor, teacher_mask: torch.Tensor, teacher, teacher_lm_head: torch.Tensor,
              teacher_lm_head_bias: torch.Tensor | None = None, projectors: DSKDProjectors,
              kl_variant: str = "forward", temperature: float = 2.0, skew_lambda: float = 0.1,
              adaptive_alpha: float = 0.5, reduction: str = "mean", vocab_chunk: int = 32768) -> tuple[torch.Tensor, dict]:
    """L_DSKD and its parts.

    Student tensors over [B, N] positions (logits [B,N,V_s], last hidden / embeddings [B,N,d], gold next
    tokens target_ids [B,N], student_mask [B,N] response positions); teacher tensors over [B, M] positions
    (hidden / embeddings [B,M,D], teacher_mask [B,M]); `teacher` is the teacher distribution over [B, M]
    (logits, HeadTeacher or TopKTeacher) for s2t_kd.

    reduction "mean": returns (t2s_ce + t2s_kd + s2t_kd, parts) with t2s terms averaged over student rows
    and s2t_kd over teacher rows. "sum": the same parts summed (and parts["n_student"], parts["n_teacher"]),
    so a caller can average over several views.
    """
    s_mask, t_mask = student_mask.bool(), teacher_mask.bool()
    n_student, n_teacher = s_mask.sum(), t_mask.sum()
    if int(n_student) == 0 or int(n_teacher) == 0:
        # nothing to align (e.g. a batch whose examples have no CoT view): exactly zero, no NaN from empty stds
        zero = student_logits.new_zeros((), dtype=torch.float32)
        parts = {"t2s_ce": zero, "t2s_kd": zero, "s2t_kd": zero, "t2s_acc": zero}
        if reduction == "sum":
            parts.update(n_student=n_student, n_teacher=n_teacher)
        return zero, parts

    # cross-model attention between the two sequences of response rows
    student_index = torch.cat([student_input_embeds, student_target_embeds], dim=-1).detach()
    teacher_index = torch.cat([teacher_input_embeds, teacher_target_embeds], dim=-1).detach()
    query = projectors.query(student_index.to(projectors.query.weight.dtype))
    key = f32(teacher_index) / _masked_std(teacher_index, t_mask)
    scores = cross_model_attention(query, key, s_mask, t_mask)

    # teacher -> student: values from the teacher's hidden states and target embeddings
    teacher_value_in = (f32(teacher_hidden.detach()) / _masked_std(teacher_hidden.detach(), t_mask)
                        + f32(teacher_target_embeds.detach()) / _masked_std(teacher_target_embeds.detach(), t_mask))
    teacher_value = f32(projectors.t2s(teacher_value_in.to(projectors.t2s.weight.dtype)))
    t2s_hidden = torch.softmax(scores, dim=-1) @ teacher_value                           # [B, N, d]
    t2s_logits = t2s_hidden[s_mask] @ f32(student_lm_head.detach()).T                 # [n, V_s]
    gold = target_ids[s_mask].long()
    t2s_ce = torch.nn.functional.cross_entropy(t2s_logits, gold, reduction="sum")
    correct = t2s_logits.argmax(-1) == gold
    student_logp = torch.log_softmax(f32(student_logits[s_mask]) / temperature, dim=-1)
    t2s_logp = torch.log_softmax(t2s_logits.detach() / temperature, dim=-1)
    t2s_kd = (divergence(student_logp, t2s_logp, kl_variant, skew_lambda, adaptive_alpha) * correct).sum()

    # student -> teacher: values from the student's hidden states, compared in the teacher's vocabulary
    student_value = f32(projectors.s2t(student_hidden.to(projectors.s2t.weight.dtype)))
    s2t_hidden = torch.softmax(scores.transpose(1, 2), dim=-1) @ student_value             # [B, M, D]
    s2t_kd = head_forward_kl(s2t_hidden[t_mask], teacher_lm_head, select(teacher, t_mask), teacher_lm_head_bias,
                             temperature, vocab_chunk).sum()

    parts = {"t2s_ce": t2s_ce, "t2s_kd": t2s_kd, "s2t_kd": s2t_kd,
             "t2s_acc": f32(correct).sum().detach() / n_student.clamp_min(1)}
    if reduction == "sum":
        parts.update(n_student=n_student, n_teacher=n_teacher)
        return t2s_ce + t2s_kd + s2t_kd, parts
    if reduction != "mean":
        raise ValueError(f"reduction: expected 'mean' or 'sum', got {reduction!r}")
    s_den, t_den = n_student.clamp_min(1), n_teacher.clamp_min(1)
    parts.update(t2s_ce=t2s_ce / s_den, t2s_kd=t2s_kd / s_den, s2t_kd=s2t_kd / t_den)
    return parts["t2s_ce"] + parts["t2s_kd"] + parts["s2t_kd"], parts


def kd_term(student: dict, teacher: dict, views: list[str], heads, projectors, cfg):
    """L_KD of `--method dskd` (methods.py): t2s terms averaged over the views' student response tokens, s2t_kd
    over their teacher response tokens."""
    sums = {"t2s_ce": 0.0, "t2s_kd": 0.0, "s2t_kd": 0.0, "n_student": 0, "n_teacher": 0}
    for v in views:
        s, t = student[v], teacher[v]
        _, view_parts = dskd_loss(
            student_logits=s.logits, student_hidden=s.last,
            student_input_embeds=heads.student_embed_tokens[s.input_ids.clamp_min(0)],
            student_target_embeds=heads.student_embed_tokens[s.target_ids.clamp_min(0)], target_ids=s.target_ids,
            student_mask=s.mask, student_lm_head=heads.student_lm_head, teacher_hidden=t.hidden,
            teacher_input_embeds=heads.teacher_embed_tokens[t.input_ids.long()],
            teacher_target_embeds=heads.teacher_embed_tokens[t.target_ids.long()], teacher_mask=t.mask,
            teacher=t.dist, teacher_lm_head=heads.teacher_lm_head, teacher_lm_head_bias=heads.teacher_lm_head_bias,
            projectors=projectors["dskd"], kl_variant=cfg.kl_variant, temperature=cfg.kd_temperature,
            skew_lambda=cfg.skew_lambda, adaptive_alpha=cfg.adaptive_alpha, reduction="sum",
            vocab_chunk=cfg.vocab_chunk)
        for key in sums:
            sums[key] = sums[key] + view_parts[key]
    n_s, n_t = sums["n_student"].clamp_min(1), sums["n_teacher"].clamp_min(1)
    parts = {"kd/t2s_ce": sums["t2s_ce"] / n_s, "kd/t2s_kd": sums["t2s_kd"] / n_s, "kd/s2t_kd": sums["s2t_kd"] / n_t}
    return parts["kd/t2s_ce"] + parts["kd/t2s_kd"] + parts["kd/s2t_kd"], parts
