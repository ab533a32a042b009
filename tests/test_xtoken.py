"""X-Token's projection KL (losses/xtoken.py) and its vocabulary projection (align/projection.py)."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from cot2align.align.projection import build_projection, piece_weights
from cot2align.align.vocab import token_strings
from cot2align.losses.teacher import HeadTeacher, TopKTeacher
from cot2align.losses.xtoken import xtoken_loss
from cot2align.modeling import load_tokenizer

V_S, V_T, K = 7, 9, 3


def random_problem(seed, dtype=torch.float64):
    """Two examples: student rows [2, 8], teacher rows [2, 6], chunks in text order with unaligned (−1) and padded
    rows, a sparse row-stochastic projection with empty slots (−1) and one student token with no entry at all."""
    g = torch.Generator().manual_seed(seed)
    student_logits = torch.randn(2, 8, V_S, generator=g, dtype=dtype) * 2
    teacher_logits = torch.randn(2, 6, V_T, generator=g, dtype=dtype) * 2
    s_chunks = torch.tensor([[-1, 0, 0, 1, 2, 2, 2, 3], [0, 1, 1, 2, -1, -1, -1, -1]])
    t_chunks = torch.tensor([[0, 1, 1, 2, 3, -1], [0, 0, 1, 2, 3, -1]])      # example 1's chunk 3 has no student row
    s_mask = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    t_mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    indices = torch.randint(0, V_T, (V_S, K), generator=g)
    indices[1, 2] = -1
    indices[4] = -1
    weights = torch.rand(V_S, K, generator=g, dtype=dtype) * (indices >= 0)
    weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-30)
    return student_logits, teacher_logits, s_chunks, t_chunks, s_mask, t_mask, indices, weights


def slow_xtoken(student_logits, teacher_rows_logprobs, columns, s_chunks, t_chunks, s_mask, t_mask, indices, weights, tau):
    """The module docstring's equations one chunk at a time in float64, with a dense W [V_s, V_t].
    teacher_rows_logprobs[b][j]: the teacher's log-probs at τ over `columns` (already renormalised within them)."""
    dense = torch.zeros(indices.shape[0], V_T, dtype=torch.float64)
    for s in range(indices.shape[0]):
        for j in range(indices.shape[1]):
            if indices[s, j] >= 0:
                dense[s, indices[s, j]] += weights[s, j]
    total, n = 0.0, 0
    for b in range(student_logits.shape[0]):
        for c in range(int(max(s_chunks.max(), t_chunks.max())) + 1):
            s_rows = [i for i in range(s_chunks.shape[1]) if s_mask[b, i] and s_chunks[b, i] == c]
            t_rows = [j for j in range(t_chunks.shape[1]) if t_mask[b, j] and t_chunks[b, j] == c]
            if not s_rows or not t_rows:
                continue
            q = torch.stack([(torch.softmax(student_logits[b, i] / tau, -1) @ dense)[columns] for i in s_rows]).mean(0)
            q = q / (q.sum() + 1e-10)
            target = torch.stack([teacher_rows_logprobs[b][j] for j in t_rows]).mean(0)
            total = total + (target.exp() * (target - torch.log(q + 1e-10))).sum()
            n += 1
    return total * tau ** 2, n


def exact_subset(teacher_logits, t_chunks, t_mask, k, tau):
    keep = t_mask & (t_chunks >= 0)
    columns = torch.topk(teacher_logits[keep].max(0).values, k).indices.sort().values
    return columns, [[torch.log_softmax(teacher_logits[b, j, columns] / tau, -1) for j in range(teacher_logits.shape[1])]
                     for b in range(teacher_logits.shape[0])]


