"""The chunk index (format 4): which chunk is stored at each position of each array, so that a chunk that is
missing, or that is a valid chunk of another position (copied or moved there), is refused rather than read.

Every chunk ends in its crc32c (the Crc32cCodec appends it as the encoded chunk's last 4 bytes). A crc32c alone
proves a chunk intact, not that it is the chunk of its position, and a deleted chunk file reads as the fill
value (zeros, empty texts). So the writer records, for each chunk it writes, that trailer under the chunk's
position (`ChunkRecorder`, a store wrapper that sees every write: nothing extra is read or hashed), and the
readers compare the trailer of each chunk they fetch with the recorded one (`CheckingStore`, a store wrapper
around the reader's store: 4 bytes compared per chunk fetched, on bytes already in memory).

Where the index lives, in the same JSON shape {array path: {chunk number: trailer}}:
  <cache>/chunk_index.json                 the arrays written at creation (examples/*, std|cot/offsets and
                                           prompt_len); its sha256 is the manifest's `store.chunk_index_sha256`
  <cache>/parts/<p>/chunk_index/<b>.json   the chunks block b of part p wrote, written before the part's
                                           `blocks_done` moves past b (a kill in between redoes the block and
                                           rewrites its file); one small file per block, so a commit never
                                           rewrites a growing file
A chunk is written by the block holding its rows, and a chunk shared by two blocks again by the later one:
its entry is in the file of the block that holds its last row (the later file supersedes the earlier one).
Readers load a block's file the first time they fetch a chunk it holds, so opening a large cache reads no
block index, and a reader keeps 5 bytes per chunk in memory.

Every chunk is written, even one holding only the fill value (the arrays' `write_empty_chunks`), so a missing
chunk file is always damage, and an all-zero chunk reads back as written.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import google_crc32c
import numpy as np
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import WrapperStore

from cot2align.cache.format import CacheError

ROOT_INDEX = "chunk_index.json"
WRITE_EVERY_CHUNK = {"write_empty_chunks": True}     # zarr array config: never leave out a chunk of fill values


def block_index_key(part: int, block: int) -> str:
    return f"parts/{part}/chunk_index/{block}.json"


def chunk_of(key: str) -> tuple[str, int] | None:
    """(array path, chunk number along rows) of a chunk's store key ("parts/0/std/hidden/c/3/0" -> ("parts/0/std/
    hidden", 3)), or None for metadata and other files. The cache's arrays are chunked along rows only, so any
    other coordinate is 0."""
    path, sep, coords = key.rpartition("/c/")
    numbers = coords.split("/")
    if not sep or not all(x.isdigit() for x in numbers) or any(x != "0" for x in numbers[1:]):
        return None
    return path, int(numbers[0])


def chunk_place(arr, c: int, examples_of) -> str:
    """"rows a..b, examples x..y" of chunk c of `arr`; `examples_of(first_row, end_row) -> (first, end)` maps the
    array's rows to the examples that hold them."""
    start = c * arr.chunks[0]
    end = min(start + arr.chunks[0], arr.shape[0])
    first, last = examples_of(start, end)
    return f"rows {start}..{end - 1}, examples {first}..{max(last - 1, first)}"


def trailer(value) -> int:
    """The crc32c the codec appended to an encoded chunk (a zarr Buffer): its last 4 bytes, little-endian."""
    tail = value.as_numpy_array()[-4:]
    return int.from_bytes(tail.tobytes(), "little") if len(tail) == 4 else -1


def encode(entries: dict[str, dict[int, int]]) -> bytes:
    return json.dumps({path: {str(c): t for c, t in sorted(chunks.items())} for path, chunks in sorted(entries.items())},
                      separators=(",", ":")).encode()


def decode(data: bytes, where: str) -> dict[str, dict[int, int]]:
    try:
        raw = json.loads(data)
        return {path: {int(c): int(t) for c, t in chunks.items()} for path, chunks in raw.items()}
    except (ValueError, AttributeError, TypeError):
        raise CacheError(f"{where}: unreadable chunk index (not the JSON the writer wrote)") from None


