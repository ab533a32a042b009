"""Forward KL against the teacher when the *student side* also lives in the teacher's vocabulary.

DSKD's s2t term compares the teacher's distribution with softmax(s2t_hidden · W_tᵀ / τ), where W_t is
the teacher's LM head [V_t, D]. With V_t = 152k (Qwen2.5) and thousands of positions, [P, V_t] float32
logits would take gigabytes — twice (teacher and projected student), plus their gradients. This module
computes, per position,

    KL(p_t ‖ q),   q = softmax((h · W_tᵀ + b) / τ)

in vocabulary chunks, never holding more than [P, chunk] at a time, and forms the gradient with respect
to h during the forward pass:  dKL/dh = Σ_v (q_v − target_v) / τ · W_t[v]  (target_v = p_t(v)), so the
backward pass is a single multiply. Two passes over the vocabulary: the first finds the log-normalisers,
the second accumulates the KL and the gradient.

The teacher is exact (logits [P, V_t] or a `HeadTeacher`, whose logits are recomputed chunk by chunk) or a
`TopKTeacher`: then the KL is over the k + 1 buckets of losses/kl.py (the top-k tokens and the rest), and
target_v = q_v · p_rest / q_rest for the tokens in the rest bucket.
"""

from __future__ import annotations

import torch

from cot2align.losses.teacher import HeadTeacher, TopKTeacher, f32, tempered_buckets


def _teacher_chunk(teacher, start: int, stop: int) -> torch.Tensor:
    if isinstance(teacher, HeadTeacher):
        out = teacher.hidden.to(teacher.lm_head.dtype) @ teacher.lm_head[start:stop].T
        if teacher.bias is not None:
            out = out + teacher.bias[start:stop]
        return f32(out)
    return f32(teacher[:, start:stop])


def _student_chunk(hidden: torch.Tensor, weight: torch.Tensor, bias, start: int, stop: int) -> torch.Tensor:
    out = hidden @ weight[start:stop].T
    if bias is not None:
        out = out + bias[start:stop]
    return f32(out)


def _chunk_topk_layout(ids: torch.Tensor, start: int, stop: int):
    """Local column of each top-k id in this chunk, whether it falls in the chunk, and column coverage."""
    local = ids - start
    inside = (local >= 0) & (local < stop - start)
    local = local.clamp(0, stop - start - 1)
    covered = torch.zeros(ids.shape[0], stop - start, device=ids.device).scatter_add(-1, local, inside.float()) > 0
    return local, inside, covered


class _HeadForwardKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, teacher, temperature, chunk):
        rows = hidden.shape[0]
        vocab = weight.shape[0]
        need_grad = ctx.needs_input_grad[0]
        compute = hidden.to(weight.dtype)
        acc = f32(hidden).dtype            # float32 (float64 stays float64)
        neg_inf = torch.full((rows,), float("-inf"), device=hidden.device, dtype=acc)
        topk = isinstance(teacher, TopKTeacher)
        # pass 1: log-normalisers (and, for top-k, the student logits at the teacher's ids)
        lse_q, lse_t = neg_inf.clone(), neg_inf.clone()
        if topk:
            ids = teacher.ids.long()
            lse_rest = neg_inf.clone()
            q_top = torch.full(ids.shape, float("-inf"), device=hidden.device, dtype=acc)
        for start in range(0, vocab, chunk):
            stop = min(start + chunk, vocab)
            z_q = _student_chunk(compute, weight, bias, start, stop) / temperature
            lse_q = torch.logaddexp(lse_q, z_q.logsumexp(-1))
            if topk:
                local, inside, covered = _chunk_topk_layout(ids, start, stop)
                q_top = torch.where(inside, z_q.gather(-1, local), q_top)
                lse_rest = torch.logaddexp(lse_rest, z_q.masked_fill(covered, float("-inf")).logsumexp(-1))
            else:
                lse_t = torch.logaddexp(lse_t, (_teacher_chunk(teacher, start, stop) / temperature).logsumexp(-1))
        grad = torch.zeros(rows, weight.shape[1], device=hidden.device, dtype=acc) if need_grad else None
        if topk:
            t_logp = tempered_buckets(teacher, temperature)                       # [P, k+1]
            q_logp = torch.cat([q_top - lse_q[:, None], (lse_rest - lse_q)[:, None]], dim=-1)
            p = t_logp.exp()
            kl = torch.where(p > 0, p * (t_logp - q_logp), 0.0).sum(-1)
            # d/dz_v for v in the rest bucket: q_v − q_v · p_rest / q_rest
            rest_ratio = torch.where(p[:, -1] > 0, (t_logp[:, -1] - q_logp[:, -1]).exp(), 0.0)[:, None]
            p_top = p[:, :-1]
        else:
            kl = torch.zeros(rows, device=hidden.device, dtype=acc)
        # pass 2: the KL (exact form) and the gradient
        if need_grad or not topk:
            for start in range(0, vocab, chunk):
                stop = min(start + chunk, vocab)
                log_q = _student_chunk(compute, weight, bias, start, stop) / temperature - lse_q[:, None]
                q = log_q.exp()
                if topk:
                    local, inside, covered = _chunk_topk_layout(ids, start, stop)
                    target = torch.where(covered, 0.0, q * rest_ratio).scatter_add(-1, local, torch.where(inside, p_top, 0.0))
                else:
                    log_p = _teacher_chunk(teacher, start, stop) / temperature - lse_t[:, None]
                    p_chunk = log_p.exp()
                    kl = kl + torch.where(p_chunk > 0, p_chunk * (log_p - log_q), 0.0).sum(-1)
                    target = p_chunk
                if need_grad:
                    grad += ((q - target) / temperature).to(weight.dtype) @ weight[start:stop]
        ctx.save_for_backward(grad if need_grad else torch.empty(0))
        ctx.hidden_dtype = hidden.dtype
        return kl

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        grad_hidden = (grad_output[:, None].to(grad.dtype) * grad).to(ctx.hidden_dtype) if ctx.needs_input_grad[0] else None
        return grad_hidden, None, None, None, None, None


def head_forward_kl(hidden: torch.Tensor, lm_head: torch.Tensor, teacher, bias: torch.Tensor | None = None,
                    temperature: float = 1.0, chunk: int = 32768) -> torch.Tensor:
    """Per-row KL(teacher ‖ softmax((hidden · lm_headᵀ + bias)/τ)) [P], differentiable in `hidden` only.

    hidden [P, D]; lm_head [V_t, D] (held fixed); teacher: logits [P, V_t], HeadTeacher over [P] rows, or
    TopKTeacher over [P] rows. The teacher logits are divided by τ too.
    """
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=torch.float32)
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        return _HeadForwardKL.apply(hidden, lm_head.detach(), None if bias is None else bias.detach(), teacher,
                                    temperature, chunk)
