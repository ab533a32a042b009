"""`cot2align cache merge A B … --out C`: caches built by separate jobs (a job array, several machines, each over
its own share of the data) become one cache, as if one multi-process pass had written them.

A cache's row axis is already split into parts (parts.py: one per writer of a torchrun pass), each a contiguous
range of examples with its own per-row arrays under parts/<p>/ and its own chunk index files. A merged cache is
the same structure with the inputs' parts one after another, in the order given (A's examples first, then B's,
…): every part is taken over whole — its chunks are never decoded or re-encoded, they are hard-linked (one local
filesystem) or copied (another filesystem, `--copy`, or an object store: a server-side copy). What is rewritten
is small: the per-example arrays (ids and texts, offsets, prompt lengths) concatenated, the root chunk index,
each block's chunk index file renamed to its new part and block number, and the manifest (example, block and row
ranges shifted; `merge` records the inputs).

Refused in one line, before anything is written: an input that is not a complete format-4 cache; inputs of
another teacher, tokenizer, template, setting or array layout than the first (naming the first field that
differs); an example id in two inputs (naming it); inputs and --out on different kinds of storage; an --out that
exists. The merged cache is built beside --out (locally: `.<name>.merging-<pid>`, renamed into place when done),
then checked by `cache verify` — every chunk read at its new position — and anything written is removed on
failure; the inputs are only read, and a hard link shares their files without changing them.
"""

from __future__ import annotations

import copy
import hashlib
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import zarr

import cot2align
from cot2align.cache.chunk_index import ROOT_INDEX, ChunkRecorder, block_index_key, decode, encode
from cot2align.cache.format import FORMAT_VERSION, VIEWS, CacheError, with_checksum
from cot2align.cache.inspect import verify_cache
from cot2align.cache.reader import TeacherCache
from cot2align.cache.storage import LocalLocation, Location
from cot2align.cache.writer import _write_texts, _write_view_index     # the per-example arrays, as a pass writes them
from cot2align.leftovers import remove_dead_temporaries
from cot2align.logs import reporter
from cot2align.object_lock import is_lock_name

# What may differ between caches that merge: what each job read and when it ran, and what the merge recomputes.
# Everything else — teacher, tokenizer, templates, settings, the store's arrays, dtypes, chunking and codecs, the
# weights' fingerprint — must be equal.
PER_BUILD = ("created_at", "created_by", "software", "data", "progress", "status", "checksum", "pass", "merge")
PER_BUILD_STORE = ("parts", "chunk_index_sha256")
SUMMED_DATA = ("n_examples", "n_cot_examples")


def merge_caches(inputs: list[str], out: str, copy_files: bool = False, log=None) -> dict:
    """Merge the complete caches `inputs` (in that order) into a new cache at `out`; return a summary."""
    say = reporter(log, __name__)
    if len(inputs) < 2:
        raise CacheError("cache merge: expected at least two caches to merge")
    caches = [_open_input(where) for where in inputs]
    _check_same_kind(caches)
    _check_ids(caches)
    target = Location(out)
    mode = _transfer_mode(caches, target, copy_files)
    with target.writer_lock(CacheError, f"--out {target}", 0, say):
        if not target.is_empty():
            raise CacheError(f"--out {target}: exists; cache merge writes a new cache — choose another --out")
        manifest = merged_manifest([c.manifest for c in caches], [c.url for c in caches], mode)
        if isinstance(target, LocalLocation):
            _merge_locally(caches, target, manifest, mode, say)
        else:
            _merge_remotely(caches, target, manifest, mode)
    n = manifest["data"]["n_examples"]
    say(f"{target}: merged {len(caches)} caches ({n} examples: "
        + ", then ".join(f"{c.url} {s}..{s + len(c) - 1}" for c, s in zip(caches, _starts(caches)))
        + f") by {mode}; verified")
    return {"out": target.url, "n_examples": n, "parts": len(manifest["store"]["parts"]), "transfer": mode}


# ------------------------------------------------------------------------------------------ checks


