"""Batched entropic optimal transport (Sinkhorn) and the sequence-level OT alignment loss.

CoT2Align §3.2: for student features X [N, d] and teacher features Y [M, D] over response rows,

    C = 1 - softmax(X · P(Y)ᵀ / √d)          (softmax over the teacher rows; P: Linear(D -> d))
    T* = argmin_T <T, C> - ε·H(T)   s.t. T 1 = 1/N,  Tᵀ 1 = 1/M      (uniform masses)
    L_OT = <T*, C>

`sinkhorn` solves B such problems at once in the log domain, in float32 (even under bf16 autocast),
with padding as zero mass and a fixed number of iterations (no host synchronisation).

Gradients:
  * "envelope" (default): the plan is held constant, so d L_OT / dC = T*. This is the gradient of the
    *entropic* OT value (envelope theorem); it needs no memory for the iterations.
  * "unrolled": autograd through every iteration, as the authors' code does (it differentiates the
    linear value <T*(C), C>, including dT*/dC). Memory grows with the iteration count.
  With the attention cost below, every row of C sums to m − 1, so the uniform coupling's share of the value
  has no gradient; near uniform (ε = 10, the default) what remains is second order in C − mean(C), and it is
  twice as large in the linear value as in the entropic one: the envelope gradient points the same way as
  the unrolled one with half its norm (tests/test_ot.py). Choosing `envelope` at ε = 10 is therefore like
  halving the OT weight relative to the authors' code.

Calibrated ε (`epsilon_scale="relative"`). The attention cost lives in [0, 1] but barely moves: each row is 1 − a
softmax over M teacher rows, so its entries sit near 1 − 1/M and spread by about 1e-2 (standard deviation 1.4e-2
with a pretrained student, 7e-3 at random init, at step 0 on DialogSum; bench/ot_calibration.py). The plan depends
on C/ε only, so at ε = 10 the kernel exp(−C/ε) is flat to 1e-3 and the plan is the uniform coupling
(H(P)/H(uniform) = 1.0000 on every measured plan): the transport term then aligns nothing — under the uniform plan
its value is the constant (M − 1)/M, and what gradient it has is second order (above). An absolute ε small enough
to matter is no fix either: the spread differs from plan to plan and between regimes (at ε = 0.01 the measured
plans range from 0.68 to 1.0 of uniform, and the random-init student's are flatter than the pretrained one's).
With "relative", ε multiplies each plan's cost standard deviation, so ε is in units of the spread and the same ε
gives about the same sharpness everywhere: H(P)/H(uniform) = 0.95 at ε = 1, 0.82 at ε = 0.3 and 0.71 at ε = 0.1,
each within ±0.08 over the measured plans and the same in both regimes (at those sizes, N ≈ 71 student and M ≈ 28
teacher rows, no plan with uniform marginals scores below 0.56). The range (max − min) calibrates about as well on
these features, but it is set by the single most peaked softmax entry, so one outlier row would change the ε of
the whole plan; the standard deviation is the spread of all the entries the plan trades off. The spread is
detached — a scale of the problem, not something to train — and a relative ε leaves the value's units alone (the
loss stays <P, C> on the paper's cost), whereas normalising the cost would multiply the OT term's gradient by
1/spread (~100x). `ot_epsilon_scale: relative` with `ot_epsilon: 0.3` is the calibrated setting; `absolute` with
ε = 10 stays the default and reproduces the paper.

Deliberate differences from the authors' code (dskd_ot_rationale, `ETP`): log domain instead of the
kernel domain with +1e-9 guards; float32 masses instead of bf16; one batched solve instead of a Python
loop over examples; no early-stop check (fixed iterations, as their check rarely triggers at ε = 10).
Their defaults are ours: ε = 10 (kernel exp(-0.1·C)) and 100 iterations.
"""

from __future__ import annotations

import math

import torch

from cot2align.methods import OT_EPSILON_SCALES as EPSILON_SCALES
from cot2align.methods import OT_GRADS

# A finite "minus infinity": exp() of it is exactly 0 in float32, and log-sum-exps over lines that
# are entirely masked stay finite, so neither the forward nor the unrolled backward produces NaN.
_MASKED = -1e9


