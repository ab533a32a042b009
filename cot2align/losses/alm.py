"""ALM: approximate likelihood matching over aligned chunks (Minixhofer, Vulić & Ponti 2025, "Cross-Tokenizer
Distillation via Approximate Likelihood Matching"; tokenkit `training/losses.py: compute_alm_loss`).

The two tokenisations of a response are cut into chunks whose ends are token boundaries on both sides
(align/chunks.py). A chunk's likelihood is the product of the probabilities of its realised tokens, so its
log-likelihood on each side is a sum over the chunk's tokens (the teacher's from the cache's `target_logprob`):

    ℓ_S(c) = Σ_{i ∈ c} log p_S(x_i | x_<i),        ℓ_T(c) = Σ_{j ∈ c} log p_T(y_j | y_<j)

Both are likelihoods of the same bytes given the same preceding text, so they are comparable. ALM compares them
through a *binarised* divergence: the chunk either is generated (probability p^{1/τ}) or not, and the two
Bernoulli distributions are compared with the KL divergence (the paper's binarised f-divergence with f = KL):

    u_T = min(ℓ_T, 0)/τ − ε,   u_S = min(ℓ_S, 0)/τ − ε,   a = e^{u_T},   b = e^{u_S}

    D(c) = a·(u_T − u_S) + (1 − a)·(log(1 − a) − log(1 − b))                                   (binary KL(a ‖ b))

    L_ALM = Σ_{b, c aligned} D(c) / #aligned chunks

with log(1 − e^u) computed as log1mexp(u) (log(−expm1 u) near 0, log1p(−e^u) below −ln 2) and ε = 1e-6 as in
tokenkit: shifting both sides by the same ε keeps the minimum at ℓ_S = ℓ_T and keeps 1 − b ≥ 1 − e^{−ε}, so a
student certain of a chunk (ℓ_S = 0 in float32) has a finite loss and gradient. At τ → ∞ the loss tends to
(|ℓ_T|/τ)·(r − 1 − log r) with r = ℓ_S/ℓ_T, i.e. the loss scales as 1/τ there.

Against tokenkit (the reference implementation, default `alm_diff_fn="binary_ce"`, `binarization_temp=100`):
  * tokenkit's binary_ce is −[a·log b + (1 − a)·log(1 − b)] = D(c) + H(a): the same gradients for the student, but
    ours is 0 when the likelihoods match (a divergence, not a cross-entropy).
  * the normaliser here counts each aligned chunk once. Tokenkit's `chunk_count` normaliser with chunk merging on
    counts merged chunks twice, and a fully merged sequence divides by zero (NaN); we divide by at least one.
  * every response token is scored, the first one (conditioned on the prompt) and the final EOS (its own chunk)
    included; tokenkit never scores token 0 and never aligns EOS.
  * not included: tokenkit's "append_space"/"merge_by_space_prob" debiasing, which adds the probability of a
    whitespace-led next token at each chunk's end — it needs the full next-token distribution at every chunk end,
    which the cache's `target_logprob` does not hold; the chunks here are the unconstrained ones.
  * our default τ is 1: the objective here is (1 − α)·CE + α·L_KD, and at tokenkit's τ = 100 the term's gradient is
    about 1/τ of CE's (tokenkit trains on ALM alone with Adam, where the scale does not matter). τ is a setting.
"""

from __future__ import annotations

import math

import torch

from cot2align.losses.teacher import HeadTeacher, TopKTeacher, f32

