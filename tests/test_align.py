"""MinED alignment on real tokenizations: normalised token strings, the vocabulary map, DTW."""

import itertools
import time

import numpy as np
import pytest
from rapidfuzz.distance import Levenshtein

from cot2align.align import vocab as vocab_module
from cot2align.align.mined import aligned_teacher_rows, dtw_align, dtw_table
from cot2align.align.vocab import build_vocab_map, normalise_token, token_strings, vocab_map
from cot2align.modeling import load_tokenizer

TOKENIZERS = ("tiny-gpt2", "tiny-mistral", "tiny-qwen2", "tiny-llama")
SENTENCES = [
    "The total is 1,234.56 dollars, i.e. 3 × 411.52 — paid on 2024-05-17.",
    "def area(r):\n    return 3.14159 * r ** 2  # circle\n",
    "Café déjà vu: naïve Zoë ate crème brûlée 🍰🙂 at 10:30pm!",
    "東京は日本の首都です。Москва — столица России.",
    "   leading spaces,\ttabs and\n\nnewlines   ",
]


@pytest.fixture(scope="module")
def tokenizers():
    return {name: load_tokenizer(name) for name in TOKENIZERS}


@pytest.fixture(scope="module")
def strings(tokenizers):
    return {name: token_strings(tok) for name, tok in tokenizers.items()}


def test_normalised_strings_are_the_bytes_of_the_text(tokenizers, strings):
    """Concatenating the normalised strings of a tokenization gives back the text's UTF-8 bytes."""
    for name, tok in tokenizers.items():
        for text in SENTENCES:
            ids = tok(text, add_special_tokens=False)["input_ids"]
            joined = "".join(strings[name][i] for i in ids).encode("latin-1")
            expected = text.encode("utf-8")
            if name in ("tiny-mistral", "tiny-llama"):          # SentencePiece adds one leading space
                assert joined in (expected, b" " + expected), (name, text)
            else:
                assert joined == expected, (name, text)
    assert normalise_token("Ġhello", True) == normalise_token("▁hello", False) == " hello"
    assert normalise_token("<0x0A>", False) == normalise_token("Ċ", True) == "\n"


def _slow_map_entry(query, student):
    distances = [Levenshtein.distance(query, s) for s in student]
    return int(np.argmin(distances)), min(distances)


def test_vocab_map_exact_then_min_edit_distance(tokenizers, strings):
    teacher, student = strings["tiny-mistral"], strings["tiny-gpt2"]
    sample = list(range(0, len(teacher), 97))[:300]
    sub_teacher = [teacher[i] for i in sample]
    result = build_vocab_map(sub_teacher, student)
    first = {}
    for i, s in enumerate(student):
        first.setdefault(s, i)
    checked_inexact = 0
    for k, query in enumerate(sub_teacher):
        if query in first:
            assert result.exact[k] and result.tea2stu[k] == first[query]
        else:
            assert not result.exact[k]
            if checked_inexact < 25:           # the brute-force check is slow in Python
                best, best_distance = _slow_map_entry(query, student)
                assert result.tea2stu[k] == best, (query, student[result.tea2stu[k]], student[best])
                assert Levenshtein.distance(query, student[result.tea2stu[k]]) == best_distance
                checked_inexact += 1
    assert checked_inexact > 5
    # stu2tea: every representative maps back to its student id, exact matches preferred
    for s_id, t_id in enumerate(result.stu2tea):
        if t_id >= 0:
            assert result.tea2stu[t_id] == s_id
            if result.exact[result.tea2stu == s_id].any():
                assert result.exact[t_id]


def test_vocab_map_special_tokens_by_role_and_disk_cache(tokenizers, tmp_path, monkeypatch):
    teacher, student = tokenizers["tiny-llama"], tokenizers["tiny-mistral"]
    started = time.perf_counter()
    first = vocab_map(teacher, student, cache_dir=tmp_path)
    assert time.perf_counter() - started < 60
    assert first.tea2stu[teacher.eos_token_id] == student.eos_token_id
    assert len(list(tmp_path.glob("*.npz"))) == 1

    def refuse(*args, **kwargs):
        raise AssertionError("the cached map should have been loaded, not rebuilt")

    monkeypatch.setattr(vocab_module, "build_vocab_map", refuse)
    again = vocab_map(teacher, student, cache_dir=tmp_path)
    assert np.array_equal(again.tea2stu, first.tea2stu) and np.array_equal(again.stu2tea, first.stu2tea)


