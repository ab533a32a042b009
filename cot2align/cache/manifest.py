"""The manifest of a cache (the group attributes of its root zarr.json) and how a pass's examples are split into
parts: the cache format's bookkeeping, written by cache-teacher and read by everything else.

    build_manifest()   the whole manifest of a new cache: what the caller says of the teacher, its tokenizer and
                       the data, plus the store's layout (arrays, dtypes, chunks, codecs, parts) and the blocks;
    split_parts()      contiguous runs of whole blocks, one per writer (rank), balanced by stored rows;
    existing_cache()   what is already at an output: a cache of the same inputs (to resume or confirm), or a
                       refusal (another cache, a foreign directory) — a cache is never overwritten.
"""

from __future__ import annotations

import time

import numpy as np

import cot2align
from cot2align.cache.format import FORMAT, FORMAT_VERSION, VIEWS, CacheError, check_format, read_manifest
from cot2align.cache.storage import Location


def build_manifest(*, teacher: dict, tokenizer: dict, data: dict, settings: dict, fingerprint: dict, specs: dict,
                   topk: int, hidden_dtype: str, hidden_codec: str, parts: list[dict], block_starts: list[int],
                   software: dict, profile: str = "full") -> dict:
    """A new cache's manifest. `teacher`, `tokenizer`, `data`, `settings` and `fingerprint` describe the pass's
    inputs (the caller knows the model); the format's own fields, the store's layout from the per-row array
    `specs` (format.view_array_specs) and the progress record are filled in here. `profile`: what the cache stores
    (format.STORE_PROFILES); a profile without hidden states records no hidden dtype or codec."""
    hidden = "hidden" in specs
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created_by": f"cot2align {cot2align.__version__}",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "software": software,
        "teacher": teacher,
        "tokenizer": tokenizer,
        "data": data,
        "store": {
            "views": list(VIEWS), "rows": "response", "profile": profile, "topk": topk,
            "hidden_dtype": hidden_dtype if hidden else None,
            "dtypes": {k: np.dtype(v["dtype"]).name for k, v in specs.items()},
            "chunk_rows": {k: v["chunk"] for k, v in specs.items()},
            "codecs": {k: v["codec"] for k, v in specs.items()}, "hidden_codec": hidden_codec if hidden else None,
            "checksum": "crc32c", "parts": parts,
        },
        "settings": settings,
        "fingerprint": fingerprint,
        "progress": {"blocks": block_starts},     # each part's blocks_done is in parts/<p>/zarr.json
    }


def split_parts(block_starts: list[int], offsets: dict[str, np.ndarray], world: int) -> list[dict]:
    """Contiguous runs of whole blocks, one per rank, balanced by stored rows — decided by the data alone, so
    every rank (and every rerun) computes the same split; whole blocks, so each block is batched exactly as in
    a single-process pass and the arrays are identical to its."""
    rows = np.array([sum(int(offsets[v][block_starts[b + 1]] - offsets[v][block_starts[b]]) for v in VIEWS)
                     for b in range(len(block_starts) - 1)], dtype=np.int64)
    cumulative = np.concatenate([[0], np.cumsum(rows)])
    cuts = [0]
    for r in range(1, world):      # the block boundary nearest to r/world of all rows, never before the last cut
        target = cumulative[-1] * r / world
        above = min(int(np.searchsorted(cumulative, target)), len(rows))
        nearest = above - 1 if above > 0 and target - cumulative[above - 1] < cumulative[above] - target else above
        cuts.append(max(nearest, cuts[-1]))
    cuts.append(len(rows))
    parts = []
    for first_block, end_block in zip(cuts[:-1], cuts[1:]):
        first, end = block_starts[first_block], block_starts[end_block]
        parts.append({"examples": [first, end], "blocks": [first_block, end_block],
                      "rows": {v: [int(offsets[v][first]), int(offsets[v][end])] for v in VIEWS}})
    return parts



def existing_cache(location: Location, fingerprint: dict, world: int, log) -> dict | None:
    """The manifest of a cache of the same inputs at --out (complete; unfinished, to resume; or interrupted while
    being created, to create again), None for an empty or missing --out; anything else is refused — a cache is
    never overwritten, nor resumed by another number of writers than it was split for."""
    existing = read_manifest(location)
    if existing is None:
        if not location.is_empty():
            raise CacheError(f"{location}: exists and is not a cot2align cache; choose another --out")
        return None
    check_format(existing, location.url)
    old = existing.get("fingerprint", {}).get("inputs", {})
    if "files" not in old.get("teacher", {}):      # a cache written before the weight files were fingerprinted
        fingerprint = dict(fingerprint, teacher={k: v for k, v in fingerprint["teacher"].items() if k != "files"})
    if old != fingerprint:
        difference = describe_difference(old, fingerprint)
        if difference.startswith("teacher.files"):
            raise CacheError(f"{location}: stale — the teacher's weight files changed since this cache was written "
                             f"({difference}); refusing to reuse or overwrite it — choose another --out")
        raise CacheError(f"{location}: holds a cache of other inputs ({difference}); "
                         "refusing to overwrite it — choose another --out")
    status = existing.get("status")
    if status == "complete":
        log(f"{location}: cache already complete ({existing['data']['n_examples']} examples); nothing to do")
    elif existing.get("format_version") != FORMAT_VERSION:
        raise CacheError(f"{location}: an unfinished cache of format version {existing.get('format_version')}; "
                         f"this cot2align writes version {FORMAT_VERSION} — choose another --out")
    elif status == "creating":
        log(f"{location}: the store's creation was interrupted; creating it again")
    elif len(existing["store"]["parts"]) != world:
        parts = len(existing["store"]["parts"])
        raise CacheError(f"{location}: this unfinished cache was split for {parts} writer(s) and this run has {world}; "
                         f"resume it with the same number of processes (e.g. torchrun --nproc_per_node {parts})")
    else:
        log(f"{location}: resuming unfinished cache ({len(existing['progress']['blocks']) - 1} blocks"
            f"{f' in {world} parts' if world > 1 else ''})")
    return existing



def describe_difference(old: dict, new: dict, prefix: str = "") -> str:
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a != b:
            if isinstance(a, dict) and isinstance(b, dict):
                return describe_difference(a, b, f"{prefix}{key}.")
            return f"{prefix}{key}: cache has {a!r}, this run has {b!r}"
    return "unknown difference"
