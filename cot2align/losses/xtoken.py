"""X-Token: the projection KL of NeMo RL's cross-tokenizer distillation ("P-KL"; NVIDIA NeMo RL,
`nemo_rl/algorithms/loss/loss_functions.py: CrossTokenizerDistillationLossFn._compute_p_kl`, guide
`docs/guides/xtoken-off-policy-distillation.md`; paper "X-Token: Projection-Guided Cross-Tokenizer Knowledge
Distillation", 2026).

The student's next-token distribution is carried into the teacher's vocabulary by a fixed sparse projection W
[V_s, V_t] built from the two tokenizers (align/projection.py), and compared with the teacher's over chunks of
the response that both tokenisations cut at the same places (align/chunks.py). With τ the temperature:

    p_i = softmax(z^S_i / τ)                       student row i, over V_s
    K   = the k teacher tokens of largest max_j z^T_j over the batch's teacher rows (k = `xtoken_vocab_topk`)
    q_i = (p_i · W)[K]                             the projected student distribution on K
    ℓ_j = log_softmax(z^T_j[K] / τ)                teacher row j, renormalised within K

and for each chunk c, with S(c), T(c) its student and teacher rows (the rows whose *predicted* token lies in c):

    q̄_c = mean_{i ∈ S(c)} q_i,   q̂_c = q̄_c / (Σ_K q̄_c + 10⁻¹⁰)           (arithmetic mean of probabilities)
    ℓ̄_c = mean_{j ∈ T(c)} ℓ_j                                              (mean of log-probabilities)
    D(c) = Σ_{v ∈ K} e^{ℓ̄_c,v} · (ℓ̄_c,v − log(q̂_c,v + 10⁻¹⁰))

    L_XT = τ² · Σ_c D(c) / #chunks with rows on both sides

Taken from NeMo as it is, deliberately: the teacher's chunk target e^{ℓ̄_c} is the *unnormalised* geometric mean
of its rows' distributions. On a one-token chunk it is the teacher's distribution and D(c) a KL divergence; on a
longer chunk its mass s_c = Σ_v e^{ℓ̄_c,v} ≤ 1 is small when the chunk's teacher rows predict different tokens
(they usually do: the rows of "1", "2" of a split "12" predict "1" and then "2"), so D(c) is a KL weighted by s_c
plus s_c·log s_c ≤ 0 — such chunks weigh little, and the value can dip below zero. Normalising the target would
instead amplify them by 1/s_c. The vocabulary subset K (NeMo's memory device: only k columns of W and of the
teacher are ever formed) changes the loss, not only its cost: both sides are renormalised within K, and K depends
on the batch. K is chosen among the teacher rows that take part (NeMo's includes padded positions).

Differences from NeMo, each deliberate:
  * the chunks are align/chunks.py's: spans whose ends are token boundaries on both sides of the same text, so
    every chunk is an exact match; NeMo aligns by dynamic programming over canonicalised token strings, which
    also pairs spans of differently spelled text (not needed here: both sides tokenise the cache's own text);
  * the teacher's distribution may be the cache's top-k + tail (--teacher-dist topk): then K is chosen by the
    stored log-probs, and a row's value on a token of K outside its own top-k is its tail mass spread evenly
    over the V_t − k tokens it covers (the assumption of losses/teacher.py `tempered_buckets`);
  * NeMo weights this term against CE with its own kl_loss_weight / ce_loss_scale (or rescales it to CE's size
    each step); here it is L_KD in (1 − α)·CE + α·L_KD, like every method.
Not included: NeMo's gold-loss modes (KL on exactly mapped tokens + sorted L1 on the rest: GOLD's loss) and
reverse KL.
"""

from __future__ import annotations

import math

import torch

from cot2align.losses.teacher import HeadTeacher, TopKTeacher, f32, select, vocab_size_of

_EPS = 1e-10


def projection_columns(indices: torch.Tensor, weights: torch.Tensor, columns: torch.Tensor, teacher_vocab: int,
                       student_vocab: int) -> torch.Tensor:
    """W[:, columns]ᵀ as a sparse [K, student_vocab] matrix: the projection restricted to the chosen teacher tokens.

    indices [V, k] teacher ids (−1 = none) and weights [V, k] hold W's non-zero entries row by row; entries outside
    the models' vocabularies (a head padded past the tokenizer, or the reverse) are dropped."""
    position = torch.full((teacher_vocab,), -1, dtype=torch.long, device=indices.device)
    position[columns] = torch.arange(columns.numel(), device=indices.device)
    student_ids = torch.arange(indices.shape[0], device=indices.device)[:, None].expand_as(indices).reshape(-1)
    teacher_ids = indices.reshape(-1)
    inside = (teacher_ids >= 0) & (teacher_ids < teacher_vocab) & (student_ids < student_vocab)
    column = torch.where(inside, position[teacher_ids.clamp(0, teacher_vocab - 1)], -1)
    keep = column >= 0
    return torch.sparse_coo_tensor(torch.stack([column[keep], student_ids[keep]]), weights.reshape(-1)[keep],
                                   (columns.numel(), student_vocab), check_invariants=True).coalesce()


