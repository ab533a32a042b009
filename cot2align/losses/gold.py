"""GOLD's off-policy loss: TRL's cross-tokenizer distillation (`trl/experimental/gold`, ULDLoss with
`use_extended_uld` and `uld_use_hybrid_loss`), fed from the cache — TRL's λ = 0: the dataset's responses.

Alignment. Both tokenisations of the same response are cut into chunks whose byte boundaries coincide
(align/chunks.py; TRL's `_align_by_byte_offsets`). Chunk c covers student rows i_1 < … < i_n and teacher rows
j_1 < … < j_m. Row i's distribution p(· | i) predicts the realised token y_i at that row (our rows are already
shifted that way: TRL's "bayesian" strategy; its default "observed" one reads p(y_i) off the row before).

Merge (the chain rule; trl issue #5152 and PR #5905, which corrected PR #4765). A chunk's rows become one row
over the vocabulary of its last row:

    q_s(v) = Π_{a<n} p_s(y_{i_a} | i_a) · p_s^τ(v | i_n) = π_s · p_s^τ(v | i_n),      v ∈ V_s

the probability that the chunk starts with its realised prefix y_{i_1} … y_{i_{n−1}} and goes on with v. π is
the probability of the realised prefix (at τ = 1: the teacher's is stored exactly in the cache), p^τ = softmax(z/τ)
the compared distribution. Same for the teacher (q_t, π_t). A merged row sums to π; the rest, ρ = 1 − π (the
chunk does not start with its realised prefix), is kept as one more event, so each side is a distribution.

Divergence per chunk (TRL's hybrid loss), U = the tokens that match exactly across the vocabularies (the map of
align/exact_tokens.py, u ↦ M(u)), ⊕ appending one bucket:

    D_match = JSD_β( [q_t(M(u))]_{u∈U} ⊕ r_t ,  [q_s(u)]_{u∈U} ⊕ r_s ),   r = 1 − Σ_{u∈U} q(u)  (all mass not in U)
    D_rest  = Σ_k | sort↓(q_s off U)_k − sort↓(q_t off M(U))_k |  +  | ρ_s − ρ_t |          (ULD, zero-padded)
    L_c     = w · D_match + (1 − w) · D_rest

JSD_β is GKD's generalised JSD, β·KL(t‖m) + (1−β)·KL(s‖m) with m = β·t + (1−β)·s, β = 0 meaning KL(t‖s) and
β = 1 KL(s‖t), as TRL's `generalized_jsd_loss`; w = |U| / (teacher tokenizer's tokens) (TRL's adaptive weight) or
fixed. L_KD = the mean of L_c over the batch's chunks paired on both sides.

Deliberate differences from TRL's code (trl 1.16.0 = main at the time of writing), each a bug or a choice:
  * The merge follows Bayes' rule with the correct shift (TRL: only under token_merge_strategy="bayesian").
  * Exact-match tokens are compared directly only in chunks of one token on both sides (`scope="one_token"`):
    there both rows condition on the same text and u is the same string on both sides. In a longer chunk the
    merged column u is P_s(prefix_s + u) on one side and P_t(prefix_t + u) on the other, two different strings
    (inside a minimal chunk the prefixes always differ), so a direct comparison would pull the probability of one
    string toward that of another; those chunks get ULD alone (U empty). `scope="all"` compares them as TRL does.
  * D_match is a divergence between distributions (the uncompared mass is one bucket on each side), in log
    space. TRL sums the JSD terms of the matched columns alone, floored at 1e-8 (a floored student entry gets
    no gradient), and its merged rows are not renormalised; at β = 0 or 1 that sum is a KL between partial
    vectors, which can be negative. ρ is compared directly; TRL drops it.
  * w counts the teacher tokenizer's tokens, not its head's (padded) rows, so it does not depend on padding.
  * The final EOS is kept, as its own chunk (EOS ↔ EOS is a matched pair by role); TRL skips both by default.
  * One τ for both sides; the mean over all chunks of the batch (TRL: per sequence, then over sequences).

A known limit: a SentencePiece side spells a response's first word with its dummy-prefix space
("▁The") where a byte-level side has "The"; the two make one chunk of one token each but not an exact pair, so
that chunk's exact-match term compares the two spellings' columns crosswise (`cot2align cache align-stats` shows
the share of responses whose first token matches exactly).

Teacher as logits / `HeadTeacher` (exact) or `TopKTeacher`: the teacher's top-k tokens are compared as above and
its mass outside the top-k (the tail, tempered as in losses/teacher.py) joins r_t in D_match and forms one bucket
in D_rest, compared with the student's unmatched mass beyond as many ranks as the teacher has unmatched top-k
tokens (as losses/uld.py does). With k = V_t both forms are the exact loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cot2align.methods import GOLD_SCOPES
import torch.nn.functional as F

from cot2align.losses.kl import _kl
from cot2align.losses.sorting import sort_descending
from cot2align.losses.teacher import HeadTeacher, TopKTeacher, f32, flatten, index_rows, tempered_buckets

SCOPES = GOLD_SCOPES     # written once, in the registry


# ----------------------------------------------------------------------------- chunks


@dataclass
class ChunkPairs:
    """The chunks present on both sides, in (example, chunk id) order."""

    student_last: torch.Tensor      # [P] flat row (into [B*L]) of each chunk's last student row
    teacher_last: torch.Tensor      # [P] flat row (into [B*M]) of each chunk's last teacher row
    student_log_prefix: torch.Tensor   # [P] log π_s: Σ log p_s(y) over the chunk's other student rows (τ = 1)
    teacher_log_prefix: torch.Tensor   # [P] log π_t
    one_token: torch.Tensor         # [P] bool: the chunk is one token on both sides


def _side_rows(chunks: torch.Tensor, mask: torch.Tensor, width: int):
    """For one side: its chunk rows (flat indices), their keys b·width + chunk, rows per key, the last row per key."""
    valid = mask.bool() & (chunks >= 0)
    rows = valid.flatten().nonzero().squeeze(1)
    batch_of_row = torch.div(rows, chunks.shape[1], rounding_mode="floor")
    keys = batch_of_row * width + chunks.flatten()[rows].long()
    n_keys = chunks.shape[0] * width
    count = torch.bincount(keys, minlength=n_keys)
    last = torch.full((n_keys,), -1, dtype=torch.long, device=chunks.device)
    last = last.scatter_reduce(0, keys, rows, reduce="amax", include_self=True)
    return rows, keys, count, last


def _prefix_rows(rows, keys, last, pair_of_key):
    """The rows that are not their chunk's last row, in paired chunks, and the pair each one belongs to."""
    keep = (pair_of_key[keys] >= 0) & (rows != last[keys])
    return rows[keep], pair_of_key[keys[keep]]


