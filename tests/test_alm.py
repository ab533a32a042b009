"""ALM (losses/alm.py) against a slow float64 reference, its edge cases, and the cache's `target_logprob`."""

import math

import numpy as np
import pytest
import torch

from conftest import online_teacher_views, write_cot_records
from cot2align.losses.alm import (alm_loss, alm_terms, binary_kl, log1mexp, realised_logprobs,
                                  teacher_realised_logprobs)
from cot2align.losses.teacher import HeadTeacher, TopKTeacher


def random_chunks(rng, n_tokens: int, n_chunks: int, cut: int) -> list[int]:
    """Non-decreasing chunk ids 0..n_chunks−1 (each chunk non-empty) over the first n_tokens − cut tokens, −1 after."""
    kept = n_tokens - cut
    starts = sorted(rng.choice(np.arange(1, kept), size=n_chunks - 1, replace=False).tolist()) if n_chunks > 1 else []
    ids = np.searchsorted(np.asarray(starts), np.arange(kept), side="right").tolist()
    return ids + [-1] * cut


def random_batch(seed: int, dtype=torch.float64):
    """Two examples with chunked student [B, L] and teacher [B, M] positions, padding masked out, a cut tail."""
    rng = np.random.default_rng(seed)
    L, M = 9, 12
    student_chunks = torch.full((3, L), -1, dtype=torch.long)
    teacher_chunks = torch.full((3, M), -1, dtype=torch.long)
    student_mask = torch.zeros(3, L, dtype=torch.bool)
    teacher_mask = torch.zeros(3, M, dtype=torch.bool)
    for b, (n_s, n_t, c, cut_s, cut_t) in enumerate([(8, 11, 5, 0, 2), (6, 6, 6, 0, 0), (9, 4, 3, 3, 0)]):
        student_chunks[b, :n_s] = torch.tensor(random_chunks(rng, n_s, c if cut_s == 0 else c - 1, cut_s))
        teacher_chunks[b, :n_t] = torch.tensor(random_chunks(rng, n_t, c, cut_t))
        student_mask[b, :n_s] = True
        teacher_mask[b, :n_t] = True
    # log-probs of realised tokens: mostly moderate, some near 0 (confident), one exactly 0
    student_lp = -torch.from_numpy(rng.exponential(1.0, (3, L))).to(dtype)
    teacher_lp = -torch.from_numpy(rng.exponential(1.0, (3, M))).to(dtype)
    student_lp[0, 0], teacher_lp[1, 2] = 0.0, -1e-9
    student_lp[~student_mask] = 7.0          # garbage where masked: must not count
    teacher_lp[~teacher_mask] = 7.0
    return student_lp, teacher_lp, student_chunks, teacher_chunks, student_mask, teacher_mask


def reference(student_lp, teacher_lp, student_chunks, teacher_chunks, student_mask, teacher_mask, tau, eps=1e-6):
    """Slow float64: loops over examples and chunks; log(1 − e^u) as log(−expm1(u)) (exact for every u < 0)."""
    total, count = 0.0, 0
    for b in range(student_lp.shape[0]):
        chunks = set(student_chunks[b][student_mask[b]].tolist()) & set(teacher_chunks[b][teacher_mask[b]].tolist())
        for c in sorted(chunks - {-1}):
            l_s = sum(student_lp[b, i] for i in range(student_lp.shape[1]) if student_mask[b, i] and student_chunks[b, i] == c)
            l_t = sum(teacher_lp[b, j] for j in range(teacher_lp.shape[1]) if teacher_mask[b, j] and teacher_chunks[b, j] == c)
            u_s = torch.clamp(l_s, max=0.0) / tau - eps
            u_t = torch.clamp(l_t, max=0.0) / tau - eps
            a, b_ = torch.exp(u_t), torch.exp(u_s)
            total = total + a * torch.log(a / b_) + (1 - a) * torch.log((-torch.expm1(u_t)) / (-torch.expm1(u_s)))
            count += 1
    return total / max(count, 1), count


