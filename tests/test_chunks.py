"""ALM's chunk alignment (align/chunks.py) on the real tokenizers: every chunk spells the same bytes on both sides."""

import itertools
import random
import time
import unicodedata

import numpy as np
import pytest

from cot2align.align.chunks import alignment_shares, chunk_alignment
from cot2align.modeling import bundled_tokenizer_dir

NAMES = ("gpt2", "qwen2.5", "llama2", "mistral", "smollm2")
SENTENCE_PIECE = ("llama2", "mistral")
TEXTS = [
    "The total is 1,234.56 dollars, i.e. 3 × 411.52 — paid on 2024-05-17.",
    "Café déjà vu: naïve Zoë ate crème brûlée 🍰🙂 at 10:30pm!",
    "東京は日本の首都です。Москва — столица России.",
    "\n\nHi\nthere  ",
    " leading space and trailing ",
    "a\tb\r\nc 12345 😀 中文",
    "x",
]
POOL = list("abcdefghij ABC0123456789 .,;:!?-\n\t") + ["é", "ü", "ß", "😀", "🍰", "中", "文", "東", "  ", "\n\n", "’"]


@pytest.fixture(scope="module")
def tokenizers():
    from transformers import AutoTokenizer
    return {name: AutoTokenizer.from_pretrained(bundled_tokenizer_dir(name)) for name in NAMES}


def response_ids(tokenizer, text: str, eos: bool = True) -> list[int]:
    """As train/data.py and teacher/sequences.py tokenise a response."""
    return tokenizer(text, add_special_tokens=False)["input_ids"] + ([tokenizer.eos_token_id] if eos else [])


def chunk_bytes(side, ids, chunks, text: str) -> list[bytes]:
    """The bytes of each chunk on one side, spelled from the tokenizer's own decode table (the SentencePiece dummy
    prefix taken off the first token when the text does not start with a space)."""
    ids = np.asarray(ids)
    pieces = [side.strings[i] for i in ids]
    if side.prefix_space and not text.startswith(" ") and pieces and pieces[0].startswith(b" "):
        pieces[0] = pieces[0][1:]
    n = int(chunks.max(initial=-1)) + 1
    return [b"".join(p for p, c in zip(pieces, chunks) if c == k) for k in range(n)]


def check_pair(aligner, ids_s, ids_t, text: str):
    chunks_s, chunks_t = aligner(ids_s, ids_t, text)
    assert chunks_s.dtype == chunks_t.dtype == np.int64
    assert len(chunks_s) == len(ids_s) and len(chunks_t) == len(ids_t)
    for chunks in (chunks_s, chunks_t):
        kept = chunks[chunks >= 0]
        assert np.all(np.diff(kept) >= 0) and np.all(np.diff(kept) <= 1) and (len(kept) == 0 or kept[0] == 0)
        assert np.all(chunks[len(kept):] == -1)                      # the unaligned tokens are a tail
    assert chunks_s.max(initial=-1) == chunks_t.max(initial=-1)
    return chunks_s, chunks_t


@pytest.mark.parametrize("student,teacher", list(itertools.product(NAMES, NAMES)))
def test_every_chunk_spells_the_same_bytes(tokenizers, student, teacher):
    """Whole responses with EOS: all tokens aligned, chunks equal in bytes, together the text, EOS its own chunk."""
    aligner = chunk_alignment(tokenizers[student], tokenizers[teacher])
    rng = random.Random(0)
    texts = TEXTS + ["".join(rng.choice(POOL) for _ in range(rng.randint(1, 60))) for _ in range(8)]
    for text in texts:
        ids_s, ids_t = response_ids(tokenizers[student], text), response_ids(tokenizers[teacher], text)
        chunks_s, chunks_t = check_pair(aligner, ids_s, ids_t, text)
        assert (chunks_s >= 0).all() and (chunks_t >= 0).all(), text
        spelled_s = chunk_bytes(aligner.student, ids_s, chunks_s, text)
        spelled_t = chunk_bytes(aligner.teacher, ids_t, chunks_t, text)
        assert spelled_s[:-1] == spelled_t[:-1], text                 # text chunks: the same bytes
        assert b"".join(spelled_s[:-1]) == text.encode("utf-8")
        assert chunks_s[-1] == chunks_t[-1] == chunks_s.max() and (chunks_s == chunks_s[-1]).sum() == 1
        assert (chunks_t == chunks_t[-1]).sum() == 1                  # EOS pairs with EOS alone
        # without the text, the dummy prefix is inferred from a side that adds none; with two SentencePiece sides a
        # leading space of the text is taken off both (then it joins the first chunk instead of being one)
        again_s, again_t = aligner(ids_s, ids_t)
        if not (student in SENTENCE_PIECE and teacher in SENTENCE_PIECE and text.startswith(" ")):
            assert np.array_equal(again_s, chunks_s) and np.array_equal(again_t, chunks_t), text
        else:
            assert (again_s >= 0).all() and again_s.max() in (chunks_s.max(), chunks_s.max() - 1)