def _realised_logprob(logits_rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(z)[y] at τ = 1 for rows [R, V] and their realised tokens [R]."""
    logits_rows = f32(logits_rows)
    return logits_rows.gather(-1, targets[:, None].long()).squeeze(-1) - logits_rows.logsumexp(-1)


def _teacher_prefix_logprob(teacher_flat, rows, target_logprob_flat, targets_flat) -> torch.Tensor:
    """log p_t(y) at τ = 1 on teacher rows: the cached exact figure, or recomputed from exact logits."""
    if target_logprob_flat is not None:
        return f32(target_logprob_flat[rows])
    if isinstance(teacher_flat, TopKTeacher):
        raise ValueError("gold: a top-k teacher needs its exact log-probability of each realised token "
                         "(target_logprob): the top-k does not hold it when the token is outside the top-k")
    with torch.no_grad():
        picked = index_rows(teacher_flat, rows)
        logits = picked.logits() if isinstance(picked, HeadTeacher) else f32(picked)
        return _realised_logprob(logits, targets_flat[rows])


def pair_chunks(student_logits, student_targets, student_mask, student_chunks,
                teacher, teacher_targets, teacher_mask, teacher_chunks, teacher_target_logprob=None) -> ChunkPairs:
    """Pair the chunks of both sides and compute each one's realised-prefix log-probabilities (see the module doc).

    A chunk id present on one side only (a response cut by a length limit) is left out. Student prefix
    probabilities carry gradients; the teacher's do not.
    """
    device = student_chunks.device
    width = int(max(student_chunks.max() if student_chunks.numel() else -1,
                    teacher_chunks.max() if teacher_chunks.numel() else -1)) + 1
    width = max(width, 1)
    s_rows, s_keys, s_count, s_last = _side_rows(student_chunks, student_mask, width)
    t_rows, t_keys, t_count, t_last = _side_rows(teacher_chunks, teacher_mask.to(device), width)
    paired_keys = ((s_count > 0) & (t_count > 0)).nonzero().squeeze(1)
    pair_of_key = torch.full_like(s_count, -1)
    pair_of_key[paired_keys] = torch.arange(len(paired_keys), device=device)

    n_pairs = len(paired_keys)
    flat_logits = student_logits.reshape(-1, student_logits.shape[-1])
    prefix_rows, prefix_pair = _prefix_rows(s_rows, s_keys, s_last, pair_of_key)
    s_logp = _realised_logprob(flat_logits[prefix_rows], student_targets.reshape(-1)[prefix_rows])
    s_log_prefix = s_logp.new_zeros(n_pairs).index_add(0, prefix_pair, s_logp)

    prefix_rows, prefix_pair = _prefix_rows(t_rows, t_keys, t_last, pair_of_key)
    t_logp = _teacher_prefix_logprob(
        flatten(teacher), prefix_rows,
        None if teacher_target_logprob is None else teacher_target_logprob.reshape(-1),
        teacher_targets.reshape(-1))
    t_log_prefix = t_logp.new_zeros(n_pairs).index_add(0, prefix_pair, t_logp).detach()
    one_token = (s_count[paired_keys] == 1) & (t_count[paired_keys] == 1)
    return ChunkPairs(s_last[paired_keys], t_last[paired_keys], s_log_prefix, t_log_prefix, one_token)


# ----------------------------------------------------------------------------- divergences


def generalized_jsd(log_t: torch.Tensor, log_s: torch.Tensor, beta: float) -> torch.Tensor:
    """GKD's JSD_β over the last axis of two log-distributions; β = 0: KL(t‖s), β = 1: KL(s‖t) (TRL's convention)."""
    if beta == 0.0:
        return _kl(log_t, log_s)
    if beta == 1.0:
        return _kl(log_s, log_t)
    log_m = torch.logaddexp(log_t + math.log(beta), log_s + math.log1p(-beta))
    return beta * _kl(log_t, log_m) + (1.0 - beta) * _kl(log_s, log_m)


def _residual(log_prefix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ρ = 1 − π and log ρ (−inf where π = 1, with a zero rather than NaN gradient there)."""
    rho = -torch.expm1(log_prefix)
    positive = rho > 0
    log_rho = torch.where(positive, torch.log(torch.where(positive, rho, 1.0)), float("-inf"))
    return rho, log_rho


