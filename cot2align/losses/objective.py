"""The training objective, assembled by method name (the paper's Eq. 16, DESIGN §5):

    L = (1 − α)·CE + α·(L_KD + w_OT·L_CCoT)

  * CE: the student's cross-entropy on its response tokens, averaged over the response tokens of the
    views in use (std only, or std + cot with CoT2Align);
  * L_KD by `method`: sft (none), kl, uld, mined, dskd — each summed over the views and averaged over their
    response tokens (DSKD's s2t term over teacher tokens, ULD over paired positions);
  * L_CCoT (only with cot2align=True): the Cross-CoT OT loss of losses/ccot.py, averaged over examples, with
    its weight w_OT (`ot_weight`, 1 in the paper); at w_OT = 0 the CoT view still joins CE and L_KD, and no
    transport problem is solved.

`method="sft"` without CoT2Align is plain CE (α unused). Everything is a function of tensors: the trainer
fills `StudentView`s from the student's forward and `TeacherView`s from the cache (or an online teacher).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from cot2align.config import identity, runtime
from cot2align.losses.ccot import ccot_loss
from cot2align.losses.dskd import DSKDProjectors, dskd_loss
from cot2align.losses.kl import kl_loss
from cot2align.losses.mined import mined_loss
from cot2align.losses.teacher import HeadTeacher, TopKTeacher, exact_logits_memory, flatten, index_rows
from cot2align.losses.uld import n_pairs, uld_loss

METHODS = ("sft", "kl", "uld", "mined", "dskd")


@dataclass
class LossConfig:
    """The objective's settings (built from DistillConfig's; field kinds as in config.py)."""

    kl_variant: str = identity("forward")        # the KL family member for kl and DSKD's t2s_kd
    kd_temperature: float = identity(2.0)        # τ of kl / mined / dskd (reference scripts); no τ² factor
    uld_temperature: float = identity(1.0)
    skew_lambda: float = identity(0.1)
    adaptive_alpha: float = identity(0.5)
    ot_epsilon: float = identity(10.0)
    ot_epsilon_scale: str = identity("absolute")  # absolute (the paper's ε) | relative (ε × each plan's cost std)
    ot_weight: float = identity(1.0)             # weight of L_CCoT (0: the CoT view's CE/KD without the transport)
    ot_iters: int = identity(100)
    ot_grad: str = identity("envelope")
    ot_compile: bool = runtime(False)            # torch.compile the Sinkhorn loop (GPU; shapes padded to multiples of 64)
    vocab_chunk: int = runtime(32768)            # vocabulary columns per chunk of the exact teacher distribution


@dataclass
class StudentView:
    """The student's forward on one view, over its full sequence [B, L]."""

    logits: torch.Tensor        # [B, L, V_s]
    embed: torch.Tensor         # [B, L, d] hidden_states[0]
    last: torch.Tensor          # [B, L, d] hidden_states[-1]
    input_ids: torch.Tensor     # [B, L]
    target_ids: torch.Tensor    # [B, L] the next token at each position
    mask: torch.Tensor          # [B, L] True at response positions (whose next token is a response token)


@dataclass
class TeacherView:
    """The teacher on one view, over its response rows [B, M] (padded), as the cache stores them."""

    input_ids: torch.Tensor     # [B, M]
    target_ids: torch.Tensor    # [B, M]
    hidden: torch.Tensor        # [B, M, D] last hidden state
    embed: torch.Tensor         # [B, M, D] embedding-layer feature (hidden_states[0])
    mask: torch.Tensor          # [B, M]
    dist: object                # logits [B,M,V_t] | HeadTeacher | TopKTeacher
    mined_rows: torch.Tensor | None = None   # [B, L] teacher row per student position, −1 = one-hot


@dataclass
class Heads:
    """Embedding tables and LM heads of both models (the teacher's from the cache's head.safetensors)."""

    student_embed_tokens: torch.Tensor
    student_lm_head: torch.Tensor
    teacher_embed_tokens: torch.Tensor | None = None
    teacher_lm_head: torch.Tensor | None = None
    teacher_lm_head_bias: torch.Tensor | None = None
    stu2tea: torch.Tensor | None = None      # MinED vocabulary map
    tea2stu: torch.Tensor | None = None