def _sinkhorn_potentials(log_kernel: torch.Tensor, log_kernel_t: torch.Tensor, log_a: torch.Tensor,
                         log_b: torch.Tensor, row_mask: torch.Tensor, col_mask: torch.Tensor, n_iters: int):
    """Fixed-point iterations of the log-domain Sinkhorn potentials f [B,N], g [B,M] (scaled by 1/ε).

    log_kernel = -C/ε with masked entries at _MASKED; log_kernel_t is its contiguous transpose so
    both reductions run over the contiguous dimension.
    """
    f = torch.zeros_like(log_a)
    g = torch.zeros_like(log_b)
    for _ in range(n_iters):
        f = torch.where(row_mask, log_a - torch.logsumexp(log_kernel + g[:, None, :], dim=2), 0.0)
        g = torch.where(col_mask, log_b - torch.logsumexp(log_kernel_t + f[:, None, :], dim=2), 0.0)
    return f, g


# The smallest cost spread a relative ε scales by: an attention cost is float32 near 1 (resolution 6e-8), so a
# spread below this is rounding noise; a problem whose real entries are all equal has a uniform plan at any ε.
_MIN_SPREAD = 1e-6

_compiled_potentials = None
_BUCKET = 64


def _potentials_fn(compile: bool):
    global _compiled_potentials
    if not compile:
        return _sinkhorn_potentials
    if _compiled_potentials is None:
        _compiled_potentials = torch.compile(_sinkhorn_potentials, dynamic=False)
    return _compiled_potentials


def uniform_log_mass(mask: torch.Tensor) -> torch.Tensor:
    """log(1/n) on the n unmasked entries of each row of `mask`, _MASKED elsewhere."""
    count = mask.sum(dim=-1, keepdim=True).clamp_min(1).to(torch.float32)
    return torch.where(mask, -torch.log(count), torch.full_like(count, _MASKED))