def test_known_chunks_digits_and_a_split_character(tokenizers):
    """GPT-2 writes "12345" as "123" "45", Qwen2.5 digit by digit; GPT-2 cuts 😀 inside its UTF-8 bytes."""
    aligner = chunk_alignment(tokenizers["gpt2"], tokenizers["qwen2.5"])
    s, t = aligner(response_ids(tokenizers["gpt2"], "12345"), response_ids(tokenizers["qwen2.5"], "12345"))
    assert s.tolist() == [0, 1, 2] and t.tolist() == [0, 0, 0, 1, 1, 2]
    gpt2, mistral = tokenizers["gpt2"], tokenizers["mistral"]
    ids_s = response_ids(gpt2, "😀!")
    assert len(ids_s) == 4                                           # two pieces of the emoji's 4 bytes, "!", EOS
    s, t = chunk_alignment(gpt2, mistral)(ids_s, response_ids(mistral, "😀!"), "😀!")
    assert s.tolist() == [0, 0, 1, 2]                                 # the cut inside the character is no boundary
    assert t.tolist()[-1] == 2 and set(t.tolist()) == {0, 1, 2}


def test_sentencepiece_dummy_prefix(tokenizers):
    """Llama-2 spells "\\nHi" as "▁" "<0x0A>" "Hi": the "▁" is the dummy prefix (no bytes), joining the newline's
    chunk; " Hello" is spelled "▁Hello" too, and there the space is the text's own."""
    llama, gpt2 = tokenizers["llama2"], tokenizers["gpt2"]
    aligner = chunk_alignment(llama, gpt2)
    s, t = aligner(response_ids(llama, "\nHi"), response_ids(gpt2, "\nHi"), "\nHi")
    assert s.tolist() == [0, 0, 1, 2] and t.tolist() == [0, 1, 2]
    assert response_ids(llama, " Hello") == response_ids(llama, "Hello")
    for text in (" Hello", "Hello"):
        s, t = aligner(response_ids(llama, text), response_ids(gpt2, text))   # read from GPT-2's side
        assert s.tolist() == [0, 1] and t.tolist() == [0, 1], text


def test_a_side_cut_shorter_leaves_the_rest_unaligned(tokenizers):
    """The student cut at max_length (no EOS): the teacher's tokens past the last shared boundary, and its EOS, are
    −1; what is aligned spells a prefix of the text on both sides."""
    student, teacher = tokenizers["gpt2"], tokenizers["llama2"]
    aligner = chunk_alignment(student, teacher)
    text = TEXTS[1]
    full_s, ids_t = response_ids(student, text, eos=False), response_ids(teacher, text)
    for keep in (1, 5, 9, len(full_s) - 1):
        ids_s = full_s[:keep]
        chunks_s, chunks_t = check_pair(aligner, ids_s, ids_t, text)
        assert chunks_t[-1] == -1 and (chunks_t == -1).sum() >= 1
        spelled_s = chunk_bytes(aligner.student, ids_s, chunks_s, text)
        spelled_t = chunk_bytes(aligner.teacher, ids_t, chunks_t, text)
        assert spelled_s == spelled_t and text.encode().startswith(b"".join(spelled_s))
        covered = b"".join(aligner.student.strings[i] for i in ids_s)
        assert len(b"".join(spelled_s)) <= len(covered)
    # one EOS without a partner is not aligned, the text is
    chunks_s, chunks_t = aligner(full_s, ids_t, text)
    assert chunks_t[-1] == -1 and (chunks_s >= 0).all() and (chunks_t[:-1] >= 0).all()
    # an empty response: EOS pairs with EOS
    s, t = aligner([student.eos_token_id], [teacher.eos_token_id], "")
    assert s.tolist() == [0] and t.tolist() == [0]


