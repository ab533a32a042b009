"""ALM's chunks: the two tokenisations of one response cut into the smallest spans that both can spell.

The student and the teacher tokenise the same response text differently. A *chunk* is a span of the text whose two
ends are token boundaries on both sides; the chunks are the minimal such spans, so every token of either side lies
in exactly one chunk and a chunk's tokens on one side spell the same bytes as its tokens on the other:

    text        "1234 café"
    student     "12" "34" " caf" "é"          (boundaries at bytes 2, 4, 8, 10)
    teacher     "1" "2" "3" "4" " café"       (boundaries at bytes 1, 2, 3, 4, 10)
    chunks      [0, 2) [2, 4) [4, 10)  ->  student 0 1 2 2,  teacher 0 0 1 1 2

Offsets are in BYTES of the UTF-8 text, not characters: byte-level BPE (GPT-2, Qwen2, SmolLM2) may cut a
character between two tokens (an emoji as "ðŁĺ" + "Ģ"), and such a cut is never a chunk boundary unless the other
side cuts there too. Each token's bytes come from its tokenizer (align/vocab.py's `token_strings`: the byte-level
decoder table, SentencePiece's "▁" as a space and "<0xNN>" byte-fallback tokens as their byte).

SentencePiece tokenizers (Llama-2, Mistral) tokenise a response on its own (`tokenizer(response,
add_special_tokens=False)`, as train/data.py and teacher/sequences.py do) with one space prepended unless the text
already starts with one ("Hello" -> "▁Hello", " Hello" -> "▁Hello" as well). That space is not in the text: it is
taken off the first token (which may leave a token of no bytes, e.g. the lone "▁" before "<0x0A>"; such a token joins
the chunk that follows it).

A response the cache kept whole ends with EOS on both sides; the two EOS tokens form a chunk of their own (the
likelihood of ending there, comparable on both sides). A side cut shorter (the student's max_length) covers less of
the text: the tokens of the other side past the last common boundary get chunk −1 (not aligned), as does an EOS
without a partner. Where the two byte strings differ (a tokenizer that normalises, e.g. Qwen2's NFC, on a text
that is not in NFC) the boundaries are matched through the runs of equal bytes on either side of each difference:
the differing bytes fall inside one chunk, the rest aligns as usual.

Tokenkit's aligner (`get_unconstrained_alignments`) differs in three ways we do not copy: it never aligns EOS, a
standalone newline token on one side resets that side's running length (everything after stays unaligned), and it
works on decoded strings.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np

from cot2align.align.vocab import token_strings

VERSION = 2     # of the chunking (memoised chunk ids are keyed by it): 2 = resynchronised after differing bytes


@dataclass
class TokenBytes:
    """One tokenizer's bytes per token id (computed once), its EOS id and whether it prepends a space."""

    strings: list[bytes]          # bytes of each id ("" for holes in the id space)
    lengths: np.ndarray           # int64 [V] their lengths
    eos_id: int | None
    prefix_space: bool            # tokenizer("a") spells " a": a SentencePiece dummy prefix

    @classmethod
    def of(cls, tokenizer) -> "TokenBytes":
        """The table of `tokenizer`, built once per tokenizer object (a 152k vocabulary takes about a second)."""
        try:
            return _TABLES[tokenizer]
        except (KeyError, TypeError):
            pass
        table = cls._build(tokenizer)
        try:
            _TABLES[tokenizer] = table
        except TypeError:               # not weak-referenceable: rebuilt per call
            pass
        return table

    @classmethod
    def _build(cls, tokenizer) -> "TokenBytes":
        strings = [s.encode("latin-1") for s in token_strings(tokenizer)]
        eos = tokenizer.eos_token_id
        if eos is not None and eos >= len(strings):       # an EOS added beyond the vocabulary's ids
            strings += [b""] * (eos + 1 - len(strings))
        lengths = np.fromiter(map(len, strings), dtype=np.int64, count=len(strings))
        probe = tokenizer("a", add_special_tokens=False)["input_ids"]
        prefix_space = b"".join(strings[i] for i in probe if i < len(strings)) == b" a"
        return cls(strings, lengths, eos, prefix_space)

    def spell(self, ids: np.ndarray, text_starts_with_space: bool | None) -> tuple[bytes, np.ndarray, bool]:
        """(bytes of the text part, byte length of each of its tokens, whether the ids end with EOS).

        text_starts_with_space: whether the response text starts with a space (None: unknown, then a leading
        space on a prefix-space tokenizer is taken for its dummy prefix)."""
        has_eos = len(ids) > 0 and self.eos_id is not None and int(ids[-1]) == self.eos_id
        body = ids[:-1] if has_eos else ids
        if len(body) and (body.min() < 0 or body.max() >= len(self.strings)):
            raise ValueError(f"token id outside the tokenizer's {len(self.strings)} ids")
        lengths = self.lengths[body]
        spelled = b"".join([self.strings[i] for i in body.tolist()])
        if self.prefix_space and not text_starts_with_space and spelled.startswith(b" "):
            spelled = spelled[1:]
            lengths = lengths.copy()
            lengths[0] -= 1
        return spelled, lengths, has_eos