def cost_spread(cost: torch.Tensor, pair_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation [B] of each problem's real cost entries, detached (0 for an empty problem)."""
    c = cost.detach()
    count = pair_mask.sum(dim=(1, 2)).clamp_min(1)
    mean = (c * pair_mask).sum(dim=(1, 2)) / count
    var = (((c - mean[:, None, None]) ** 2) * pair_mask).sum(dim=(1, 2)) / count
    return mean, var.sqrt()


def sinkhorn(cost: torch.Tensor, row_mask: torch.Tensor, col_mask: torch.Tensor, epsilon: float = 10.0,
             n_iters: int = 100, grad: str = "envelope", compile: bool = False,
             epsilon_scale: str = "absolute") -> tuple[torch.Tensor, torch.Tensor]:
    """Entropic OT plans of B padded problems at once (README 'Methods').

    cost [B,N,M] float; row_mask [B,N], col_mask [B,M] bool (True = real row/column); uniform mass over
    the real rows and columns. Returns plan [B,N,M] (exactly zero on padded entries; all zero for a
    problem with no real rows or columns) and value [B] = <plan, cost>.

    epsilon_scale "absolute": ε as given, in the cost's own units (the paper's setting).
    "relative": each problem b is solved at ε_b = ε · std_b, std_b the standard deviation of its real cost
    entries (detached, floored at _MIN_SPREAD): ε is then in units of the cost's spread, so the same ε gives
    plans of the same sharpness whatever the cost's scale (see the module docstring for why the attention
    cost needs this). The kernel is built from the cost minus its mean, which leaves the plan unchanged
    (a constant shift of the cost only rescales the potentials) but keeps -C/ε_b small in float32.
    The value is <plan, cost> on the original cost either way.
    """
    if grad not in OT_GRADS:
        raise ValueError(f"grad: expected one of {', '.join(OT_GRADS)}, got {grad!r}")
    if epsilon_scale not in EPSILON_SCALES:
        raise ValueError(f"epsilon_scale: expected one of {', '.join(EPSILON_SCALES)}, got {epsilon_scale!r}")
    if cost.dim() != 3:
        raise ValueError(f"cost: expected [B, N, M], got shape {tuple(cost.shape)}")
    if compile and (cost.shape[1] % _BUCKET or cost.shape[2] % _BUCKET):
        # the compiled loop is specialised to its shape: pad N and M up to multiples of _BUCKET (padding is
        # zero mass, so the plan is unchanged) so that varying batch shapes reuse a few compiled graphs
        n, m = cost.shape[1], cost.shape[2]
        pad_n, pad_m = -n % _BUCKET, -m % _BUCKET
        plan, value = sinkhorn(torch.nn.functional.pad(cost, (0, pad_m, 0, pad_n)),
                               torch.nn.functional.pad(row_mask.bool(), (0, pad_n)),
                               torch.nn.functional.pad(col_mask.bool(), (0, pad_m)), epsilon, n_iters, grad, compile,
                               epsilon_scale)
        return plan[:, :n, :m], value
    row_mask, col_mask = row_mask.bool(), col_mask.bool()
    with torch.autocast(device_type=cost.device.type, enabled=False):
        cost32 = cost.float()
        pair_mask = row_mask[:, :, None] & col_mask[:, None, :]
        log_a, log_b = uniform_log_mass(row_mask), uniform_log_mass(col_mask)
        potentials = _potentials_fn(compile)
        if epsilon_scale == "relative":
            mean, std = cost_spread(cost32, pair_mask)
            shift, eps = mean[:, None, None], (epsilon * std.clamp_min(_MIN_SPREAD))[:, None, None]
        else:
            shift, eps = 0.0, epsilon

        def log_kernel_of(c):
            return torch.where(pair_mask, -(c - shift) / eps, torch.full_like(c, _MASKED))

        if grad == "envelope":
            with torch.no_grad():
                lk = log_kernel_of(cost32.detach())
                f, g = potentials(lk, lk.transpose(1, 2).contiguous(), log_a, log_b, row_mask, col_mask, n_iters)
                plan = torch.exp(lk + f[:, :, None] + g[:, None, :]) * pair_mask
            value = (plan * cost32).sum(dim=(1, 2))  # d value / d cost = plan
        else:
            lk = log_kernel_of(cost32)
            f, g = potentials(lk, lk.transpose(1, 2).contiguous(), log_a, log_b, row_mask, col_mask, n_iters)
            plan = torch.exp(lk + f[:, :, None] + g[:, None, :]) * pair_mask
            value = (plan * cost32).sum(dim=(1, 2))
    return plan, value


def plan_entropy(plan: torch.Tensor, pair_mask: torch.Tensor) -> torch.Tensor:
    """H(P) / H(uniform) [B] of each plan over its n·m real entries, detached, in [0, 1].

    1 is the uniform (independent) coupling, what ε = 10 gives on the attention cost. The plan's marginals
    are uniform, so H(P) ≥ max(log n, log m): a one-to-one plan between n = m rows scores 0.5, and no plan
    scores below max(log n, log m) / log(n·m). log(n·m) − H(P) is KL(P ‖ uniform), the plan's mutual
    information. A problem with a single real entry scores 1 (its only plan is uniform); one with none, 0.
    """
    p = plan.detach().double() * pair_mask
    total = p.sum(dim=(1, 2), keepdim=True)
    p = p / total.clamp_min(1e-300)
    entropy = -torch.xlogy(p, p).sum(dim=(1, 2))
    log_size = torch.log(pair_mask.sum(dim=(1, 2)).double())
    ratio = torch.where(log_size > 0, entropy / log_size.clamp_min(1e-300), (log_size == 0).double())
    return ratio.float().clamp(0.0, 1.0)


def attention_cost(student_feats: torch.Tensor, projected_teacher: torch.Tensor, teacher_mask: torch.Tensor) -> torch.Tensor:
    """C = 1 - softmax(X · Yᵀ / √d) over the real teacher rows, in float32. [B,N,d] x [B,M,d] -> [B,N,M]."""
    d = student_feats.shape[-1]
    with torch.autocast(device_type=student_feats.device.type, enabled=False):
        scores = torch.bmm(student_feats.float(), projected_teacher.float().transpose(1, 2)) / math.sqrt(d)
        scores = scores.masked_fill(~teacher_mask.bool()[:, None, :], _MASKED)
        return 1.0 - torch.softmax(scores, dim=-1)


def ot_alignment_loss(student_feats: torch.Tensor, teacher_feats: torch.Tensor, student_mask: torch.Tensor,
                      teacher_mask: torch.Tensor, projector: torch.nn.Module, epsilon: float = 10.0,
                      n_iters: int = 100, grad: str = "envelope", return_details: bool = False,
                      epsilon_scale: str = "absolute"):
    """Per-example L_OT [B] between student rows [B,N,d] and teacher rows [B,M,D] (README 'Methods').

    The teacher features go through `projector` (Linear(D -> d), shared by the layers in CoT2Align).
    With return_details, also returns {"plan", "cost", "gap_from_uniform"} where gap_from_uniform =
    L_OT - mean(C) over real entries: how far the plan is from the independent coupling (small at ε = 10).
    """
    cost = attention_cost(student_feats, projector(teacher_feats), teacher_mask)
    plan, value = sinkhorn(cost, student_mask, teacher_mask, epsilon, n_iters, grad, epsilon_scale=epsilon_scale)
    if not return_details:
        return value
    pair = student_mask.bool()[:, :, None] & teacher_mask.bool()[:, None, :]
    mean_cost = (cost.detach() * pair).sum((1, 2)) / pair.sum((1, 2)).clamp_min(1)
    return value, {"plan": plan, "cost": cost, "gap_from_uniform": value.detach() - mean_cost}