def _slow_dtw_path(student, teacher):
    """FuseLLM's dtw, written out with Python loops (teacher rows, student columns)."""
    n, m = len(teacher), len(student)
    table = [[float("inf")] * (m + 1) for _ in range(n + 1)]
    table[0][0] = 0.0
    for i in range(n):
        for j in range(m):
            cost = Levenshtein.distance(teacher[i], student[j])
            table[i + 1][j + 1] = cost + min(table[i][j + 1], table[i + 1][j], table[i][j])
    i, j, path = n - 1, m - 1, []
    while i > 0 or j > 0:
        path.append((j, i))
        options = [table[i][j] if i > 0 and j > 0 else float("inf"), table[i][j + 1] if i > 0 else float("inf"),
                   table[i + 1][j] if j > 0 else float("inf")]
        move = int(np.argmin(options))
        i, j = (i - 1, j - 1) if move == 0 else ((i - 1, j) if move == 1 else (i, j - 1))
    path.append((0, 0))
    return path[::-1], np.array(table)[1:, 1:]


@pytest.mark.parametrize("student_name,teacher_name", [("tiny-gpt2", "tiny-mistral"), ("tiny-gpt2", "tiny-qwen2"),
                                                        ("tiny-llama", "tiny-qwen2"), ("tiny-mistral", "tiny-gpt2")])
def test_dtw_on_real_tokenizations(tokenizers, strings, student_name, teacher_name):
    for text in SENTENCES:
        s_ids = tokenizers[student_name](text, add_special_tokens=False)["input_ids"]
        t_ids = tokenizers[teacher_name](text, add_special_tokens=False)["input_ids"]
        s_tokens = [strings[student_name][i] for i in s_ids]
        t_tokens = [strings[teacher_name][i] for i in t_ids]
        slow_path, slow_table = _slow_dtw_path(s_tokens, t_tokens)
        assert dtw_align(s_tokens, t_tokens, anchored=False) == slow_path
        path = dtw_align(s_tokens, t_tokens)
        cost = np.array([[Levenshtein.distance(a, b) for b in s_tokens] for a in t_tokens], dtype=float)
        assert np.array_equal(dtw_table(cost), slow_table)
        # monotone steps of at most one on each side, covering both sequences end to end
        assert path[0] == (0, 0) and path[-1] == (len(s_tokens) - 1, len(t_tokens) - 1)
        for (i0, j0), (i1, j1) in itertools.pairwise(path):
            assert (i1 - i0, j1 - j0) in ((1, 1), (1, 0), (0, 1))
        # identical tokens at the same place in the text are paired
        s_offsets, t_offsets = _byte_offsets(s_tokens), _byte_offsets(t_tokens)
        t_at = {(t_offsets[j], t): j for j, t in enumerate(t_tokens)}
        shared = [(i, t_at[(s_offsets[i], s)]) for i, s in enumerate(s_tokens) if (s_offsets[i], s) in t_at and s.strip()]
        assert shared, text
        assert set(shared) <= set(path), (text, [p for p in shared if p not in path])


def _byte_offsets(tokens):
    """Start offset of each token in the joined byte string, ignoring one leading SentencePiece space."""
    offsets, position = [], 0
    shift = 1 if tokens and tokens[0].startswith(" ") else 0
    for t in tokens:
        offsets.append(position - shift)
        position += len(t)
    return offsets


def test_aligned_rows_one_to_one_and_same_token(tokenizers, strings):
    teacher_tok, student_tok = tokenizers["tiny-mistral"], tokenizers["tiny-gpt2"]
    result = build_vocab_map(strings["tiny-mistral"], strings["tiny-gpt2"])
    text = "Two friends talk about the weather and decide to walk to the station together."
    s_ids = student_tok(text, add_special_tokens=False)["input_ids"]
    t_ids = teacher_tok(text, add_special_tokens=False)["input_ids"]
    rows = aligned_teacher_rows(s_ids, t_ids, strings["tiny-gpt2"], strings["tiny-mistral"], result.tea2stu)
    path = dtw_align([strings["tiny-gpt2"][i] for i in s_ids], [strings["tiny-mistral"][i] for i in t_ids])
    partners = {}
    for i, j in path:
        partners.setdefault(i, []).append(j)
    for i, row in enumerate(rows):
        if row >= 0:
            assert partners[i] == [row] and result.tea2stu[t_ids[row]] == s_ids[i]
        else:
            assert len(partners[i]) != 1 or result.tea2stu[t_ids[partners[i][0]]] != s_ids[i]
    assert (rows >= 0).mean() > 0.5
    assert aligned_teacher_rows([], t_ids, strings["tiny-gpt2"], strings["tiny-mistral"], result.tea2stu).shape == (0,)
