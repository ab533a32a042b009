"""`cache info` (what is in a cache, how big, how fast it was made) and `cache verify` (is it intact)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import zarr

from cot2align.cache.format import (TEXT_FIELDS, VIEWS, CacheError, check_format, check_teacher_files, read_manifest)
from cot2align.cache.storage import Location


def _open(where) -> tuple[Location, dict, zarr.Group]:
    location = Location(where)
    manifest = read_manifest(location)
    if manifest is None:
        raise CacheError(f"{location}: no cache here (zarr.json not found)")
    check_format(manifest, location.url)
    return location, manifest, zarr.open_group(store=location.zarr_store(read_only=True), mode="r")


def _part_prefixes(manifest: dict) -> list[str]:
    """Where each part's per-row arrays live: v1 keeps them beside the offsets, v2 under parts/<p>/."""
    if manifest["format_version"] == 1:
        return [""]
    return [f"parts/{p}/" for p in range(len(manifest["store"]["parts"]))]


def cache_info(path: str | Path) -> dict:
    """Manifest summary, rows per view, bytes per row by array, compression ratios, throughput."""
    location, manifest, root = _open(path)
    arrays = {}
    rows = {view: 0 for view in VIEWS}
    for prefix in _part_prefixes(manifest):
        for view in VIEWS:
            g = root[f"{prefix}{view}"]
            rows[view] += int(g["input_ids"].shape[0])
            for name in sorted(g.array_keys()):
                if name in ("offsets", "prompt_len"):
                    continue
                entry = arrays.setdefault(name, {"raw_bytes": 0, "stored_bytes": 0})
                entry["raw_bytes"] += int(np.prod(g[name].shape)) * g[name].dtype.itemsize
                entry["stored_bytes"] += location.size(f"{prefix}{view}/{name}", chunks_only=True)
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
        "parts": len(_part_prefixes(manifest)),
        "rows": rows,
        "topk": manifest["store"]["topk"],
        "hidden_codec": manifest["store"].get("hidden_codec"),
        "arrays": arrays,
        "bytes_per_row": per_row_total,
        "bytes_per_row_vs_bf16_hidden": per_row_total / hidden_bf16,
        "total_bytes": location.size(chunks_only=True),
        "pass": manifest.get("pass", {}),
    }


def format_info(info: dict) -> str:
    t, d, p = info["teacher"], info["data"], info["pass"]
    split = f", split {d['data_split']}" if d.get("data_split") else ""     # the split read of a DatasetDict or hub id
    lines = [
        f"cache        {info['path']}  ({info['status']})",
        f"teacher      {t['name_or_path']}  {t['model_type']}  D={t['hidden_size']}  V={t['vocab_size']}  "
        f"layers={t['num_layers']}  dtype={t['dtype']}  embeddings={t['embed_kind']}  exact_logits={t['exact_logits']}",
        f"data         {d['name']} [{d['split']}]  {d['n_examples']} examples, {d['n_cot_examples']} with CoT  "
        f"({d.get('path') or d.get('hub') or d.get('dataset')}{split})",
        f"truncated    prompts {d['truncated']['prompt']}  responses {d['truncated']['response']}",
        f"rows         std {info['rows']['std']:,}  cot {info['rows']['cot']:,}   top-k {info['topk']}  "
        f"hidden codec {info['hidden_codec']}   parts {info['parts']}",
        "array            bytes/row    ratio",
    ]
    for name, e in sorted(info["arrays"].items()):
        lines.append(f"  {name:<14} {e['bytes_per_row']:>10.1f}   {e['ratio']:>5.2f}x")
    lines.append(f"  {'total':<14} {info['bytes_per_row']:>10.1f}   = {info['bytes_per_row_vs_bf16_hidden']:.3f} x "
                 f"the bf16 hidden state   ({info['total_bytes'] / 2**20:.1f} MiB on disk)")
    if p:
        lines.append(f"pass         {p.get('seconds', 0):.1f} s on {p.get('device')}: {p.get('tokens_per_s', 0):,.0f} "
                     f"teacher tokens/s, {p.get('rows_per_s', 0):,.0f} rows/s, {p.get('examples_per_s', 0):,.1f} examples/s")
    return "\n".join(lines)


