"""ULD, MinED, DSKD (and the chunked head KL they use) against slow float64 references; top-k k = V vs exact."""

import math

import pytest
import torch

from cot2align.losses.dskd import DSKDProjectors, cross_model_attention, dskd_loss
from cot2align.losses.head_kl import head_forward_kl
from cot2align.losses.kl import divergence, topk_buckets
from cot2align.losses.mined import mined_loss
from cot2align.losses.teacher import HeadTeacher, TopKTeacher
from cot2align.losses.uld import uld_loss


def topk_of(logits: torch.Tensor, k: int) -> TopKTeacher:
    logp = torch.log_softmax(logits.double(), dim=-1)
    values, ids = logp.topk(k, dim=-1)
    rest = logp.scatter(-1, ids, float("-inf")).logsumexp(-1)
    return TopKTeacher(values.to(logits.dtype), ids, rest.to(logits.dtype), logits.shape[-1])


def random_masks(batch, length, generator, min_true=1):
    mask = torch.rand(batch, length, generator=generator) > 0.3
    mask[:, :min_true] = True
    return mask


def softmax_list(row, tau=1.0):
    m = max(row)
    e = [math.exp((x - m) / tau) for x in row]
    return [x / sum(e) for x in e]


# ----------------------------------------------------------------------------- ULD

def slow_uld(student_logits, teacher_logits, s_mask, t_mask, tau=1.0):
    total, count = 0.0, 0
    for b in range(student_logits.shape[0]):
        s_pos = [i for i in range(s_mask.shape[1]) if s_mask[b, i]]
        t_pos = [j for j in range(t_mask.shape[1]) if t_mask[b, j]]
        for i, j in zip(s_pos, t_pos):                         # aligned from the first response token, truncated
            ps = sorted(softmax_list(student_logits[b, i].tolist(), tau), reverse=True)
            pt = sorted(softmax_list(teacher_logits[b, j].tolist(), tau), reverse=True)
            width = max(len(ps), len(pt))
            ps, pt = ps + [0.0] * (width - len(ps)), pt + [0.0] * (width - len(pt))
            total += sum(abs(a - c) for a, c in zip(ps, pt))
            count += 1
    return total / count


@pytest.mark.parametrize("v_s,v_t", [(7, 11), (13, 5), (9, 9)])
def test_uld_matches_slow_reference_and_gradcheck(v_s, v_t):
    g = torch.Generator().manual_seed(v_s * 100 + v_t)
    student = torch.randn(2, 6, v_s, generator=g, dtype=torch.float64) * 2
    teacher = torch.randn(2, 8, v_t, generator=g, dtype=torch.float64) * 2
    s_mask, t_mask = random_masks(2, 6, g), random_masks(2, 8, g)
    got = uld_loss(student, teacher, s_mask, t_mask)
    assert abs(got.item() - slow_uld(student, teacher, s_mask, t_mask)) < 1e-10
    student.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s: uld_loss(s, teacher, s_mask, t_mask, row_chunk=3), (student,))


def test_uld_exact_forms_and_topk_with_k_equal_vocab():
    g = torch.Generator().manual_seed(1)
    hidden, head = torch.randn(2, 5, 4, generator=g), torch.randn(9, 4, generator=g)
    bias = torch.randn(9, generator=g)
    student = torch.randn(2, 7, 12, generator=g)
    s_mask, t_mask = random_masks(2, 7, g), random_masks(2, 5, g)
    logits = hidden @ head.T + bias
    exact = uld_loss(student, logits, s_mask, t_mask)
    assert torch.allclose(uld_loss(student, HeadTeacher(hidden, head, bias), s_mask, t_mask), exact, atol=1e-6)
    assert torch.allclose(uld_loss(student, topk_of(logits, 9), s_mask, t_mask), exact, atol=1e-6)
    # top-k < V: ranks 1..k and one bucket for the rest on each side
    k = 3
    teacher = topk_of(logits, k)
    got = uld_loss(student.double(), teacher, s_mask, t_mask)
    total, count = 0.0, 0
    for b in range(2):
        s_pos = [i for i in range(7) if s_mask[b, i]]
        t_pos = [j for j in range(5) if t_mask[b, j]]
        for i, j in zip(s_pos, t_pos):
            ps = sorted(softmax_list(student[b, i].double().tolist()), reverse=True)
            pt = sorted(softmax_list(logits[b, j].double().tolist()), reverse=True)
            total += sum(abs(a - c) for a, c in zip(ps[:k], pt[:k])) + abs(sum(ps[k:]) - sum(pt[k:]))
            count += 1
    assert abs(got.item() - total / count) < 1e-6