def _bucket(log_parts: list[torch.Tensor]) -> torch.Tensor:
    """log Σ exp over the last axis of several [P, ·] log-probability blocks -> [P, 1]."""
    return torch.cat(log_parts, dim=-1).logsumexp(-1, keepdim=True)


def _l1_sorted(student_sorted: torch.Tensor, teacher_sorted: torch.Tensor) -> torch.Tensor:
    """Σ |s − t| over ranks after zero-padding the shorter side. [P, a], [P, b] -> [P]."""
    width = max(student_sorted.shape[-1], teacher_sorted.shape[-1])
    s = F.pad(student_sorted, (0, width - student_sorted.shape[-1]))
    t = F.pad(teacher_sorted, (0, width - teacher_sorted.shape[-1]))
    return (s - t).abs().sum(-1)


def _exact_parts(log_qs, log_qt, log_rho_s, log_rho_t, s_cols, t_cols, beta):
    """(D_match, D_rest) [P] for merged log-rows log_qs [P, V_s], log_qt [P, V_t] (exact teacher).

    s_cols / t_cols: the matched columns, paired ([n] each, empty: no matched part)."""
    s_off = torch.ones(log_qs.shape[-1], dtype=torch.bool, device=log_qs.device)
    t_off = torch.ones(log_qt.shape[-1], dtype=torch.bool, device=log_qt.device)
    s_off[s_cols], t_off[t_cols] = False, False
    rho_gap = (log_rho_s.exp() - log_rho_t.exp()).abs()
    d_rest = _l1_sorted(sort_descending(log_qs[:, s_off].exp()), sort_descending(log_qt[:, t_off].exp())) + rho_gap
    if len(s_cols) == 0:
        return torch.zeros_like(d_rest), d_rest
    s_buckets = torch.cat([log_qs[:, s_cols], _bucket([log_qs[:, s_off], log_rho_s[:, None]])], dim=-1)
    t_buckets = torch.cat([log_qt[:, t_cols], _bucket([log_qt[:, t_off], log_rho_t[:, None]])], dim=-1)
    return generalized_jsd(t_buckets, s_buckets, beta), d_rest


