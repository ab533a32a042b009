"""`cache info` (what is in a cache, how big, how fast it was made, whether it would be opened) and `cache verify`
(is it intact: everything opening it checks, then every chunk)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import zarr

from cot2align.cache.chunk_index import ChunkProblem, chunk_place
from cot2align.cache.format import (VIEWS, CacheError, check_teacher_files, has_array, read_manifest, store_profile,
                                    text_fields)
from cot2align.cache.parts import read_parts
from cot2align.cache.profiles import servable
from cot2align.cache.reader import TeacherCache, check_opens, check_tokenizer_files, open_arrays
from cot2align.cache.storage import Location
from cot2align.logs import reporter


def _open(where) -> tuple[Location, dict]:
    """(location, manifest), refused as opening the cache refuses it, except that an unfinished cache is shown
    (and verified) too."""
    location = Location(where)
    manifest = read_manifest(location)
    check_opens(location, manifest, allow_incomplete=True)
    return location, manifest


def refusal(location: Location) -> str | None:
    """Why opening the cache for training would refuse it (None: it would open), by the very checks open_cache
    runs; a remote cache's tokenizer files are fetched into a temporary directory to check them."""
    try:
        cache = TeacherCache(location, check_tokenizer=False)
        with tempfile.TemporaryDirectory() as scratch:
            check_tokenizer_files(cache.manifest, location.local_copy("teacher", Path(scratch) / "teacher"),
                                  location.url)
    except CacheError as e:
        return str(e)
    return None


def cache_info(path: str | Path) -> dict:
    """Manifest summary, rows per view, the store profile, bytes per row by array, compression ratios, which runs
    of each method the cache can serve, throughput, and why the cache would be refused when it would be."""
    location, manifest = _open(path)
    root = zarr.open_group(store=location.zarr_store(read_only=True), mode="r")    # sizes only: no chunk is read
    parts = read_parts(manifest, root, location.url)
    arrays = {}
    rows = {view: 0 for view in VIEWS}
    for part in parts:
        for view in VIEWS:
            rows[view] += int(part.arrays[view]["input_ids"].shape[0])
            for name, arr in sorted(part.arrays[view].items()):
                entry = arrays.setdefault(name, {"raw_bytes": 0, "stored_bytes": 0})
                entry["raw_bytes"] += int(np.prod(arr.shape)) * arr.dtype.itemsize
                entry["stored_bytes"] += location.size(f"{part.prefix}{view}/{name}", chunks_only=True)
    total_rows = sum(rows.values())
    for entry in arrays.values():
        entry["bytes_per_row"] = entry["stored_bytes"] / max(total_rows, 1)
        entry["ratio"] = entry["raw_bytes"] / max(entry["stored_bytes"], 1)
    hidden_bf16 = 2 * manifest["teacher"]["hidden_size"]
    per_row_total = sum(e["bytes_per_row"] for e in arrays.values())
    return {
        "path": location.url,
        "status": manifest.get("status"),
        "teacher": manifest["teacher"],
        "tokenizer": manifest["tokenizer"]["name_or_path"],
        "data": {k: manifest["data"].get(k) for k in ("name", "split", "path", "hub", "dataset", "data_split",
                                                      "n_examples", "n_cot_examples", "truncated")},
        "parts": len(parts),
        "rows": rows,
        "topk": manifest["store"]["topk"],
        "profile": store_profile(manifest),
        "serves": servable(manifest),
        "hidden_codec": manifest["store"].get("hidden_codec"),
        "arrays": arrays,
        "bytes_per_row": per_row_total,
        "bytes_per_row_vs_bf16_hidden": per_row_total / hidden_bf16,
        "total_bytes": location.size(chunks_only=True),
        "pass": manifest.get("pass", {}),
        "refused": refusal(location),
    }