def _open_input(where: str) -> TeacherCache:
    cache = TeacherCache(where, check_tokenizer=False)       # refuses what is not a complete cache, in one line
    version = cache.manifest["format_version"]
    if version != FORMAT_VERSION:
        raise CacheError(f"{cache.url}: cache format version {version}; cache merge takes version {FORMAT_VERSION} "
                         "caches (rebuild it with this cot2align)")
    return cache


def comparable(manifest: dict) -> dict:
    """The part of a manifest that caches which merge must share (all but what is per build), the fields a user
    sets first, so that a refusal names them rather than the fingerprint that repeats them."""
    kept = {k: copy.deepcopy(manifest.get(k)) for k in ("teacher", "tokenizer")}
    kept["data.templates"] = manifest["data"].get("templates")
    kept.update({k: copy.deepcopy(v) for k, v in manifest.items() if k not in PER_BUILD and k not in kept})
    kept["store"] = {k: v for k, v in kept["store"].items() if k not in PER_BUILD_STORE}
    kept.get("fingerprint", {}).get("inputs", {}).pop("data", None)
    return kept


def first_difference(a, b, prefix: str = "") -> tuple[str, object, object] | None:
    """(dotted field, a's value, b's value) of the first field where a and b differ (a's top-level order, then
    sorted), or None."""
    if isinstance(a, dict) and isinstance(b, dict):
        keys = list(a) + sorted(set(b) - set(a)) if not prefix else sorted(set(a) | set(b))
        for key in keys:
            found = first_difference(a.get(key), b.get(key), f"{prefix}{key}.")
            if found is not None:
                return found
        return None
    return None if a == b else (prefix.rstrip("."), a, b)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_same_kind(caches: list[TeacherCache]) -> None:
    first = comparable(caches[0].manifest)
    for cache in caches[1:]:
        found = first_difference(first, comparable(cache.manifest))
        if found is not None:
            field, a, b = found
            raise CacheError(f"cache merge: {cache.url} differs from {caches[0].url} in {field} ({_short(b)} vs "
                             f"{_short(a)}); only caches of the same teacher, tokenizer, templates and settings merge")


def _check_ids(caches: list[TeacherCache]) -> None:
    seen: dict[str, tuple[str, int]] = {}
    for cache in caches:
        for i, example_id in enumerate(cache.texts()["id"]):
            if example_id in seen:
                url, j = seen[example_id]
                raise CacheError(f"cache merge: example id {example_id!r} is in {url} (example {j}) and in "
                                 f"{cache.url} (example {i}); the merged cache's ids must be unique")
            seen[example_id] = (cache.url, i)


def _transfer_mode(caches: list[TeacherCache], target: Location, copy_files: bool) -> str:
    """How the inputs' chunk files reach --out: "hard links", "copies", or "server-side copies" (object store)."""
    local = isinstance(target, LocalLocation)
    if any(isinstance(c.location, LocalLocation) != local for c in caches):
        raise CacheError("cache merge: the caches and --out must all be local paths, or all on one object store")
    if not local:
        if any(type(c.location.fs) is not type(target.fs) for c in caches):
            raise CacheError("cache merge: the caches and --out must all be on one object store (one URL scheme)")
        return "server-side copies"
    inside = next((c for c in caches if c.location.contains(target.local_path)), None)
    if inside is not None:
        raise CacheError(f"--out {target}: inside the cache {inside.url}, which a merge only reads; choose another --out")
    parent = target.local_path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    same_device = all(os.stat(c.location.local_path).st_dev == os.stat(parent).st_dev for c in caches)
    return "hard links" if same_device and not copy_files else "copies"


def _starts(caches: list[TeacherCache]) -> list[int]:
    return [int(x) for x in np.cumsum([0] + [len(c) for c in caches])[:-1]]


# ------------------------------------------------------------------------------------------ the merged manifest