# ----------------------------------------------------------------------------- chunked head KL

@pytest.mark.parametrize("chunk", [3, 64])
def test_head_forward_kl_exact_matches_full_computation(chunk):
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    head = torch.randn(11, 5, generator=g, dtype=torch.float64)
    bias = torch.randn(11, generator=g, dtype=torch.float64)
    teacher_hidden = torch.randn(6, 5, generator=g, dtype=torch.float64)
    tau = 2.0
    reference = torch.nn.functional.kl_div(torch.log_softmax((hidden @ head.T + bias) / tau, -1),
                                           torch.log_softmax((teacher_hidden @ head.T + bias) / tau, -1),
                                           log_target=True, reduction="none").sum(-1)
    for teacher in (HeadTeacher(teacher_hidden, head, bias), teacher_hidden @ head.T + bias):
        got = head_forward_kl(hidden, head, teacher, bias, tau, chunk)
        assert torch.allclose(got, reference, atol=1e-12)
        weights = torch.randn(6, dtype=torch.float64, generator=g)
        (grad,) = torch.autograd.grad((got * weights).sum(), hidden)
        (expected,) = torch.autograd.grad((reference * weights).sum(), hidden, retain_graph=True)
        assert torch.allclose(grad, expected, atol=1e-12)
    assert torch.autograd.gradcheck(lambda h: head_forward_kl(h, head, HeadTeacher(teacher_hidden, head, bias), bias, tau, chunk),
                                    (hidden,))


@pytest.mark.parametrize("k", [4, 11])
def test_head_forward_kl_topk_matches_bucket_reference(k):
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    head = torch.randn(11, 6, generator=g, dtype=torch.float64)
    teacher_logits = torch.randn(5, 11, generator=g, dtype=torch.float64) * 2
    teacher = topk_of(teacher_logits, k)
    tau = 2.0
    s_logp, t_logp = topk_buckets(hidden @ head.T, teacher, tau)
    reference = divergence(s_logp, t_logp, "forward")
    got = head_forward_kl(hidden, head, teacher, None, tau, chunk=4)
    assert torch.allclose(got, reference, atol=1e-12)
    (grad,) = torch.autograd.grad(got.sum(), hidden)
    (expected,) = torch.autograd.grad(reference.sum(), hidden)
    assert torch.allclose(grad, expected, atol=1e-10)
    if k == 11:
        exact = head_forward_kl(hidden, head, teacher_logits, None, tau, chunk=4)
        assert torch.allclose(got, exact, atol=1e-10)


# ----------------------------------------------------------------------------- MinED

def slow_mined(student_logits, target_ids, s_mask, rows, teacher_logits, stu2tea, tau):
    total, count = 0.0, 0
    for b in range(student_logits.shape[0]):
        for i in range(student_logits.shape[1]):
            if not s_mask[b, i]:
                continue
            ps = softmax_list(student_logits[b, i].tolist(), tau)
            j = int(rows[b, i])
            if j < 0:
                total += -math.log(ps[int(target_ids[b, i])])
            else:
                mapped = [v for v in range(len(stu2tea)) if stu2tea[v] >= 0]
                pt_sub = softmax_list([teacher_logits[b, j, int(stu2tea[v])].item() for v in mapped], tau)
                total += sum(p * (math.log(p) - math.log(ps[v])) for p, v in zip(pt_sub, mapped) if p > 0)
            count += 1
    return total / count


def mined_inputs(seed, v_s=9, v_t=12):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(2, 6, v_s, generator=g, dtype=torch.float64) * 2
    target_ids = torch.randint(0, v_s, (2, 6), generator=g)
    s_mask = random_masks(2, 6, g)
    rows = torch.randint(-1, 5, (2, 6), generator=g)
    teacher_logits = torch.randn(2, 5, v_t, generator=g, dtype=torch.float64) * 2
    tea2stu = torch.randint(0, v_s, (v_t,), generator=g)
    stu2tea = torch.full((v_s,), -1)
    for t in range(v_t - 1, -1, -1):
        stu2tea[tea2stu[t]] = t
    return student, target_ids, s_mask, rows, teacher_logits, tea2stu, stu2tea