def _topk_parts(log_qs, teacher_rows: TopKTeacher, log_pi_t, log_rho_s, log_rho_t, tea2stu, s_matched, temperature,
                beta):
    """(D_match, D_rest) [P] with a top-k teacher. tea2stu [≥ V_t tokens] the exact map's inverse (−1: none) or None;
    s_matched [V_s] the student columns that have an exact teacher partner."""
    k = teacher_rows.ids.shape[-1]
    buckets = tempered_buckets(teacher_rows, temperature) + log_pi_t[:, None]      # [P, k + 1]
    log_top, log_tail = buckets[:, :k], buckets[:, k:]
    ids = teacher_rows.ids.long()
    if tea2stu is None:
        partner = torch.full_like(ids, -1)
    else:
        partner = torch.where(ids < len(tea2stu), tea2stu[ids.clamp(max=len(tea2stu) - 1)], -1)
    matched = partner >= 0                                                             # [P, k]
    rho_gap = (log_rho_s.exp() - log_rho_t.exp()).abs()

    # D_rest: the teacher's unmatched top-k tokens rank by rank, then its tail against the student's remaining mass
    s_unmatched = log_qs if tea2stu is None else log_qs[:, ~s_matched]
    t_unmatched = sort_descending(torch.where(matched, 0.0, log_top.exp()))
    n_unmatched = (~matched).sum(-1, keepdim=True)                                    # [P, 1]
    s_top = sort_descending(s_unmatched.exp())[:, :k]
    s_top = F.pad(s_top, (0, k - s_top.shape[-1]))
    ranked = torch.arange(k, device=ids.device)[None, :] < n_unmatched
    s_ranked = torch.where(ranked, s_top, 0.0)
    s_beyond = (s_unmatched.logsumexp(-1).exp() - s_ranked.sum(-1)).clamp_min(0.0)
    d_rest = (s_ranked - t_unmatched).abs().sum(-1) + (s_beyond - log_tail[:, 0].exp()).abs() + rho_gap
    if tea2stu is None:
        return torch.zeros_like(d_rest), d_rest

    # D_match: the teacher's matched top-k tokens one by one, everything else in one bucket on each side
    s_pick = torch.where(matched, log_qs.gather(-1, partner.clamp_min(0)), float("-inf"))
    covered = torch.zeros_like(log_qs).scatter_add(-1, partner.clamp_min(0), matched.to(log_qs.dtype)) > 0
    s_rest = _bucket([log_qs.masked_fill(covered, float("-inf")), log_rho_s[:, None]])
    t_pick = torch.where(matched, log_top, float("-inf"))
    t_rest = _bucket([log_top.masked_fill(matched, float("-inf")), log_tail, log_rho_t[:, None]])
    d_match = generalized_jsd(torch.cat([t_pick, t_rest], -1), torch.cat([s_pick, s_rest], -1), beta)
    return d_match, d_rest