@pytest.mark.parametrize("tau", [1.0, 2.5, 100.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_alm_equals_the_slow_reference_in_value_and_gradient(seed, tau):
    s_lp, t_lp, s_ch, t_ch, s_m, t_m = random_batch(seed)
    s1, t1 = s_lp.clone().requires_grad_(), t_lp.clone().requires_grad_()
    s2, t2 = s_lp.clone().requires_grad_(), t_lp.clone().requires_grad_()
    fast = alm_loss(s1, t1, s_ch, t_ch, s_m, t_m, tau)
    slow, count = reference(s2, t2, s_ch, t_ch, s_m, t_m, tau)
    assert count > 5
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-12)
    fast.backward()
    slow.backward()
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(t1.grad, t2.grad, rtol=1e-9, atol=1e-12)
    assert s1.grad[~s_m].abs().max() == 0 and s1.grad[s_ch < 0].abs().max() == 0
    # float32 (what training runs in) stays close to the float64 value
    fast32 = alm_loss(s_lp.float(), t_lp.float(), s_ch, t_ch, s_m, t_m, tau)
    torch.testing.assert_close(fast32.double(), slow.detach(), rtol=2e-4, atol=1e-6)
    divergence, aligned = alm_terms(s_lp, t_lp, s_ch, t_ch, s_m, t_m, tau)
    assert int(aligned.sum()) == count and (divergence >= -1e-15).all()
    assert torch.autograd.gradcheck(lambda x: alm_loss(x, t_lp, s_ch, t_ch, s_m, t_m, tau),
                                    (s_lp.clone().clamp_max(-1e-3).requires_grad_(),))


def test_matching_likelihoods_cost_nothing_and_the_gradient_is_tokenkits():
    """D = 0 with zero gradient when the chunk likelihoods agree; D ≥ 0; its student gradient equals that of
    tokenkit's binary cross-entropy −[a log b + (1 − a) log(1 − b)] (they differ by the teacher's entropy)."""
    l_t = torch.tensor([-0.01, -0.5, -3.0, -40.0], dtype=torch.float64)
    for tau in (1.0, 100.0):
        l_s = l_t.clone().requires_grad_()
        d = binary_kl(l_t, l_s, tau)
        d.sum().backward()
        assert d.abs().max() < 1e-12 and l_s.grad.abs().max() < 1e-9
        l_s = (l_t - torch.tensor([0.3, -0.2, 1.0, 5.0], dtype=torch.float64)).requires_grad_()
        d = binary_kl(l_t, l_s, tau)
        assert (d > 0).all()
        (grad_kl,) = torch.autograd.grad(d.sum(), l_s)
        u_t, u_s = l_t / tau - 1e-6, l_s / tau - 1e-6
        bce = -(torch.exp(u_t) * u_s + (-torch.expm1(u_t)) * torch.log(-torch.expm1(u_s)))
        (grad_bce,) = torch.autograd.grad(bce.sum(), l_s)
        torch.testing.assert_close(grad_kl, grad_bce, rtol=1e-10, atol=1e-14)


def test_edges_certain_chunks_nothing_aligned_and_one_merged_chunk():
    # log-likelihood exactly 0 on either side (float32): finite loss and gradient
    l = torch.zeros(1, 2, requires_grad=True)
    loss = alm_loss(l, torch.tensor([[0.0, -3.0]]), torch.tensor([[0, 1]]), torch.tensor([[0, 1]]),
                    torch.ones(1, 2, dtype=torch.bool), torch.ones(1, 2, dtype=torch.bool))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(l.grad).all() and l.grad[0, 1] > 0   # descent lowers p_S of chunk 1
    # nothing aligned (a chunk on one side only): 0, zero gradient, no NaN
    s = torch.full((2, 3), -1.0, requires_grad=True)
    loss = alm_loss(s, torch.full((2, 2), -1.0), torch.tensor([[0, 0, -1], [-1, -1, -1]]),
                    torch.tensor([[-1, -1], [0, 0]]), torch.ones(2, 3, dtype=torch.bool), torch.ones(2, 2, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and s.grad.abs().max() == 0
    # one chunk merging every token of both sides is counted once (tokenkit's normaliser counts it twice / NaN)
    s_lp = torch.tensor([[-0.2, -0.3, -0.5]], dtype=torch.float64)
    t_lp = torch.tensor([[-0.4, -0.1]], dtype=torch.float64)
    loss = alm_loss(s_lp, t_lp, torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 2, dtype=torch.long),
                    torch.ones(1, 3, dtype=torch.bool), torch.ones(1, 2, dtype=torch.bool))
    torch.testing.assert_close(loss, binary_kl(torch.tensor(-0.5, dtype=torch.float64),
                                               torch.tensor(-1.0, dtype=torch.float64), 1.0))


def test_log1mexp_is_stable():
    """Against 50-digit arithmetic (mpmath comes with torch, through sympy)."""
    import mpmath

    mpmath.mp.dps = 50
    x = torch.tensor([-1e-20, -1e-8, -0.1, -math.log(2), -1.0, -30.0, -800.0], dtype=torch.float64)
    expected = torch.tensor([float(mpmath.log(1 - mpmath.exp(mpmath.mpf(v)))) for v in x.tolist()], dtype=torch.float64)
    torch.testing.assert_close(log1mexp(x), expected, rtol=1e-12, atol=1e-300)
    torch.testing.assert_close(log1mexp(x.float()).double(), expected, rtol=1e-6, atol=1e-30)


def test_teacher_logprobs_recomputed_from_hidden_states():
    """An older cache without target_logprob: hidden · lm_headᵀ (+ bias) in row blocks = log_softmax gathered."""
    torch.manual_seed(0)
    hidden, head, bias = torch.randn(2, 5, 8), torch.randn(40, 8), torch.randn(40)
    targets = torch.randint(0, 40, (2, 5))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    got = teacher_realised_logprobs(HeadTeacher(hidden, head, bias), targets, mask, rows_per_block=3)
    expected = torch.log_softmax(hidden @ head.T + bias, -1).gather(-1, targets[..., None]).squeeze(-1)
    torch.testing.assert_close(got[mask], expected[mask], rtol=1e-5, atol=1e-5)
    assert got[~mask].abs().max() == 0
    torch.testing.assert_close(teacher_realised_logprobs(hidden @ head.T, targets, mask)[mask],
                               realised_logprobs(hidden @ head.T, targets)[mask])
    with pytest.raises(ValueError, match="target_logprob"):
        teacher_realised_logprobs(TopKTeacher(torch.zeros(2, 5, 3), torch.zeros(2, 5, 3, dtype=torch.long),
                                              torch.zeros(2, 5), 40), targets, mask)


# ------------------------------------------------------------------ the cache's target_logprob, ALM in training

TEACHER, STUDENT = "tiny-qwen2", "tiny-gpt2"


def _build_cache(root, preset, name="cache", n=8):
    from cot2align.config import CacheTeacherConfig, build_config
    from cot2align.teacher.cache_pass import cache_teacher

    data = write_cot_records(root / f"{name}.jsonl", n=n, cot_every=2)
    cache_teacher(build_config(CacheTeacherConfig, model=preset, data=str(data), out=str(root / name), topk=4,
                               batch_tokens=2048), log=lambda m: None)
    return root / name


@pytest.fixture(scope="module")
def qwen_cache(tmp_path_factory):
    return _build_cache(tmp_path_factory.mktemp("alm"), TEACHER)


def test_cached_target_logprob_equals_a_fresh_forward(qwen_cache):
    from cot2align.cache import open_cache
    from cot2align.cache.inspect import cache_info, format_info, verify_cache
    from cot2align.modeling import load_model

    cache = open_cache(qwen_cache)
    model, tokenizer = load_model(TEACHER), cache.tokenizer()
    assert cache.manifest["store"]["dtypes"]["target_logprob"] == "float32"
    checked = 0
    for i in range(len(cache)):
        for view in ("std", "cot"):
            v = cache.view(i, view)
            if not v["n_rows"]:
                continue
            prompt = tokenizer(v["prompt"])["input_ids"]
            sequence = prompt + v["target_ids"].tolist()
            assert v["input_ids"][0] == sequence[len(prompt) - 1]
            with torch.no_grad():
                logits = model(torch.tensor([sequence])).logits[0, len(prompt) - 1:len(sequence) - 1].float()
            expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(v["target_ids"], dtype=torch.long)[:, None])
            stored = cache.teacher_rows(i, view, ("target_logprob",))["target_logprob"]
            assert stored.dtype == torch.float32 and stored.shape == (v["n_rows"],)
            torch.testing.assert_close(stored, expected.squeeze(1), rtol=1e-4, atol=1e-4)
            checked += 1
    assert checked >= 10
    assert verify_cache(qwen_cache) == []
    info = cache_info(qwen_cache)
    assert "target_logprob" in info["arrays"] and "absent" not in format_info(info)


def _alm_both_ways(cache_path, cot2align: bool):
    """The ALM objective on one batch: fed from the cache, and from the teacher run online on the same texts with
    the chunks aligned again from the online token ids."""
    from cot2align.align.chunks import chunk_alignment
    from cot2align.cache import open_cache
    from cot2align.losses.objective import Heads, default_settings, distillation_loss
    from cot2align.modeling import load_model, load_tokenizer, tokenizer_hash
    from cot2align.train.batches import arrays_to_read, student_view, teacher_view
    from cot2align.train.data import DistillDataset, collate, tokenize_cache

    cache = open_cache(cache_path)
    student_tok, teacher_tok = load_tokenizer(STUDENT), load_tokenizer(TEACHER)
    torch.manual_seed(0)
    student, teacher = load_model(STUDENT), load_model(TEACHER)
    ids = tokenize_cache(cache, student_tok, tokenizer_hash(student_tok), 512, "chunks")
    views = ("std", "cot") if cot2align else ("std",)
    arrays = arrays_to_read(cache, "alm", cot2align)
    assert "target_logprob" in arrays and ("hidden" in arrays) == cot2align
    examples = [0, 1, 2, 3]
    dataset = DistillDataset(ids, views, examples, cache.opened(), arrays)
    batch = collate([dataset[k] for k in range(len(examples))], views, student_tok.eos_token_id)
    head = cache.head()
    heads = Heads(student_embed_tokens=student.get_input_embeddings().weight,
                  student_lm_head=student.get_output_embeddings().weight, teacher_embed_tokens=head["embed_tokens"],
                  teacher_lm_head=head["lm_head"])
    students = {v: student_view(student, batch[v], "cpu", cot2align) for v in views}
    cached = {v: teacher_view(batch[v], heads, "cpu", torch.float32) for v in views}
    align = chunk_alignment(student_tok, teacher_tok)
    online = online_teacher_views(teacher, teacher_tok, cache, examples, views)
    for v in views:
        t = online[v]
        s_mask = students[v].mask
        t.student_chunks = torch.full(s_mask.shape, -1, dtype=torch.long)
        t.teacher_chunks = torch.full(t.mask.shape, -1, dtype=torch.long)
        for b in range(len(examples)):
            chunks_s, chunks_t = align(students[v].target_ids[b][s_mask[b]].numpy(), t.target_ids[b][t.mask[b]].numpy())
            t.student_chunks[b, s_mask[b]] = torch.from_numpy(chunks_s)
            t.teacher_chunks[b, t.mask[b]] = torch.from_numpy(chunks_t)
    results = [distillation_loss("alm", 0.5, students, teachers, heads, None if not cot2align else
                                 _ot_projector(student, teacher), cot2align, default_settings())
               for teachers in (cached, online)]
    return results, cached, online


def _ot_projector(student, teacher):
    from cot2align.losses.objective import build_projectors

    torch.manual_seed(1)
    return build_projectors("alm", True, student.config.hidden_size, teacher.config.hidden_size)


@pytest.mark.parametrize("cot2align", [False, True])
def test_alm_cache_fed_equals_online_teacher(qwen_cache, cot2align):
    (cached, online), cached_views, online_views = _alm_both_ways(qwen_cache, cot2align)
    torch.testing.assert_close(cached[0], online[0], rtol=1e-5, atol=1e-5)
    assert cached[1]["kd/alm"] > 0
    for key in cached[1]:
        torch.testing.assert_close(cached[1][key], online[1][key], rtol=1e-4, atol=1e-5)
    for v, t in cached_views.items():
        o = online_views[v]
        assert torch.equal(t.mask, o.mask) and torch.equal(t.target_ids[t.mask], o.target_ids[o.mask])
        # the memoised chunks are those aligned from the online ids; every response token is in a chunk
        assert torch.equal(t.teacher_chunks[t.mask], o.teacher_chunks[o.mask])
        assert torch.equal(t.student_chunks, o.student_chunks)
        assert (t.teacher_chunks[t.mask] >= 0).all()
        torch.testing.assert_close(t.target_logprob[t.mask], o.target_logprob[o.mask], rtol=1e-4, atol=1e-4)


def _run(cache, out, **kw):
    from cot2align.config import DistillConfig, build_config
    from cot2align.train.distill import distill

    settings = dict(cache=str(cache), student=STUDENT, out=str(out), method="alm", epochs=2, batch_size=4,
                    val_examples=2, val_max_new_tokens=4, lr=3e-3)
    settings.update(kw)
    return distill(build_config(DistillConfig, **settings), log=lambda m: None, progress=False)


@pytest.mark.slow      # like test_train's KD short runs
def test_a_short_alm_run_lowers_its_loss(qwen_cache, tmp_path):
    import json

    summary = _run(qwen_cache, tmp_path / "run", epochs=4, alm_temperature=2.0, cot2align=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "kd/alm" in r]
    assert summary["steps"] == len(steps) >= 6
    assert all(math.isfinite(r["kd/alm"]) and r["kd/alm"] >= 0 for r in steps)
    losses = [r["loss"] for r in steps]
    assert np.mean(losses[-2:]) < np.mean(losses[:2]), losses
    alignment = next(r["alignment"] for r in records if "alignment" in r)
    assert alignment["chunk_bytes_share"] == 1.0              # GPT-2 and Qwen2.5 spell every cached response alike


def test_an_older_cache_without_target_logprob(tmp_path, monkeypatch):
    """A cache written before the array existed (same format version): read without it, verified, shown absent;
    ALM recomputes the teacher's log-probs from the hidden states under --teacher-dist exact, and refuses
    --teacher-dist topk in one line naming the cache and the array."""
    import cot2align.teacher.cache_pass as cache_pass
    from cot2align.cache import open_cache
    from cot2align.cache.format import has_array, view_array_specs
    from cot2align.cache.inspect import cache_info, format_info, verify_cache
    from cot2align.config import ConfigError
    from cot2align.train.batches import arrays_to_read

    def old_specs(*args, **kwargs):
        specs = view_array_specs(*args, **kwargs)
        specs.pop("target_logprob")
        return specs

    real_batch = cache_pass.teacher_batch

    def old_batch(*args, **kwargs):
        result = real_batch(*args, **kwargs)
        result.pop("target_logprob")
        return result

    monkeypatch.setattr(cache_pass, "view_array_specs", old_specs)
    monkeypatch.setattr(cache_pass, "teacher_batch", old_batch)
    path = _build_cache(tmp_path, "tiny-llama", "old", n=6)
    monkeypatch.undo()
    cache = open_cache(path)
    assert not has_array(cache.manifest, "target_logprob")
    rows = cache.teacher_rows(0, "std", ("input_ids", "target_ids", "target_logprob"))
    assert set(rows) == {"input_ids", "target_ids"}
    assert verify_cache(path) == []
    assert "target_logprob absent" in format_info(cache_info(path))
    assert arrays_to_read(cache, "alm", False, "exact") == ("input_ids", "target_ids", "target_logprob", "hidden")
    with pytest.raises(ConfigError) as refused:
        _run(path, tmp_path / "topk", teacher_dist="topk", cot2align=False)
    message = str(refused.value)
    assert "\n" not in message and str(path) in message and "target_logprob" in message and "cache-teacher" in message
    assert not (tmp_path / "topk").exists()                   # refused before --out is touched
    summary = _run(path, tmp_path / "exact", cot2align=False, epochs=1)
    assert summary["steps"] >= 1


def test_verify_checks_target_logprob_values():
    """verify's value check of the array: a log-probability, equal to the top-k where the token is among them, at
    most the tail's log-mass where it is not."""
    from cot2align.cache.inspect import _verify_target_logprob

    values = {"target_ids": np.array([1, 2]), "topk_ids": np.array([[1, 3], [4, 5]]),
              "topk_logprobs": np.array([[-0.5, -1.0], [-0.1, -0.2]], dtype=np.float16),
              "tail_logprob": np.array([-3.0, -2.0], dtype=np.float32)}
    assert _verify_target_logprob(dict(values, target_logprob=np.array([-0.5, -2.5], np.float32)), "std") == []
    assert "top-k" in _verify_target_logprob(dict(values, target_logprob=np.array([-0.9, -2.5], np.float32)), "std")[0]
    assert "tail" in _verify_target_logprob(dict(values, target_logprob=np.array([-0.5, -1.5], np.float32)), "std")[0]
    assert "log-probability" in _verify_target_logprob(dict(values, target_logprob=np.array([0.5, -2.5], np.float32)),
                                                       "std")[0]


def test_kd_term_counts_each_aligned_chunk_once_over_the_views_and_falls_back_to_hidden_states():
    """kd_term = Σ over views of the chunk divergences / all aligned chunks; without target_logprob the teacher's
    log-probs come from hidden · lm_headᵀ and give the same value."""
    from types import SimpleNamespace

    from cot2align.losses.alm import kd_term

    torch.manual_seed(0)
    V_s, V_t, D = 11, 13, 6
    lm_head = torch.randn(V_t, D, dtype=torch.float64)
    students, teachers, with_hidden = {}, {}, {}
    for seed, v in enumerate(("std", "cot")):
        s_lp, _, s_ch, t_ch, s_m, t_m = random_batch(seed)
        logits = torch.randn(*s_ch.shape, V_s, dtype=torch.float64, requires_grad=True)
        targets_s = torch.randint(0, V_s, s_ch.shape)
        hidden = torch.randn(*t_ch.shape, D, dtype=torch.float64)
        targets_t = torch.randint(0, V_t, t_ch.shape)
        exact = torch.log_softmax(hidden @ lm_head.T, -1).gather(-1, targets_t[..., None]).squeeze(-1)
        students[v] = SimpleNamespace(logits=logits, target_ids=targets_s, mask=s_m)
        common = dict(target_ids=targets_t, mask=t_m, student_chunks=s_ch, teacher_chunks=t_ch)
        teachers[v] = SimpleNamespace(target_logprob=exact.float(), dist=None, **common)
        with_hidden[v] = SimpleNamespace(target_logprob=None, dist=HeadTeacher(hidden, lm_head), **common)
    cfg = SimpleNamespace(alm_temperature=2.0)
    kd, parts = kd_term(students, teachers, ["std", "cot"], None, None, cfg)
    expected_sum, expected_count = 0.0, 0
    for v in ("std", "cot"):
        s_lp = torch.log_softmax(students[v].logits, -1).gather(-1, students[v].target_ids[..., None]).squeeze(-1)
        t = teachers[v]
        d, aligned = alm_terms(s_lp, t.target_logprob.double(), t.student_chunks, t.teacher_chunks, students[v].mask,
                               t.mask, 2.0)
        expected_sum, expected_count = expected_sum + d.sum(), expected_count + int(aligned.sum())
    torch.testing.assert_close(kd, expected_sum / expected_count)
    assert parts == {"kd/alm": kd}
    fallback, _ = kd_term(students, with_hidden, ["std", "cot"], None, None, cfg)
    torch.testing.assert_close(fallback, kd, rtol=1e-6, atol=1e-7)
    kd.backward()
    assert torch.isfinite(students["std"].logits.grad).all() and students["std"].logits.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="target_logprob"):
        top = SimpleNamespace(**dict(vars(with_hidden["std"]), dist=TopKTeacher(
            torch.zeros(3, 12, 2), torch.zeros(3, 12, 2, dtype=torch.long), torch.zeros(3, 12), V_t)))
        kd_term(students, {"std": top}, ["std"], None, None, cfg)