def format_info(info: dict) -> str:
    t, d, p = info["teacher"], info["data"], info["pass"]
    split = f", split {d['data_split']}" if d.get("data_split") else ""     # the split read of a DatasetDict or hub id
    lines = [
        f"cache        {info['path']}  ({info['status']})",
        *([f"REFUSED      opening it for training would fail: {info['refused']}"] if info.get("refused") else []),
        f"teacher      {t['name_or_path']}  {t['model_type']}  D={t['hidden_size']}  V={t['vocab_size']}  "
        f"layers={t['num_layers']}  dtype={t['dtype']}  embeddings={t['embed_kind']}  exact_logits={t['exact_logits']}",
        f"data         {d['name']} [{d['split']}]  {d['n_examples']} examples, {d['n_cot_examples']} with CoT  "
        f"({d.get('path') or d.get('hub') or d.get('dataset')}{split})",
        f"truncated    prompts {d['truncated']['prompt']}  responses {d['truncated']['response']}",
        f"rows         std {info['rows']['std']:,}  cot {info['rows']['cot']:,}   top-k {info['topk']}  "
        f"hidden codec {info['hidden_codec']}   parts {info['parts']}   store {info['profile']}",
        "array            bytes/row    ratio",
    ]
    for name, e in sorted(info["arrays"].items()):
        lines.append(f"  {name:<14} {e['bytes_per_row']:>10.1f}   {e['ratio']:>5.2f}x")
    if "target_logprob" not in info["arrays"]:
        lines.append("  target_logprob absent (written before it was added): ALM recomputes it from hidden x lm_head "
                     "under --teacher-dist exact and refuses --teacher-dist topk")
    lines.append(f"  {'total':<14} {info['bytes_per_row']:>10.1f}   = {info['bytes_per_row_vs_bf16_hidden']:.3f} x "
                 f"the bf16 hidden state   ({info['total_bytes'] / 2**20:.1f} MiB on disk)")
    lines += _format_serves(info["serves"])
    if p:
        lines.append(f"pass         {p.get('seconds', 0):.1f} s on {p.get('device')}: {p.get('tokens_per_s', 0):,.0f} "
                     f"teacher tokens/s, {p.get('rows_per_s', 0):,.0f} rows/s, {p.get('examples_per_s', 0):,.1f} examples/s")
    return "\n".join(lines)


def _format_serves(serves: dict[str, list[str]]) -> list[str]:
    """`cache info`'s lines on what the cache can serve: each method with the runs of it the cache's arrays serve
    (teacher distribution, ± CoT2Align), and the methods it cannot serve with what would provide them."""
    lines = ["serves       method: runs (--teacher-dist, +cot2align)"]
    for name, runs in serves.items():
        lines.append(f"  {name:<14} {', '.join(runs) if runs else 'none: rebuild with cache-teacher --store full'}")
    return lines


def verify_cache(path: str | Path, log=None) -> list[str]:
    """Check everything the trainer trusts: every check opening the cache runs (the manifest against its checksum,
    the tokenizer files against its sha256 and vocab_hash, the chunk index against its sha256), every file under
    teacher/, then every chunk of every array — present, at its own position (the chunk index, format 4), intact
    (crc32c) — and the offsets, shapes, dtypes and values.

    Returns a list of problems (empty = intact); a bad chunk is named by its file, its rows and its examples.
    """
    say = reporter(log, __name__)
    try:
        location, manifest = _open(path)
        root, index = open_arrays(location, manifest)
    except CacheError as e:
        return [str(e)]
    problems: list[str] = []
    if manifest.get("status") != "complete":
        problems.append(f"{location}: status is '{manifest.get('status')}', not complete")
    problems += _verify_teacher(location, manifest)
    if index is None:
        say(f"{location}: format version {manifest['format_version']} has no chunk index: a missing chunk (read as "
            "zeros) or a chunk in the wrong place cannot be detected; rebuild it with this cot2align for format 4")
    n = manifest["data"]["n_examples"]
    for name in text_fields(manifest):
        arr = root["examples"][name]
        if arr.shape != (n,):
            problems.append(f"examples/{name}: shape {arr.shape}, expected ({n},)")
        problems += _read_all(arr, location, lambda a, b: (a, b))[1]
    index_of, more = _verify_view_index(root, location, n)
    problems += more
    if more:
        return problems
    try:
        parts = read_parts(manifest, root, location.url)
    except CacheError as e:
        return [*problems, str(e)]
    if index is not None:
        for part in parts:
            index.add_part(part, {view: index_of[view][0] for view in VIEWS}, manifest["progress"]["blocks"])
        problems += [f"{location}/{key}: missing (its block is committed)" for key in index.block_files()
                     if location.read_text(key) is None]
    for part in parts:
        for view in VIEWS:
            offsets, prompt_len = index_of[view]
            problems += _verify_part_view(part, view, location, manifest, offsets, prompt_len)
    return problems


