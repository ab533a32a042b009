"""Token strings in one comparable form, and the teacher -> student vocabulary map of MinED.

Tokenizers spell the same text differently: GPT-2/Qwen2/SmolLM2 byte-level BPE writes a space as "Ġ" and
every byte through a printable-unicode table; Llama/Mistral SentencePiece writes a space as "▁" and
unknown characters as byte tokens "<0xE2>". `token_strings` turns every vocabulary entry into the bytes
it stands for, kept as a latin-1 str (one char per byte) so that exact matching and edit distance work
the same for every tokenizer: "Ġhello", "▁hello" -> " hello"; "<0x0A>", "Ċ" -> "\\n".

`vocab_map(teacher_tok, student_tok)`: for each teacher token, the student token with the same bytes, else
the one at minimum Levenshtein distance (lowest student id among ties), computed with rapidfuzz's
compiled `cdist` in blocks on all cores; special tokens are mapped by role (eos -> eos, ...). The map is
cached on disk under $COT2ALIGN_HOME/vocab_maps, keyed by the two tokenizer hashes.
(FuseLLM's vocab_mapping.py does the same with a Python loop over `editdistance`, after stripping the
space marker; we keep the space as a byte instead, so "hello" and " hello" stay distinct.)
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from rapidfuzz import process
from rapidfuzz.distance import Levenshtein

from cot2align.modeling import cot2align_home, tokenizer_hash

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
SPECIAL_ROLES = ("eos_token_id", "bos_token_id", "pad_token_id", "unk_token_id")


@lru_cache(maxsize=1)
def _byte_level_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode table: printable char -> byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = printable[:], 0
    byte_values = printable[:]
    for b in range(256):
        if b not in printable:
            byte_values.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(byte_values, chars)}


def is_byte_level(tokenizer) -> bool:
    """True for byte-level BPE tokenizers (GPT-2 style), judged by their decoder."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return any(tok.startswith("Ġ") for tok in list(tokenizer.get_vocab())[:5000])
    return "ByteLevel" in json.dumps(json.loads(backend.to_str()).get("decoder"))


def normalise_token(token: str, byte_level: bool, special: frozenset = frozenset()) -> str:
    """The bytes a token stands for, as a latin-1 str. Special tokens keep their spelling."""
    if token in special:
        return token
    if byte_level:
        table = _byte_level_decoder()
        if all(c in table for c in token):
            return bytes(table[c] for c in token).decode("latin-1")
    else:
        match = _BYTE_TOKEN.fullmatch(token)
        if match:
            return chr(int(match.group(1), 16))
    return token.replace("\u2581", " ").encode("utf-8").decode("latin-1")


def token_strings(tokenizer) -> list[str]:
    """normalise_token for every id of the tokenizer (holes in the id space become "")."""
    vocab = tokenizer.get_vocab()
    byte_level = is_byte_level(tokenizer)
    special = frozenset(getattr(tokenizer, "all_special_tokens", []) or [])
    strings = [""] * (max(vocab.values()) + 1)
    for token, i in vocab.items():
        strings[i] = normalise_token(token, byte_level, special)
    return strings


@dataclass
class VocabMap:
    """tea2stu [V_t] student id per teacher id; exact [V_t] whether the bytes matched exactly;
    stu2tea [V_s] the teacher id representing each student id (-1: none) — the exact match if there
    is one, else the lowest teacher id mapped there (DSKD keeps the first, `max_align_num = 1`)."""

    tea2stu: np.ndarray
    exact: np.ndarray
    stu2tea: np.ndarray


def build_vocab_map(teacher_strings: list[str], student_strings: list[str], special_pairs: dict[int, int] | None = None,
                    block_cells: int = 64_000_000, workers: int = -1) -> VocabMap:
    """Exact byte match, else minimum edit distance (rapidfuzz cdist, blocks of ~block_cells distances)."""
    first_id: dict[str, int] = {}
    for i, s in enumerate(student_strings):
        if s:
            first_id.setdefault(s, i)
    tea2stu = np.array([first_id.get(s, -1) for s in teacher_strings], dtype=np.int64)
    exact = tea2stu >= 0
    for t_id, s_id in (special_pairs or {}).items():
        tea2stu[t_id], exact[t_id] = s_id, True
    pending = np.nonzero(~exact)[0]
    block = max(1, block_cells // max(len(student_strings), 1))
    for start in range(0, len(pending), block):
        ids = pending[start:start + block]
        distances = process.cdist([teacher_strings[i] for i in ids], student_strings, scorer=Levenshtein.distance,
                                  dtype=np.int32, workers=workers)
        tea2stu[ids] = distances.argmin(axis=1)          # first minimum = lowest student id among ties
    stu2tea = np.full(len(student_strings), -1, dtype=np.int64)
    order = np.lexsort((np.arange(len(tea2stu)), ~exact))  # exact matches first, then by teacher id
    for t_id in order[::-1]:                              # last write wins -> the first in `order`
        stu2tea[tea2stu[t_id]] = t_id
    return VocabMap(tea2stu, exact, stu2tea)


def _special_pairs(teacher_tok, student_tok) -> dict[int, int]:
    pairs = {}
    for role in SPECIAL_ROLES:
        t_id, s_id = getattr(teacher_tok, role, None), getattr(student_tok, role, None)
        if t_id is not None and s_id is not None:
            pairs.setdefault(int(t_id), int(s_id))
    return pairs


def vocab_map(teacher_tok, student_tok, cache_dir: str | Path | None = None) -> VocabMap:
    """The teacher -> student map, built once and cached on disk by the two tokenizer hashes."""
    cache_dir = Path(cache_dir) if cache_dir is not None else cot2align_home() / "vocab_maps"
    path = cache_dir / f"{tokenizer_hash(teacher_tok)[:16]}-to-{tokenizer_hash(student_tok)[:16]}.npz"
    if path.exists():
        with np.load(path) as stored:
            return VocabMap(stored["tea2stu"], stored["exact"], stored["stu2tea"])
    result = build_vocab_map(token_strings(teacher_tok), token_strings(student_tok), _special_pairs(teacher_tok, student_tok))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.npz")
    np.savez(tmp, tea2stu=result.tea2stu, exact=result.exact, stu2tea=result.stu2tea)
    os.replace(tmp, path)
    return result