def _rows_parts(student_rows, teacher_rows, log_pi_s, log_pi_t, maps, temperature, beta):
    """(D_match, D_rest) for a block of paired chunks; maps = (s_cols, t_cols, tea2stu, s_matched) or None."""
    log_qs = torch.log_softmax(f32(student_rows) / temperature, dim=-1) + log_pi_s[:, None]
    _, log_rho_s = _residual(log_pi_s)
    _, log_rho_t = _residual(log_pi_t)
    if isinstance(teacher_rows, TopKTeacher):
        tea2stu, s_matched = (None, None) if maps is None else maps[2:]
        return _topk_parts(log_qs, teacher_rows, log_pi_t, log_rho_s, log_rho_t, tea2stu, s_matched, temperature, beta)
    with torch.no_grad():
        logits = teacher_rows.logits() if isinstance(teacher_rows, HeadTeacher) else f32(teacher_rows)
        log_qt = torch.log_softmax(logits / temperature, dim=-1) + log_pi_t[:, None]
    empty = torch.zeros(0, dtype=torch.long, device=log_qs.device)
    s_cols, t_cols = (empty, empty) if maps is None else maps[:2]
    return _exact_parts(log_qs, log_qt, log_rho_s, log_rho_t, s_cols, t_cols, beta)


def _exact_maps(stu2tea: torch.Tensor, student_vocab: int, teacher_vocab: int, device):
    """(s_cols, t_cols, tea2stu, s_matched) from the exact map stu2tea [V_s tokens] (−1: no partner).

    Entries beyond either model's head are dropped; student head rows beyond the map have no partner."""
    stu2tea = stu2tea.to(device).long()[:student_vocab]
    stu2tea = torch.where(stu2tea < teacher_vocab, stu2tea, -1)
    s_cols = (stu2tea >= 0).nonzero().squeeze(1)
    t_cols = stu2tea[s_cols]
    tea2stu = torch.full((teacher_vocab,), -1, dtype=torch.long, device=device)
    tea2stu[t_cols] = s_cols
    s_matched = torch.zeros(student_vocab, dtype=torch.bool, device=device)
    s_matched[s_cols] = True
    return s_cols, t_cols, tea2stu, s_matched


