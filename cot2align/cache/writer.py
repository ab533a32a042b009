"""Writer primitives of the cache: create the store, write one block of rows, commit progress.

Crash safety comes from three facts:
1. Everything that does not depend on the teacher's outputs (texts, offsets, prompt lengths, the
   teacher head and tokenizer) is written before the first block, with status "writing".
2. Rows are written block by block; zarr's local store replaces each chunk file atomically
   (write to a temporary file, then rename), so a chunk is always either the old or the new one.
3. The manifest's `progress.blocks_done` moves only after all of a block's arrays are written.
   A restart recomputes from the first uncommitted block, with the same batches, so the final
   arrays equal those of an uninterrupted run. Rows past the committed ones are never read.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import zarr
from safetensors.torch import save_file

from cot2align.cache.format import EXAMPLE_CHUNK, TEXT_FIELDS, VIEWS, CacheError, checksum_codecs


class CacheWriter:
    def __init__(self, path: Path, group: zarr.Group, manifest: dict):
        self.path = path
        self.group = group
        self.manifest = manifest

    # ---------------------------------------------------------------- creation and reopening

    @classmethod
    def create(cls, path: str | Path, manifest: dict, texts: dict[str, list[str]], offsets: dict[str, np.ndarray],
               prompt_len: dict[str, np.ndarray], specs: dict[str, dict], head: dict, teacher_files_dir: Path | None):
        """Create a new cache with everything except the per-row teacher outputs."""
        final = Path(path)
        if final.exists() and any(final.iterdir()):
            raise CacheError(f"{final}: exists and is not empty")
        # Build in a sibling directory and rename it into place: --out never holds a half-made store.
        path = final.with_name(f".{final.name}.creating-{os.getpid()}")
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        manifest = dict(manifest, status="creating")
        root = zarr.open_group(str(path), mode="w", attributes=_copy(manifest))
        n = len(texts["id"])
        ex = root.create_group("examples")
        for name in TEXT_FIELDS:
            arr = ex.create_array(name, shape=(n,), dtype=str, chunks=(min(EXAMPLE_CHUNK, max(n, 1)),),
                                  compressors=checksum_codecs("topk"))
            if n:
                arr[:] = np.array(texts[name], dtype=object)
        for view in VIEWS:
            g = root.create_group(view)
            total = int(offsets[view][-1])
            off = g.create_array("offsets", shape=(n + 1,), dtype=np.int64, chunks=(min(EXAMPLE_CHUNK, n + 1),),
                                 compressors=checksum_codecs("topk"))
            off[:] = offsets[view]
            pl = g.create_array("prompt_len", shape=(n,), dtype=np.int32, chunks=(min(EXAMPLE_CHUNK, max(n, 1)),),
                                compressors=checksum_codecs("topk"))
            if n:
                pl[:] = prompt_len[view]
            for name, spec in specs.items():
                g.create_array(name, shape=(total, *spec["trailing"]), dtype=spec["dtype"],
                               chunks=(spec["chunk"], *spec["trailing"]), compressors=checksum_codecs(spec["codec"]),
                               fill_value=0)
        teacher_dir = path / "teacher"
        teacher_dir.mkdir(exist_ok=True)
        if teacher_files_dir is not None:
            for item in Path(teacher_files_dir).iterdir():
                shutil.copy2(item, teacher_dir / item.name)
        # clone(): tied embeddings share storage, and each is stored under its own name
        save_file({k: v.detach().cpu().clone().contiguous() for k, v in head.items()}, str(teacher_dir / "head.safetensors"))
        manifest["status"] = "writing"
        root.attrs.put(_copy(manifest))
        if final.exists():
            final.rmdir()  # empty (checked above)
        os.replace(path, final)
        return cls(final, zarr.open_group(str(final), mode="r+"), manifest)

    @classmethod
    def reopen(cls, path: str | Path):
        path = Path(path)
        root = zarr.open_group(str(path), mode="r+")
        return cls(path, root, dict(root.attrs.asdict()))

    # ---------------------------------------------------------------- blocks

    def write_rows(self, view: str, row_start: int, arrays: dict[str, np.ndarray]) -> None:
        """Write a block's rows [row_start, row_start + len) of every per-row array of `view`."""
        g = self.group[view]
        for name, data in arrays.items():
            if len(data):
                g[name][row_start:row_start + len(data)] = data

    def commit(self, blocks_done: int, examples_done: int, extra: dict | None = None) -> None:
        """Record progress: called only after every array of the block is written."""
        progress = dict(self.manifest.get("progress", {}), blocks_done=blocks_done, examples_done=examples_done)
        self.manifest["progress"] = progress
        if extra:
            self.manifest.update(extra)
        self.group.attrs.put(_copy(self.manifest))

    def finalize(self, extra: dict) -> None:
        self.manifest.update(extra)
        self.manifest["status"] = "complete"
        self.group.attrs.put(_copy(self.manifest))


def _copy(manifest: dict) -> dict:
    # A deep, JSON-clean copy: zarr clears the dict it is handed on the next put().
    return json.loads(json.dumps(manifest))