def merged_manifest(manifests: list[dict], urls: list[str], mode: str) -> dict:
    """The first input's manifest with the inputs' parts, blocks and data one after another."""
    merged = copy.deepcopy(manifests[0])
    parts, blocks = [], [0]
    examples, rows = 0, {view: 0 for view in VIEWS}
    block_count = 0
    for manifest in manifests:
        for part in manifest["store"]["parts"]:
            parts.append({"examples": [e + examples for e in part["examples"]],
                          "blocks": [b + block_count for b in part["blocks"]],
                          "rows": {view: [r + rows[view] for r in part["rows"][view]] for view in VIEWS}})
        starts = manifest["progress"]["blocks"]
        blocks += [s + examples for s in starts[1:]]
        block_count += len(starts) - 1
        examples += manifest["data"]["n_examples"]
        for view in VIEWS:
            rows[view] += max((p["rows"][view][1] for p in manifest["store"]["parts"]), default=0)
    merged["store"] = dict(merged["store"], parts=parts)
    merged["progress"] = {"blocks": blocks}
    merged["data"] = _merged_data([m["data"] for m in manifests])
    merged["fingerprint"]["inputs"]["data"] = {"merged": [m["fingerprint"]["inputs"]["data"] for m in manifests]}
    merged["pass"] = _merged_pass([m.get("pass", {}) for m in manifests], examples)
    merged["created_by"] = f"cot2align {cot2align.__version__}"
    merged["created_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    merged["merge"] = {"transfer": mode, "inputs": [
        {"url": url, "n_examples": m["data"]["n_examples"], "created_at": m.get("created_at"),
         "software": m.get("software"), "checksum": m.get("checksum")} for url, m in zip(urls, manifests)]}
    merged["status"] = "complete"
    return merged


def _merged_data(datas: list[dict]) -> dict:
    names = [d.get("name") for d in datas]
    merged = {"name": names[0] if len(set(names)) == 1 else "+".join(map(str, names)),
              "path": " + ".join(str(d.get("path") or d.get("hub") or d.get("dataset")) for d in datas),
              "split": datas[0].get("split"), "templates": datas[0].get("templates"),
              **{k: sum(d.get(k, 0) for d in datas) for k in SUMMED_DATA},
              "sha256": hashlib.sha256("".join(str(d.get("sha256")) for d in datas).encode()).hexdigest(),
              "merged": [{k: v for k, v in d.items() if k != "templates"} for d in datas]}
    merged["truncated"] = {side: {view: sum(d["truncated"][side][view] for d in datas) for view in VIEWS}
                           for side in ("prompt", "response")}
    return merged


def _merged_pass(passes: list[dict], examples: int) -> dict:
    """The inputs' teacher passes as one: tokens and rows summed over the jobs, seconds of the slowest."""
    total = {"device": passes[0].get("device"), "jobs": len(passes)}
    for key in ("tokens", "rows"):
        total[key] = sum(p.get(key, 0) for p in passes)
    total["examples"] = examples
    total["seconds"] = max((p.get("seconds", 0.0) for p in passes), default=0.0)
    for key, count in (("tokens_per_s", "tokens"), ("rows_per_s", "rows"), ("examples_per_s", "examples")):
        total[key] = total[count] / max(total["seconds"], 1e-9)
    return total


# ------------------------------------------------------------------------------------------ writing


def _merge_locally(caches, target: LocalLocation, manifest: dict, mode: str, say) -> None:
    """Build in a directory beside --out, verify it, rename it into place; remove it on any failure."""
    final = target.local_path.absolute()
    final.parent.mkdir(parents=True, exist_ok=True)
    pattern = re.compile(rf"\.{re.escape(final.name)}\.merging-(\d+)")
    for gone in remove_dead_temporaries(final.parent, pattern):
        say(f"{gone}: removed (left by a killed cache merge)")
    building = final.with_name(f".{final.name}.merging-{os.getpid()}")
    shutil.rmtree(building, ignore_errors=True)
    link = mode == "hard links"
    try:
        _write(caches, Location(building), manifest,
               lambda source, relative, to: _place(source.location.path(relative), building / to, link))
        _check_verified(verify_cache(building), final)
        if final.exists():             # an empty directory (is_empty): replaced
            final.rmdir()
        os.rename(building, final)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise


