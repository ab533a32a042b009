"""MinED distillation loss (Wan et al. 2024, as DSKD's min_edit_dis_kld) (README 'Methods').

At every student response position s:
  * if the alignment (cot2align.align.mined.aligned_teacher_rows) gives a teacher row j, the target is the
    teacher's next-token distribution at j carried into the student vocabulary through the vocabulary map:
    student token v gets the teacher logit of its representative teacher token stu2tea[v]; student tokens
    with no teacher counterpart get probability 0;
  * otherwise the target is one-hot on the student's gold next token;

and the loss is the forward KL(target ‖ softmax(z_s / τ)) with the teacher logits also divided by τ
(τ = 2.0 in the reference scripts), averaged over the student response positions. A one-hot position
contributes −log softmax(z_s / τ)[gold].

Teacher as full logits / `HeadTeacher` (exact; only the mapped columns hidden · lm_head[stu2tea]ᵀ are
computed, never [P, V_t]) or `TopKTeacher`: the teacher's top-k tokens that represent a student token,
plus one bucket holding the rest of the mass on both sides (tail tempered as in losses/kl.py); with
k = V_t this equals the exact form.

Deliberate differences from DSKD: log-space −inf instead of −1e5 / +100 pseudo-logits (the same limits);
the representative of a student token prefers an exact-bytes match over the first teacher id.
"""

from __future__ import annotations

import torch

from cot2align.losses.kl import _kl
from cot2align.losses.teacher import HeadTeacher, TopKTeacher, f32, flatten, index_rows, tempered_buckets


def _padded(stu2tea: torch.Tensor, student_vocab: int) -> torch.Tensor:
    """stu2tea extended with -1 to the student model's vocabulary size (models pad their vocabularies)."""
    if len(stu2tea) >= student_vocab:
        return stu2tea[:student_vocab]
    return torch.cat([stu2tea, stu2tea.new_full((student_vocab - len(stu2tea),), -1)])


def _mapped_target_exact(teacher_rows, stu2tea: torch.Tensor, temperature: float) -> torch.Tensor:
    """Teacher log-probs at τ over the student vocabulary [P, V_s] (−inf where no counterpart)."""
    has_teacher = stu2tea >= 0
    columns = stu2tea[has_teacher]
    with torch.no_grad():
        if isinstance(teacher_rows, HeadTeacher):
            logits = teacher_rows.logits(columns)
        else:
            logits = f32(teacher_rows)[:, columns]
        target = logits.new_full((logits.shape[0], len(stu2tea)), float("-inf"))
        target[:, has_teacher] = logits / temperature
        return torch.log_softmax(target, dim=-1)


def _kl_topk(student_rows: torch.Tensor, teacher_rows: TopKTeacher, tea2stu: torch.Tensor, stu2tea: torch.Tensor,
             temperature: float) -> torch.Tensor:
    """Forward KL over buckets: the teacher's top-k tokens that represent a student token, and the rest."""
    ids = teacher_rows.ids.long()
    safe = ids.clamp(max=len(tea2stu) - 1)
    student_ids = torch.where(ids < len(tea2stu), tea2stu[safe], -1)
    keep = (student_ids >= 0) & (stu2tea[student_ids.clamp_min(0)] == ids)   # each student id once
    s_logp = torch.log_softmax(f32(student_rows) / temperature, dim=-1)
    gather_ids = student_ids.clamp_min(0)
    s_top = torch.where(keep, s_logp.gather(-1, gather_ids), float("-inf"))
    covered = torch.zeros_like(s_logp).scatter_add(-1, gather_ids, keep.to(s_logp.dtype)) > 0
    s_rest = s_logp.masked_fill(covered, float("-inf")).logsumexp(-1, keepdim=True)
    return _kl(tempered_buckets(teacher_rows, temperature, keep), torch.cat([s_top, s_rest], dim=-1))


def mined_loss(student_logits: torch.Tensor, target_ids: torch.Tensor, student_mask: torch.Tensor,
               teacher_rows: torch.Tensor, teacher, stu2tea: torch.Tensor, tea2stu: torch.Tensor | None = None,
               temperature: float = 2.0, reduction: str = "mean") -> torch.Tensor:
    """MinED KD over the student response positions.

    student_logits [B,N,V_s]; target_ids [B,N] (student gold next tokens); student_mask [B,N];
    teacher_rows [B,N] long: for each student position the aligned teacher position in [0, M), or −1;
    teacher over [B,M] positions (logits [B,M,V_t], HeadTeacher or TopKTeacher);
    stu2tea [≤V_s] representative teacher id per student id (−1 none); tea2stu [V_t] (top-k form only).
    """
    batch, n_student, vocab = student_logits.shape
    stu2tea = _padded(stu2tea.to(student_logits.device).long(), vocab)
    mask = student_mask.bool()
    aligned = mask & (teacher_rows >= 0)
    s_logp_all = student_logits.reshape(-1, vocab)
    flat_mask, flat_aligned = mask.reshape(-1), aligned.reshape(-1)
    total = student_logits.new_zeros((), dtype=torch.float32)

    # one-hot positions: −log p_s(gold) at τ
    one_hot = flat_mask & ~flat_aligned
    if one_hot.any():
        logp = torch.log_softmax(f32(s_logp_all[one_hot]) / temperature, dim=-1)
        total = total - logp.gather(-1, target_ids.reshape(-1)[one_hot, None].long()).sum()

    # aligned positions: KL(teacher mapped into the student vocabulary ‖ student)
    if flat_aligned.any():
        m_teacher = teacher.ids.shape[1] if isinstance(teacher, TopKTeacher) else (
            teacher.hidden.shape[1] if isinstance(teacher, HeadTeacher) else teacher.shape[1])
        batch_index = torch.arange(batch, device=teacher_rows.device)[:, None].expand(batch, n_student)
        flat_rows = (batch_index * m_teacher + teacher_rows.clamp_min(0)).reshape(-1)[flat_aligned]
        t_rows = index_rows(flatten(teacher), flat_rows)
        s_rows = s_logp_all[flat_aligned]
        if isinstance(t_rows, TopKTeacher):
            if tea2stu is None:
                raise ValueError("mined_loss: a top-k teacher needs tea2stu")
            per_row = _kl_topk(s_rows, t_rows, tea2stu.to(s_rows.device).long(), stu2tea, temperature)
        else:
            target = _mapped_target_exact(t_rows, stu2tea, temperature)
            per_row = _kl(target, torch.log_softmax(f32(s_rows) / temperature, dim=-1))
        total = total + per_row.sum()

    if reduction == "sum":
        return total
    return total / mask.sum().clamp_min(1)


def kd_term(student: dict, teacher: dict, views: list[str], heads, projectors, cfg):
    """L_KD of `--method mined` (methods.py): averaged over the views' response tokens."""
    if heads.stu2tea is None:
        raise ValueError("mined: needs the vocabulary map (heads.stu2tea)")
    total = sum(mined_loss(student[v].logits, student[v].target_ids, student[v].mask, teacher[v].mined_rows,
                           teacher[v].dist, heads.stu2tea, heads.tea2stu, cfg.kd_temperature, reduction="sum")
                for v in views)
    kd = total / sum(student[v].mask.sum() for v in views).clamp_min(1)
    return kd, {"kd/mined": kd}
