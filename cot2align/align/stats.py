"""How well a student tokenizer lines up with a cached teacher's: the figures to look at before hours of training.

Every cross-tokenizer method compares the two models only where their tokenisations of the same response can be
matched. A degenerate alignment — nothing matched, a leading space or template token on one side only, numbers
split one way and not the other — trains silently and transfers nothing. `alignment_stats` measures, on a sample
of cached examples (their responses, in both views):

  chunk_bytes_share      response bytes inside aligned chunks (align/chunks.py: spans whose byte boundaries
                         coincide on both sides; ALM compares their likelihoods, GOLD merges over them)
  one_to_one_bytes_share response bytes in chunks of one token on each side (the rest are merged spans)
  exact_token_share      student response tokens in a one-to-one chunk whose token is the teacher's own, byte for
                         byte (or both the end of the response): where GOLD's exact-match term applies
  tokens_per_chunk       mean student and teacher tokens per chunk
  first_token_share      examples whose first response token is an exact one-to-one match (a low share points at
                         a BOS, leading-space or template asymmetry)
  digits_one_to_one_share  chunks holding a digit that are one-to-one (low: numbers split differently)
  mined_coverage         student response rows that MinED pairs with a teacher row (the rest get a one-hot target)
  mined_exact_share      of those, the rows whose teacher token has the student token's exact bytes
  vocab_exact_share      teacher response tokens whose MinED vocabulary map lands on a student token of the same
                         bytes (the rest are mapped by edit distance)

and `warnings` for figures that signal a broken alignment. The OT plans' distance from uniform needs the student's
features, so it is logged during training (`ot/plan_entropy` in metrics.jsonl), not here.
"""

from __future__ import annotations

import numpy as np

from cot2align.align.vocab import token_strings, vocab_map
from cot2align.cache.format import VIEWS

# Below these a warning is printed (and logged at the start of a run).
THRESHOLDS = {"chunk_bytes_share": 0.95, "exact_token_share": 0.2, "first_token_share": 0.5,
              "mined_coverage": 0.5}


def alignment_stats(cache, student_tokenizer, limit: int = 200, with_mined: bool = True) -> dict:
    """The figures of the module docstring over the first `limit` examples of `cache` (both views). Without
    `with_mined` the MinED figures are left out (building its vocabulary map for a new tokenizer pair takes up to
    a minute; a run of another method does not need it)."""
    from cot2align.align.chunks import chunk_alignment
    from cot2align.align.mined import aligned_teacher_rows

    teacher_tokenizer = cache.tokenizer()
    s_strings, t_strings = token_strings(student_tokenizer), token_strings(teacher_tokenizer)
    s_eos, t_eos = student_tokenizer.eos_token_id, teacher_tokenizer.eos_token_id
    vmap = vocab_map(teacher_tokenizer, student_tokenizer) if with_mined else None
    align_chunks = chunk_alignment(student_tokenizer, teacher_tokenizer)
    texts = cache.texts()
    counts = dict.fromkeys(("bytes", "chunk_bytes", "one_bytes", "s_tokens", "exact_tokens", "chunks", "chunk_s",
                            "chunk_t", "examples", "first_exact", "digit_chunks", "digit_one", "mined_rows",
                            "mined_paired", "mined_exact", "t_tokens", "vocab_exact"), 0)
    n = min(limit, len(cache))
    for view in VIEWS:
        offsets, targets, inputs = cache.offsets(view), cache.column(view, "target_ids"), cache.column(view, "input_ids")
        for i in range(n):
            a, b = int(offsets[i]), int(offsets[i + 1])
            if b == a:
                continue
            with_eos = int(targets[b - 1]) == t_eos
            s_ids = student_tokenizer(texts[f"response_{view}"][i], add_special_tokens=False)["input_ids"]
            s_ids = s_ids + ([s_eos] if with_eos else [])
            t_ids = [int(t) for t in targets[a:b]]
            s_chunks, t_chunks = (np.asarray(c) for c in align_chunks(np.asarray(s_ids), np.asarray(t_ids)))
            _count_chunks(counts, s_ids, t_ids, s_chunks, t_chunks, s_strings, t_strings, (s_eos, t_eos))
            if vmap is None:
                continue
            prompt_last = student_tokenizer(texts[f"prompt_{view}"][i], add_special_tokens=True)["input_ids"][-1:]
            s_inputs = np.asarray(prompt_last + s_ids[:-1])
            rows = aligned_teacher_rows(s_inputs, inputs[a:b], s_strings, t_strings, vmap.tea2stu)
            _count_mined(counts, rows, s_ids, t_ids, s_strings, t_strings, vmap.tea2stu)
    figures = _figures(counts, n)
    if not with_mined:
        figures = {k: v for k, v in figures.items() if not k.startswith(("mined_", "vocab_"))}
        figures["warnings"] = [w for w in figures["warnings"] if not w.startswith("mined_")]
    return figures