def build_projectors(method: str, cot2align: bool, student_dim: int, teacher_dim: int) -> nn.ModuleDict:
    """The trainable projectors the objective needs: DSKD's three and CoT2Align's OT projector P (D -> d)."""
    projectors = nn.ModuleDict()
    if method == "dskd":
        projectors["dskd"] = DSKDProjectors(student_dim, teacher_dim)
    if cot2align:
        projectors["ot"] = nn.Linear(teacher_dim, student_dim)
    return projectors


def teacher_arrays(method: str, cot2align: bool, teacher_dist: str = "exact") -> tuple[str, ...]:
    """The cached per-row teacher arrays the objective of `method` (± CoT2Align) reads — the loader decodes
    nothing else. Row ids give the masks (and DSKD's keys, by embedding lookup); the distribution is the
    exact one recomputed from `hidden` or the stored top-k + tail; DSKD's values and the OT features need the
    hidden states and the embedding-layer features (`embeds`, stored only for teachers whose embedding is not
    a plain lookup)."""
    if method not in METHODS:
        raise ValueError(f"method: expected one of {', '.join(METHODS)}, got {method!r}")
    if method == "sft" and not cot2align:
        return ()
    names = ["input_ids", "target_ids"]
    uses_features = method == "dskd" or cot2align
    if uses_features or (method != "sft" and teacher_dist == "exact"):
        names.append("hidden")
    if uses_features:
        names.append("embeds")
    if method != "sft" and teacher_dist == "topk":
        names += ["topk_ids", "topk_logprobs", "tail_logprob"]
    return tuple(names)


def compact_rows(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move the masked positions of each example to the front: [B, L, ...] -> [B, n_max, ...] and its mask."""
    mask = mask.bool()
    counts = mask.sum(1)
    width = int(counts.max()) if mask.numel() else 0
    out = x.new_zeros((x.shape[0], width, *x.shape[2:]))
    new_mask = torch.arange(width, device=x.device)[None, :] < counts[:, None]
    out[new_mask] = x[mask]
    return out, new_mask


def _ce_sum(view: StudentView) -> torch.Tensor:
    mask = view.mask.bool()
    return torch.nn.functional.cross_entropy(view.logits[mask].float(), view.target_ids[mask].long(), reduction="sum")


def _kd(method: str, views: list[str], student: dict, teacher: dict, heads: Heads, projectors, cfg: LossConfig):
    """L_KD averaged over the views' tokens, and its parts for logging."""
    parts: dict[str, torch.Tensor] = {}
    if method == "kl":
        total = sum(kl_loss(student[v].logits, teacher_dist_on_student(student[v], teacher[v]), student[v].mask,
                            cfg.kl_variant, cfg.kd_temperature, cfg.skew_lambda, cfg.adaptive_alpha)
                    * student[v].mask.sum() for v in views)
        kd = total / sum(student[v].mask.sum() for v in views).clamp_min(1)
        parts["kd/kl"] = kd
        return kd, parts
    if method == "uld":
        total = sum(uld_loss(student[v].logits, teacher[v].dist, student[v].mask, teacher[v].mask,
                             cfg.uld_temperature, reduction="sum") for v in views)
        kd = total / max(sum(n_pairs(student[v].mask, teacher[v].mask) for v in views), 1)
        parts["kd/uld"] = kd
        return kd, parts
    if method == "mined":
        if heads.stu2tea is None:
            raise ValueError("mined: needs the vocabulary map (heads.stu2tea)")
        total = sum(mined_loss(student[v].logits, student[v].target_ids, student[v].mask, teacher[v].mined_rows,
                               teacher[v].dist, heads.stu2tea, heads.tea2stu, cfg.kd_temperature, reduction="sum")
                    for v in views)
        kd = total / sum(student[v].mask.sum() for v in views).clamp_min(1)
        parts["kd/mined"] = kd
        return kd, parts
    if method == "dskd":
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
                reduction="sum", vocab_chunk=cfg.vocab_chunk)
            for key in sums:
                sums[key] = sums[key] + view_parts[key]
        n_s, n_t = sums["n_student"].clamp_min(1), sums["n_teacher"].clamp_min(1)
        parts = {"kd/t2s_ce": sums["t2s_ce"] / n_s, "kd/t2s_kd": sums["t2s_kd"] / n_s, "kd/s2t_kd": sums["s2t_kd"] / n_t}
        return parts["kd/t2s_ce"] + parts["kd/t2s_kd"] + parts["kd/s2t_kd"], parts
    raise ValueError(f"method: expected one of {', '.join(METHODS)}, got {method!r}")