def _verify_teacher(location: Location, manifest: dict) -> list[str]:
    """Every file under teacher/ against the manifest's sha256, then the tokenizer as opening the cache checks it
    (a remote cache's files fetched into a temporary directory)."""
    problems = []
    with tempfile.TemporaryDirectory() as scratch:
        teacher_dir = location.local_copy("teacher", Path(scratch) / "teacher")
        for check in (check_teacher_files, check_tokenizer_files):
            try:
                check(manifest, teacher_dir, location.url)
            except CacheError as e:
                problems.append(str(e))
                break
    return problems


def _read_all(arr, location: Location, examples_of) -> tuple[np.ndarray | None, list[str]]:
    """Read an array chunk by chunk; every unreadable, missing or misplaced chunk is named by its file, its rows
    and the examples that hold them (`examples_of(first_row, end_row) -> (first_example, end_example)`).
    Returns (values or None, problems)."""
    chunk = arr.chunks[0]
    pieces, problems = [], []
    for c, start in enumerate(range(0, arr.shape[0], chunk)):
        try:
            pieces.append(arr[start:min(start + chunk, arr.shape[0])])
        except ChunkProblem as e:
            problems.append(e.named(location.url, chunk_place(arr, c, examples_of)))
        except Exception as e:  # checksum mismatch, truncated file, codec error
            key = arr.metadata.encode_chunk_key((c,) + (0,) * (arr.ndim - 1))
            problems.append(f"{location}/{arr.path}/{key}: unreadable chunk ({chunk_place(arr, c, examples_of)}): "
                            f"{type(e).__name__}: {e}")
    if problems:
        return None, problems
    return (np.concatenate(pieces) if pieces else arr[:]), []


def _verify_view_index(root, location: Location, n: int) -> tuple[dict, list[str]]:
    """Each view's offsets and prompt lengths: view -> (offsets, prompt_len), and the problems found."""
    found, problems = {}, []
    for view in VIEWS:
        offsets, bad = _read_all(root[view]["offsets"], location, lambda a, b: (a, b))
        prompt_len, more = _read_all(root[view]["prompt_len"], location, lambda a, b: (a, b))
        problems += bad + more
        if offsets is not None and (offsets.shape != (n + 1,) or offsets[0] != 0 or np.any(np.diff(offsets) < 0)):
            problems.append(f"{view}/offsets: not a non-decreasing [n+1] array starting at 0")
        found[view] = (offsets, prompt_len)
    return found, problems


def _verify_part_view(part, view: str, location: Location, manifest: dict, offsets: np.ndarray,
                      prompt_len: np.ndarray) -> list[str]:
    """One view of one part: its per-row arrays' shapes and dtypes, then (when those hold) their chunks and
    values over the part's rows."""
    first, end = part.examples
    g, label = part.groups[view], f"{part.prefix}{view}"
    part_offsets = offsets[first:end + 1] - offsets[first]
    found = _verify_shapes(g, label, manifest, int(part_offsets[-1]))
    if found:
        return found
    values = {}
    for name, arr in part.arrays[view].items():
        values[name], bad = _read_all(arr, location, lambda a, b: part.examples_of(view, offsets, a, b))
        found += bad
    if found:
        return found
    return (_verify_values(values, label, part_offsets, prompt_len[first:end], manifest["teacher"]["vocab_size"])
            + _verify_target_logprob(values, label))