_TABLES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _common_boundaries(bytes_s: bytes, bytes_t: bytes, ends_s: np.ndarray, ends_t: np.ndarray):
    """Byte offsets (on the student's side, on the teacher's) of the boundaries both sides share, increasing,
    excluding 0. Same bytes (or one a prefix of the other): the token ends found on both sides up to the shorter
    one. Otherwise through the matching blocks of the two strings: a student end inside (or at an edge of) a block
    maps to a teacher offset, a boundary where that offset is a teacher end."""
    covered = min(len(bytes_s), len(bytes_t))
    if bytes_s[:covered] == bytes_t[:covered]:
        shared = np.intersect1d(ends_s, ends_t)
        shared = shared[(shared > 0) & (shared <= covered)]
        return shared, shared
    on_s, on_t = [], []
    teacher_ends = set(ends_t.tolist())
    for a, b, size in _matching_blocks(bytes_s, bytes_t):
        inside = ends_s[(ends_s >= a) & (ends_s <= a + size)]
        for e in inside.tolist():
            if e > 0 and e - a + b in teacher_ends and (not on_s or e > on_s[-1]) and e - a + b > (on_t[-1] if on_t else 0):
                on_s.append(e)
                on_t.append(e - a + b)
    return np.asarray(on_s, dtype=np.int64), np.asarray(on_t, dtype=np.int64)


RESYNC_WINDOW = 4      # bytes that must agree again after a difference
RESYNC_REACH = 64      # the furthest (in bytes, on each side) a difference may run


def _matching_blocks(bytes_s: bytes, bytes_t: bytes) -> list[tuple[int, int, int]]:
    """Blocks (a, b, size) where bytes_s[a:a+size] == bytes_t[b:b+size], in order: runs of equal bytes, and after each
    difference the nearest point where both agree again for RESYNC_WINDOW bytes (the fewest bytes skipped on the two
    sides together, up to RESYNC_REACH on each). Linear in the length for the local differences a normalising
    tokenizer makes; a difference that never resynchronises ends the blocks."""
    s, t = np.frombuffer(bytes_s, np.uint8), np.frombuffer(bytes_t, np.uint8)
    blocks, i, j = [], 0, 0
    while i < len(s) and j < len(t):
        n = min(len(s) - i, len(t) - j)
        differ = np.nonzero(s[i:i + n] != t[j:j + n])[0]
        run = int(differ[0]) if len(differ) else n
        if run:
            blocks.append((i, j, run))
        i, j = i + run, j + run
        if run == n:
            break
        step = _resync(bytes_s, bytes_t, i, j)
        if step is None:
            return blocks
        i, j = i + step[0], j + step[1]
    if i == len(s) and j == len(t):
        blocks.append((i, j, 0))         # both ends reached together: the end is a shared position
    return blocks