def verify_cache(path: str | Path, log=None) -> list[str]:
    """Check everything the trainer trusts: the manifest against its checksum, every file under teacher/ against
    the manifest's sha256, then every chunk of every array (crc32c) and the offsets, shapes, dtypes and values.

    Returns a list of problems (empty = intact); a bad chunk is named by its file and the examples it holds.
    """
    try:
        location, manifest, root = _open(path)
    except CacheError as e:
        return [str(e)]
    problems: list[str] = []
    if manifest.get("status") != "complete":
        problems.append(f"{location}: status is '{manifest.get('status')}', not complete")
    try:
        with tempfile.TemporaryDirectory() as scratch:    # a remote cache's teacher files, downloaded to check
            check_teacher_files(manifest, location.local_copy("teacher", Path(scratch) / "teacher"), location.url)
    except CacheError as e:
        problems.append(str(e))
    n = manifest["data"]["n_examples"]
    for name in TEXT_FIELDS:
        arr = root["examples"][name]
        if arr.shape != (n,):
            problems.append(f"examples/{name}: shape {arr.shape}, expected ({n},)")
        problems += _read_all(arr, location, lambda a, b: (a, b))[1]
    for view in VIEWS:
        problems += _verify_view(root, location, view, manifest, n)
    return problems


def _read_all(arr, location: Location, examples_of) -> tuple[np.ndarray | None, list[str]]:
    """Read an array chunk by chunk; every unreadable chunk is named by its file and the examples whose rows it
    holds (`examples_of(first_row, end_row) -> (first_example, end_example)`). Returns (values or None, problems)."""
    chunk = arr.chunks[0]
    pieces, problems = [], []
    for c, start in enumerate(range(0, arr.shape[0], chunk)):
        end = min(start + chunk, arr.shape[0])
        try:
            pieces.append(arr[start:end])
        except Exception as e:  # checksum mismatch, truncated file, codec error
            key = arr.metadata.encode_chunk_key((c,) + (0,) * (arr.ndim - 1))
            first, last = examples_of(start, end)
            problems.append(f"{location}/{arr.path}/{key}: unreadable chunk (rows {start}..{end - 1}, examples "
                            f"{first}..{max(last - 1, first)}): {type(e).__name__}: {e}")
    if problems:
        return None, problems
    return (np.concatenate(pieces) if pieces else arr[:]), []


def _verify_view(root, location: Location, view: str, manifest: dict, n: int) -> list[str]:
    """One view: the global offsets, then each part's per-row arrays: shape and dtype, then (when those hold)
    their values over the part's rows."""
    offsets, problems = _read_all(root[view]["offsets"], location, lambda a, b: (a, b))
    prompt_len, more = _read_all(root[view]["prompt_len"], location, lambda a, b: (a, b))
    problems += more
    if offsets is None or prompt_len is None:
        return problems
    if offsets.shape != (n + 1,) or offsets[0] != 0 or np.any(np.diff(offsets) < 0):
        return [f"{view}/offsets: not a non-decreasing [n+1] array starting at 0"]
    spans = [(0, n)] if manifest["format_version"] == 1 else [tuple(p["examples"]) for p in manifest["store"]["parts"]]
    for prefix, (first, end) in zip(_part_prefixes(manifest), spans):
        g, label = root[f"{prefix}{view}"], f"{prefix}{view}"
        part_offsets = offsets[first:end + 1] - offsets[first]

        def examples_of(row_a, row_b, part_offsets=part_offsets, first=first):
            # the examples whose rows intersect [row_a, row_b) of this part
            return (first + int(np.searchsorted(part_offsets, row_a, side="right")) - 1,
                    first + int(np.searchsorted(part_offsets, row_b, side="left")))

        found = _verify_shapes(g, label, manifest, int(part_offsets[-1]))
        if not found:
            values = {}
            for name in g.array_keys():
                if name not in ("offsets", "prompt_len"):
                    values[name], bad = _read_all(g[name], location, examples_of)
                    found += bad
            if not found:
                found = _verify_values(values, label, part_offsets, prompt_len[first:end],
                                       manifest["teacher"]["vocab_size"])
        problems += found
    return problems


def _verify_shapes(g, view: str, manifest: dict, rows: int) -> list[str]:
    D, k = manifest["teacher"]["hidden_size"], manifest["store"]["topk"]
    expected = {"input_ids": ((rows,), "int32"), "target_ids": ((rows,), "int32"),
                "topk_logprobs": ((rows, k), "float16"), "tail_logprob": ((rows,), "float32"),
                "hidden": ((rows, D), manifest["store"]["dtypes"]["hidden"]),
                "topk_ids": ((rows, k), manifest["store"]["dtypes"]["topk_ids"])}
    if manifest["teacher"]["embed_kind"] == "stored":
        expected["embeds"] = ((rows, D), "uint16")
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
