"""GOLD (losses/gold.py): against a slow float64 reference (values and gradients), exact vs top-k forms, the exact-match
vocabulary (align/exact_tokens.py), and against TRL's own ULDLoss on hand cases (numbers pinned from upstream)."""

import math

import pytest
import torch

from cot2align.align.exact_tokens import build_exact_token_map
from cot2align.losses.gold import gold_divergences, gold_loss
from cot2align.losses.teacher import HeadTeacher, TopKTeacher


def softmax_list(row, tau=1.0):
    m = max(row)
    e = [math.exp((x - m) / tau) for x in row]
    return [x / sum(e) for x in e]


def slow_gjsd(t, s, beta):
    def kl(p, q):
        return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)
    if beta == 0:
        return kl(t, s)
    if beta == 1:
        return kl(s, t)
    m = [beta * a + (1 - beta) * b for a, b in zip(t, s)]
    return beta * kl(t, m) + (1 - beta) * kl(s, m)


def slow_l1_sorted(a, b):
    a, b = sorted(a, reverse=True), sorted(b, reverse=True)
    width = max(len(a), len(b))
    a, b = a + [0.0] * (width - len(a)), b + [0.0] * (width - len(b))
    return sum(abs(x - y) for x, y in zip(a, b))


def chunk_rows(chunks, mask, b):
    rows = {}
    for i in range(chunks.shape[1]):
        if mask[b, i] and chunks[b, i] >= 0:
            rows.setdefault(int(chunks[b, i]), []).append(i)
    return rows


def merged(logits, targets, rows, tau):
    """(q over the last row's vocabulary, ρ): the chain rule written out, prefix at τ = 1."""
    prefix = 1.0
    for r in rows[:-1]:
        prefix *= softmax_list(logits[r].tolist())[int(targets[r])]
    return [prefix * p for p in softmax_list(logits[rows[-1]].tolist(), tau)], 1.0 - prefix


def slow_gold_parts(s_logits, s_targets, s_mask, s_chunks, t_logits, t_targets, t_mask, t_chunks, stu2tea,
                    tau=1.0, beta=0.5, scope="one_token"):
    parts = []
    for b in range(s_logits.shape[0]):
        s_rows, t_rows = chunk_rows(s_chunks, s_mask, b), chunk_rows(t_chunks, t_mask, b)
        for c in sorted(set(s_rows) & set(t_rows)):
            qs, rho_s = merged(s_logits[b], s_targets[b], s_rows[c], tau)
            qt, rho_t = merged(t_logits[b], t_targets[b], t_rows[c], tau)
            one = len(s_rows[c]) == 1 and len(t_rows[c]) == 1
            pairs = [(u, v) for u, v in enumerate(stu2tea) if 0 <= v < len(qt)] if (one or scope == "all") else []
            s_in, t_in = {u for u, _ in pairs}, {v for _, v in pairs}
            s_off = [q for u, q in enumerate(qs) if u not in s_in]
            t_off = [q for v, q in enumerate(qt) if v not in t_in]
            d_rest = slow_l1_sorted(s_off, t_off) + abs(rho_s - rho_t)
            d_match = 0.0
            if pairs:
                s_b = [qs[u] for u, _ in pairs] + [sum(s_off) + rho_s]
                t_b = [qt[v] for _, v in pairs] + [sum(t_off) + rho_t]
                d_match = slow_gjsd(t_b, s_b, beta)
            parts.append((d_match, d_rest))
    return parts


