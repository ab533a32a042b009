"""X-Token's vocabulary projection: each student token spread over the teacher tokens it stands for.

NeMo RL's cross-tokenizer distillation ("X-Token", `tools/x_token/minimal_projection_via_multitoken.py`,
`reapply_exact_map.py`, `sort_and_cut_projection_matrix.py`) compares the two models' distributions in the teacher's
vocabulary through a sparse row-stochastic matrix W [V_s, V_t]: the student's probabilities p [V_s] become
q = p·W [V_t]. W is built from the two tokenizers alone:

  1. student → teacher: every student token's text, encoded by the teacher tokenizer into t_1 … t_n, adds
     w_i = 0.9·0.1^(i−1) / Σ_j 0.9·0.1^(j−1) to W[s, t_i] (the first piece carries ~90 % of the weight);
  2. teacher → student (the reverse pass): every teacher token t, encoded by the student tokenizer into
     s_1 … s_n, adds w_i to W[s_i, t];
  3. a student token whose bytes are exactly a teacher token's is pinned to that token alone, weight 1;
  4. each row is normalised to sum to 1, cut to its `top_k` largest entries (NeMo's runtime default, 4) and
     normalised again.

Tokens are compared as the bytes they stand for (align/vocab.py `token_strings`: "Ġhello", "▁hello" → " hello").
Differences from NeMo's tools, each deliberate:
  * special tokens (eos, bos, pad, unk) are paired by role and kept out of both passes; NeMo pairs special tokens by
    the similarity of their spelling;
  * a SentencePiece tokenizer's dummy prefix is removed from an encoding (the text "ing" is not the word-initial
    "▁ing"); NeMo's re-encoding keeps it and so maps word pieces onto word-initial tokens;
  * a token whose bytes are not whole UTF-8 characters (a byte-fallback piece) has no text to re-encode and gets
    entries from the reverse pass only;
  * NeMo's "scale trick" is not applied: it sets the last of the 32 prepared entries of every non-exact row to 0.2
    before the cut, and for a row with fewer than 32 real entries that slot is an arbitrary zero-weight teacher
    token, which then keeps at least 1/6 of the row's mass (its 0.2 of 1.2, kept through the cut).

The projection is built once per tokenizer pair and kept on disk under $COT2ALIGN_HOME/vocab_projections.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from cot2align.align.vocab import SPECIAL_ROLES, token_strings
from cot2align.modeling import cot2align_home, tokenizer_hash

TOP_K = 4                   # entries kept per student token (NeMo's runtime top_k)
MAX_PIECES = 32             # pieces of one re-encoded token that receive weight (NeMo's prepared top_k)
VERSION = 1


def piece_weights(n: int) -> np.ndarray:
    """0.9·0.1^i for the i-th piece, normalised: the first piece of a split token carries most of its weight."""
    w = 0.9 * 0.1 ** np.arange(n, dtype=np.float64)
    return w / w.sum()


def _text(token_bytes: str) -> str | None:
    """The text of a token's bytes (latin-1 str), or None when they are not whole UTF-8 characters."""
    try:
        return token_bytes.encode("latin-1").decode("utf-8")
    except (UnicodeDecodeError, UnicodeEncodeError):
        return None


def _special_ids(tokenizer) -> set[int]:
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    return ids | {int(i) for i in (getattr(tokenizer, r, None) for r in SPECIAL_ROLES) if i is not None}


def _longest_match(text: str, by_string: dict[str, int], longest: int) -> list[int] | None:
    """`text` cut greedily into the longest vocabulary strings from the left (None if a byte has no token)."""
    ids, start = [], 0
    while start < len(text):
        for end in range(min(len(text), start + longest), start, -1):
            if text[start:end] in by_string:
                ids.append(by_string[text[start:end]])
                start = end
                break
        else:
            return None
    return ids