def _exact_logits_memory(method: str, views: list[str], teacher: dict):
    """KL, ULD and MinED hold the exact teacher logits [rows, V_t] (and tensors of their size) whole; running out
    of memory there is one line naming their size (losses/teacher.py). DSKD goes through the vocabulary in chunks."""
    dists = [teacher[v].dist for v in views]
    if method == "dskd" or not all(isinstance(d, HeadTeacher) for d in dists):
        return nullcontext()
    return exact_logits_memory(dists[0].vocab_size, dists[0].hidden.device,
                               lambda: sum(int(teacher[v].mask.sum()) for v in views))


def teacher_dist_on_student(student: StudentView, teacher: TeacherView):
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


def distillation_loss(method: str, alpha: float, student: dict[str, StudentView], teacher: dict[str, TeacherView] | None,
                      heads: Heads | None = None, projectors: nn.ModuleDict | None = None, cot2align: bool = False,
                      config: LossConfig | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(1 − α)·CE + α·(L_KD + w_OT·L_CCoT) for `method` (DESIGN §5); returns the loss and detached parts for logging.

    student / teacher: {"std": view[, "cot": view]}. With cot2align the CoT view joins CE and KD and adds
    L_CCoT; without it only "std" is used.
    """
    if method not in METHODS:
        raise ValueError(f"method: expected one of {', '.join(METHODS)}, got {method!r}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha: expected a value in [0, 1], got {alpha}")
    cfg = config or LossConfig()
    views = ["std", "cot"] if cot2align else ["std"]
    n_tokens = sum(student[v].mask.sum() for v in views).clamp_min(1)
    ce = sum(_ce_sum(student[v]) for v in views) / n_tokens
    logs = {"ce": ce.detach()}
    if method == "sft" and not cot2align:
        return ce, logs
    if method == "sft":
        kd = ce.new_zeros(())
    else:
        with _exact_logits_memory(method, views, teacher):
            kd, parts = _kd(method, views, student, teacher, heads, projectors, cfg)
        logs.update({k: v.detach() for k, v in parts.items()})
        logs["kd"] = kd.detach()
    distill = kd
    if cot2align and cfg.ot_weight > 0:
        student_feats, teacher_feats = {}, {}
        for v in ("std", "cot"):
            embed, mask = compact_rows(student[v].embed, student[v].mask)
            last, _ = compact_rows(student[v].last, student[v].mask)
            student_feats[v] = {"embed": embed, "last": last, "mask": mask}
            dtype = projectors["ot"].weight.dtype
            teacher_feats[v] = {"embed": teacher[v].embed.to(dtype), "last": teacher[v].hidden.to(dtype),
                                "mask": teacher[v].mask}
        per_example, ot_logs = ccot_loss(student_feats, teacher_feats, projectors["ot"], cfg.ot_epsilon, cfg.ot_iters,
                                         cfg.ot_grad, cfg.ot_compile, cfg.ot_epsilon_scale)
        ccot = per_example.mean()
        logs.update(ot_logs)
        logs["ccot"] = ccot.detach()
        distill = distill + cfg.ot_weight * ccot
    loss = (1.0 - alpha) * ce + alpha * distill
    logs["loss"] = loss.detach()
    return loss, logs