def _merge_remotely(caches, target: Location, manifest: dict, mode: str) -> None:
    """Write at --out (found empty under its writer lock), verify; remove what was written on any failure."""
    try:
        _write(caches, target, manifest,
               lambda source, relative, to: target.fs.copy(source.location.path(relative), target.path(to)))
        _check_verified(verify_cache(target.url), target.url)
    except BaseException:               # --out was empty under its lock: all that is there now was written here
        written = [name for name in target.fs.find(target.root) if not is_lock_name(name.rsplit("/", 1)[-1])]
        if written:
            target.fs.rm(written)
        raise


def _check_verified(problems: list[str], where) -> None:
    if problems:
        raise CacheError(f"cache merge: the merged cache for {where} does not verify ({problems[0]}"
                         f"{f'; and {len(problems) - 1} more' if len(problems) > 1 else ''}); nothing was kept")


def _place(source: str, destination: Path, link: bool) -> None:
    destination.parent.mkdir(parents=True, exist_ok=True)
    if link:
        os.link(source, destination)
    else:
        shutil.copyfile(source, destination)


def _write(caches: list[TeacherCache], location: Location, manifest: dict, transfer) -> None:
    """The merged store: manifest first ("creating"), the per-example arrays and their chunk index, each input's
    parts (chunk files transferred, block index files renamed), the teacher files, the manifest last.
    `transfer(cache, relative, to)`: the input's file at `relative` to `to` in the merged store."""
    store = ChunkRecorder(location.zarr_store(read_only=False))
    root = zarr.open_group(store=store, mode="w", attributes=with_checksum(dict(manifest, status="creating")))
    _write_texts(root, {name: sum((c.texts()[name] for c in caches), []) for name in caches[0].texts()})
    for view in VIEWS:
        offsets = np.concatenate([[0]] + [c.offsets(view)[1:] + s for c, s in zip(caches, _row_starts(caches, view))])
        prompt_len = np.concatenate([c.views[view]["prompt_len"] for c in caches]).astype(np.int32)
        _write_view_index(root.create_group(view), offsets.astype(np.int64), prompt_len)
    root_index = encode(store.take())
    store.write_file(ROOT_INDEX, root_index)
    root.require_group("parts")
    number, block_shift = 0, 0
    for cache in caches:
        for part in cache.parts:
            _transfer_part(cache, part.number, number, block_shift, store, transfer)
            number += 1
        block_shift += len(cache.manifest["progress"]["blocks"]) - 1
    for name in caches[0].manifest["teacher"]["files_sha256"]:
        transfer(caches[0], f"teacher/{name}", f"teacher/{name}")
    manifest["store"] = dict(manifest["store"], chunk_index_sha256=hashlib.sha256(root_index).hexdigest())
    root.attrs.put(with_checksum(manifest))


def _row_starts(caches: list[TeacherCache], view: str) -> list[int]:
    return [int(x) for x in np.cumsum([0] + [int(c.offsets(view)[-1]) for c in caches])[:-1]]


def _transfer_part(cache: TeacherCache, old: int, new: int, block_shift: int, store: ChunkRecorder, transfer) -> None:
    """Input part `old` as part `new`: every file but its block index files transferred as it is (chunk numbers
    are part-local, so no chunk moves within its array), each block index file rewritten under its new part
    and block number, its array paths renamed."""
    location = cache.location
    prefix = location.path(f"parts/{old}")
    for name in sorted(location.fs.find(prefix)):
        relative = name[len(prefix) + 1:]
        if not relative.startswith("chunk_index/"):
            transfer(cache, f"parts/{old}/{relative}", f"parts/{new}/{relative}")
    first, end = cache.manifest["store"]["parts"][old]["blocks"]
    for block in range(first, end):
        key = block_index_key(old, block)
        text = location.read_text(key)
        if text is None:
            raise CacheError(f"{location}/{key}: missing (block {block} of part {old} is committed)")
        entries = {f"parts/{new}/{path.removeprefix(f'parts/{old}/')}": chunks
                   for path, chunks in decode(text.encode(), f"{location}/{key}").items()}
        store.write_file(block_index_key(new, block + block_shift), encode(entries))