def encoder(tokenizer, strings: list[str]):
    """texts -> token ids with `tokenizer`, without special tokens and without a SentencePiece dummy prefix.

    A SentencePiece tokenizer encodes "stem" as "▁stem": the space it added is dropped when a token " " starts the
    encoding; when the first token is " X", it becomes the token X, or, where the vocabulary has no X, X cut into
    the longest vocabulary strings from the left (the tokenizer cannot encode a word without its dummy prefix)."""
    by_string = {s: i for i, s in enumerate(strings) if s}
    longest = max(map(len, by_string))
    probe = tokenizer("a", add_special_tokens=False)["input_ids"]
    adds_space = "".join(strings[i] for i in probe) == " a"

    def encode(texts: list[str]) -> list[list[int]]:
        out = []
        for text, ids in zip(texts, tokenizer(texts, add_special_tokens=False)["input_ids"]):
            if adds_space and ids and not text.startswith(" ") and strings[ids[0]].startswith(" "):
                rest = strings[ids[0]][1:]
                head = [] if not rest else _longest_match(rest, by_string, longest)
                ids = ids if head is None else [*head, *ids[1:]]
            out.append(ids)
        return out

    return encode


def _add_pass(weights: dict, source_strings: list[str], skip: set[int], encode, target_skip: set[int],
              student_is_source: bool) -> None:
    sources = [(i, _text(s)) for i, s in enumerate(source_strings) if s and i not in skip]
    sources = [(i, text) for i, text in sources if text]
    for (source, _), pieces in zip(sources, encode([text for _, text in sources])):
        pieces = pieces[:MAX_PIECES]
        if not pieces or any(p in target_skip for p in pieces):
            continue
        for piece, w in zip(pieces, piece_weights(len(pieces))):
            key = (source, piece) if student_is_source else (piece, source)
            weights[key] = weights.get(key, 0.0) + float(w)


def build_projection(student_tok, teacher_tok, top_k: int = TOP_K) -> tuple[np.ndarray, np.ndarray]:
    """(indices [V_s, top_k] int64 teacher ids, −1 = none; weights [V_s, top_k] float32, rows summing to 1 or 0)."""
    s_strings, t_strings = token_strings(student_tok), token_strings(teacher_tok)
    s_strings += [""] * max(0, len(student_tok) - len(s_strings))
    s_special, t_special = _special_ids(student_tok), _special_ids(teacher_tok)
    weights: dict[tuple[int, int], float] = {}
    _add_pass(weights, s_strings, s_special, encoder(teacher_tok, t_strings), t_special, True)
    _add_pass(weights, t_strings, t_special, encoder(student_tok, s_strings), s_special, False)
    rows: dict[int, dict[int, float]] = {}
    for (s, t), w in weights.items():
        rows.setdefault(s, {})[t] = w
    teacher_id = {}
    for t, string in enumerate(t_strings):
        if string and t not in t_special:
            teacher_id.setdefault(string, t)
    for s, string in enumerate(s_strings):           # exact byte matches: that teacher token alone
        if string and s not in s_special and string in teacher_id:
            rows[s] = {teacher_id[string]: 1.0}
    for role in SPECIAL_ROLES:                        # special tokens by role: eos -> eos, ...
        s, t = getattr(student_tok, role, None), getattr(teacher_tok, role, None)
        if s is not None and t is not None:
            rows[int(s)] = {int(t): 1.0}
    indices = np.full((len(s_strings), top_k), -1, dtype=np.int64)
    values = np.zeros((len(s_strings), top_k), dtype=np.float32)
    for s, entries in rows.items():
        kept = sorted(entries.items(), key=lambda e: (-e[1], e[0]))[:top_k]   # by weight, then lowest teacher id
        total = sum(w for _, w in kept)
        for j, (t, w) in enumerate(kept):
            indices[s, j], values[s, j] = t, w / total
    return indices, values


def vocab_projection(student_tok, teacher_tok, cache_dir: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """build_projection, built once per tokenizer pair and kept on disk."""
    cache_dir = Path(cache_dir) if cache_dir is not None else cot2align_home() / "vocab_projections"
    path = cache_dir / f"{tokenizer_hash(student_tok)[:16]}-to-{tokenizer_hash(teacher_tok)[:16]}-v{VERSION}.npz"
    if path.exists():
        with np.load(path) as stored:
            return stored["indices"], stored["weights"]
    indices, weights = build_projection(student_tok, teacher_tok)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.npz")
    np.savez(tmp, indices=indices, weights=weights)
    os.replace(tmp, path)
    return indices, weights


def xtoken_tables(teacher_tok, student_tok) -> dict:
    """What X-Token reads from `Heads.tables` (methods.py `vocab_tables`): the projection's teacher ids and weights
    [V_s, k]."""
    import torch

    indices, weights = vocab_projection(student_tok, teacher_tok)
    return {"projection_ids": torch.from_numpy(indices), "projection_weights": torch.from_numpy(weights)}