def gold_divergences(student_logits: torch.Tensor, student_targets: torch.Tensor, student_mask: torch.Tensor,
                     student_chunks: torch.Tensor, teacher, teacher_targets: torch.Tensor, teacher_mask: torch.Tensor,
                     teacher_chunks: torch.Tensor, stu2tea: torch.Tensor, teacher_target_logprob=None,
                     temperature: float = 1.0, beta: float = 0.5, scope: str = "one_token",
                     row_chunk: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """(D_match [P], D_rest [P]) of the module doc for every chunk paired on both sides, in (example, chunk) order.

    student_logits [B,L,V_s] with targets, mask and chunk ids [B,L] (−1: no chunk); the teacher over [B,M] rows
    (logits [B,M,V_t], HeadTeacher or TopKTeacher) with targets, mask and chunk ids [B,M]; stu2tea the exact-match
    map (student id -> teacher id, −1: none); teacher_target_logprob [B,M] the exact log p_t(y) at τ = 1 (needed
    for a top-k teacher, else recomputed from the exact logits). Rows are processed `row_chunk` chunks at a time.
    """
    if scope not in SCOPES:
        raise ValueError(f"gold scope: expected one of {', '.join(SCOPES)}, got {scope!r}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"gold beta: expected a value in [0, 1], got {beta}")
    pairs = pair_chunks(student_logits, student_targets, student_mask, student_chunks, teacher, teacher_targets,
                        teacher_mask, teacher_chunks, teacher_target_logprob)
    vocab_t = teacher.vocab_size if isinstance(teacher, (TopKTeacher, HeadTeacher)) else teacher.shape[-1]
    maps = _exact_maps(stu2tea, student_logits.shape[-1], vocab_t, student_logits.device)
    with_matched = torch.ones_like(pairs.one_token) if scope == "all" else pairs.one_token
    flat_student = student_logits.reshape(-1, student_logits.shape[-1])
    flat_teacher = flatten(teacher)
    n_pairs = len(pairs.student_last)
    dtype = torch.float64 if flat_student.dtype == torch.float64 else torch.float32
    d_match = flat_student.new_zeros(n_pairs, dtype=dtype)
    d_rest = d_match.clone()
    for group, group_maps in ((with_matched, maps), (~with_matched, None)):
        index = group.nonzero().squeeze(1)
        for start in range(0, len(index), row_chunk):
            block = index[start:start + row_chunk]
            match, rest = _rows_parts(flat_student[pairs.student_last[block]],
                                      index_rows(flat_teacher, pairs.teacher_last[block]),
                                      pairs.student_log_prefix[block], pairs.teacher_log_prefix[block], group_maps,
                                      temperature, beta)
            d_match = d_match.index_copy(0, block, match.to(d_match.dtype))
            d_rest = d_rest.index_copy(0, block, rest.to(d_rest.dtype))
    return d_match, d_rest


def gold_loss(student_logits, student_targets, student_mask, student_chunks, teacher, teacher_targets, teacher_mask,
              teacher_chunks, stu2tea, matched_weight: float, teacher_target_logprob=None, temperature: float = 1.0,
              beta: float = 0.5, scope: str = "one_token", reduction: str = "mean") -> torch.Tensor:
    """Σ or mean over paired chunks of w·D_match + (1 − w)·D_rest (module doc); w = `matched_weight`."""
    d_match, d_rest = gold_divergences(student_logits, student_targets, student_mask, student_chunks, teacher,
                                       teacher_targets, teacher_mask, teacher_chunks, stu2tea, teacher_target_logprob,
                                       temperature, beta, scope)
    total = (matched_weight * d_match + (1.0 - matched_weight) * d_rest).sum()
    if reduction == "sum":
        return total
    if reduction != "mean":
        raise ValueError(f"reduction: expected 'mean' or 'sum', got {reduction!r}")
    return total / max(len(d_match), 1)


def kd_term(student: dict, teacher: dict, views: list[str], heads, projectors, cfg):
    """L_KD of `--method gold` (methods.py): the mean over the views' paired chunks of w·D_match + (1 − w)·D_rest,
    w = the exact-match vocabulary's adaptive weight (shared tokens / teacher tokens) or cfg.gold_matched_weight."""
    if heads is None or "exact_stu2tea" not in heads.tables:
        raise ValueError("gold: needs the exact-match vocabulary (heads.tables, align/exact_tokens.py)")
    weight = heads.tables["exact_matched_weight"] if cfg.gold_weighting == "adaptive" else cfg.gold_matched_weight
    matched, rest, n_chunks = 0.0, 0.0, 0
    for v in views:
        s, t = student[v], teacher[v]
        if t.student_chunks is None or t.teacher_chunks is None:
            raise ValueError("gold: the batch has no chunk alignment (student_chunks / teacher_chunks)")
        d_match, d_rest = gold_divergences(
            s.logits, s.target_ids, s.mask, t.student_chunks, t.dist, t.target_ids, t.mask, t.teacher_chunks,
            heads.tables["exact_stu2tea"], t.target_logprob, cfg.gold_temperature, cfg.gold_beta, cfg.gold_scope)
        matched, rest, n_chunks = matched + d_match.sum(), rest + d_rest.sum(), n_chunks + len(d_match)
    matched, rest = matched / max(n_chunks, 1), rest / max(n_chunks, 1)
    kd = weight * matched + (1.0 - weight) * rest
    return kd, {"kd/gold_matched": matched, "kd/gold_unmatched": rest}