def random_case(seed, batch=2, n=9, m=10, v_s=8, v_t=11, dtype=torch.float64):
    """Random logits and hand-made chunkings: per example a few chunks of 1-3 student and 1-2 teacher rows after
    a prompt gap, plus one chunk on the student side only (cut by a length limit: left out)."""
    g = torch.Generator().manual_seed(seed)
    s_chunks = torch.full((batch, n), -1, dtype=torch.long)
    t_chunks = torch.full((batch, m), -1, dtype=torch.long)
    for b in range(batch):
        i, j = b, 1
        for c in range(3):
            ns, nt = (1, 1) if c == b else (int(torch.randint(1, 4, (1,), generator=g)), int(torch.randint(1, 3, (1,),
                                                                                                      generator=g)))
            s_chunks[b, i:i + ns], t_chunks[b, j:j + nt] = c, c
            i, j = i + ns, j + nt
        s_chunks[b, i] = 3                                  # student only
    s_mask, t_mask = s_chunks >= 0, t_chunks >= 0
    case = dict(
        student_logits=torch.randn(batch, n, v_s, generator=g, dtype=dtype) * 2,
        student_targets=torch.randint(0, v_s, (batch, n), generator=g), student_mask=s_mask, student_chunks=s_chunks,
        teacher=torch.randn(batch, m, v_t, generator=g, dtype=dtype) * 2,
        teacher_targets=torch.randint(0, v_t, (batch, m), generator=g), teacher_mask=t_mask, teacher_chunks=t_chunks)
    perm = torch.randperm(v_t, generator=g)
    stu2tea = torch.full((v_s,), -1, dtype=torch.long)
    stu2tea[: v_s // 2 + 1] = perm[: v_s // 2 + 1]
    case["stu2tea"] = stu2tea
    return case


SMALL = dict(batch=1, n=8, m=7, v_s=6, v_t=7)


def slow_of(case, **kw):
    return slow_gold_parts(case["student_logits"], case["student_targets"], case["student_mask"],
                           case["student_chunks"], case["teacher"], case["teacher_targets"], case["teacher_mask"],
                           case["teacher_chunks"], case["stu2tea"].tolist(), **kw)


@pytest.mark.parametrize("tau,beta,scope", [(1.0, 0.5, "one_token"), (2.0, 0.3, "all"), (1.0, 0.0, "all"),
                                            (0.7, 1.0, "one_token")])
def test_gold_matches_slow_reference_values_and_gradients(tau, beta, scope):
    case = random_case(int(tau * 10 + beta * 100) + len(scope))
    d_match, d_rest = gold_divergences(**case, temperature=tau, beta=beta, scope=scope)
    expected = slow_of(case, tau=tau, beta=beta, scope=scope)
    assert len(expected) == len(d_match) == 6                # three chunks per example; the student-only one left out
    assert torch.allclose(d_match, torch.tensor([e[0] for e in expected], dtype=torch.float64), atol=1e-10)
    assert torch.allclose(d_rest, torch.tensor([e[1] for e in expected], dtype=torch.float64), atol=1e-10)
    assert any(e[0] > 0 for e in expected) and any(e[0] == 0 for e in expected) == (scope == "one_token")
    w = 0.3
    got = gold_loss(**case, matched_weight=w, temperature=tau, beta=beta, scope=scope)
    assert abs(got.item() - sum(w * a + (1 - w) * b for a, b in expected) / len(expected)) < 1e-10

    small = random_case(int(tau * 10 + beta * 100), **SMALL)    # finite differences: one example, small vocabularies
    logits = small.pop("student_logits").clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda z: gold_loss(student_logits=z, **small, matched_weight=w, temperature=tau, beta=beta, scope=scope),
        (logits,))


def test_gold_gradient_reaches_the_chunk_prefix_rows():
    """The merged row's scale π_s is the student's probability of the realised prefix: its rows get gradient."""
    case = random_case(5)
    logits = case.pop("student_logits").clone().requires_grad_(True)
    gold_loss(student_logits=logits, **case, matched_weight=0.5).backward()
    s_chunks, s_mask = case["student_chunks"], case["student_mask"]
    for b in range(2):
        for c, rows in chunk_rows(s_chunks, s_mask, b).items():
            if c < 3:
                assert all(logits.grad[b, r].abs().sum() > 0 for r in rows)
    outside = (s_chunks < 0) | (s_chunks == 3)
    assert logits.grad[outside].abs().sum() == 0


def topk_of(logits, k):
    logp = torch.log_softmax(logits.double(), dim=-1)
    values, ids = logp.topk(k, dim=-1)
    rest = logp.scatter(-1, ids, float("-inf")).logsumexp(-1)
    return TopKTeacher(values.to(logits.dtype), ids, rest.to(logits.dtype), logits.shape[-1])


def realised_logprob(case):
    return torch.log_softmax(case["teacher"], -1).gather(-1, case["teacher_targets"][..., None]).squeeze(-1)


