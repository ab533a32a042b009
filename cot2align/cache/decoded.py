"""The reader's decoded chunks: the last chunks it read, decompressed and checked, kept in memory per process.

An example's rows are a small slice of each array's chunk (about 4 MiB of hidden state, 512-1024 rows; the 1-D
id arrays hold 65536 rows a chunk), and reading a slice through Zarr fetches, crc32c-checks and decompresses the
whole chunk. Without a place to keep it, every example read did that again for every array and view: the chunk
of its neighbours, decoded a moment before, was thrown away. `DecodedChunks` keeps the most recently used
decoded chunks, least recently used out, up to a number of bytes; each DataLoader worker opens its own reader,
so each worker has its own (COT2ALIGN_DECODED_MEMORY_MB, default 256; 0 reads every slice through Zarr as before).

How often a kept chunk is used again depends on the order examples are read in: the chunk-ordered sampler
(train/sampling.py) draws the batches of a stretch of neighbouring examples together, so a chunk is decoded about
once per worker and epoch rather than once per example.
"""

from __future__ import annotations

import os
from collections import OrderedDict

import numpy as np

from cot2align.errors import ConfigError

DEFAULT_MB = 256


def decoded_memory() -> int:
    """Bytes of decoded chunks a reader keeps (COT2ALIGN_DECODED_MEMORY_MB, default 256)."""
    raw = os.environ.get("COT2ALIGN_DECODED_MEMORY_MB", str(DEFAULT_MB))
    try:
        mb = float(raw)
    except ValueError:
        mb = -1.0
    if mb < 0:
        raise ConfigError(f"COT2ALIGN_DECODED_MEMORY_MB: expected a number of MiB >= 0 (0: keep none), got {raw!r}")
    return int(mb * (1 << 20))


class DecodedChunks:
    """Decoded chunks by key (array path, chunk number), least recently used out beyond `capacity` bytes.

    Kept arrays are made read-only: the rows handed out are views of them, and a caller writing into one would
    change what every later read of that chunk returns."""

    def __init__(self, capacity: int):
        self.capacity, self.size = capacity, 0
        self.kept: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()
        self.hits = self.misses = 0

    def get(self, key: tuple[str, int]) -> np.ndarray | None:
        chunk = self.kept.get(key)
        if chunk is None:
            self.misses += 1
            return None
        self.hits += 1
        self.kept.move_to_end(key)
        return chunk

    def put(self, key: tuple[str, int], chunk: np.ndarray) -> np.ndarray:
        """Keep `chunk` (unless it alone is larger than the capacity); returns it, read-only."""
        chunk.flags.writeable = False
        if chunk.nbytes > self.capacity:
            return chunk
        self.kept[key] = chunk
        self.size += chunk.nbytes
        while self.size > self.capacity:
            _, dropped = self.kept.popitem(last=False)
            self.size -= dropped.nbytes
        return chunk