EPSILON = 1e-6
_LOG_HALF = -math.log(2.0)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − e^x) for x < 0, stable at both ends (Mächler 2012): log(−expm1 x) near 0, log1p(−e^x) below −ln 2."""
    near = x > _LOG_HALF
    return torch.where(near, torch.log(-torch.expm1(torch.where(near, x, -1.0))),
                       torch.log1p(-torch.exp(torch.where(near, -1.0, x))))


def chunk_loglik(logprobs: torch.Tensor, chunks: torch.Tensor, mask: torch.Tensor, n_chunks: int):
    """(Σ of the log-probs of each chunk's tokens [B, C], the number of its tokens [B, C]) via scatter_add; tokens
    outside the mask or with chunk −1 count nowhere."""
    keep = mask.bool() & (chunks >= 0)
    index = torch.where(keep, chunks, 0).long()
    values = torch.where(keep, logprobs, torch.zeros((), dtype=logprobs.dtype, device=logprobs.device))
    sums = values.new_zeros(values.shape[0], n_chunks).scatter_add(1, index, values)
    counts = torch.zeros(values.shape[0], n_chunks, dtype=torch.long, device=values.device).scatter_add(
        1, index, keep.long())
    return sums, counts


def binary_kl(teacher_loglik: torch.Tensor, student_loglik: torch.Tensor, temperature: float,
              epsilon: float = EPSILON) -> torch.Tensor:
    """D(c) of the module docstring, elementwise: KL(Bernoulli(a) ‖ Bernoulli(b)) with a = e^{u_T}, b = e^{u_S},
    u = min(ℓ, 0)/τ − ε."""
    u_t = teacher_loglik.clamp_max(0.0) / temperature - epsilon
    u_s = student_loglik.clamp_max(0.0) / temperature - epsilon
    a = torch.exp(u_t)
    return a * (u_t - u_s) + (-torch.expm1(u_t)) * (log1mexp(u_t) - log1mexp(u_s))


def alm_terms(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, student_chunks: torch.Tensor,
              teacher_chunks: torch.Tensor, student_mask: torch.Tensor, teacher_mask: torch.Tensor,
              temperature: float = 1.0, epsilon: float = EPSILON) -> tuple[torch.Tensor, torch.Tensor]:
    """(D(c) [B, C], aligned [B, C] bool): the binarised divergence of every chunk and whether the chunk has tokens on
    both sides (D is 0 where it has not).

    student_logprobs [B, L]: log p_S of the student's realised token at each position (its next token);
    teacher_logprobs [B, M]: the teacher's at each of its response rows; *_chunks: the chunk of each position
    (−1: none); *_mask: which positions count (the response rows)."""
    n_chunks = _n_chunks(student_chunks, teacher_chunks)
    dtype = torch.promote_types(f32(student_logprobs).dtype, f32(teacher_logprobs).dtype)
    l_s, n_s = chunk_loglik(student_logprobs.to(dtype), student_chunks, student_mask, n_chunks)
    l_t, n_t = chunk_loglik(teacher_logprobs.to(dtype), teacher_chunks, teacher_mask, n_chunks)
    aligned = (n_s > 0) & (n_t > 0)
    divergence = binary_kl(l_t, l_s, temperature, epsilon)
    return torch.where(aligned, divergence, torch.zeros((), dtype=dtype, device=divergence.device)), aligned


def _n_chunks(student_chunks: torch.Tensor, teacher_chunks: torch.Tensor) -> int:
    """At least 1: a batch whose view has no rows (no example kept a rationale) has padding positions of chunk −1,
    which the scatter sends to chunk 0 with weight 0 — that chunk must exist (it is aligned nowhere)."""
    top = [int(c.max()) for c in (student_chunks, teacher_chunks) if c.numel()]
    return max(top + [0]) + 1      # at least one (empty, unaligned) chunk: a view without rows scatters somewhere


def alm_loss(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, student_chunks: torch.Tensor,
             teacher_chunks: torch.Tensor, student_mask: torch.Tensor, teacher_mask: torch.Tensor,
             temperature: float = 1.0, reduction: str = "mean", epsilon: float = EPSILON) -> torch.Tensor:
    """L_ALM of the module docstring: "mean" over the aligned chunks of the batch (0 when there are none), or
    "sum" (divide by `aligned.sum()` of `alm_terms` yourself, e.g. over several views)."""
    divergence, aligned = alm_terms(student_logprobs, teacher_logprobs, student_chunks, teacher_chunks, student_mask,
                                    teacher_mask, temperature, epsilon)
    total = divergence.sum()
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / aligned.sum().clamp_min(1)
    raise ValueError(f"reduction: expected 'mean' or 'sum', got {reduction!r}")


def realised_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] at every position [..., V] -> [...], in at least float32."""
    logits = f32(logits)
    return logits.gather(-1, targets.long().clamp_min(0)[..., None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


@torch.no_grad()
def teacher_realised_logprobs(dist, targets: torch.Tensor, mask: torch.Tensor, rows_per_block: int = 256) -> torch.Tensor:
    """The teacher's log-prob of each realised token [B, M] recomputed from its distribution, for a cache written
    before `target_logprob` was stored: exact logits hidden · lm_headᵀ (+ bias) over the masked rows, a block of
    rows at a time (the full [rows, V_t] logits are never held whole), or a plain logits tensor. A top-k teacher
    cannot give it (the realised token may be outside the top-k)."""
    if isinstance(dist, TopKTeacher):
        raise ValueError("alm: the teacher's log-prob of each realised token is not in a top-k distribution; "
                         "needs the cache's target_logprob (rebuild the cache with cache-teacher)")
    out = torch.zeros(targets.shape, dtype=torch.float32, device=targets.device)
    where = mask.bool().nonzero(as_tuple=True)
    rows_targets = targets[where]
    if not isinstance(dist, HeadTeacher):
        return out.index_put_(where, realised_logprobs(dist[where], rows_targets).float())
    hidden = dist.hidden[where]
    values = []
    for start in range(0, hidden.shape[0], rows_per_block):
        block = HeadTeacher(hidden[start:start + rows_per_block], dist.lm_head, dist.bias)
        values.append(realised_logprobs(block.logits(), rows_targets[start:start + rows_per_block]))
    if values:
        out = out.to(values[0].dtype).index_put_(where, torch.cat(values))
    return out


def kd_term(student: dict, teacher: dict, views: list[str], heads, projectors, cfg):
    """The objective's L_KD for --method alm: L_ALM over the aligned chunks of every view in use (each chunk
    counted once, whichever view it is in), and its parts for logging.

    The teacher's log-probs are the cache's exact `target_logprob`; a cache written before that array existed
    gives them from its hidden states (hidden · lm_headᵀ, the exact logits; setup loads the hidden states then,
    or refuses --teacher-dist topk in one line)."""
    total, aligned_chunks = None, None
    for v in views:
        s, t = student[v], teacher[v]
        if t.student_chunks is None or t.teacher_chunks is None:
            raise ValueError("alm: the batch has no chunk alignment (student_chunks / teacher_chunks)")
        student_lp = realised_logprobs(s.logits, s.target_ids)
        teacher_lp = t.target_logprob
        if teacher_lp is None:
            if isinstance(t.dist, HeadTeacher) and t.dist.hidden is None:
                raise ValueError("alm: the teacher rows have neither target_logprob nor hidden states")
            teacher_lp = teacher_realised_logprobs(t.dist, t.target_ids, t.mask)
        divergence, aligned = alm_terms(student_lp, teacher_lp.detach(), t.student_chunks, t.teacher_chunks, s.mask,
                                        t.mask, cfg.alm_temperature)
        total = divergence.sum() if total is None else total + divergence.sum()
        aligned_chunks = aligned.sum() if aligned_chunks is None else aligned_chunks + aligned.sum()
    kd = total / aligned_chunks.clamp_min(1)
    return kd, {"kd/alm": kd}
