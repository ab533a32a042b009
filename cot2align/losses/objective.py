"""The training objective, assembled by method name (the paper's Eq. 16):

    L = (1 − α)·CE + α·(L_KD + w_OT·L_CCoT)

  * CE: the student's cross-entropy on its response tokens, averaged over the response tokens of the
    views in use (std only, or std + cot with CoT2Align);
  * L_KD by `method`: the registered method's `kd_term` (methods.py; each in its own file of losses/), summed
    over the views and averaged over their response tokens (DSKD's s2t term over teacher tokens, ULD over paired
    positions); `sft` has none;
  * L_CCoT (only with cot2align=True): the Cross-CoT OT loss of losses/ccot.py, averaged over examples, with
    its weight w_OT (`ot_weight`, 1 in the paper); at w_OT = 0 the CoT view still joins CE and L_KD, and no
    transport problem is solved.

`method="sft"` without CoT2Align is plain CE (α unused). Everything is a function of tensors: the trainer
fills `StudentView`s from the student's forward and `TeacherView`s from the cache (or an online teacher).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn

from cot2align.losses.ccot import ccot_loss
from cot2align.losses.teacher import HeadTeacher, exact_logits_memory
from cot2align.methods import method as registered


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
    student_chunks: torch.Tensor | None = None   # [B, L] aligned chunk of each student row (align/chunks.py), −1 none
    teacher_chunks: torch.Tensor | None = None   # [B, M] aligned chunk of each teacher row, −1 none
    target_logprob: torch.Tensor | None = None   # [B, M] the teacher's log-probability of its realised token


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
    tables: dict = field(default_factory=dict)   # a method's own vocabulary tables (methods.py `vocab_tables`)


def build_projectors(method: str, cot2align: bool, student_dim: int, teacher_dim: int,
                     transport: bool = True) -> nn.ModuleDict:
    """The trainable projectors the objective needs: the method's own (DSKD's three, under "dskd"), and
    CoT2Align's OT projector P (D -> d) under "ot" when its OT term is on (`transport`: --ot-weight > 0)."""
    projectors = nn.ModuleDict()
    own = registered(method).build_projectors(student_dim, teacher_dim)
    if own is not None:
        projectors[method] = own
    if cot2align and transport:
        projectors["ot"] = nn.Linear(teacher_dim, student_dim)
    return projectors


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


def _exact_logits_memory(method, views: list[str], teacher: dict):
    """Methods that hold the exact teacher logits [rows, V_t] (and tensors of their size) whole: running out of memory
    there is one line naming their size (losses/teacher.py). DSKD goes through the vocabulary in chunks."""
    dists = [teacher[v].dist for v in views]
    if not method.whole_teacher_logits or not all(isinstance(d, HeadTeacher) for d in dists):
        return nullcontext()
    return exact_logits_memory(dists[0].vocab_size, dists[0].hidden.device,
                               lambda: sum(int(teacher[v].mask.sum()) for v in views))


def default_settings():
    """The loss settings of a run that sets none: DistillConfig's defaults (general defaults where a field waits
    for the paper's setting)."""
    from cot2align.config import DistillConfig

    return DistillConfig(kl_variant="forward")


def distillation_loss(method: str, alpha: float, student: dict[str, StudentView], teacher: dict[str, TeacherView] | None,
                      heads: Heads | None = None, projectors: nn.ModuleDict | None = None, cot2align: bool = False,
                      config=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(1 − α)·CE + α·(L_KD + w_OT·L_CCoT) for `method`; returns the loss and detached parts for logging.

    student / teacher: {"std": view[, "cot": view]}. With cot2align the CoT view joins CE and KD and adds
    L_CCoT; without it only "std" is used. `config`: the run's DistillConfig (the loss settings are its fields;
    default: default_settings()).
    """
    spec = registered(method)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha: expected a value in [0, 1], got {alpha}")
    cfg = config or default_settings()
    views = ["std", "cot"] if cot2align else ["std"]
    n_tokens = sum(student[v].mask.sum() for v in views).clamp_min(1)
    ce = sum(_ce_sum(student[v]) for v in views) / n_tokens
    logs = {"ce": ce.detach()}
    if spec.kd is None and not cot2align:
        return ce, logs
    if spec.kd is None:
        kd = ce.new_zeros(())
    else:
        with _exact_logits_memory(spec, views, teacher):
            kd, parts = spec.kd_term()(student, teacher, views, heads, projectors, cfg)
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