# ---------------------------------------------------------------------------------------------------- writing


class ChunkRecorder(WrapperStore):
    """The writer's store: every chunk written is recorded as (array path, chunk number) -> its trailer, until
    `take` hands the entries of a block (or of the creation) to an index file."""

    def __init__(self, store, entries: dict | None = None):
        super().__init__(store)
        self.entries: dict[str, dict[int, int]] = {} if entries is None else entries

    def _with_store(self, store):
        return type(self)(store, self.entries)

    async def set(self, key, value) -> None:
        await self._store.set(key, value)
        located = chunk_of(key)
        if located is not None:
            self.entries.setdefault(located[0], {})[located[1]] = trailer(value)

    def take(self, prefix: str = "") -> dict[str, dict[int, int]]:
        """The entries recorded under `prefix` since the last take (then forgotten)."""
        taken = {path: chunks for path, chunks in self.entries.items() if path.startswith(prefix)}
        for path in taken:
            del self.entries[path]
        return taken

    def write_file(self, key: str, data: bytes) -> None:
        """A whole index file, through the store (a local store writes it aside and renames it)."""
        sync(self._store.set(key, default_buffer_prototype().buffer.from_bytes(data)))


# ---------------------------------------------------------------------------------------------------- reading


class ChunkProblem(CacheError):
    """A chunk that is not the one the index recorded at its position: missing, another chunk, or not indexed."""

    def __init__(self, key: str, what: str, detail: str):
        super().__init__(f"{key}: {what}: {detail}")
        self.key, self.what, self.detail = key, what, detail

    def named(self, where: str, place: str) -> str:
        """The problem as the readers report it: `where`/key: what (place: rows, examples): detail."""
        return f"{where}/{self.key}: {self.what} ({place}): {self.detail}"