def test_a_normalising_tokenizer_realigns_after_the_difference(tokenizers):
    """Qwen2.5 normalises to NFC: "e" + combining acute becomes "é" (2 bytes instead of 3). The differing bytes fall
    in one chunk; the text after it still aligns."""
    qwen, gpt2 = tokenizers["qwen2.5"], tokenizers["gpt2"]
    text = "A cafe\u0301 at 12:30, then 😀 done."
    ids_s, ids_t = response_ids(gpt2, text), response_ids(qwen, text)
    chunks_s, chunks_t = check_pair(chunk_alignment(gpt2, qwen), ids_s, ids_t, text)
    assert (chunks_s >= 0).all() and (chunks_t >= 0).all()
    aligner = chunk_alignment(gpt2, qwen)
    spelled_s = chunk_bytes(aligner.student, ids_s, chunks_s, text)
    spelled_t = chunk_bytes(aligner.teacher, ids_t, chunks_t, text)
    differ = [k for k, (a, b) in enumerate(zip(spelled_s, spelled_t)) if a != b]
    assert len(differ) == 1
    k = differ[0]
    assert unicodedata.normalize("NFC", spelled_s[k].decode()) == spelled_t[k].decode()
    assert spelled_s[k + 1:] == spelled_t[k + 1:] and len(spelled_s) - k > 5


def test_describe_and_shares(tokenizers):
    gpt2, qwen = tokenizers["gpt2"], tokenizers["qwen2.5"]
    aligner = chunk_alignment(gpt2, qwen)
    counts = aligner.describe(response_ids(gpt2, "12345 ok"), response_ids(qwen, "12345 ok"))
    # gpt2 "123" "45" " ok" | qwen "1" "2" "3" "4" "5" " ok": chunks [123] [45] [ ok] [EOS]
    assert counts == {"bytes": 8, "bytes_aligned": 8, "bytes_one_to_one": 3, "bytes_merged": 5, "chunks": 4,
                      "chunks_one_to_one": 2, "tokens_student": 4, "tokens_teacher": 7, "tokens_student_aligned": 4,
                      "tokens_teacher_aligned": 7, "eos_paired": 1}
    shares = alignment_shares(counts)
    assert shares["bytes_aligned"] == 1.0 and shares["bytes_one_to_one"] == 3 / 8 and shares["chunks_one_to_one"] == 0.5
    assert shares["teacher_tokens_per_chunk"] == 7 / 4
    cut = aligner.describe(response_ids(gpt2, "12345 ok", eos=False)[:1], response_ids(qwen, "12345 ok"))
    assert cut["bytes_aligned"] == 3 and cut["bytes"] == 8 and cut["eos_paired"] == 0


def test_fast_enough_for_tens_of_thousands(tokenizers):
    """One ~300-token response pair well under a millisecond or so: 50k examples x 2 views in about a minute."""
    gpt2, qwen = tokenizers["gpt2"], tokenizers["qwen2.5"]
    aligner = chunk_alignment(gpt2, qwen)
    text = " ".join(TEXTS) * 3
    ids_s, ids_t = response_ids(gpt2, text), response_ids(qwen, text)
    assert len(ids_s) > 250
    start = time.perf_counter()
    for _ in range(200):
        aligner(ids_s, ids_t)
    assert (time.perf_counter() - start) / 200 < 5e-3