@pytest.mark.parametrize("seed, tau, topk", [(0, 1.0, V_T), (1, 2.0, V_T), (2, 1.0, 5), (3, 0.7, 4)])
def test_value_and_gradient_equal_the_slow_float64_reference(seed, tau, topk):
    logits, teacher, s_chunks, t_chunks, s_mask, t_mask, indices, weights = random_problem(seed)
    logits.requires_grad_(True)
    value, n = xtoken_loss(logits, teacher, s_chunks, t_chunks, s_mask, t_mask, indices, weights, tau, topk)
    value.backward()
    ref_logits = logits.detach().clone().requires_grad_(True)
    columns, rows = exact_subset(teacher, t_chunks, t_mask, topk, tau)
    ref, ref_n = slow_xtoken(ref_logits, rows, columns, s_chunks, t_chunks, s_mask, t_mask, indices, weights, tau)
    ref.backward()
    assert int(n) == ref_n == 7
    # (NeMo's chunk means divide by size + 1e-10: a relative 1e-10 from the plain mean of the reference)
    torch.testing.assert_close(value, ref, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(logits.grad, ref_logits.grad, rtol=1e-8, atol=1e-12)
    assert logits.grad[~s_mask].abs().sum() == 0 and logits.grad[0, 0].abs().sum() == 0   # padded and unaligned rows


def test_the_teacher_from_its_head_is_the_teacher_from_its_logits():
    logits, _, s_chunks, t_chunks, s_mask, t_mask, indices, weights = random_problem(4)
    g = torch.Generator().manual_seed(0)
    hidden, head = torch.randn(2, 6, 5, generator=g, dtype=torch.float64), torch.randn(V_T, 5, generator=g, dtype=torch.float64)
    from_head, _ = xtoken_loss(logits, HeadTeacher(hidden, head), s_chunks, t_chunks, s_mask, t_mask, indices, weights)
    from_logits, _ = xtoken_loss(logits, hidden @ head.T, s_chunks, t_chunks, s_mask, t_mask, indices, weights)
    torch.testing.assert_close(from_head, from_logits)


def test_a_top_k_teacher_spreads_its_tail_evenly_over_the_tokens_it_covers():
    logits, teacher, s_chunks, t_chunks, s_mask, t_mask, indices, weights = random_problem(5)
    full = torch.log_softmax(teacher, -1)
    top = torch.topk(full, 3, dim=-1)
    tail = torch.log1p(-top.values.exp().sum(-1))
    got, n = xtoken_loss(logits, TopKTeacher(top.values, top.indices, tail, V_T), s_chunks, t_chunks, s_mask, t_mask,
                         indices, weights, 1.0, 4)
    keep = t_mask & (t_chunks >= 0)
    importance = torch.full((V_T,), -math.inf, dtype=torch.float64)
    for lp, ids in zip(top.values[keep], top.indices[keep]):
        importance[ids] = torch.maximum(importance[ids], lp)
    columns = torch.topk(importance, 4).indices.sort().values
    rows = []
    for b in range(2):
        rows.append([])
        for j in range(6):
            dense = torch.full((V_T,), float(tail[b, j] - math.log(V_T - 3)), dtype=torch.float64)
            dense[top.indices[b, j]] = top.values[b, j]
            rows[-1].append(torch.log_softmax(dense[columns], -1))
    ref, ref_n = slow_xtoken(logits, rows, columns, s_chunks, t_chunks, s_mask, t_mask, indices, weights, 1.0)
    assert int(n) == ref_n
    torch.testing.assert_close(got, ref, rtol=1e-8, atol=1e-12)


def test_same_vocabulary_one_token_chunks_is_the_forward_kl():
    """With W = identity, one token per chunk on both sides and every teacher token compared, X-Token is the
    token-level KL(teacher ‖ student) at τ, times τ² — an independent check of the whole chain."""
    g = torch.Generator().manual_seed(6)
    student, teacher = torch.randn(2, 5, V_T, generator=g, dtype=torch.float64), torch.randn(2, 5, V_T, generator=g,
                                                                                            dtype=torch.float64)
    chunks = torch.arange(5).expand(2, 5)
    mask = torch.ones(2, 5, dtype=torch.bool)
    indices = torch.cat([torch.arange(V_T)[:, None], torch.full((V_T, 1), -1)], 1)
    weights = torch.tensor([[1.0, 0.0]] * V_T, dtype=torch.float64)
    value, n = xtoken_loss(student, teacher, chunks, chunks, mask, mask, indices, weights, 2.0, V_T)
    kl = torch.nn.functional.kl_div(torch.log_softmax(student / 2, -1), torch.log_softmax(teacher / 2, -1),
                                    log_target=True, reduction="sum")
    assert int(n) == 10
    torch.testing.assert_close(value, kl * 4, rtol=1e-8, atol=1e-10)


def test_nothing_aligned_is_zero_with_a_gradient_path():
    logits, teacher, s_chunks, t_chunks, s_mask, t_mask, indices, weights = random_problem(7)
    logits.requires_grad_(True)
    value, n = xtoken_loss(logits, teacher, torch.full_like(s_chunks, -1), t_chunks, s_mask, t_mask, indices, weights)
    value.backward()
    assert value.item() == 0.0 and int(n) == 0 and logits.grad.abs().sum() == 0


def test_the_projection_of_real_tokenizers():
    """GPT-2 student, Qwen2.5 teacher: shared tokens map to themselves alone; a split number spreads over the
    teacher's digit pieces with weights 0.9·0.1^i (normalised); every row sums to one."""
    student, teacher = load_tokenizer("tiny-gpt2"), load_tokenizer("tiny-qwen2")
    indices, weights = build_projection(student, teacher)
    s_strings, t_strings = token_strings(student), token_strings(teacher)
    assert indices.shape == (len(s_strings), 4)
    has = indices[:, 0] >= 0
    np.testing.assert_allclose(weights[has].sum(1), 1.0, rtol=1e-6)
    assert has.mean() > 0.99
    the = student.convert_tokens_to_ids("Ġthe")
    assert t_strings[indices[the, 0]] == " the" and weights[the, 0] == 1.0 and indices[the, 1] == -1
    number = s_strings.index(" 123")
    pieces = [t_strings[i] for i in indices[number] if i >= 0]
    assert pieces == [" ", "1", "2", "3"]
    np.testing.assert_allclose(weights[number], piece_weights(4), rtol=1e-6)
    assert indices[student.eos_token_id, 0] == teacher.eos_token_id


def test_a_sentencepiece_teacher_gets_no_dummy_prefix():
    """Llama-2's SentencePiece writes "ing" alone as "▁ing": a student word piece must not map onto a word start."""
    student, teacher = load_tokenizer("tiny-gpt2"), load_tokenizer("tiny-llama")
    indices, _ = build_projection(student, teacher)
    s_strings, t_strings = token_strings(student), token_strings(teacher)
    starts_without_space = [s for s, string in enumerate(s_strings) if string and string[0].isalpha()][:2000]
    firsts = [t_strings[indices[s, 0]] for s in starts_without_space if indices[s, 0] >= 0]
    assert len(firsts) > 1500 and not any(f.startswith(" ") for f in firsts)


def test_a_short_xtoken_run_from_the_cache(tmp_path):
    """The registered method end to end: cache pass, chunk alignment, projection, a few steps; the KD part logged."""
    from conftest import write_cot_records
    from cot2align.config import CacheTeacherConfig, DistillConfig, build_config
    from cot2align.teacher.cache_pass import cache_teacher
    from cot2align.train.distill import distill

    data = write_cot_records(tmp_path / "data.jsonl", n=4, cot_every=1)
    cache_teacher(build_config(CacheTeacherConfig, model="tiny-llama", data=str(data), out=str(tmp_path / "cache"),
                               batch_tokens=4096), log=lambda m: None)
    for dist in ("exact", "topk"):
        out = tmp_path / f"run_{dist}"
        cfg = build_config(DistillConfig, cache=str(tmp_path / "cache"), student="tiny-gpt2", out=str(out),
                           method="xtoken", cot2align=False, teacher_dist=dist, max_steps=2, batch_size=2,
                           val_examples=1, val_max_new_tokens=2)
        distill(cfg, log=lambda m: None, progress=False)
        steps = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines() if '"lr"' in line]
        assert len(steps) == 2 and all(math.isfinite(r["kd/xtoken"]) and r["kd/xtoken"] != 0 for r in steps), steps