def _teacher_on_subset(teacher, vocab_topk: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(K [k] sorted teacher ids, ℓ [R, k] log-probs at τ renormalised within K) of a teacher over [R] rows."""
    if isinstance(teacher, TopKTeacher):
        vocab = teacher.vocab_size
        logprobs, ids = f32(teacher.logprobs), teacher.ids.long()
        importance = logprobs.new_full((vocab,), -math.inf).scatter_reduce(0, ids.reshape(-1), logprobs.reshape(-1),
                                                                             "amax")
        k = min(vocab_topk, int(torch.isfinite(importance).sum()))
        columns = torch.topk(importance, k).indices.sort().values
        n_rest = max(vocab - ids.shape[-1], 1)
        values = (f32(teacher.tail) - math.log(n_rest))[:, None].expand(-1, k).clone()
        position = torch.full((vocab,), -1, dtype=torch.long, device=ids.device)
        position[columns] = torch.arange(k, device=ids.device)
        where = position[ids]
        rows = torch.arange(ids.shape[0], device=ids.device)[:, None].expand_as(ids)
        values[rows[where >= 0], where[where >= 0]] = logprobs[where >= 0]
    else:
        logits = teacher.logits() if isinstance(teacher, HeadTeacher) else f32(teacher)
        k = min(vocab_topk, logits.shape[-1])
        columns = torch.topk(logits.max(dim=0).values, k).indices.sort().values
        values = logits[:, columns]
    return columns, torch.log_softmax(values / temperature, dim=-1)


def _chunk_means(rows: torch.Tensor, chunk: torch.Tensor, n_slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean of `rows` [R, K] per chunk slot [n_slots, K], rows per slot [n_slots])."""
    sums = rows.new_zeros(n_slots, rows.shape[-1]).index_add(0, chunk, rows)
    sizes = torch.zeros(n_slots, dtype=rows.dtype, device=rows.device).index_add(
        0, chunk, torch.ones_like(chunk, dtype=rows.dtype))
    return sums / (sizes[:, None] + _EPS), sizes


def xtoken_loss(student_logits: torch.Tensor, teacher, student_chunks: torch.Tensor, teacher_chunks: torch.Tensor,
                student_mask: torch.Tensor, teacher_mask: torch.Tensor, proj_indices: torch.Tensor,
                proj_weights: torch.Tensor, temperature: float = 1.0,
                vocab_topk: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """(τ²·Σ_c D(c) over the chunks with rows on both sides, their number) — see the module docstring.

    student_logits [B, L, V_s] with student_chunks / student_mask [B, L]; teacher: logits [B, M, V_t], HeadTeacher or
    TopKTeacher over [B, M] rows, with teacher_chunks / teacher_mask [B, M]; chunk id −1 = no chunk.
    proj_indices / proj_weights [V_s, k]: the projection W (align/projection.py)."""
    s_keep = student_mask.bool() & (student_chunks >= 0)
    t_keep = teacher_mask.bool() & (teacher_chunks >= 0)
    if not bool(s_keep.any()) or not bool(t_keep.any()):
        return student_logits.sum() * 0.0, torch.zeros((), dtype=torch.long, device=student_logits.device)
    n_chunks = int(torch.maximum(student_chunks.max(), teacher_chunks.max())) + 1
    n_slots = student_chunks.shape[0] * n_chunks
    batch_s = torch.arange(s_keep.shape[0], device=s_keep.device)[:, None].expand_as(s_keep)
    batch_t = torch.arange(t_keep.shape[0], device=t_keep.device)[:, None].expand_as(t_keep)
    s_slot = (batch_s * n_chunks + student_chunks)[s_keep].long()
    t_slot = (batch_t * n_chunks + teacher_chunks)[t_keep].long()

    columns, teacher_logprobs = _teacher_on_subset(select(teacher, t_keep), vocab_topk, temperature)
    probs = torch.softmax(f32(student_logits[s_keep]) / temperature, dim=-1)                  # [P, V_s]
    projection = projection_columns(proj_indices, proj_weights.to(probs.dtype), columns, vocab_size_of(teacher),
                                    probs.shape[-1])
    projected = torch.sparse.mm(projection, probs.T).T                                        # [P, K]

    student_chunk, s_sizes = _chunk_means(projected, s_slot, n_slots)
    teacher_chunk, t_sizes = _chunk_means(teacher_logprobs.to(probs.dtype), t_slot, n_slots)
    valid = (s_sizes > 0) & (t_sizes > 0)
    student_chunk = student_chunk[valid]
    student_log = torch.log(student_chunk / (student_chunk.sum(-1, keepdim=True) + _EPS) + _EPS)
    target = teacher_chunk[valid].detach()
    divergence = (target.exp() * (target - student_log)).sum(-1)
    return divergence.sum() * temperature ** 2, valid.sum()


def kd_term(student: dict, teacher: dict, views: list[str], heads, projectors, cfg):
    """The objective's L_KD for --method xtoken: Σ_c D(c) over the aligned chunks of the views in use, divided by
    their number (each view picks its own teacher-token subset K, as NeMo does per micro-batch)."""
    if heads is None or "projection_ids" not in heads.tables:
        raise ValueError("xtoken: needs the vocabulary projection (heads.tables, align/projection.py)")
    indices, weights = heads.tables["projection_ids"], heads.tables["projection_weights"]
    total, chunks = None, None
    for v in views:
        s, t = student[v], teacher[v]
        if t.student_chunks is None or t.teacher_chunks is None:
            raise ValueError("xtoken: the batch has no chunk alignment (student_chunks / teacher_chunks)")
        value, n = xtoken_loss(s.logits, t.dist, t.student_chunks, t.teacher_chunks, s.mask, t.mask, indices, weights,
                               cfg.xtoken_temperature, cfg.xtoken_vocab_topk)
        total = value if total is None else total + value
        chunks = n if chunks is None else chunks + n
    kd = total / chunks.clamp_min(1)
    return kd, {"kd/xtoken": kd}
