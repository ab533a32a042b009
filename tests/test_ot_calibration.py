"""The calibrated OT term: ε relative to each plan's cost spread, the OT weight, the plans' entropy in the logs."""

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import ot
import pytest
import torch

from cot2align.config import ConfigError, DistillConfig, build_config, field_kind
from cot2align.losses import ccot as ccot_module
from cot2align.losses.ccot import ccot_loss
from cot2align.losses.objective import build_projectors, default_settings, distillation_loss
from cot2align.losses.ot import attention_cost, ot_alignment_loss, plan_entropy, sinkhorn
from test_objective import D_S, D_T, make_views


def random_features(seed, B=3, N=24, M=30, d=16, D=20):
    """Student rows [B,N,d], teacher rows [B,M,D] with padding, and a projector, as at the start of a run."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(B, N, d, generator=g), torch.randn(B, M, D, generator=g)
    rows = torch.arange(N)[None] < torch.tensor([N, N - 7, 5])[:, None]
    cols = torch.arange(M)[None] < torch.tensor([M - 4, M, 9])[:, None]
    torch.manual_seed(seed)
    return x, y, rows, cols, torch.nn.Linear(D, d)


def ccot_inputs(seed, B=2, d=16, D=20):
    g = torch.Generator().manual_seed(seed)
    student, teacher = {}, {}
    for view, (n, m) in {"std": (20, 26), "cot": (30, 35)}.items():
        student[view] = {"embed": torch.randn(B, n, d, generator=g), "last": torch.randn(B, n, d, generator=g),
                         "mask": torch.arange(n)[None] < torch.tensor([n, n - 5])[:, None]}
        teacher[view] = {"embed": torch.randn(B, m, D, generator=g), "last": torch.randn(B, m, D, generator=g),
                         "mask": torch.arange(m)[None] < torch.tensor([m - 3, m])[:, None]}
    torch.manual_seed(seed)
    return student, teacher, torch.nn.Linear(D, d)


# ------------------------------------------------------------------------------------------- sharpness of the plans

def test_relative_epsilon_gives_plans_well_below_uniform_where_absolute_10_is_uniform():
    student, teacher, projector = ccot_inputs(0)
    _, paper = ccot_loss(student, teacher, projector, epsilon=10.0, n_iters=100)
    _, calibrated = ccot_loss(student, teacher, projector, epsilon=0.3, n_iters=200, epsilon_scale="relative")
    assert paper["ot/plan_entropy"] > 0.999                 # the paper's setting: the independent coupling
    assert calibrated["ot/plan_entropy"] < 0.9              # the same costs, ε in units of their spread
    # and the sharpness tracks ε: a smaller relative ε, a sharper plan
    _, sharper = ccot_loss(student, teacher, projector, epsilon=0.1, n_iters=300, epsilon_scale="relative")
    assert sharper["ot/plan_entropy"] < calibrated["ot/plan_entropy"] - 0.05


def test_relative_epsilon_does_not_depend_on_the_cost_scale():
    """The plan of C at relative ε is the plan of a·C + b (a > 0): the calibration is scale-free; absolute ε is not."""
    x, y, rows, cols, projector = random_features(1)
    with torch.no_grad():
        cost = attention_cost(x, projector(y), cols)
    plan, _ = sinkhorn(cost, rows, cols, 0.3, 400, epsilon_scale="relative")
    scaled, _ = sinkhorn(0.01 * cost + 0.5, rows, cols, 0.3, 400, epsilon_scale="relative")
    torch.testing.assert_close(scaled, plan, rtol=1e-3, atol=1e-7)
    flat, _ = sinkhorn(0.01 * cost, rows, cols, 0.3, 400)
    assert not torch.allclose(flat, plan, rtol=1e-2, atol=1e-5)


def test_the_absolute_default_is_bitwise_the_paper_setting():
    x, y, rows, cols, projector = random_features(2)
    cost = attention_cost(x, projector(y), cols).detach()
    default = sinkhorn(cost, rows, cols, 10.0, 100)
    explicit = sinkhorn(cost, rows, cols, 10.0, 100, epsilon_scale="absolute")
    assert torch.equal(default[0], explicit[0]) and torch.equal(default[1], explicit[1])


# --------------------------------------------------------------------- the calibrated term vs a slow float64 reference

def slow_relative_plan(cost, epsilon):
    """One problem in float64 with POT: ε_b = ε · (population) standard deviation of its entries."""
    c = cost.detach().double()
    n, m = c.shape
    reg = epsilon * float(c.std(unbiased=False))
    a, b = torch.full((n,), 1.0 / n, dtype=torch.float64), torch.full((m,), 1.0 / m, dtype=torch.float64)
    return ot.sinkhorn(a, b, c, reg, method="sinkhorn_log", numItermax=100000, stopThr=1e-13), reg


def test_relative_plan_and_value_match_pot_in_float64():
    torch.manual_seed(3)
    cost = torch.rand(3, 9, 12) * 0.02 + 0.97                 # the attention cost's scale: near 1, a small spread
    rows = torch.arange(9)[None] < torch.tensor([9, 6, 2])[:, None]
    cols = torch.arange(12)[None] < torch.tensor([10, 12, 3])[:, None]
    plan, value = sinkhorn(cost, rows, cols, 0.5, 2000, epsilon_scale="relative")
    for b in range(3):
        n, m = int(rows[b].sum()), int(cols[b].sum())
        ref, _ = slow_relative_plan(cost[b, :n, :m], 0.5)
        torch.testing.assert_close(plan[b, :n, :m].double(), ref, rtol=1e-4, atol=1e-7)
        ref_value = float((ref * cost[b, :n, :m].double()).sum())
        assert value[b].item() == pytest.approx(ref_value, rel=1e-6)
        assert torch.count_nonzero(plan[b, n:]) == 0 and torch.count_nonzero(plan[b, :, m:]) == 0


def test_relative_envelope_gradients_match_a_float64_reference():
    """Values and gradients (student rows, teacher rows, projector) of the calibrated L_OT, envelope gradient:
    the plan and its ε held constant, d L / d C = plan."""
    x, y, rows, cols, projector = random_features(4, N=8, M=11, d=6, D=7)
    x.requires_grad_(True)
    y.requires_grad_(True)
    value = ot_alignment_loss(x, y, rows, cols, projector, epsilon=0.3, n_iters=3000, epsilon_scale="relative")
    value.sum().backward()
    proj64 = torch.nn.Linear(7, 6).double()
    proj64.load_state_dict({k: v.double() for k, v in projector.state_dict().items()})
    weight_grad = torch.zeros_like(proj64.weight)
    for b in range(3):
        n, m = int(rows[b].sum()), int(cols[b].sum())
        xb = x[b, :n].detach().double().requires_grad_(True)
        yb = y[b, :m].detach().double().requires_grad_(True)
        proj64.zero_grad()
        cost = 1 - torch.softmax(xb @ proj64(yb).T / math.sqrt(6), dim=-1)
        plan, _ = slow_relative_plan(cost, 0.3)
        ref = (plan * cost).sum()
        ref.backward()
        weight_grad += proj64.weight.grad
        assert value[b].item() == pytest.approx(ref.item(), rel=1e-5)
        torch.testing.assert_close(x.grad[b, :n].double(), xb.grad, rtol=1e-3, atol=1e-6)
        torch.testing.assert_close(y.grad[b, :m].double(), yb.grad, rtol=1e-3, atol=1e-6)
        assert torch.count_nonzero(x.grad[b, n:]) == 0
    torch.testing.assert_close(projector.weight.grad.double(), weight_grad, rtol=1e-3, atol=1e-6)


def test_relative_unrolled_gradient_matches_pot_autodiff_with_the_spread_held_constant():
    torch.manual_seed(5)
    cost = (torch.rand(2, 7, 9) * 0.03 + 0.96).requires_grad_(True)
    rows, cols = torch.ones(2, 7, dtype=torch.bool), torch.ones(2, 9, dtype=torch.bool)
    _, value = sinkhorn(cost, rows, cols, 0.5, 800, grad="unrolled", epsilon_scale="relative")
    value.sum().backward()
    for b in range(2):
        c = cost[b].detach().double().clone().requires_grad_(True)
        reg = 0.5 * float(c.detach().std(unbiased=False))       # detached: a scale of the problem, not trained
        a_w, b_w = torch.full((7,), 1 / 7, dtype=torch.float64), torch.full((9,), 1 / 9, dtype=torch.float64)
        ot.sinkhorn2(a_w, b_w, c, reg, method="sinkhorn_log", numItermax=800, stopThr=0.0).backward()
        torch.testing.assert_close(cost.grad[b].double(), c.grad, rtol=2e-3, atol=1e-5)


def test_plan_entropy_against_its_definition():
    n, m = 5, 5
    pair = torch.ones(4, n, m, dtype=torch.bool)
    pair[3] = False
    pair[2] = False
    pair[2, 0, 0] = True                                        # one real entry: its only plan is uniform
    uniform = torch.full((n, m), 1.0 / (n * m))
    one_to_one = torch.eye(n) / n
    g = torch.Generator().manual_seed(0)
    random = torch.rand(n, m, generator=g, dtype=torch.float64)
    random = random / random.sum()
    plans = torch.stack([uniform, one_to_one, torch.zeros(n, m), torch.zeros(n, m)]).float()
    plans[2, 0, 0] = 1.0
    got = plan_entropy(plans, pair)
    assert got[0].item() == pytest.approx(1.0, abs=1e-6)
    assert got[1].item() == pytest.approx(0.5, abs=1e-6)         # log n / log(n·m)
    assert got[2].item() == 1.0 and got[3].item() == 0.0
    expected = float(-(random * random.log()).sum() / math.log(n * m))
    assert plan_entropy(random[None].float(), pair[:1])[0].item() == pytest.approx(expected, rel=1e-5)


# ------------------------------------------------------------------------------------------------------ the OT weight

def settings(**changes):
    return dataclasses.replace(default_settings(), **changes)


@pytest.mark.parametrize("method", ["sft", "dskd"])
def test_ot_weight_zero_keeps_the_cot_view_and_solves_no_transport(method, monkeypatch):
    student, teacher, heads = make_views(3)
    torch.manual_seed(0)
    projectors = build_projectors(method, True, D_S, D_T)
    full, full_logs = distillation_loss(method, 0.4, student, teacher, heads, projectors, cot2align=True)

    def no_sinkhorn(*args, **kwargs):
        raise AssertionError("Sinkhorn ran with ot_weight = 0")

    monkeypatch.setattr(ccot_module, "sinkhorn", no_sinkhorn)
    loss, logs = distillation_loss(method, 0.4, student, teacher, heads, projectors, cot2align=True,
                                   config=settings(ot_weight=0.0))
    assert not any(key.startswith("ot") or key == "ccot" for key in logs)
    torch.testing.assert_close(loss, full - 0.4 * full_logs["ccot"])           # exactly the loss without L_CCoT
    torch.testing.assert_close(logs["ce"], full_logs["ce"])                    # CE still over both views
    views = ["std", "cot"]
    n_tokens = sum(student[v].mask.sum() for v in views)
    assert n_tokens > student["std"].mask.sum()
    if method == "dskd":
        torch.testing.assert_close(logs["kd"], full_logs["kd"])                # KD still over both views
    loss.backward()
    assert student["cot"].logits.grad is not None and student["cot"].logits.grad.abs().sum() > 0


def test_ot_weight_zero_reads_no_hidden_states_and_builds_no_ot_projector():
    """Without transport the CoT view needs only what the method reads: a run reads no teacher hidden states or
    embeddings for OT, keeps no student hidden states for it, and trains no OT projector."""
    from cot2align.methods import needs_student_hidden, teacher_arrays

    assert {"hidden", "embeds"} <= set(teacher_arrays("mined", True, "topk"))
    assert not {"hidden", "embeds"} & set(teacher_arrays("mined", True, "topk", transport=False))
    assert "embeds" not in teacher_arrays("dskd", True, "exact", transport=False)
    assert needs_student_hidden("sft", True) and not needs_student_hidden("sft", True, transport=False)
    assert needs_student_hidden("dskd", True, transport=False)             # DSKD's own projection reads them
    assert "ot" in build_projectors("mined", True, D_S, D_T)
    assert "ot" not in build_projectors("mined", True, D_S, D_T, transport=False)
    assert set(build_projectors("dskd", True, D_S, D_T, transport=False)) == {"dskd"}


def test_ot_weight_scales_the_transport_term_only():
    student, teacher, heads = make_views(4)
    torch.manual_seed(0)
    projectors = build_projectors("dskd", True, D_S, D_T)
    full, logs = distillation_loss("dskd", 0.5, student, teacher, heads, projectors, cot2align=True)
    half, half_logs = distillation_loss("dskd", 0.5, student, teacher, heads, projectors, cot2align=True,
                                        config=settings(ot_weight=0.5))
    torch.testing.assert_close(half_logs["ccot"], logs["ccot"])
    torch.testing.assert_close(half, full - 0.5 * 0.5 * logs["ccot"])
    assert 0.0 <= float(logs["ot/plan_entropy"]) <= 1.0


# ---------------------------------------------------------------------------------------------- config, flags, run

def test_config_fields_are_identity_and_checked():
    assert field_kind(DistillConfig, "ot_epsilon_scale") == "identity"
    assert field_kind(DistillConfig, "ot_weight") == "identity"
    cfg = build_config(DistillConfig, cache="c", ot_epsilon_scale="relative", ot_weight=0.0)
    assert (cfg.ot_epsilon_scale, cfg.ot_weight) == ("relative", 0.0)
    with pytest.raises(ConfigError, match=r"ot.weight: expected a number >= 0, got -1"):
        build_config(DistillConfig, cache="c", ot_weight=-1.0)
    with pytest.raises(ConfigError, match=r"ot.epsilon.scale: expected one of absolute, relative, got 'std'"):
        build_config(DistillConfig, cache="c", ot_epsilon_scale="std").validate()


def test_the_flags_reach_the_config(tiny_cache):
    from click.testing import CliRunner

    from cot2align.cli import main

    result = CliRunner().invoke(main, ["distill", "--cache", str(tiny_cache), "--student", "tiny-mistral", "--ot-epsilon-scale", "relative",
                                       "--ot-weight", "0.5", "--ot-epsilon", "0.3", "--print-config"])
    assert result.exit_code == 0, result.output
    assert "ot_epsilon_scale: relative" in result.output and "ot_weight: 0.5" in result.output


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    from conftest import write_cot_records
    from cot2align.config import CacheTeacherConfig
    from cot2align.teacher.cache_pass import cache_teacher

    root = tmp_path_factory.mktemp("ot_calibration")
    data = write_cot_records(root / "data.jsonl", n=4, cot_every=1)
    cfg = build_config(CacheTeacherConfig, model="tiny-llama", data=str(data), out=str(root / "cache"), batch_tokens=4096)
    cache_teacher(cfg, log=lambda m: None)
    return root / "cache"


def test_a_run_logs_the_plans_entropy_per_step(tiny_cache, tmp_path):
    from cot2align.train.distill import distill

    def run(out, **kw):
        cfg = build_config(DistillConfig, cache=str(tiny_cache), student="tiny-mistral", out=str(out), method="sft",
                           cot2align=True, max_steps=2, batch_size=2, val_examples=1, val_max_new_tokens=2, **kw)
        distill(cfg, log=lambda m: None, progress=False)
        return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines() if '"lr"' in line]

    steps = run(tmp_path / "relative", ot_epsilon_scale="relative", ot_epsilon=0.3)
    assert len(steps) == 2 and all(0.0 < r["ot/plan_entropy"] < 0.95 for r in steps), steps
    assert "ot_epsilon_scale: relative" in (tmp_path / "relative" / "config.yaml").read_text()
    steps = run(tmp_path / "no_ot", ot_weight=0.0)
    assert len(steps) == 2 and not any("ccot" in r or "ot/plan_entropy" in r for r in steps)
    assert all(np.isfinite(r["loss"]) for r in steps)