def _verify_shapes(g, view: str, manifest: dict, rows: int) -> list[str]:
    D, k = manifest["teacher"]["hidden_size"], manifest["store"]["topk"]
    expected = {"input_ids": ((rows,), "int32"), "target_ids": ((rows,), "int32"),
                "topk_logprobs": ((rows, k), "float16"), "tail_logprob": ((rows,), "float32"),
                "topk_ids": ((rows, k), manifest["store"]["dtypes"]["topk_ids"])}
    if store_profile(manifest) != "logits":            # the profiles with hidden states (format.py)
        expected["hidden"] = ((rows, D), manifest["store"]["dtypes"]["hidden"])
        if manifest["teacher"]["embed_kind"] == "stored":
            expected["embeds"] = ((rows, D), "uint16")
    if has_array(manifest, "target_logprob"):          # caches written before it was added lack it
        expected["target_logprob"] = ((rows,), "float32")
    problems = []
    for name, (shape, dtype) in expected.items():
        if name not in g:
            problems.append(f"{view}/{name}: missing")
            continue
        if tuple(g[name].shape) != shape:
            problems.append(f"{view}/{name}: shape {tuple(g[name].shape)}, expected {shape}")
        if np.dtype(g[name].dtype).name != dtype:
            problems.append(f"{view}/{name}: dtype {g[name].dtype}, expected {dtype}")
    return problems


def _verify_values(values: dict, view: str, offsets: np.ndarray, prompt_len: np.ndarray, vocab_size: int) -> list[str]:
    """Token ids inside the vocabulary, rows chained inside an example, top-k sorted, prompts non-empty."""
    problems = []
    rows = int(offsets[-1])
    ids, targets = values["input_ids"].astype(np.int64), values["target_ids"].astype(np.int64)
    if rows and (ids.min() < 0 or ids.max() >= vocab_size or targets.min() < 0 or targets.max() >= vocab_size):
        problems.append(f"{view}/input_ids or target_ids: token id outside [0, {vocab_size})")
    if rows and (values["topk_ids"].astype(np.int64).max() >= vocab_size):
        problems.append(f"{view}/topk_ids: token id outside [0, {vocab_size})")
    # Within an example, the token a row predicts is the next row's input.
    same_example = np.ones(max(rows - 1, 0), dtype=bool)
    same_example[offsets[1:-1][(offsets[1:-1] > 0) & (offsets[1:-1] < rows)] - 1] = False
    if rows > 1 and np.any(targets[:-1][same_example] != ids[1:][same_example]):
        problems.append(f"{view}: target_ids[t] != input_ids[t+1] inside an example")
    if rows and np.any(np.diff(values["topk_logprobs"].astype(np.float32), axis=1) > 1e-3):
        problems.append(f"{view}/topk_logprobs: not sorted in descending order")
    if np.any((prompt_len <= 0) & (np.diff(offsets) > 0)):
        problems.append(f"{view}/prompt_len: zero prompt length for an example with rows")
    return problems


def _verify_target_logprob(values: dict, view: str) -> list[str]:
    """The realised token's log-prob is a log-probability (finite, at most 0), agrees with the top-k where the token
    is among them (float16 there), and is at most the tail's log-mass where it is not."""
    if "target_logprob" not in values or not len(values["target_logprob"]):
        return []
    target = values["target_logprob"].astype(np.float64)
    if not np.all(np.isfinite(target)) or target.max() > 1e-5:
        return [f"{view}/target_logprob: not a log-probability (finite, at most 0)"]
    top_ids, top_lp = values["topk_ids"].astype(np.int64), values["topk_logprobs"].astype(np.float64)
    hit = top_ids == values["target_ids"].astype(np.int64)[:, None]
    in_top = hit.any(1)
    stored = (top_lp * hit).sum(1)
    if np.any(np.abs(stored - target)[in_top] > 1e-2 + 2e-3 * np.abs(target[in_top])):
        return [f"{view}/target_logprob: differs from topk_logprobs for a token in the top-k"]
    if np.any(target[~in_top] > values["tail_logprob"].astype(np.float64)[~in_top] + 1e-4):
        return [f"{view}/target_logprob: above the tail's log-mass for a token outside the top-k"]
    return []