@pytest.mark.parametrize("scope", ["one_token", "all"])
def test_gold_teacher_forms_agree_head_topk_k_equal_vocab_and_cached_logprob(scope):
    g = torch.Generator().manual_seed(3)
    case = random_case(11, dtype=torch.float64)
    hidden, head = torch.randn(2, 10, 5, generator=g, dtype=torch.float64), torch.randn(11, 5, generator=g,
                                                                                          dtype=torch.float64)
    case["teacher"] = hidden @ head.T
    exact = torch.stack(gold_divergences(**case, temperature=1.5, scope=scope))
    logprob = realised_logprob(case)
    for teacher, cached in ((HeadTeacher(hidden, head), None), (HeadTeacher(hidden, head), logprob),
                            (topk_of(case["teacher"], 11), logprob)):
        got = torch.stack(gold_divergences(**{**case, "teacher": teacher}, teacher_target_logprob=cached,
                                           temperature=1.5, scope=scope))
        assert torch.allclose(got, exact, atol=1e-10)


def slow_topk_parts(case, k, tau, scope):
    """The top-k form written out: the teacher's top-k tokens (tempered, its tail spread evenly), one tail bucket."""
    out = []
    stu2tea = case["stu2tea"].tolist()
    tea2stu = {v: u for u, v in enumerate(stu2tea) if v >= 0}
    t_logits, v_t = case["teacher"], case["teacher"].shape[-1]
    for b in range(2):
        s_rows = chunk_rows(case["student_chunks"], case["student_mask"], b)
        t_rows = chunk_rows(case["teacher_chunks"], case["teacher_mask"], b)
        for c in sorted(set(s_rows) & set(t_rows)):
            qs, rho_s = merged(case["student_logits"][b], case["student_targets"][b], s_rows[c], tau)
            _, rho_t = merged(t_logits[b], case["teacher_targets"][b], t_rows[c], 1.0)
            p = softmax_list(t_logits[b, t_rows[c][-1]].tolist())
            top = sorted(range(v_t), key=lambda v: -p[v])[:k]
            tail = 1 - sum(p[v] for v in top)
            raw = [p[v] ** (1 / tau) for v in top] + [(v_t - k) * (tail / (v_t - k)) ** (1 / tau)]
            pi_t = 1 - rho_t
            qt = [pi_t * x / sum(raw) for x in raw]                      # top-k..., tail
            one = len(s_rows[c]) == 1 and len(t_rows[c]) == 1
            use = one or scope == "all"
            matched = [i for i, v in enumerate(top) if use and v in tea2stu]
            unmatched_t = sorted((qt[i] for i in range(k) if i not in matched), reverse=True)
            s_matched = set(tea2stu.values()) if use else set()
            unmatched_s = sorted((q for u, q in enumerate(qs) if u not in s_matched), reverse=True)
            n_u = len(unmatched_t)
            unmatched_s += [0.0] * max(n_u - len(unmatched_s), 0)          # zero-padded, as ULD pads
            d_rest = (sum(abs(a - b_) for a, b_ in zip(unmatched_s[:n_u], unmatched_t)) + abs(sum(unmatched_s[n_u:])
                      - qt[k]) + abs(rho_s - rho_t))
            d_match = 0.0
            if use:
                s_pick = [qs[tea2stu[top[i]]] for i in matched]
                t_pick = [qt[i] for i in matched]
                d_match = slow_gjsd(t_pick + [1 - sum(t_pick)], s_pick + [1 - sum(s_pick)], 0.5)
            out.append((d_match, d_rest))
    return out


@pytest.mark.parametrize("k,tau,scope", [(3, 1.0, "one_token"), (5, 2.0, "all")])
def test_gold_topk_matches_slow_bucket_reference(k, tau, scope):
    case = random_case(20 + k)
    teacher = topk_of(case["teacher"], k)
    got = gold_divergences(**{**case, "teacher": teacher}, teacher_target_logprob=realised_logprob(case),
                           temperature=tau, scope=scope)
    expected = slow_topk_parts(case, k, tau, scope)
    assert torch.allclose(torch.stack(got, 1), torch.tensor(expected, dtype=torch.float64), atol=1e-10)
    small = random_case(20 + k, **SMALL)
    cached, teacher = realised_logprob(small), topk_of(small.pop("teacher"), k)
    logits = small.pop("student_logits").clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda z: gold_loss(student_logits=z, teacher=teacher, teacher_target_logprob=cached, **small,
                            matched_weight=0.4, temperature=tau, scope=scope), (logits,))


