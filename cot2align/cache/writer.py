"""Writer primitives of the cache: create the store, fill a part block by block, commit progress, complete.

The commit protocol (format.py) in four calls:
  create()      manifest first (status "creating"), then texts, offsets, prompt lengths and their chunk index,
                every part's array metadata and progress, the teacher files, then the manifest again (status
                "writing", with the chunk index's sha256);
  write_rows()  a block's rows of one view of one part — each chunk one whole-object write, every chunk written
                (even one of fill values only) and its crc32c trailer recorded (chunk_index.py);
  commit()      the block's chunk index file, then the part's progress, written only after all of the block's
                chunks (by that part's writer alone: parts never share a chunk, an index file or a progress
                record, so ranks never race);
  finalize()    status "complete", once every part is complete.
A restart recomputes each part from its first uncommitted block, with the same batches, so the final arrays
equal those of an uninterrupted run; rows past a part's committed blocks are never read.
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

import numpy as np
import zarr
from safetensors.torch import save_file

from cot2align.cache.chunk_index import (ROOT_INDEX, WRITE_EVERY_CHUNK, ChunkRecorder, block_index_key, encode)
from cot2align.cache.format import (EXAMPLE_CHUNK, MESSAGE_FIELDS, TEXT_FIELDS, VIEWS, checksum_codecs, file_sha256,
                                    with_checksum)
from cot2align.cache.storage import Location


class CacheWriter:
    def __init__(self, location: Location, group: zarr.Group, manifest: dict, store: ChunkRecorder):
        self.location = location
        self.group = group
        self.manifest = manifest
        self.store = store                      # records the trailer of every chunk written, for the chunk index

    # ---------------------------------------------------------------- creation and reopening

    @classmethod
    def create(cls, location: Location, manifest: dict, texts: dict[str, list[str]], offsets: dict[str, np.ndarray],
               prompt_len: dict[str, np.ndarray], specs: dict[str, dict], head: dict, teacher_files_dir: Path | None):
        """A new cache (or an interrupted creation redone) with everything but the per-row teacher outputs."""
        manifest = dict(manifest, status="creating")
        location.clear_for_creation()
        store = ChunkRecorder(location.zarr_store(read_only=False))
        root = zarr.open_group(store=store, mode="w", attributes=with_checksum(manifest))
        _write_texts(root, texts)
        for view in VIEWS:
            _write_view_index(root.create_group(view), offsets[view], prompt_len[view])
        root_index = encode(store.take())
        store.write_file(ROOT_INDEX, root_index)
        manifest["store"] = dict(manifest["store"], chunk_index_sha256=hashlib.sha256(root_index).hexdigest())
        for number, part in enumerate(manifest["store"]["parts"]):
            group = root.create_group(f"parts/{number}", attributes={"blocks_done": 0})
            for view in VIEWS:
                rows = part["rows"][view][1] - part["rows"][view][0]
                _create_row_arrays(group.create_group(view), rows, specs)
        files_sha256 = {}
        if teacher_files_dir is not None:
            location.upload(Path(teacher_files_dir), "teacher")
            files_sha256 = {str(f.relative_to(teacher_files_dir)): file_sha256(f)
                            for f in sorted(Path(teacher_files_dir).rglob("*")) if f.is_file()}
        with tempfile.TemporaryDirectory() as tmp:
            # clone(): tied embeddings share storage, and each is stored under its own name
            save_file({k: v.detach().cpu().clone().contiguous() for k, v in head.items()}, f"{tmp}/head.safetensors")
            files_sha256["head.safetensors"] = file_sha256(Path(tmp) / "head.safetensors")
            location.upload(Path(tmp) / "head.safetensors", "teacher/head.safetensors")
        manifest["teacher"] = dict(manifest["teacher"], files_sha256=files_sha256)
        manifest["status"] = "writing"
        root.attrs.put(with_checksum(manifest))
        return cls(location, root, manifest, store)

    @classmethod
    def reopen(cls, location: Location):
        store = ChunkRecorder(location.zarr_store(read_only=False))
        root = zarr.open_group(store=store, mode="r+")
        return cls(location, root, dict(root.attrs.asdict()), store)

    # ---------------------------------------------------------------- blocks

    def blocks_done(self, part: int) -> int:
        return int(self.group[f"parts/{part}"].attrs.get("blocks_done", 0))

    def write_rows(self, part: int, view: str, row_start: int, arrays: dict[str, np.ndarray]) -> None:
        """Write a block's rows [row_start, row_start + len) (rows of the part) of every per-row array of `view`."""
        g = self.group[f"parts/{part}/{view}"]
        for name, data in arrays.items():
            if len(data):
                g[name].with_config(WRITE_EVERY_CHUNK)[row_start:row_start + len(data)] = data

    def commit(self, part: int, blocks_done: int) -> None:
        """Record a part's progress: called only after every chunk of the block is written. The block's chunk
        index goes first: a kill before the progress moves leaves the block uncommitted, redone by the next run."""
        self.location.check_writer()           # an object store's lease taken over: never commit over another writer
        block = self.manifest["store"]["parts"][part]["blocks"][0] + blocks_done - 1
        self.store.write_file(block_index_key(part, block), encode(self.store.take(f"parts/{part}/")))
        self.group[f"parts/{part}"].attrs.put({"blocks_done": blocks_done})

    def finalize(self, extra: dict) -> None:
        self.manifest.update(extra)
        self.manifest["status"] = "complete"
        self.group.attrs.put(with_checksum(self.manifest))


def _write_texts(root: zarr.Group, texts: dict[str, list[str]]) -> None:
    n = len(texts["id"])
    examples = root.create_group("examples")
    for name in TEXT_FIELDS + tuple(f for f in MESSAGE_FIELDS if f in texts):
        arr = examples.create_array(name, shape=(n,), dtype=str, chunks=(min(EXAMPLE_CHUNK, max(n, 1)),),
                                    compressors=checksum_codecs("topk"), config=WRITE_EVERY_CHUNK)
        if n:
            arr[:] = np.array(texts[name], dtype=object)


def _write_view_index(g: zarr.Group, offsets: np.ndarray, prompt_len: np.ndarray) -> None:
    n = len(prompt_len)
    off = g.create_array("offsets", shape=(n + 1,), dtype=np.int64, chunks=(min(EXAMPLE_CHUNK, n + 1),),
                         compressors=checksum_codecs("topk"), config=WRITE_EVERY_CHUNK)
    off[:] = offsets
    pl = g.create_array("prompt_len", shape=(n,), dtype=np.int32, chunks=(min(EXAMPLE_CHUNK, max(n, 1)),),
                        compressors=checksum_codecs("topk"), config=WRITE_EVERY_CHUNK)
    if n:
        pl[:] = prompt_len


def _create_row_arrays(g: zarr.Group, rows: int, specs: dict[str, dict]) -> None:
    for name, spec in specs.items():
        g.create_array(name, shape=(rows, *spec["trailing"]), dtype=spec["dtype"],
                       chunks=(spec["chunk"], *spec["trailing"]), compressors=checksum_codecs(spec["codec"]),
                       fill_value=0)