def test_mined_matches_slow_reference_and_gradcheck():
    student, target_ids, s_mask, rows, teacher_logits, tea2stu, stu2tea = mined_inputs(4)
    got = mined_loss(student, target_ids, s_mask, rows, teacher_logits, stu2tea, temperature=2.0)
    assert abs(got.item() - slow_mined(student, target_ids, s_mask, rows, teacher_logits, stu2tea, 2.0)) < 1e-10
    student.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s: mined_loss(s, target_ids, s_mask, rows, teacher_logits, stu2tea), (student,))


def test_mined_head_and_topk_forms():
    student, target_ids, s_mask, rows, _, tea2stu, stu2tea = mined_inputs(5)
    g = torch.Generator().manual_seed(6)
    hidden, head = torch.randn(2, 5, 4, generator=g, dtype=torch.float64), torch.randn(12, 4, generator=g, dtype=torch.float64)
    logits = hidden @ head.T
    exact = mined_loss(student, target_ids, s_mask, rows, logits, stu2tea)
    assert torch.allclose(mined_loss(student, target_ids, s_mask, rows, HeadTeacher(hidden, head), stu2tea), exact)
    assert torch.allclose(mined_loss(student, target_ids, s_mask, rows, topk_of(logits, 12), stu2tea, tea2stu), exact,
                          atol=1e-10)
    # a smaller k stays finite and differentiable
    student.requires_grad_(True)
    loss = mined_loss(student, target_ids, s_mask, rows, topk_of(logits, 3), stu2tea, tea2stu)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()


# ----------------------------------------------------------------------------- DSKD

def dskd_inputs(seed, d=6, big_d=10, v_s=13, v_t=17, n=7, m=9, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype)  # noqa: E731
    inputs = dict(
        student_logits=randn(2, n, v_s), student_hidden=randn(2, n, d), student_input_embeds=randn(2, n, d),
        student_target_embeds=randn(2, n, d), target_ids=torch.randint(0, v_s, (2, n), generator=g),
        student_mask=random_masks(2, n, g, 2), student_lm_head=randn(v_s, d), teacher_hidden=randn(2, m, big_d),
        teacher_input_embeds=randn(2, m, big_d), teacher_target_embeds=randn(2, m, big_d),
        teacher_mask=random_masks(2, m, g, 2), teacher_lm_head=randn(v_t, big_d), teacher_lm_head_bias=randn(v_t))
    inputs["teacher"] = randn(2, m, v_t)
    torch.manual_seed(seed)
    projectors = DSKDProjectors(d, big_d).to(dtype)
    return inputs, projectors


def slow_dskd(x, proj, tau, variant="forward"):
    """Example by example over the real rows only, float64, straight from the definitions."""
    s_mask, t_mask = x["student_mask"], x["teacher_mask"]
    t_index = torch.cat([x["teacher_input_embeds"], x["teacher_target_embeds"]], -1)
    std_index = t_index[t_mask].std()
    std_hidden = x["teacher_hidden"][t_mask].std()
    std_target = x["teacher_target_embeds"][t_mask].std()
    t2s_ce = t2s_kd = s2t_kd = 0.0
    n_s, n_t = int(s_mask.sum()), int(t_mask.sum())
    for b in range(s_mask.shape[0]):
        si, ti = s_mask[b].nonzero().squeeze(1), t_mask[b].nonzero().squeeze(1)
        q = proj.query(torch.cat([x["student_input_embeds"][b, si], x["student_target_embeds"][b, si]], -1))
        k = t_index[b, ti] / std_index
        a = q @ k.T / math.sqrt(k.shape[-1])
        v_t = proj.t2s(x["teacher_hidden"][b, ti] / std_hidden + x["teacher_target_embeds"][b, ti] / std_target)
        t2s_logits = torch.softmax(a, -1) @ v_t @ x["student_lm_head"].T
        gold = x["target_ids"][b, si]
        t2s_ce = t2s_ce + torch.nn.functional.cross_entropy(t2s_logits, gold, reduction="sum")
        correct = t2s_logits.argmax(-1) == gold
        div = divergence(torch.log_softmax(x["student_logits"][b, si] / tau, -1),
                         torch.log_softmax(t2s_logits.detach() / tau, -1), variant)
        t2s_kd = t2s_kd + (div * correct).sum()
        s2t_logits = torch.softmax(a.T, -1) @ proj.s2t(x["student_hidden"][b, si]) @ x["teacher_lm_head"].T + x["teacher_lm_head_bias"]
        s2t_kd = s2t_kd + divergence(torch.log_softmax(s2t_logits / tau, -1),
                                     torch.log_softmax(x["teacher"][b, ti] / tau, -1), "forward").sum()
    return t2s_ce / n_s + t2s_kd / n_s + s2t_kd / n_t


