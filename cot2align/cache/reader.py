"""Read a teacher cache: `open_cache(path)` -> TeacherCache with random access per example.

    cache = open_cache("cache/mistral_dolly")
    len(cache)                        # examples
    ex = cache[3]                     # {"id", "std": {...}, "cot": {...}} of numpy arrays
    ex["std"]["hidden"]               # uint16 [rows, D] bf16 bits -> cache.hidden_tensor(ex["std"])
    head = cache.head()               # {"embed_tokens", "lm_head"[, "lm_head_bias"]} torch tensors
    cache.embedding_features(ex["std"], head)   # the embedding-layer feature of each row

Row r of a view is teacher position t = prompt_len - 1 + r: its input token, the token it
predicts (`target_ids`), the last hidden state there and the teacher's distribution of the next token.

This module is the one place that knows how arrays are stored: `teacher_rows` (and `decode_rows`) turn the
stored bytes — bf16 bits, int8 + per-row scale, narrowed ids — into ready torch tensors; a trainer never
touches zarr or a storage dtype.
"""

from __future__ import annotations

import asyncio
import bisect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch
import zarr
from safetensors.torch import load_file
from transformers import AutoTokenizer
from zarr.core.sync import sync as zarr_sync

from cot2align.cache.decoded import DecodedChunks, decoded_memory
from cot2align.cache.chunk_index import ChunkIndex, ChunkProblem, CheckingStore, chunk_of, chunk_place
from cot2align.cache.format import (CHUNK_INDEX_SINCE, VIEWS, prompt_format, text_fields, CacheError, check_format,
                                    check_teacher_files, manifest_checksum, read_manifest)
from cot2align.cache.parts import read_parts, readable_prefix
from cot2align.cache.storage import Location
from cot2align.modeling import cot2align_home, tokenizer_hash


@dataclass(frozen=True)
class OpenedCache:
    """What opening a cache read (storage.Location.known: the manifest, the chunk index, each array's zarr.json,
    the offsets), handed to each DataLoader worker so that it opens the same cache without a request
    (`open_cache(opened)`); picklable, so it crosses a spawn as well as a fork."""

    url: str
    objects: dict
    allow_incomplete: bool


