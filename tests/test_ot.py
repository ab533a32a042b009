"""Batched Sinkhorn against POT (one problem at a time, float64), OT alignment and Cross-CoT."""

import math

import numpy as np
import ot
import pytest
import torch

from cot2align.losses.ccot import ccot_loss
from cot2align.losses.ot import ot_alignment_loss, sinkhorn


def random_batch(seed, B=4, N=9, M=12, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    cost = torch.rand(B, N, M, generator=g) * scale
    n_real = [N, max(1, N - 3), 2, N - 1][:B]
    m_real = [M - 2, M, 3, max(1, M - 5)][:B]
    row_mask = torch.arange(N)[None, :] < torch.tensor(n_real)[:, None]
    col_mask = torch.arange(M)[None, :] < torch.tensor(m_real)[:, None]
    return cost, row_mask, col_mask, n_real, m_real


def pot_plan(cost_np, eps, n_iter=100000):
    n, m = cost_np.shape
    a, b = np.full(n, 1.0 / n), np.full(m, 1.0 / m)
    return ot.sinkhorn(a, b, cost_np, eps, method="sinkhorn_log", numItermax=n_iter, stopThr=1e-14)


@pytest.mark.parametrize("eps, scale", [(10.0, 1.0), (0.5, 1.0), (0.05, 1.0)])
def test_plan_and_value_match_pot_per_example(eps, scale):
    cost, rm, cm, n_real, m_real = random_batch(0, scale=scale)
    iters = {10.0: 50, 0.5: 300, 0.05: 3000}[eps]
    plan, value = sinkhorn(cost, rm, cm, epsilon=eps, n_iters=iters)
    for b in range(cost.shape[0]):
        c = cost[b, : n_real[b], : m_real[b]].double().numpy()
        ref = pot_plan(c, eps)
        got = plan[b, : n_real[b], : m_real[b]].double().numpy()
        assert np.allclose(got, ref, rtol=1e-6, atol=1e-6 * ref.max())
        ref_value = float((ref * c).sum())
        assert abs(value[b].item() - ref_value) <= 1e-6 * abs(ref_value) + 1e-7
        # padded entries are exactly zero
        assert torch.count_nonzero(plan[b, n_real[b]:, :]) == 0 and torch.count_nonzero(plan[b, :, m_real[b]:]) == 0


def test_envelope_gradient_is_the_plan_and_zero_on_padding():
    cost, rm, cm, n_real, m_real = random_batch(1)
    cost.requires_grad_(True)
    plan, value = sinkhorn(cost, rm, cm, epsilon=0.5, n_iters=300, grad="envelope")
    value.sum().backward()
    assert torch.equal(cost.grad, plan)
    pad = ~(rm[:, :, None] & cm[:, None, :])
    assert torch.count_nonzero(cost.grad[pad]) == 0
    # and the plan is the gradient of the entropic OT value (envelope theorem), checked with POT
    b = 0
    c = cost[b, : n_real[b], : m_real[b]].detach().double().clone().requires_grad_(True)
    n, m = c.shape
    res = ot.solve(c, torch.full((n,), 1.0 / n, dtype=torch.float64), torch.full((m,), 1.0 / m, dtype=torch.float64),
                   reg=0.5, max_iter=5000, tol=1e-14, grad="autodiff")
    res.value.backward()
    assert torch.allclose(c.grad, plan[b, :n, :m].double(), rtol=1e-5, atol=1e-7)


def test_unrolled_gradient_matches_pot_autodiff_of_the_linear_value():
    cost, rm, cm, n_real, m_real = random_batch(2, B=3)
    cost.requires_grad_(True)
    plan, value = sinkhorn(cost, rm, cm, epsilon=0.5, n_iters=400, grad="unrolled")
    value.sum().backward()
    pad = ~(rm[:, :, None] & cm[:, None, :])
    assert torch.count_nonzero(cost.grad[pad]) == 0
    for b in range(3):
        c = cost[b, : n_real[b], : m_real[b]].detach().double().clone().requires_grad_(True)
        n, m = c.shape
        a_w = torch.full((n,), 1.0 / n, dtype=torch.float64)
        b_w = torch.full((m,), 1.0 / m, dtype=torch.float64)
        ref_value = ot.sinkhorn2(a_w, b_w, c, 0.5, method="sinkhorn_log", numItermax=2000, stopThr=0.0)
        ref_value.backward()
        got = cost.grad[b, :n, :m].double()
        assert torch.allclose(got, c.grad, rtol=1e-4, atol=1e-6), (got - c.grad).abs().max()
        assert not torch.allclose(got, plan[b, :n, :m].double(), atol=1e-4)  # it is not the envelope gradient


def test_fully_masked_problems_give_zeros_not_nan():
    cost = torch.rand(3, 5, 6, requires_grad=True)
    rm = torch.tensor([[True] * 5, [False] * 5, [True] * 5])
    cm = torch.tensor([[True] * 6, [True] * 6, [False] * 6])
    for grad in ("envelope", "unrolled"):
        plan, value = sinkhorn(cost, rm, cm, epsilon=10.0, n_iters=20, grad=grad)
        value.sum().backward()
        assert torch.isfinite(plan).all() and torch.isfinite(cost.grad).all()
        assert value[1] == 0 and value[2] == 0 and torch.count_nonzero(plan[1:]) == 0
        assert torch.count_nonzero(cost.grad[1:]) == 0
        cost.grad = None


def test_float32_inside_under_bf16_autocast_and_marginals():
    cost, rm, cm, n_real, m_real = random_batch(3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plan, value = sinkhorn(cost.bfloat16(), rm, cm, epsilon=10.0, n_iters=100)
    assert plan.dtype == torch.float32 and value.dtype == torch.float32
    for b in range(cost.shape[0]):
        p = plan[b, : n_real[b], : m_real[b]]
        assert torch.allclose(p.sum(1), torch.full((n_real[b],), 1 / n_real[b]), atol=1e-6)
        assert torch.allclose(p.sum(0), torch.full((m_real[b],), 1 / m_real[b]), atol=1e-6)


@pytest.mark.slow
def test_compiled_path_is_numerically_the_same():
    cost, rm, cm, _, _ = random_batch(4, B=2, N=8, M=8)
    eager = sinkhorn(cost, rm, cm, epsilon=1.0, n_iters=30)
    compiled = sinkhorn(cost, rm, cm, epsilon=1.0, n_iters=30, compile=True)
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(compiled[1], eager[1], rtol=1e-5, atol=1e-7)


def slow_ot(x, y, projector, eps, iters=3000):
    """One example, float64, explicit softmax and POT: the obvious reference for L_OT."""
    yp = projector(y).double()
    scores = x.double() @ yp.T / math.sqrt(x.shape[-1])
    cost = 1 - torch.softmax(scores, dim=-1)
    n, m = cost.shape
    plan = ot.sinkhorn(torch.full((n,), 1.0 / n, dtype=torch.float64), torch.full((m,), 1.0 / m, dtype=torch.float64),
                       cost.detach(), eps, method="sinkhorn_log", numItermax=iters, stopThr=1e-14)
    return (plan * cost).sum()  # envelope: plan constant, gradient through the cost


def test_ot_alignment_loss_matches_slow_reference_values_and_gradients():
    torch.manual_seed(0)
    B, N, M, d, D = 3, 7, 10, 6, 8
    x = torch.randn(B, N, d, requires_grad=True)
    y = torch.randn(B, M, D, requires_grad=True)
    projector = torch.nn.Linear(D, d).double()
    smask = torch.arange(N)[None] < torch.tensor([7, 4, 1])[:, None]
    tmask = torch.arange(M)[None] < torch.tensor([10, 3, 6])[:, None]
    proj32 = torch.nn.Linear(D, d)
    proj32.load_state_dict({k: v.float() for k, v in projector.state_dict().items()})
    value, details = ot_alignment_loss(x, y, smask, tmask, proj32, epsilon=0.5, n_iters=500, return_details=True)
    value.sum().backward()
    for b in range(B):
        xb = x[b, : smask[b].sum()].detach().double().requires_grad_(True)
        yb = y[b, : tmask[b].sum()].detach().double().requires_grad_(True)
        ref = slow_ot(xb, yb, projector, 0.5)
        ref.backward()
        assert abs(value[b].item() - ref.item()) < 1e-5
        assert torch.allclose(x.grad[b, : smask[b].sum()].double(), xb.grad, atol=1e-5)
        assert torch.allclose(y.grad[b, : tmask[b].sum()].double(), yb.grad, atol=1e-5)
        assert torch.count_nonzero(x.grad[b, smask[b].sum():]) == 0
    assert torch.isfinite(details["gap_from_uniform"]).all()


def test_at_epsilon_10_the_plan_is_near_uniform():
    torch.manual_seed(1)
    x, y = torch.randn(1, 20, 8), torch.randn(1, 30, 8)
    mask_s, mask_t = torch.ones(1, 20, dtype=torch.bool), torch.ones(1, 30, dtype=torch.bool)
    value, details = ot_alignment_loss(x, y, mask_s, mask_t, torch.nn.Identity(), return_details=True)
    assert abs(details["gap_from_uniform"].item()) < 0.02 * value.item()
    assert abs(value.item() - (1 - 1 / 30)) < 0.05


def test_envelope_gradient_is_half_the_unrolled_one_near_uniform():
    """A property, not a bug (documented in losses/ot.py): with the attention cost every row of C sums to m − 1,
    so the uniform coupling's part of <T*, C> has no gradient, and near uniform (ε = 10) the remaining
    second-order part of the linear value <T*, C> (unrolled) is twice that of the entropic value (envelope):
    same direction, half the norm."""
    from cot2align.losses.ot import attention_cost

    torch.manual_seed(0)
    x0, y = torch.randn(4, 30, 64), torch.randn(4, 40, 64)
    rows, cols = torch.ones(4, 30, dtype=torch.bool), torch.ones(4, 40, dtype=torch.bool)
    grads = {}
    for mode in ("envelope", "unrolled"):
        x = x0.clone().requires_grad_(True)
        sinkhorn(attention_cost(x, y, cols), rows, cols, 10.0, 200, mode)[1].sum().backward()
        grads[mode] = x.grad.flatten()
    assert torch.nn.functional.cosine_similarity(grads["envelope"], grads["unrolled"], 0) > 0.99
    assert grads["envelope"].norm() / grads["unrolled"].norm() == pytest.approx(0.5, abs=0.01)


def test_ccot_equals_the_four_explicit_terms_over_two_layers():
    torch.manual_seed(2)
    B, d, D = 3, 5, 7
    lens = {"std": ([6, 4, 5], [8, 5, 3]), "cot": ([9, 0, 7], [11, 0, 4])}  # example 1 has no CoT view
    student, teacher = {}, {}
    for view, (ns, mt) in lens.items():
        N, M = max(ns), max(mt)
        student[view] = {"embed": torch.randn(B, N, d), "last": torch.randn(B, N, d),
                         "mask": torch.arange(N)[None] < torch.tensor(ns)[:, None]}
        teacher[view] = {"embed": torch.randn(B, M, D), "last": torch.randn(B, M, D),
                         "mask": torch.arange(M)[None] < torch.tensor(mt)[:, None]}
    projector = torch.nn.Linear(D, d)
    total, details = ccot_loss(student, teacher, projector, epsilon=10.0, n_iters=100)

    def ot_term(sv, tv, layer):
        return ot_alignment_loss(student[sv][layer], teacher[tv][layer], student[sv]["mask"], teacher[tv]["mask"],
                                 projector, epsilon=10.0, n_iters=100)

    expected = sum(ot_term("cot", "cot", L) + ot_term("std", "std", L) + ot_term("std", "cot", L) + ot_term("cot", "std", L)
                   for L in ("embed", "last")) / 4
    torch.testing.assert_close(total, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(total[1], (ot_term("std", "std", "embed") + ot_term("std", "std", "last"))[1] / 4)
    assert set(details) >= {"ot/cst_cot/embed", "ot/crc_cot_std/last", "ot_gap/cst_std/embed"}