@pytest.mark.parametrize("variant", ["forward", "skewed_reverse"])
def test_dskd_matches_slow_reference_values_and_gradients(variant):
    x, proj = dskd_inputs(7)
    x["student_logits"].requires_grad_(True)
    x["student_hidden"].requires_grad_(True)
    got, parts = dskd_loss(**x, projectors=proj, kl_variant=variant, temperature=2.0, vocab_chunk=5)
    params = [x["student_logits"], x["student_hidden"], *proj.parameters()]
    grads = torch.autograd.grad(got, params)
    reference = slow_dskd(x, proj, 2.0, variant)
    assert abs(got.item() - reference.item()) < 1e-10
    expected = torch.autograd.grad(reference, params)
    for a, b in zip(grads, expected):
        assert torch.allclose(a, b, atol=1e-9)
    assert set(parts) >= {"t2s_ce", "t2s_kd", "s2t_kd", "t2s_acc"}


def test_dskd_never_attends_to_padding():
    x, proj = dskd_inputs(8)
    base, _ = dskd_loss(**x, projectors=proj)
    noisy = dict(x)
    for key in ("student_hidden", "student_input_embeds", "student_target_embeds", "student_logits"):
        noisy[key] = torch.where(x["student_mask"][..., None], x[key], torch.randn_like(x[key]) * 50)
    for key in ("teacher_hidden", "teacher_input_embeds", "teacher_target_embeds", "teacher"):
        noisy[key] = torch.where(x["teacher_mask"][..., None], x[key], torch.randn_like(x[key]) * 50)
    changed, _ = dskd_loss(**noisy, projectors=proj)
    assert torch.allclose(base, changed, atol=1e-12)
    scores = cross_model_attention(torch.randn(2, 7, 20, dtype=torch.float64), torch.randn(2, 9, 20, dtype=torch.float64),
                                   x["student_mask"], x["teacher_mask"])
    weights = torch.softmax(scores, -1)
    real_rows = x["student_mask"]
    assert (weights[real_rows][~x["teacher_mask"][real_rows.nonzero()[:, 0]]] == 0).all()


def test_dskd_shapes_float32_and_topk_k_equals_vocab():
    x, proj = dskd_inputs(9, d=4, big_d=12, dtype=torch.float32)
    exact, _ = dskd_loss(**x, projectors=proj)
    teacher_logits = x.pop("teacher")
    topk, _ = dskd_loss(**x, teacher=topk_of(teacher_logits, teacher_logits.shape[-1]), projectors=proj)
    assert torch.allclose(exact, topk, atol=1e-5)
    hidden_form = HeadTeacher(x["teacher_hidden"], x["teacher_lm_head"], x["teacher_lm_head_bias"])
    by_head, _ = dskd_loss(**x, teacher=hidden_form, projectors=proj)
    with_logits, _ = dskd_loss(**x, teacher=hidden_form.logits(), projectors=proj)
    assert torch.allclose(by_head, with_logits, atol=1e-5) and torch.isfinite(by_head)


def test_dskd_with_no_rows_is_zero_and_keeps_gradients_finite():
    x, proj = dskd_inputs(10)
    x["student_mask"] = torch.zeros_like(x["student_mask"])
    x["student_logits"].requires_grad_(True)
    loss, parts = dskd_loss(**x, projectors=proj, reduction="sum")
    assert loss.item() == 0.0 and parts["n_student"] == 0
    total = loss + x["student_logits"].sum() * 0
    total.backward()
    assert torch.isfinite(x["student_logits"].grad).all()