class TeacherCache:
    def __init__(self, where, allow_incomplete: bool = False, check_tokenizer: bool = True,
                 known: dict | None = None):
        self.location = where if isinstance(where, Location) else Location(where)
        self.url = self.location.url
        self.allow_incomplete = allow_incomplete
        if known is not None:
            self.location.known.update(known)
        self.location.record(known is None)        # what the open reads, for `opened()`
        try:
            self.manifest = manifest = read_manifest(self.location)
            check_opens(self.location, manifest, allow_incomplete)
            self.complete = manifest["status"] == "complete"
            self.group, self.index = open_arrays(self.location, manifest)
            n = manifest["data"]["n_examples"]
            self.views = {view: {"offsets": self._read(self.group[view]["offsets"], slice(None), "the offsets"),
                                 "prompt_len": (self._read(self.group[view]["prompt_len"], slice(None),
                                                           "the prompt lengths") if n else np.zeros(0, np.int32))}
                          for view in VIEWS}
            self.parts = read_parts(manifest, self.group, self.url)
        finally:
            self.location.record(False)
        if self.index is not None:          # where each part's chunk index entries are (one file per block)
            for part in self.parts:
                self.index.add_part(part, {v: self.views[v]["offsets"] for v in VIEWS}, manifest["progress"]["blocks"])
        self._part_starts = [p.examples[0] for p in self.parts]
        self._n = n if self.complete else readable_prefix(self.parts)
        self._texts = None
        self.decoded = DecodedChunks(decoded_memory())
        if check_tokenizer:
            check_tokenizer_files(manifest, self.teacher_dir(), self.url)

    def opened(self) -> OpenedCache:
        """This cache as a DataLoader worker opens it: from the objects this open read, without a request."""
        return OpenedCache(self.url, dict(self.location.known), self.allow_incomplete)

    # ------------------------------------------------------------------ basics

    def __len__(self) -> int:
        return self._n

    @property
    def build_id(self) -> str:
        """sha256 of the whole manifest: every build of a cache has its own (its creation time, teacher weights,
        data and pass are all in it), so what is derived from one build is never taken for another's, even at the
        same path with the same data."""
        return manifest_checksum(self.manifest)

    @property
    def hidden_size(self) -> int:
        return self.manifest["teacher"]["hidden_size"]

    @property
    def embed_kind(self) -> str:
        return self.manifest["teacher"]["embed_kind"]

    def texts(self, i: int | None = None):
        """All texts as {field: list} (i=None) or one example's texts as {field: str}."""
        if self._texts is None:
            ex = self.group["examples"]
            n = self.manifest["data"]["n_examples"]
            self._texts = {name: [str(x) for x in self._read(ex[name], slice(None), "the texts")] if n else []
                           for name in text_fields(self.manifest)}
        if i is None:
            return self._texts
        return {name: values[i] for name, values in self._texts.items()}

    def messages(self, view: str) -> list:
        """Each example's prompt turns of `view` ([] where the view is empty), for a student that renders them in its
        own chat template; a cache of paper-format prompts stores none: one-line CacheError."""
        if prompt_format(self.manifest) != "chat":
            raise CacheError(f"{self.url}: its prompts are in the paper's format (no conversation turns stored); "
                             "train with --prompt-format paper, or rebuild it with cache-teacher --prompt-format chat")
        return [json.loads(text) if text else [] for text in self.texts()[f"messages_{view}"]]

    def rows(self, view: str) -> int:
        """Stored rows of a view, over all (readable) examples."""
        return int(self.views[view]["offsets"][self._n])

    def offsets(self, view: str) -> np.ndarray:
        """int64 [n + 1]: the global rows of example i are offsets[i]:offsets[i + 1]."""
        return self.views[view]["offsets"]

    def column(self, view: str, name: str) -> np.ndarray:
        """A whole per-row id array of a view (input_ids or target_ids, int64 [rows]), read part by part."""
        if name not in ("input_ids", "target_ids"):
            raise ValueError(f"column: expected input_ids or target_ids, got {name!r}")
        pieces = []
        for part in self.parts:
            end = int(self.views[view]["offsets"][min(part.committed, self._n)]) - part.row_start[view]
            if end > 0:
                pieces.append(self._read(part.arrays[view][name], slice(0, end), f"the {view} {name} column",
                                         self._examples_of(part, view)))
        return np.concatenate(pieces).astype(np.int64) if pieces else np.zeros(0, dtype=np.int64)

    def teacher_rows(self, i: int, view: str, names=None) -> dict[str, torch.Tensor]:
        """One example's rows of a view as decoded tensors (see `decode_rows`); `names` limits what is read
        (names the cache does not store, such as `embeds` of a lookup-embedding teacher, are skipped)."""
        if names is not None and "hidden" in names:
            names = (*names, "hidden_scale")          # int8 storage: the scale is part of the hidden state
        return decode_rows(self.view(i, view, names))

    def __getitem__(self, i: int) -> dict:
        if not -self._n <= i < self._n:
            raise IndexError(f"example {i} out of range for a cache of {self._n}")
        i = i % self._n
        out = {"id": self.texts(i)["id"]}
        for view in VIEWS:
            out[view] = self.view(i, view)
        return out

    def view(self, i: int, view: str, names=None) -> dict:
        """One example's view; `names` limits which per-row arrays are read (and decoded), and leaves out its
        texts (a trainer's worker never reads them: the texts of a million examples would fill its memory)."""
        v = self.views[view]
        a, b = int(v["offsets"][i]), int(v["offsets"][i + 1])
        part = self.parts[bisect.bisect_right(self._part_starts, i) - 1]
        local = a - part.row_start[view]
        out = {"prompt_len": int(v["prompt_len"][i]), "n_rows": b - a}
        if names is None:
            texts = self.texts(i)
            out.update(prompt=texts[f"prompt_{view}"], response=texts[f"response_{view}"])
        wanted = {name: arr for name, arr in part.arrays[view].items() if names is None or name in names}
        out.update(self._rows(wanted, local, local + b - a, f"example {i}", self._examples_of(part, view)))
        return out

    def _rows(self, arrays: dict, a: int, b: int, what: str, examples_of) -> dict[str, np.ndarray]:
        """arr[a:b] of each per-row array of `arrays` (name -> array of one part and view), through this reader's
        decoded chunks: each chunk the rows touch is read (fetched, crc32c-checked, decompressed) once while it stays
        in `self.decoded`, not once per example, and the chunks missing from it are read concurrently (one round of
        requests to an object store rather than one per array). The rows come back read-only when they are a slice
        of one kept chunk (a writer would change the kept copy)."""
        if b <= a:
            return {name: np.zeros((0, *arr.shape[1:]), dtype=arr.dtype) for name, arr in arrays.items()}
        if not self.decoded.capacity:
            return {name: self._read(arr, slice(a, b), what, examples_of) for name, arr in arrays.items()}
        spans = {name: range(a // arr.chunks[0], (b - 1) // arr.chunks[0] + 1) for name, arr in arrays.items()}
        chunks = {(name, c): self.decoded.get((arr.path, c)) for name, arr in arrays.items() for c in spans[name]}
        missing = [key for key, chunk in chunks.items() if chunk is None]
        reads = [(arrays[name], _chunk_rows(arrays[name], c)) for name, c in missing]
        for (name, c), rows in zip(missing, self._read_together(reads, what, examples_of)):
            chunks[(name, c)] = self.decoded.put((arrays[name].path, c), rows)
        out = {}
        for name, arr in arrays.items():
            per_chunk = arr.chunks[0]
            pieces = [chunks[(name, c)][max(a - c * per_chunk, 0):b - c * per_chunk] for c in spans[name]]
            out[name] = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
        return out

    def _read_together(self, reads: list, what: str, examples_of) -> list[np.ndarray]:
        """arr[rows] for each (arr, rows) of `reads`, fetched concurrently on Zarr's event loop; a failure is named
        as `_read` names it."""
        if len(reads) <= 1:
            return [self._read(arr, rows, what, examples_of) for arr, rows in reads]

        async def fetch_all():
            return await asyncio.gather(*(arr.async_array.getitem(rows) for arr, rows in reads), return_exceptions=True)

        results = zarr_sync(fetch_all())
        for (arr, _), result in zip(reads, results):
            if isinstance(result, BaseException):
                self._unreadable(arr, result, what, examples_of)
        return results

    def _examples_of(self, part, view: str):
        return lambda row_a, row_b: part.examples_of(view, self.views[view]["offsets"], row_a, row_b)

    def _read(self, arr, rows: slice, what: str, examples_of=None) -> np.ndarray:
        """arr[rows], or a CacheError naming the array: a crc32c mismatch, a truncated chunk, and (format 4) a
        missing chunk or one in the wrong place are never trained on. `examples_of(first_row, end_row)`: the
        examples of the array's rows (default: row i is example i, as in the per-example arrays)."""
        try:
            return arr[rows]
        except Exception as e:
            self._unreadable(arr, e, what, examples_of)

    def _unreadable(self, arr, e: BaseException, what: str, examples_of=None) -> NoReturn:
        """Raise the CacheError naming what a read of `arr` ran into (see `_read`)."""
        if isinstance(e, ChunkProblem):
            place = chunk_place(arr, chunk_of(e.key)[1], examples_of or (lambda a, b: (a, b)))
            raise CacheError(f"{e.named(self.url, place)}; run `cot2align cache verify {self.url}` to list every "
                             "damaged chunk") from None
        if not isinstance(e, Exception):
            raise e
        reason = str(e).splitlines()[0] if str(e) else ""
        raise CacheError(f"{self.url}/{arr.path}: unreadable chunk holding {what} ({type(e).__name__}: {reason}); "
                         f"run `cot2align cache verify {self.url}` to list every damaged chunk") from None

    # ------------------------------------------------------------------ local places kept for this cache

    def local_dir(self, kind: str) -> Path:
        """A local directory for what is kept on this cache's behalf (`students`: the students' memoised
        tokenisation; `teacher`: a remote cache's teacher files): beside a local, writable cache
        (<cache>.students/), else under $COT2ALIGN_HOME/<kind>/<cache identity>/ — a cache on an object store or
        on read-only storage is never written by a reader."""
        beside = self.location.beside(".students") if kind == "students" else None
        return beside if beside is not None else self.home_dir(kind)

    def home_dir(self, kind: str) -> Path:
        """$COT2ALIGN_HOME/<kind>/<cache identity>/: what is kept for a cache whose own storage cannot take it."""
        return cot2align_home() / kind / self.location.identity(self.manifest)

    def teacher_dir(self) -> Path:
        """The teacher's tokenizer files and head, as a local directory."""
        return self.location.local_copy("teacher", self.local_dir("remote") / "teacher")

    # ------------------------------------------------------------------ tensors

    def hidden_tensor(self, view_data: dict, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """The stored last hidden states as a torch tensor (bf16 bits reinterpreted, or int8 dequantised)."""
        return _hidden(view_data).to(dtype)

    def head(self, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The teacher's embedding table and LM head, stored once in teacher/head.safetensors."""
        check_teacher_files(self.manifest, self.teacher_dir(), self.url, names=["head.safetensors"])
        tensors = load_file(str(self.teacher_dir() / "head.safetensors"), device=str(device))
        if dtype is not None:
            tensors = {k: v.to(dtype) for k, v in tensors.items()}
        return tensors

    def tokenizer(self):
        return AutoTokenizer.from_pretrained(str(self.teacher_dir()))

    def embedding_features(self, view_data: dict, head: dict, which: str = "input") -> torch.Tensor:
        """Embedding-layer features of the rows: embed_tokens[input_ids] (or [target_ids] for
        DSKD's keys), or the stored per-row `embeds` when the model's embedding is not a lookup."""
        if which == "input" and self.embed_kind == "stored":
            return _bf16(view_data["embeds"]).to(head["embed_tokens"].dtype)
        ids = view_data["input_ids" if which == "input" else "target_ids"]
        return gather_embeddings(head["embed_tokens"], ids)


def _chunk_rows(arr, c: int) -> slice:
    """The rows of chunk c of a per-row array."""
    return slice(c * arr.chunks[0], min((c + 1) * arr.chunks[0], arr.shape[0]))


def _bf16(bits: np.ndarray) -> torch.Tensor:
    """uint16 bf16 bits -> a bfloat16 tensor (a reinterpretation, no rounding)."""
    return torch.from_numpy(np.ascontiguousarray(bits).view(np.int16).copy()).view(torch.bfloat16)


def _hidden(rows: dict) -> torch.Tensor:
    """bf16 bits as bfloat16, or int8 x per-row float16 scale dequantised to float32."""
    hidden = rows["hidden"]
    if hidden.dtype == np.uint16:
        return _bf16(hidden)
    scale = torch.from_numpy(rows["hidden_scale"].astype(np.float32))
    return torch.from_numpy(hidden.astype(np.float32)) * scale[:, None]


def decode_rows(rows: dict) -> dict[str, torch.Tensor]:
    """Stored per-row arrays (as `TeacherCache.view` returns them) -> torch tensors a loss can use:

        input_ids, target_ids, topk_ids  int64          hidden  bfloat16 (bf16 storage) | float32 (int8 + scale)
        topk_logprobs, tail_logprob,     float32        embeds  bfloat16 (only caches of stored embeddings)
        target_logprob (caches that hold it)

    `hidden_scale` is folded into `hidden`; other keys of `rows` (prompt_len, texts) are left out.
    """
    out: dict[str, torch.Tensor] = {}
    for name in ("input_ids", "target_ids", "topk_ids"):
        if name in rows:
            out[name] = torch.from_numpy(rows[name].astype(np.int64))
    for name in ("topk_logprobs", "tail_logprob", "target_logprob"):
        if name in rows:
            out[name] = torch.from_numpy(rows[name].astype(np.float32))
    if "hidden" in rows:
        out["hidden"] = _hidden(rows)
    if "embeds" in rows:
        out["embeds"] = _bf16(rows["embeds"])
    return out


def gather_embeddings(embed_tokens: torch.Tensor, ids) -> torch.Tensor:
    """Rows of the stored embedding table for token ids (numpy or torch)."""
    ids = torch.as_tensor(np.asarray(ids, dtype=np.int64) if not torch.is_tensor(ids) else ids, dtype=torch.long)
    return embed_tokens[ids.to(embed_tokens.device)]


def open_cache(path: str | Path | OpenedCache, allow_incomplete: bool = False, check_tokenizer: bool = True) -> TeacherCache:
    """Open a complete cache for reading (README 'Methods'): a local directory or an fsspec URL (s3://, gs://, …),
    or again, in a DataLoader worker, from what the trainer's open read (`TeacherCache.opened()`; the tokenizer
    was checked there)."""
    if isinstance(path, OpenedCache):
        return TeacherCache(path.url, allow_incomplete=path.allow_incomplete, check_tokenizer=False,
                            known=path.objects)
    return TeacherCache(path, allow_incomplete=allow_incomplete, check_tokenizer=check_tokenizer)


def check_opens(location: Location, manifest: dict | None, allow_incomplete: bool = False) -> None:
    """What opening a cache refuses before reading an array: no manifest, another format, a manifest that fails its
    checksum or lacks a field, and (unless `allow_incomplete`) a cache that is not complete."""
    if manifest is None:
        raise CacheError(f"{location}: no cache here (zarr.json not found)")
    check_format(manifest, location.url)
    status = manifest.get("status")
    if status != "complete" and not allow_incomplete:
        raise CacheError(f"{location}: cache status is '{status}', not complete (still being written or "
                         "interrupted; rerun cache-teacher to finish it)")


def open_arrays(location: Location, manifest: dict):
    """(root group, chunk index or None): the store read through the chunk index from format 4 on, so that each
    chunk fetched is checked against the crc32c recorded at its position."""
    store = location.zarr_store(read_only=True)
    index = None
    if manifest["format_version"] >= CHUNK_INDEX_SINCE:
        index = ChunkIndex.open(location, store, manifest)
        store = CheckingStore(store, index)
    return zarr.open_group(store=store, mode="r"), index


def check_tokenizer_files(manifest: dict, teacher_dir: Path, where) -> None:
    """The teacher's tokenizer as opening a cache checks it: each tokenizer file against the manifest's sha256,
    then the vocabulary hash of the tokenizer they load against the manifest's."""
    tokenizer_files = [name for name in manifest["teacher"].get("files_sha256", {}) if name != "head.safetensors"]
    check_teacher_files(manifest, teacher_dir, where, names=tokenizer_files)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(teacher_dir))
    except Exception as e:
        raise CacheError(f"{where}/teacher: the tokenizer files cannot be loaded ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if tokenizer_hash(tokenizer) != manifest["tokenizer"]["vocab_hash"]:
        raise CacheError(f"{where}/teacher: tokenizer files do not match the manifest's vocab_hash")
