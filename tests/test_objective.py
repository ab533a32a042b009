"""The assembled objective (1 − α)·CE + α·(L_KD + L_CCoT): dispatch, weighting, views, errors."""

import pytest
import torch

from cot2align.losses.ccot import ccot_loss
from cot2align.losses.kl import kl_loss
from cot2align.methods import METHODS
from cot2align.losses.objective import (Heads, StudentView, TeacherView, build_projectors, compact_rows,
                                        distillation_loss)
from cot2align.losses.uld import uld_loss

D_S, D_T, V_S, V_T = 6, 10, 11, 13


def make_views(seed, v_t=V_T, same_lengths=False):
    g = torch.Generator().manual_seed(seed)
    student, teacher = {}, {}
    for view, (length, rows) in {"std": (9, 5), "cot": (12, 8)}.items():
        s_mask = torch.zeros(2, length, dtype=torch.bool)
        s_mask[0, 3:8] = True
        s_mask[1, 2:6] = True
        t_mask = torch.zeros(2, rows, dtype=torch.bool)
        if same_lengths:
            t_mask[0, :5], t_mask[1, :4] = True, True
        else:
            t_mask[0, :rows], t_mask[1, :rows - 2] = True, True
        student[view] = StudentView(
            logits=torch.randn(2, length, V_S, generator=g, requires_grad=True),
            embed=torch.randn(2, length, D_S, generator=g), last=torch.randn(2, length, D_S, generator=g, requires_grad=True),
            input_ids=torch.randint(0, V_S, (2, length), generator=g),
            target_ids=torch.randint(0, V_S, (2, length), generator=g), mask=s_mask)
        teacher[view] = TeacherView(
            input_ids=torch.randint(0, v_t, (2, rows), generator=g), target_ids=torch.randint(0, v_t, (2, rows), generator=g),
            hidden=torch.randn(2, rows, D_T, generator=g), embed=torch.randn(2, rows, D_T, generator=g), mask=t_mask,
            dist=torch.randn(2, rows, v_t, generator=g),
            mined_rows=torch.where(s_mask, torch.randint(-1, rows - 2, (2, length), generator=g), -1))
    heads = Heads(student_embed_tokens=torch.randn(V_S, D_S, generator=g), student_lm_head=torch.randn(V_S, D_S, generator=g),
                  teacher_embed_tokens=torch.randn(v_t, D_T, generator=g), teacher_lm_head=torch.randn(v_t, D_T, generator=g),
                  stu2tea=torch.arange(V_S) % v_t, tea2stu=torch.arange(v_t) % V_S)
    return student, teacher, heads


def ce_of(student, views):
    total = sum(torch.nn.functional.cross_entropy(student[v].logits[student[v].mask], student[v].target_ids[student[v].mask],
                                                  reduction="sum") for v in views)
    return total / sum(student[v].mask.sum() for v in views)


def test_sft_is_plain_cross_entropy_and_alpha_zero_keeps_only_ce():
    student, teacher, heads = make_views(0)
    loss, logs = distillation_loss("sft", 0.7, student, None)
    assert torch.allclose(loss, ce_of(student, ["std"]))
    for method in ("uld", "mined", "dskd"):
        projectors = build_projectors(method, True, D_S, D_T)
        loss, _ = distillation_loss(method, 0.0, student, teacher, heads, projectors, cot2align=True)
        assert torch.allclose(loss, ce_of(student, ["std", "cot"]))


@pytest.mark.parametrize("method", ["uld", "mined", "dskd"])
@pytest.mark.parametrize("cot2align", [False, True])
def test_weighting_and_parts(method, cot2align):
    student, teacher, heads = make_views(1)
    torch.manual_seed(0)
    projectors = build_projectors(method, cot2align, D_S, D_T)
    alpha = 0.3
    loss, logs = distillation_loss(method, alpha, student, teacher, heads, projectors, cot2align=cot2align)
    views = ["std", "cot"] if cot2align else ["std"]
    ce = ce_of(student, views)
    kd = logs["kd"]
    expected = (1 - alpha) * ce + alpha * (kd + (logs["ccot"] if cot2align else 0.0))
    assert torch.allclose(loss, expected)
    assert torch.allclose(logs["ce"], ce)
    if method == "uld":   # L_KD = ULD summed over the views / paired positions of both views
        pairs = 0
        total = 0.0
        for v in views:
            n = int(torch.minimum(student[v].mask.sum(1), teacher[v].mask.sum(1)).sum())
            total = total + uld_loss(student[v].logits, teacher[v].dist, student[v].mask, teacher[v].mask) * n
            pairs += n
        assert torch.allclose(kd, total / pairs)
    if method == "dskd":
        assert torch.allclose(kd, logs["kd/t2s_ce"] + logs["kd/t2s_kd"] + logs["kd/s2t_kd"])
    if cot2align:       # L_CCoT from the compacted student response rows
        feats_s, feats_t = {}, {}
        for v in ("std", "cot"):
            embed, mask = compact_rows(student[v].embed, student[v].mask)
            last, _ = compact_rows(student[v].last, student[v].mask)
            feats_s[v] = {"embed": embed, "last": last, "mask": mask}
            feats_t[v] = {"embed": teacher[v].embed, "last": teacher[v].hidden, "mask": teacher[v].mask}
        per_example, _ = ccot_loss(feats_s, feats_t, projectors["ot"])
        assert torch.allclose(logs["ccot"], per_example.mean())
    loss.backward()
    assert student["std"].logits.grad is not None and torch.isfinite(student["std"].logits.grad).all()
    if cot2align:
        assert projectors["ot"].weight.grad is not None and student["cot"].last.grad is not None


def test_kl_with_shared_vocabulary_moves_teacher_rows_onto_student_positions():
    student, teacher, heads = make_views(2, v_t=V_S, same_lengths=True)
    loss, logs = distillation_loss("kl", 1.0, student, teacher, heads, build_projectors("kl", False, D_S, D_S))
    s, t = student["std"], teacher["std"]
    placed = torch.zeros_like(s.logits)
    placed[s.mask] = t.dist[t.mask]
    assert torch.allclose(loss, kl_loss(s.logits, placed, s.mask, "forward", 2.0))


def test_errors():
    student, teacher, heads = make_views(3)
    with pytest.raises(ValueError, match="method"):
        distillation_loss("dpo", 0.5, student, teacher, heads)
    with pytest.raises(ValueError, match="alpha"):
        distillation_loss("uld", 1.5, student, teacher, heads)
    with pytest.raises(ValueError, match="vocabulary|response lengths"):
        distillation_loss("kl", 0.5, student, teacher, heads)
    assert list(METHODS)[:5] == ["sft", "kl", "uld", "mined", "dskd"]


@pytest.mark.parametrize("method", ["uld", "mined", "dskd"])
def test_a_batch_without_cot_rows_stays_finite(method):
    """Records whose rationale was dropped as degenerate have an empty CoT view."""
    student, teacher, heads = make_views(4)
    student["cot"].mask = torch.zeros_like(student["cot"].mask)
    teacher["cot"].mask = torch.zeros_like(teacher["cot"].mask)
    projectors = build_projectors(method, True, D_S, D_T)
    loss, _ = distillation_loss(method, 0.5, student, teacher, heads, projectors, cot2align=True)
    loss.backward()
    assert torch.isfinite(loss)
    for p in [student["std"].logits, student["std"].last, *projectors.parameters()]:
        assert p.grad is None or torch.isfinite(p.grad).all()
