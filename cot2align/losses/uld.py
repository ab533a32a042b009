"""Universal Logit Distillation (Boizard et al. 2024) (README 'Methods').

Per example, the r-th response position of the student is paired with the r-th response position of
the teacher (both aligned from the first response token), for r < min(n_student, n_teacher): the longer
response is truncated. At each pair both distributions are softmax(z / τ) with τ = 1 by default, each is
sorted in descending order, the smaller vocabulary is zero-padded, and

    ULD = Σ_r |p_s^(r) − p_t^(r)|          (L1 over sorted ranks, summed over the vocabulary)

averaged over the paired positions (over the whole batch: every paired token has the same weight).

Teacher as full logits / `HeadTeacher` (exact), or `TopKTeacher`: then ranks 1..k are compared and the
ranks beyond k form one bucket on each side, |Σ_{r>k} p_s^(r) − tail mass|; with k = V_t this equals the
exact loss. (Axolotl's top-k ULD instead drops the tail mass.)

Deliberate differences from the references: DSKD's ULD keeps EOS on both sides and uses τ = 1 (as we do);
llm-recipes skips the student's EOS — here the caller's masks decide.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cot2align.losses.sorting import sort_descending
from cot2align.losses.teacher import HeadTeacher, TopKTeacher, f32, flatten, index_rows, tempered_buckets


def paired_positions(student_mask: torch.Tensor, teacher_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices (student [P], teacher [P]) of the r-th response position on each side, r < min(n_s, n_t).

    Indices are into the [B*N] and [B*M] flattened position axes; pairs are in (example, rank) order.
    """
    student_mask, teacher_mask = student_mask.bool(), teacher_mask.bool()
    n_pairs = torch.minimum(student_mask.sum(1), teacher_mask.sum(1))[:, None]
    s_keep = student_mask & (student_mask.cumsum(1) <= n_pairs)
    t_keep = teacher_mask & (teacher_mask.cumsum(1) <= n_pairs)
    return s_keep.flatten().nonzero().squeeze(1), t_keep.flatten().nonzero().squeeze(1)


def _sorted_teacher_probs(teacher, temperature: float) -> torch.Tensor:
    """Exact teacher probabilities at τ, sorted descending [P, V_t] (no gradient: the teacher is fixed)."""
    with torch.no_grad():
        logits = teacher.logits() if isinstance(teacher, HeadTeacher) else f32(teacher)
        return sort_descending(torch.softmax(logits / temperature, dim=-1))


def _l1_sorted(student_sorted: torch.Tensor, teacher_sorted: torch.Tensor) -> torch.Tensor:
    """Σ |s − t| over ranks after zero-padding the shorter vocabulary. [P, Vs], [P, Vt] -> [P]."""
    width = max(student_sorted.shape[-1], teacher_sorted.shape[-1])
    s = F.pad(student_sorted, (0, width - student_sorted.shape[-1]))
    t = F.pad(teacher_sorted, (0, width - teacher_sorted.shape[-1]))
    return (s - t).abs().sum(-1)


def _uld_topk(student_logits: torch.Tensor, teacher: TopKTeacher, temperature: float) -> torch.Tensor:
    k = teacher.ids.shape[-1]
    p_s = torch.softmax(f32(student_logits) / temperature, dim=-1)
    s_top = p_s.topk(min(k, p_s.shape[-1]), dim=-1).values
    s_rest = (1.0 - s_top.sum(-1)).clamp_min(0.0)
    t_probs = tempered_buckets(teacher, temperature).exp()
    return _l1_sorted(s_top, t_probs[:, :k]) + (s_rest - t_probs[:, k]).abs()


def uld_loss(student_logits: torch.Tensor, teacher, student_mask: torch.Tensor, teacher_mask: torch.Tensor,
             temperature: float = 1.0, reduction: str = "mean", row_chunk: int = 1024) -> torch.Tensor:
    """ULD between student logits [B,N,V_s] and a teacher over [B,M] positions (README 'Methods').

    teacher: logits [B,M,V_t], HeadTeacher (hidden [B,M,D]) or TopKTeacher ([B,M,k]).
    reduction "mean" (over paired positions) or "sum". Rows are processed `row_chunk` at a time so the
    sorted [P, V] float32 tensors of a large vocabulary never exist for all positions at once.
    """
    s_idx, t_idx = paired_positions(student_mask, teacher_mask)
    flat_student = student_logits.reshape(-1, student_logits.shape[-1])
    flat_teacher = flatten(teacher)
    total = student_logits.new_zeros((), dtype=torch.float32)
    for start in range(0, len(s_idx), row_chunk):
        s_rows = flat_student[s_idx[start:start + row_chunk]]
        t_rows = index_rows(flat_teacher, t_idx[start:start + row_chunk])
        if isinstance(t_rows, TopKTeacher):
            per_pair = _uld_topk(s_rows, t_rows, temperature)
        else:
            s_sorted = sort_descending(torch.softmax(f32(s_rows) / temperature, dim=-1))
            per_pair = _l1_sorted(s_sorted, _sorted_teacher_probs(t_rows, temperature))
        total = total + per_pair.sum()
    if reduction == "sum":
        return total
    if reduction != "mean":
        raise ValueError(f"reduction: expected 'mean' or 'sum', got {reduction!r}")
    return total / max(len(s_idx), 1)


def n_pairs(student_mask: torch.Tensor, teacher_mask: torch.Tensor) -> int:
    return int(torch.minimum(student_mask.bool().sum(1), teacher_mask.bool().sum(1)).sum())



def kd_term(student: dict, teacher: dict, views: list[str], heads, projectors, cfg):
    """L_KD of `--method uld` (methods.py): summed over the views, averaged over their paired positions."""
    total = sum(uld_loss(student[v].logits, teacher[v].dist, student[v].mask, teacher[v].mask, cfg.uld_temperature,
                         reduction="sum") for v in views)
    kd = total / max(sum(n_pairs(student[v].mask, teacher[v].mask) for v in views), 1)
    return kd, {"kd/uld": kd}