def _resync(bytes_s: bytes, bytes_t: bytes, i: int, j: int) -> tuple[int, int] | None:
    """(di, dj), the fewest bytes di + dj to skip after a difference at (i, j) so that both sides agree again on the
    next RESYNC_WINDOW bytes (or on all that is left of both: both ends)."""
    left_s, left_t = len(bytes_s) - i, len(bytes_t) - j
    for d in range(1, 2 * RESYNC_REACH + 1):
        for di in range(max(0, d - RESYNC_REACH), min(d, RESYNC_REACH) + 1):
            dj = d - di
            if di > left_s or dj > left_t:
                continue
            width = min(RESYNC_WINDOW, left_s - di, left_t - dj)
            if width == 0:
                if di == left_s and dj == left_t:
                    return di, dj
                continue
            if bytes_s[i + di:i + di + width] == bytes_t[j + dj:j + dj + width]:
                return di, dj
    return None


def _chunk_ids(lengths: np.ndarray, boundaries: np.ndarray) -> np.ndarray:
    """Chunk of each token: the number of shared boundaries at or before its first byte (a token of no bytes joins
    the chunk that starts where it is); −1 past the last shared boundary."""
    starts = np.cumsum(lengths) - lengths
    chunks = np.searchsorted(boundaries, starts, side="right").astype(np.int64)
    chunks[chunks >= len(boundaries)] = -1
    return chunks


@dataclass
class _Alignment:
    student: np.ndarray            # int64 chunk of each student token (−1: none)
    teacher: np.ndarray            # int64 chunk of each teacher token
    student_bytes: np.ndarray      # bytes of each student token (0 for EOS and a dummy-prefix "▁")
    teacher_bytes: np.ndarray
    eos_paired: bool