def test_gold_topk_without_cached_logprob_is_refused():
    case = random_case(2)
    with pytest.raises(ValueError, match="target_logprob"):
        gold_divergences(**{**case, "teacher": topk_of(case["teacher"], 4)})


def test_gold_identical_models_give_zero_and_float32_runs():
    """Same vocabulary, same logits, same chunking: every part is 0 (and the float32 path keeps float32)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 6, 7, generator=g)
    targets = torch.randint(0, 7, (1, 6), generator=g)
    chunks = torch.tensor([[-1, 0, 1, 1, 2, -1]])
    d_match, d_rest = gold_divergences(logits, targets, chunks >= 0, chunks, logits.clone(), targets, chunks >= 0,
                                       chunks, torch.arange(7), scope="all")
    assert d_match.dtype == torch.float32
    assert d_match.abs().max() < 1e-6 and d_rest.abs().max() < 1e-6


# ----------------------------------------------------------------------------- the exact-match vocabulary


def test_exact_token_map_is_one_to_one_by_bytes_with_specials_by_role():
    teacher = ["<eos>", " a", "b", " a", "", "c"]        # " a" twice (the highest id kept), a hole
    student = ["x", "b", " a", "<|end|>", " a", "c"]
    result = build_exact_token_map(teacher, student, special_pairs={0: 3})
    assert result.stu2tea.tolist() == [-1, 2, -1, 0, 3, 5]
    assert result.n_matched == 4 and result.n_teacher_tokens == 5
    assert result.adaptive_matched_weight == 4 / 5


def test_exact_token_map_on_real_tokenizers_counts_tokens_not_head_rows():
    from cot2align.align.exact_tokens import exact_token_map
    from cot2align.modeling import load_tokenizer

    qwen, gpt2 = load_tokenizer("tiny-qwen2"), load_tokenizer("tiny-gpt2")
    result = exact_token_map(qwen, gpt2)
    # TRL's raw-string count for this pair is 42,257 shared tokens (method anchors); Qwen2.5 has 151,665 tokens and a
    # 151,936-row head, so the adaptive weight is 0.279, not 0.278
    assert result.n_teacher_tokens == 151_665 and result.n_matched == 42_257
    assert result.stu2tea[gpt2.eos_token_id] == qwen.eos_token_id
    hello = gpt2.convert_tokens_to_ids("Ġhello")
    assert qwen.convert_ids_to_tokens(int(result.stu2tea[hello])) == "Ġhello"


# ----------------------------------------------------------------------------- against TRL's ULDLoss
#
# The pinned numbers below come from TRL's own code, run once on these hand cases: trl 1.16.0 from PyPI (its ULDLoss is
# unchanged on huggingface/trl main f2cd577), `ULDLoss(config, student_tok, teacher_tok)` with use_extended_uld=True,
# uld_token_merge_strategy="bayesian", uld_use_hybrid_loss=True, adaptive weights, beta as stated, both temperatures 1,
# uld_skip_{student,teacher}_eos=False, cross-entropy weight 0; tokenizers whose get_vocab() are S_STR / T_STR; one
# prompt token (id 0, label -100) before the response; the logits of `hand_logits`; byte offsets as in each case.
# Its `_merge_probabilities_with_alignment_groups` gave the merged rows, `last_matched_loss` / `last_unmatched_loss`
# the two parts (means over the chunks), and the call the total.

S_STR, T_STR = ["a", "b", "c", "d", "e"], ["a", "b", "x", "y", "z", "w"]   # "a", "b" shared: adaptive w = 2 / 6


def hand_logits(n, v, f, phase):
    i = torch.arange(n, dtype=torch.float64)[:, None]
    j = torch.arange(v, dtype=torch.float64)[None, :]
    return (2 * f(0.7 * i + 1.3 * j + phase))[None]


def hand_case(s_ids, t_ids, s_chunks, t_chunks):
    """Our rows: row r predicts response token r (TRL's logits shifted by its "bayesian" strategy)."""
    z_s = hand_logits(len(s_ids) + 1, 5, torch.sin, 0.1)[:, :-1]
    z_t = hand_logits(len(t_ids) + 1, 6, torch.cos, 0.4)[:, :-1]
    s_chunks, t_chunks = torch.tensor([s_chunks]), torch.tensor([t_chunks])
    return dict(student_logits=z_s, student_targets=torch.tensor([s_ids]), student_mask=s_chunks >= 0,
                student_chunks=s_chunks, teacher=z_t, teacher_targets=torch.tensor([t_ids]),
                teacher_mask=t_chunks >= 0, teacher_chunks=t_chunks, stu2tea=torch.tensor([0, 1, -1, -1, -1]))


# case 2: student "a|bc|d|e|f", teacher "ab|c|de|f" -> chunks {a,bc | ab}, {d,e | c}... by byte offsets: TRL's groups
# student [[0, 1], [2, 3], [4]], teacher [[0, 1], [2], [3]]
CASE2 = dict(s_ids=[0, 2, 3, 4, 1], t_ids=[1, 3, 4, 0], s_chunks=[0, 0, 1, 1, 2], t_chunks=[0, 0, 1, 2])
TRL_CASE2_MERGED_STUDENT = [
    [0.0412917602809755, 0.055277697258207, 0.00589950580343934, 0.00133123126108995, 0.00562443103100162],
    [0.00724226520500646, 0.000712749514798093, 0.000196049520857423, 0.000998617171888314, 0.00867423740762294],
    [0.13820014132249, 0.0149850454031694, 0.0208869304147645, 0.230080898060043, 0.595846984799533]]
TRL_CASE2_MERGED_TEACHER = [
    [0.00799101728274458, 0.000738110598777776, 0.000591511451821708, 0.00568852051415512, 0.0238275649360356,
     0.0053315687181647],
    [0.0549198554678275, 0.0117283482435722, 0.0467873748627646, 0.45930051301242, 0.390756126219457,
     0.0365077821939589],
    [0.0177533237479767, 0.0181183377193477, 0.187694467572642, 0.642411985867458, 0.119774128544134,
     0.0142477565484414]]
# (case name, case, beta, TRL total, TRL matched part, TRL unmatched part)
TRL_PINS = [
    ("one-token chunks", dict(s_ids=[2, 0, 4], t_ids=[3, 0, 5], s_chunks=[0, 1, 2], t_chunks=[0, 1, 2]), 0.5,
     0.4464061564183522, 0.1764751517379576, 0.5813716587585495),
    ("merged chunks", CASE2, 0.5, 0.26218915879034577, 0.021131959073693793, 0.3827177586486717),
    ("merged chunks, beta 0.2", CASE2, 0.2, 0.2593473520596026, 0.0126065388814643, 0.3827177586486717),
]


def test_gold_merge_equals_trl_bayesian_merge():
    """Our merged rows π · p(· | last row) are TRL's "bayesian" merged rows, number for number."""
    from cot2align.losses.gold import pair_chunks

    case = hand_case(**CASE2)
    case.pop("stu2tea")
    pairs = pair_chunks(**case)
    for logits, last, log_prefix, pinned in (
            (case["student_logits"], pairs.student_last, pairs.student_log_prefix, TRL_CASE2_MERGED_STUDENT),
            (case["teacher"], pairs.teacher_last, pairs.teacher_log_prefix, TRL_CASE2_MERGED_TEACHER)):
        rows = torch.softmax(logits.reshape(-1, logits.shape[-1])[last], -1) * log_prefix.exp()[:, None]
        assert torch.allclose(rows, torch.tensor(pinned, dtype=torch.float64), rtol=1e-12, atol=0)


def _gjsd_term(t, s, beta):
    m = beta * t + (1 - beta) * s
    return beta * t * math.log(t / m) + (1 - beta) * s * math.log(s / m)


@pytest.mark.parametrize("name,spec,beta,total,matched,unmatched", TRL_PINS, ids=[p[0] for p in TRL_PINS])
def test_gold_equals_trl_uld_hybrid_up_to_the_documented_buckets(name, spec, beta, total, matched, unmatched):
    """With TRL's scope (matched tokens compared in every chunk) our two parts are TRL's plus exactly the two terms we
    add on purpose: the JSD term of the bucket holding the mass not compared token by token (r_t, r_s), and |ρ_s − ρ_t|
    (the mass a merged row lacks). Where both vanish (one-token chunks with equal rest masses) the losses are equal."""
    case = hand_case(**spec)
    d_match, d_rest = gold_divergences(**case, beta=beta, scope="all")
    rest_terms, rho_gaps = [], []
    for (qs, qt), (rho_s, rho_t) in _merged_rows(case):
        r_s, r_t = 1 - qs[0] - qs[1], 1 - qt[0] - qt[1]
        rest_terms.append(_gjsd_term(r_t, r_s, beta))
        rho_gaps.append(abs(rho_s - rho_t))
    assert abs((d_match.mean().item() - sum(rest_terms) / len(rest_terms)) - matched) < 1e-12
    assert abs((d_rest.mean().item() - sum(rho_gaps) / len(rho_gaps)) - unmatched) < 1e-12
    w = 2 / 6
    ours = gold_loss(**case, matched_weight=w, beta=beta, scope="all").item()
    correction = w * sum(rest_terms) / len(rest_terms) + (1 - w) * sum(rho_gaps) / len(rho_gaps)
    assert abs(ours - correction - total) < 1e-12
    assert min(rho_gaps) == 0 and (max(rho_gaps) > 0) == (spec is CASE2)     # one-token chunks lack no mass


def _merged_rows(case):
    """[((q_s, q_t), (ρ_s, ρ_t)) per chunk] of one example, from the slow reference's chain rule."""
    s_rows = chunk_rows(case["student_chunks"], case["student_mask"], 0)
    t_rows = chunk_rows(case["teacher_chunks"], case["teacher_mask"], 0)
    out = []
    for c in sorted(s_rows):
        qs, rho_s = merged(case["student_logits"][0], case["student_targets"][0], s_rows[c], 1.0)
        qt, rho_t = merged(case["teacher"][0], case["teacher_targets"][0], t_rows[c], 1.0)
        out.append(((qs, qt), (rho_s, rho_t)))
    return out


@pytest.mark.parametrize("teacher_name,student_name", [("tiny-qwen2", "tiny-gpt2"), ("tiny-qwen2", "tiny-llama")])
def test_one_token_chunks_of_real_tokenizers_are_exact_pairs(teacher_name, student_name):
    """In a chunk of one token on each side (align/chunks.py) both tokens spell the same bytes, so the exact map pairs
    them — digits, accents, an emoji, a newline, the final EOS (by role) — except where a SentencePiece dummy prefix
    makes the first token " The" on one side and "The" on the other."""
    import numpy as np

    from cot2align.align.chunks import chunk_alignment
    from cot2align.align.exact_tokens import exact_token_map
    from cot2align.align.vocab import token_strings
    from cot2align.modeling import load_tokenizer

    teacher, student = load_tokenizer(teacher_name), load_tokenizer(student_name)
    exact = exact_token_map(teacher, student)
    strings_s, strings_t = token_strings(student), token_strings(teacher)
    text = "The café's 1234 naïve résumé costs $5.99 — 🙂 done.\nNew line: x = y + 2"
    ids_s = student(text, add_special_tokens=False)["input_ids"] + [student.eos_token_id]
    ids_t = teacher(text, add_special_tokens=False)["input_ids"] + [teacher.eos_token_id]
    chunks_s, chunks_t = chunk_alignment(student, teacher)(ids_s, ids_t, text)
    paired = 0
    for c in range(int(chunks_s.max()) + 1):
        rows_s, rows_t = np.nonzero(chunks_s == c)[0], np.nonzero(chunks_t == c)[0]
        if len(rows_s) == len(rows_t) == 1:
            s_id, t_id = ids_s[rows_s[0]], ids_t[rows_t[0]]
            same = strings_s[s_id] == strings_t[t_id] or (s_id, t_id) == (student.eos_token_id, teacher.eos_token_id)
            assert (exact.stu2tea[s_id] == t_id) == same, (strings_s[s_id], strings_t[t_id])
            paired += same
    assert paired >= 10