def _token_bytes(ids, strings) -> list[int]:
    return [len(strings[t]) if 0 <= t < len(strings) else 0 for t in ids]


def _count_chunks(counts: dict, s_ids, t_ids, s_chunks, t_chunks, s_strings, t_strings, eos) -> None:
    s_bytes = _token_bytes(s_ids, s_strings)
    counts["bytes"] += sum(s_bytes)
    counts["s_tokens"] += len(s_ids)
    counts["examples"] += 1
    n_chunks = int(max(s_chunks.max(initial=-1), t_chunks.max(initial=-1))) + 1
    s_per = np.bincount(s_chunks[s_chunks >= 0], minlength=n_chunks)
    t_per = np.bincount(t_chunks[t_chunks >= 0], minlength=n_chunks)
    chunk_bytes = np.bincount(s_chunks[s_chunks >= 0], weights=np.asarray(s_bytes)[s_chunks >= 0], minlength=n_chunks)
    one = (s_per == 1) & (t_per == 1)
    counts["chunks"] += n_chunks
    counts["chunk_s"] += int(s_per.sum())
    counts["chunk_t"] += int(t_per.sum())
    counts["chunk_bytes"] += float(chunk_bytes.sum())
    counts["one_bytes"] += float(chunk_bytes[one].sum())
    t_of_chunk = {int(c): t for c, t in zip(t_chunks, t_ids) if c >= 0}
    for k, (c, s) in enumerate(zip(s_chunks, s_ids)):
        if c < 0 or not one[c]:
            continue
        t = t_of_chunk[int(c)]
        exact = (s == eos[0] and t == eos[1]) or (s != eos[0] and s_strings[s] == t_strings[t])
        counts["exact_tokens"] += exact
        counts["first_exact"] += exact and k == 0
        if any(ch.isdigit() for ch in s_strings[s]):
            counts["digit_one"] += 1
    has_digit = np.asarray([any(ch.isdigit() for ch in s_strings[s]) if 0 <= s < len(s_strings) else False
                            for s in s_ids], dtype=bool)
    counts["digit_chunks"] += int((np.bincount(s_chunks[s_chunks >= 0], weights=has_digit[s_chunks >= 0],
                                               minlength=n_chunks) > 0).sum())


def _count_mined(counts: dict, rows, s_ids, t_ids, s_strings, t_strings, tea2stu) -> None:
    rows = np.asarray(rows)
    counts["mined_rows"] += len(rows)
    paired = rows >= 0
    counts["mined_paired"] += int(paired.sum())
    counts["mined_exact"] += sum(s_strings[s_ids[k]] == t_strings[t_ids[r]]
                                 for k, r in enumerate(rows) if r >= 0 and k < len(s_ids) and r < len(t_ids))
    counts["t_tokens"] += len(t_ids)
    counts["vocab_exact"] += sum(0 <= tea2stu[t] < len(s_strings) and s_strings[tea2stu[t]] == t_strings[t]
                                 for t in t_ids if t < len(tea2stu))


def _share(part, whole) -> float:
    return round(float(part) / whole, 4) if whole else 0.0


def _figures(c: dict, n: int) -> dict:
    figures = {
        "examples": n,
        "chunk_bytes_share": _share(c["chunk_bytes"], c["bytes"]),
        "one_to_one_bytes_share": _share(c["one_bytes"], c["bytes"]),
        "exact_token_share": _share(c["exact_tokens"], c["s_tokens"]),
        "student_tokens_per_chunk": _share(c["chunk_s"], c["chunks"]),
        "teacher_tokens_per_chunk": _share(c["chunk_t"], c["chunks"]),
        "first_token_share": _share(c["first_exact"], c["examples"]),
        "digits_one_to_one_share": _share(c["digit_one"], c["digit_chunks"]) if c["digit_chunks"] else None,
        "mined_coverage": _share(c["mined_paired"], c["mined_rows"]),
        "mined_exact_share": _share(c["mined_exact"], c["mined_paired"]),
        "vocab_exact_share": _share(c["vocab_exact"], c["t_tokens"]),
    }
    figures["warnings"] = [f"{name} is {figures[name]:.2f} (below {limit}): {WHY[name]}"
                           for name, limit in THRESHOLDS.items() if figures[name] is not None and figures[name] < limit]
    return figures


WHY = {"chunk_bytes_share": "part of the responses aligns nowhere (a truncation or text that differs between the views)",
       "exact_token_share": "few tokens match exactly; GOLD's exact-match term and ALM's one-token chunks see little",
       "first_token_share": "the first response token rarely matches: a BOS, leading-space or template asymmetry?",
       "mined_coverage": "MinED pairs few student rows with the teacher's; most get a one-hot target"}


def format_stats(stats: dict) -> str:
    """The figures as aligned lines, then each warning."""
    lines = [f"{name:<26} {value}" for name, value in stats.items() if name != "warnings"]
    lines += [f"WARNING {w}" for w in stats["warnings"]] or ["no warning: the alignment looks sound"]
    return "\n".join(lines)