def test_cache_fed_objective_equals_the_online_teacher(tmp_path):
    """The same batch, the teacher's rows from the cache (hidden · lm_headᵀ) or from a fresh teacher forward: the
    same X-Token objective (the cache stores bf16 hidden states; the online path rounds the same way)."""
    import dataclasses

    from conftest import write_cot_records
    from cot2align.cache import open_cache
    from cot2align.config import CacheTeacherConfig, build_config
    from cot2align.losses.objective import default_settings, distillation_loss
    from cot2align.modeling import load_model
    from cot2align.teacher.cache_pass import cache_teacher
    from cot2align.train.batches import cache_dataloader, load_heads, student_view, teacher_view
    from cot2align.train.online import online_teacher_view

    data = write_cot_records(tmp_path / "data.jsonl", n=3, cot_every=1)
    cache_teacher(build_config(CacheTeacherConfig, model="tiny-llama", data=str(data), out=str(tmp_path / "cache"),
                               batch_tokens=4096), log=lambda m: None)
    cache = open_cache(tmp_path / "cache")
    student_tok, teacher_tok = load_tokenizer("tiny-gpt2"), load_tokenizer("tiny-llama")
    torch.manual_seed(0)
    student, teacher = load_model("tiny-gpt2"), load_model("tiny-llama")
    batch = next(iter(cache_dataloader(cache, student_tok, method="xtoken", cot2align=False, batch_size=3,
                                       indices=[0, 1, 2])))
    heads = load_heads(cache, student, student_tok, method="xtoken")
    students = {"std": student_view(student, batch["std"], "cpu", False)}
    cached = teacher_view(batch["std"], heads, "cpu", torch.float32)
    texts, order = cache.texts(), batch["index"].tolist()
    rows = [cache.view(i, "std") for i in order]
    online = online_teacher_view(teacher, teacher_tok, [texts["prompt_std"][i] for i in order],
                                 [texts["response_std"][i] for i in order],
                                 [int(r["target_ids"][-1]) == teacher_tok.eos_token_id for r in rows], "cpu")
    assert torch.equal(online.target_ids[online.mask], cached.target_ids[cached.mask])
    online = dataclasses.replace(online, student_chunks=cached.student_chunks, teacher_chunks=cached.teacher_chunks)
    assert int((cached.teacher_chunks >= 0).sum()) > 10
    settings = dataclasses.replace(default_settings(), xtoken_vocab_topk=500)
    values = [distillation_loss("xtoken", 0.5, students, {"std": view}, heads, None, False, settings)
              for view in (cached, online)]
    torch.testing.assert_close(values[0][0], values[1][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(values[0][1]["kd/xtoken"], values[1][1]["kd/xtoken"], rtol=1e-5, atol=1e-5)
    assert values[0][1]["kd/xtoken"] > 0