@dataclass
class _PartArray:
    """What locates the index entry of a part's per-row array: the block that holds a chunk's last row."""

    part: int
    chunk_rows: int
    rows: int                                # the array's rows (the part's rows of its view)
    block_rows: np.ndarray                   # the part-local first row of each of the part's blocks
    first_block: int                         # the manifest's number of the part's first block
    blocks_done: int                         # committed blocks: chunks of later blocks are not checked
    trailers: np.ndarray = field(init=False)
    known: np.ndarray = field(init=False)

    def __post_init__(self):
        n = -(-self.rows // self.chunk_rows)
        self.trailers, self.known = np.zeros(n, dtype=np.uint32), np.zeros(n, dtype=bool)

    def block_of(self, c: int) -> int | None:
        """The part-local block whose file holds chunk c's entry, None for a chunk outside the array."""
        if not 0 <= c < len(self.known):
            return None
        last_row = min((c + 1) * self.chunk_rows, self.rows) - 1
        return int(np.searchsorted(self.block_rows, last_row, side="right")) - 1


class ChunkIndex:
    """The recorded trailer of every chunk of a format-4 cache, the root's read at open, a block's on first use."""

    def __init__(self, store, where: str, root_entries: dict[str, dict[int, int]]):
        self.store, self.where = store, where
        self.root = root_entries
        self.arrays: dict[str, _PartArray] = {}
        self.loaded: set[tuple[int, int]] = set()

    @classmethod
    def open(cls, location, store, manifest: dict) -> "ChunkIndex":
        """The root index of the cache at `location`, checked against the manifest's sha256."""
        where = f"{location}/{ROOT_INDEX}"
        recorded = manifest.get("store", {}).get("chunk_index_sha256")
        text = location.read_text(ROOT_INDEX)
        if not isinstance(recorded, str):
            raise CacheError(f"{location}/zarr.json: manifest field 'store.chunk_index_sha256' is missing "
                             "(format 4 records its chunk index)")
        if text is None:
            raise CacheError(f"{where}: missing (the manifest records its sha256)")
        if hashlib.sha256(text.encode()).hexdigest() != recorded:
            raise CacheError(f"{where}: sha256 does not match the manifest (corrupted or replaced); "
                             "rebuild the cache with cache-teacher")
        return cls(store, str(location), decode(text.encode(), where))

    def add_part(self, part, offsets: dict, block_starts: list[int]) -> None:
        """Index the per-row arrays of a part (parts.Part) under their paths."""
        first, end = part.blocks
        for view, arrays in part.arrays.items():
            block_rows = np.asarray(offsets[view][block_starts[first:end]], dtype=np.int64) - part.row_start[view]
            for arr in arrays.values():
                self.arrays[arr.path] = _PartArray(part.number, arr.chunks[0], arr.shape[0], block_rows, first,
                                                   part.blocks_done)

    async def expected(self, key: str) -> int | None:
        """The trailer recorded for the chunk at `key`; None where nothing is checked (metadata, files outside the
        arrays, a chunk of a block not committed yet). ChunkProblem when the index has no entry for it."""
        located = chunk_of(key)
        if located is None:
            return None
        path, c = located
        if path in self.root:
            if c not in self.root[path]:
                raise ChunkProblem(key, "chunk not in the chunk index", f"{ROOT_INDEX} has no entry for it")
            return self.root[path][c]
        array = self.arrays.get(path)
        block = None if array is None else array.block_of(c)
        if block is None or block >= array.blocks_done:
            return None
        if not array.known[c]:
            await self._load(array.part, array.first_block + block)
        if not array.known[c]:
            raise ChunkProblem(key, "chunk not in the chunk index",
                               f"{block_index_key(array.part, array.first_block + block)} has no entry for it")
        return int(array.trailers[c])

    async def _load(self, part: int, block: int) -> None:
        """Read block `block`'s index file; keep each entry of the chunks whose last row is in that block."""
        if (part, block) in self.loaded:
            return
        key = block_index_key(part, block)
        value = await self.store.get(key, default_buffer_prototype())
        if value is None:
            raise CacheError(f"{self.where}/{key}: missing (block {block} of part {part} is committed)")
        for path, chunks in decode(value.to_bytes(), f"{self.where}/{key}").items():
            array = self.arrays.get(path)
            if array is None or array.part != part:
                continue
            for c, recorded in chunks.items():
                b = array.block_of(c)
                if b is not None and array.first_block + b == block:
                    array.trailers[c], array.known[c] = recorded, True
        self.loaded.add((part, block))

    def block_files(self) -> list[str]:
        """The store keys of every committed block's index file (what `cache verify` checks exist)."""
        parts = {(a.part, a.first_block, a.blocks_done) for a in self.arrays.values()}
        return [block_index_key(p, first + b) for p, first, done in sorted(parts) for b in range(done)]


class CheckingStore(WrapperStore):
    """The readers' store: each chunk fetched must exist and end in the trailer the index recorded for its
    position, else ChunkProblem (the chunk's key and what is wrong)."""

    def __init__(self, store, index: ChunkIndex):
        super().__init__(store)
        self.index = index

    def _with_store(self, store):
        return type(self)(store, self.index)

    async def get(self, key, prototype, byte_range=None):
        value = await self._store.get(key, prototype, byte_range)
        expected = await self.index.expected(key)
        if expected is None or byte_range is not None:
            return value
        if value is None:
            raise ChunkProblem(key, "missing chunk", "the chunk index lists it, the store does not hold it")
        found = trailer(value)
        if found != expected:
            body = value.as_numpy_array()[:-4]
            if google_crc32c.value(body.tobytes()) != found:    # (only on this error path: a full pass)
                raise ChunkProblem(key, "unreadable chunk", "its crc32c does not match its bytes (corrupted)")
            raise ChunkProblem(key, "chunk in the wrong place", f"its crc32c {found & 0xFFFFFFFF:08x} is not the "
                               f"{expected:08x} written at this position (copied or moved from elsewhere)")
        return value