class ChunkAligner:
    """`align(student_ids, teacher_ids[, text]) -> (student_chunks, teacher_chunks)` for one response: int64 arrays
    of the chunk id of each token (0..C−1 in text order, −1 = not aligned). The ids are the response tokens as
    each side has them (EOS included when kept); `text`, when given, is the response text (it only settles whether
    a SentencePiece side's leading space is the text's own)."""

    def __init__(self, student_tokenizer, teacher_tokenizer):
        self.student = TokenBytes.of(student_tokenizer)
        self.teacher = TokenBytes.of(teacher_tokenizer)

    def __call__(self, student_ids, teacher_ids, text: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        return self.align(student_ids, teacher_ids, text)

    def align(self, student_ids, teacher_ids, text: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        found = self._align(student_ids, teacher_ids, text)
        return found.student, found.teacher

    def _align(self, student_ids, teacher_ids, text) -> "_Alignment":
        ids_s = np.asarray(student_ids, dtype=np.int64).reshape(-1)
        ids_t = np.asarray(teacher_ids, dtype=np.int64).reshape(-1)
        bytes_s, lengths_s, eos_s, bytes_t, lengths_t, eos_t = self._spell_both(ids_s, ids_t, text)
        on_s, on_t = _common_boundaries(bytes_s, bytes_t, np.cumsum(lengths_s), np.cumsum(lengths_t))
        chunks_s, chunks_t = _chunk_ids(lengths_s, on_s), _chunk_ids(lengths_t, on_t)
        # EOS after the whole text on both sides: a chunk of its own; otherwise it has no partner
        if len(on_s):
            whole = on_s[-1] == len(bytes_s) and on_t[-1] == len(bytes_t)
        else:
            whole = len(bytes_s) == len(bytes_t) == 0
        paired = bool(eos_s and eos_t and whole)
        if eos_s:
            chunks_s, lengths_s = np.append(chunks_s, len(on_s) if paired else -1), np.append(lengths_s, 0)
        if eos_t:
            chunks_t, lengths_t = np.append(chunks_t, len(on_t) if paired else -1), np.append(lengths_t, 0)
        return _Alignment(chunks_s, chunks_t, lengths_s, lengths_t, paired)

    def _spell_both(self, ids_s: np.ndarray, ids_t: np.ndarray, text: str | None):
        """Both sides' bytes; without the text, whether it starts with a space is read from a side that adds no
        dummy prefix (when both add one, both leading spaces are taken off alike)."""
        if text is not None:
            leading = text.startswith(" ")
            return (*self.student.spell(ids_s, leading), *self.teacher.spell(ids_t, leading))
        if self.student.prefix_space and not self.teacher.prefix_space:
            spelled_t = self.teacher.spell(ids_t, None)
            return (*self.student.spell(ids_s, spelled_t[0].startswith(b" ")), *spelled_t)
        spelled_s = self.student.spell(ids_s, None)
        leading = spelled_s[0].startswith(b" ") if not self.student.prefix_space else None
        return (*spelled_s, *self.teacher.spell(ids_t, leading))

    def describe(self, student_ids, teacher_ids, text: str | None = None) -> dict[str, int]:
        """Counts for the alignment diagnostics of one response (sum them over examples, then `alignment_shares`):
        bytes of the response (the longer side's), bytes in aligned chunks, in chunks of one token on each side
        (1:1) and in merged chunks (more than one token on a side); chunks, 1:1 chunks; tokens and aligned tokens
        per side; whether the EOS pair was aligned."""
        found = self._align(student_ids, teacher_ids, text)
        chunks_s, chunks_t, lengths_s = found.student, found.teacher, found.student_bytes
        n_chunks = int(max(chunks_s.max(initial=-1), chunks_t.max(initial=-1))) + 1
        tokens_s = np.bincount(chunks_s[chunks_s >= 0], minlength=n_chunks)
        tokens_t = np.bincount(chunks_t[chunks_t >= 0], minlength=n_chunks)
        chunk_bytes = np.bincount(chunks_s[chunks_s >= 0], weights=lengths_s[chunks_s >= 0], minlength=n_chunks)
        one_to_one = (tokens_s == 1) & (tokens_t == 1)
        return {
            "bytes": int(max(lengths_s.sum(), found.teacher_bytes.sum())),
            "bytes_aligned": int(chunk_bytes.sum()),
            "bytes_one_to_one": int(chunk_bytes[one_to_one].sum()),
            "bytes_merged": int(chunk_bytes[~one_to_one].sum()),
            "chunks": n_chunks,
            "chunks_one_to_one": int(one_to_one.sum()),
            "tokens_student": len(chunks_s), "tokens_teacher": len(chunks_t),
            "tokens_student_aligned": int((chunks_s >= 0).sum()), "tokens_teacher_aligned": int((chunks_t >= 0).sum()),
            "eos_paired": int(found.eos_paired),
        }


def alignment_shares(counts: dict[str, int]) -> dict[str, float]:
    """Shares from summed `ChunkAligner.describe` counts: of the response bytes, those in aligned chunks, in 1:1
    chunks and in merged chunks; of the chunks, the 1:1 ones; of each side's tokens, the aligned ones; the mean
    tokens per aligned chunk on each side."""
    def share(a: str, b: str) -> float:
        return counts[a] / counts[b] if counts.get(b) else 0.0

    aligned_chunks = max(counts.get("chunks", 0), 1)
    return {
        "bytes_aligned": share("bytes_aligned", "bytes"),
        "bytes_one_to_one": share("bytes_one_to_one", "bytes"),
        "bytes_merged": share("bytes_merged", "bytes"),
        "chunks_one_to_one": share("chunks_one_to_one", "chunks"),
        "tokens_student_aligned": share("tokens_student_aligned", "tokens_student"),
        "tokens_teacher_aligned": share("tokens_teacher_aligned", "tokens_teacher"),
        "student_tokens_per_chunk": counts.get("tokens_student_aligned", 0) / aligned_chunks,
        "teacher_tokens_per_chunk": counts.get("tokens_teacher_aligned", 0) / aligned_chunks,
    }


def chunk_alignment(student_tokenizer, teacher_tokenizer) -> ChunkAligner:
    """The per-example aligner of a (student, teacher) tokenizer pair: each tokenizer's bytes per token are
    computed here, once (see ChunkAligner)."""
    return ChunkAligner(student_tokenizer, teacher_tokenizer)
