"""Where a cache lives: a local directory, or any fsspec URL — s3://bucket/prefix, gs://…, az://…, file://…,
memory://… (tests).

Zarr v3 opens both with its own stores (`LocalStore`, `FsspecStore`); the few files outside Zarr (the teacher's
tokenizer files and head weights) go through the same fsspec filesystem. Credentials and endpoints come from the
usual environment of each backend (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS_PROFILE for
S3; GOOGLE_APPLICATION_CREDENTIALS for GCS; …), or as fsspec options in COT2ALIGN_STORAGE_OPTIONS (a JSON
object, e.g. {"client_kwargs": {"endpoint_url": "http://127.0.0.1:8333"}}).

A remote cache is read-only to a trainer: what a trainer keeps beside a local cache (the student's memoised
tokenisation) goes to a local directory keyed by the cache's identity instead (`local_dir`).

Reads of a remote cache keep the last COT2ALIGN_REMOTE_MEMORY_MB (default 512) of chunk objects in memory per
process (`MemoryChunkStore`): an example's rows are a slice of a chunk its neighbours share, so each chunk is
fetched once rather than once per example. `COT2ALIGN_CHUNK_CACHE=DIR` keeps a local copy of every chunk object read from a remote cache
(`ChunkCacheStore`, safe across DataLoader worker processes), so a second epoch, or a second student, reads
from local disk.

A location can be handed objects already read (`known`, key -> bytes or None for "absent"), which it serves
without a request: the trainer's process records what opening a cache reads (the manifest, the chunk index, each
array's zarr.json, the offsets), and every DataLoader worker opens the cache from those bytes — over S3 that open
was ~60 sequential requests per worker before its first batch.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem
from zarr.storage import FsspecStore, LocalStore, WrapperStore

from cot2align.cache.format import CacheError
from cot2align.leftovers import remove_dead_temporaries, remove_partial_writes
from cot2align.locks import writer_lock
from cot2align.object_lock import ObjectLock, is_lock_name, lock_key


def is_url(where) -> bool:
    return "://" in str(where)


def storage_options() -> dict:
    raw = os.environ.get("COT2ALIGN_STORAGE_OPTIONS")
    if not raw:
        return {}
    try:
        options = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CacheError(f"COT2ALIGN_STORAGE_OPTIONS: not a JSON object ({e.msg})") from None
    if not isinstance(options, dict):
        raise CacheError("COT2ALIGN_STORAGE_OPTIONS: expected a JSON object of fsspec options")
    return options


class Location:
    """A cache's root, of one of two kinds: `LocalLocation` (a directory) or `RemoteLocation` (an fsspec URL).

    `Location(where)` gives the right kind. Both have `url` as given, `fs` + `root` for the files outside Zarr,
    `zarr_store()` for the arrays; each kind knows how to lock its writer out of others, how to clean what a killed
    writer left, and where a reader may keep derived data — so no caller asks which kind it holds.
    """

    def __new__(cls, where=None):
        if cls is Location:
            url = str(where)
            cls = RemoteLocation if is_url(url) and not url.startswith("file://") else LocalLocation
        return super().__new__(cls)

    def __init__(self, where: str | Path):
        self.url = str(where)
        self.known: dict[str, bytes | None] = {}      # objects served without a request (see `record`)
        self.recording = False

    def record(self, on: bool) -> None:
        """While on, every whole object this location reads (files outside Zarr and objects of the read-only store)
        is kept in `known`: what opening a cache read, to hand to its DataLoader workers."""
        self.recording = on

    def __str__(self) -> str:
        return self.url

    def path(self, relative: str = "") -> str:
        return f"{self.root}/{relative}".rstrip("/") if relative else self.root

    # ------------------------------------------------------------------ files outside zarr

    def is_empty(self) -> bool:
        """Nothing at the root (a missing root is empty too)."""
        if not self.fs.exists(self.root):
            return True
        return not [name for name in self.fs.ls(self.root, detail=False) if not is_lock_name(name.rsplit("/", 1)[-1])]

    def read_text(self, relative: str) -> str | None:
        key = f"files/{relative}"
        if key in self.known:
            data = self.known[key]
        else:
            try:
                with self.fs.open(self.path(relative), "rb") as f:
                    data = f.read()
            except FileNotFoundError:
                data = None
            if self.recording:
                self.known[key] = data
        return None if data is None else data.decode("utf-8")

    def upload(self, local: Path, relative: str) -> None:
        """A local file or directory to `relative` (each file one whole-object write)."""
        if local.is_dir():
            for item in sorted(local.iterdir()):
                self.upload(item, f"{relative}/{item.name}")
        else:
            self.fs.makedirs(self.path(relative).rsplit("/", 1)[0], exist_ok=True)
            self.fs.put_file(str(local), self.path(relative))

    def size(self, relative: str = "", chunks_only: bool = False) -> int:
        """Stored bytes under `relative` (a directory or prefix); chunks_only leaves out zarr.json metadata."""
        target = self.path(relative)
        if not self.fs.exists(target):
            return 0
        files = self.fs.find(target, detail=True)
        return int(sum(info["size"] for name, info in files.items()
                       if not (chunks_only and name.rsplit("/", 1)[-1] == "zarr.json")))

    def identity(self, manifest: dict) -> str:
        """A short key of this cache's place and whole manifest (every build writes a new one: its creation
        time, teacher weights, data, pass), for local directories kept on its behalf: a cache rebuilt at the same
        place is another cache, and nothing derived from the old one is reused for it."""
        from cot2align.cache.format import manifest_checksum

        key = json.dumps({"url": self.url, "manifest": manifest_checksum(manifest)}, sort_keys=True)
        return hashlib.sha256(key.encode()).hexdigest()[:16]


class LocalLocation(Location):
    """A cache in a local directory (a plain path or a file:// URL)."""

    def __init__(self, where: str | Path):
        super().__init__(where)
        self.local_path = Path(self.url.removeprefix("file://"))
        self.fs, self.root = LocalFileSystem(), str(self.local_path.absolute())

    def zarr_store(self, read_only: bool):
        store = LocalStore(self.root, read_only=read_only)
        return KnownObjectsStore(store, self) if read_only else store

    def writer_lock(self, error, what: str, rank: int = 0, log=None):
        """The output's writer lock (locks.py): a second writer of this cache is refused at once; each rank of a
        torchrun pass locks its own part, and every job has a rank 0, so two jobs always meet on <out>.lock."""
        return writer_lock(self.local_path, error, what, rank, log)

    def check_writer(self) -> None:
        """Nothing to check: a lock file stays its holder's until the holder removes it."""

    def remove_leftovers(self, rank: int) -> list:
        """Half-written files of a killed writer (leftovers.py): this rank's part, and on rank 0 the rest of the
        store and a format-1 creation directory beside it. Call it under the writer lock only."""
        root = self.local_path.absolute()
        removed = remove_partial_writes(root / "parts" / str(rank))
        if rank == 0:
            removed += remove_partial_writes(root, skip="parts")
            removed += remove_dead_temporaries(root.parent, re.compile(rf"\.{re.escape(root.name)}\.creating-(\d+)"))
        return removed

    def clear_for_creation(self) -> None:
        """Redoing an interrupted creation: remove everything but zarr.json first (Zarr's own overwrite then
        removes the rest). A kill meanwhile still leaves a store the next run recognises as this cache being
        created, never a directory without a manifest, which it would refuse as someone else's."""
        if not self.local_path.is_dir():
            return
        for entry in self.local_path.iterdir():
            if entry.name == "zarr.json":
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()

    def beside(self, suffix: str) -> Path | None:
        """<cache><suffix> next to the cache, where a reader keeps what it derives from it (the students' memo),
        or None when that directory cannot be written (read-only storage): the cache itself is never written."""
        return self.local_path.parent / f"{self.local_path.name}{suffix}" if writable_parent(self.local_path) else None

    def contains(self, path: str | Path) -> bool:
        """Whether a local `path` lies inside this cache (where no run may write)."""
        return Path(path).resolve().is_relative_to(self.local_path.resolve())

    def local_copy(self, relative: str, target: Path) -> Path:
        """The local directory holding the files under `relative`: the cache's own."""
        return self.local_path / relative


class RemoteLocation(Location):
    """A cache on an object store or other fsspec filesystem: s3://bucket/prefix, gs://…, az://…, memory://….

    An object store has no rename and no atomic directory: every chunk is one whole-object PUT, so a killed
    writer leaves nothing half-written to clean. Its writer lock is a lock object holding a renewed lease
    (object_lock.py): created conditionally where the store honours If-None-Match (S3), else with a documented race.
    """

    def __init__(self, where: str | Path):
        super().__init__(where)
        self.fs, self.root = fsspec.url_to_fs(self.url, **storage_options())
        self.root = self.root.rstrip("/")
        self.held: list[ObjectLock] = []

    def zarr_store(self, read_only: bool):
        store = FsspecStore.from_url(self.url, storage_options=storage_options(), read_only=read_only)
        if not read_only:
            return store
        chunk_cache = os.environ.get("COT2ALIGN_CHUNK_CACHE")
        if chunk_cache:    # a local copy of each object read, kept across epochs, workers and runs
            store = ChunkCacheStore(store, Path(chunk_cache) / hashlib.sha256(self.url.encode()).hexdigest()[:16])
        # an example's rows are a slice of a chunk its neighbours share: fetch each chunk once, not per example
        store = MemoryChunkStore(store, int(os.environ.get("COT2ALIGN_REMOTE_MEMORY_MB", "512")) << 20)
        return KnownObjectsStore(store, self)

    def is_empty(self, prefix: str | None = None) -> bool:
        """No object under the root (its writer lock aside). Some stores (SeaweedFS) keep a prefix's directories
        after its last object is deleted, each listed with a marker object "<dir>/": those hold nothing, so the
        search goes down until it finds an object."""
        prefix = (self.root if prefix is None else prefix).rstrip("/")
        if not self.fs.exists(prefix):
            return True
        for entry in self.fs.ls(prefix, detail=True):
            name = entry["name"].rstrip("/")
            if name == prefix:                   # the directory's own marker
                continue
            if entry["type"] == "directory":
                if not self.is_empty(name):
                    return False
            elif not is_lock_name(name.rsplit("/", 1)[-1]):
                return False
        return True

    def read_text(self, relative: str) -> str | None:
        """As for any location; a store that cannot be reached at all (no credentials, a wrong endpoint, no such
        bucket) is one line naming the URL — the first read of every command that opens or writes a cache."""
        try:
            return super().read_text(relative)
        except Exception as e:
            raise CacheError(self._unreachable("read", e)) from None

    def _unreachable(self, doing: str, e: Exception) -> str:
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        return (f"{self.url}: cannot {doing} the object store ({type(e).__name__}: {reason}); check its "
                "credentials and endpoint (AWS_* variables, COT2ALIGN_STORAGE_OPTIONS)")

    @contextmanager
    def writer_lock(self, error, what: str, rank: int = 0, log=None):
        """The output's writer lock: the lease object <out>.lock (<out>.rank<r>.lock for rank r > 0, as on disk),
        held and renewed for the duration of the block; a second writer is refused at once in one line."""
        key = lock_key(self.root, rank)
        try:
            lock = ObjectLock(self.fs, key, self.fs.unstrip_protocol(key), error, what, log).acquire()
        except error:
            raise
        except Exception as e:         # no credentials, a wrong endpoint, no such bucket: one line, like a read
            raise error(self._unreachable("write the writer lock to", e)) from None
        self.held.append(lock)
        try:
            yield lock
        finally:
            self.held.remove(lock)
            lock.release()

    def check_writer(self) -> None:
        """Raise when a lease held here was taken over (this run stalled past it): called before each commit."""
        for lock in self.held:
            lock.check()

    def remove_leftovers(self, rank: int) -> list:
        return []             # whole-object writes leave no partial objects

    def clear_for_creation(self) -> None:
        pass                  # Zarr's overwrite of the group removes what a killed creation wrote

    def contains(self, path: str | Path) -> bool:
        return False          # a local path is never inside an object store

    def beside(self, suffix: str) -> Path | None:
        return None           # read-only to a trainer: derived data goes under $COT2ALIGN_HOME instead

    def local_copy(self, relative: str, target: Path) -> Path:
        """A local directory holding the files under `relative`, downloaded once into `target`, atomically."""
        if target.exists():
            return target
        tmp = target.with_name(f".{target.name}.{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for remote in self.fs.find(self.path(relative)):
            name = remote[len(self.path(relative)) + 1:]
            local = contained(tmp, name, f"{self.url}/{relative}")
            local.parent.mkdir(parents=True, exist_ok=True)
            self.fs.get_file(remote, str(local))
        try:
            os.replace(tmp, target)
        except OSError:        # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
        return target


class ChunkCacheStore(WrapperStore):
    """A read-only store that keeps a local file of every whole object it reads from the wrapped (remote) one.

    A cache's objects never change once it is complete, so a local copy is always valid. Each copy is written
    to a temporary file and renamed into place: DataLoader workers in several processes share the directory
    safely (a reader sees a whole object or none). Ranged reads pass through uncached.
    """

    def __init__(self, store, directory: Path):
        super().__init__(store)
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def _with_store(self, store):
        return type(self)(store, self.directory)

    async def get(self, key, prototype, byte_range=None):
        if byte_range is not None:
            return await self._store.get(key, prototype, byte_range)
        local = self.directory / key
        if local.exists():
            return prototype.buffer.from_bytes(local.read_bytes())
        value = await self._store.get(key, prototype)
        if value is not None:
            local.parent.mkdir(parents=True, exist_ok=True)
            tmp = local.with_name(f".{local.name}.{os.getpid()}.{id(value)}")
            tmp.write_bytes(value.to_bytes())
            os.replace(tmp, local)
        return value


class MemoryChunkStore(WrapperStore):
    """A read-only store that keeps the most recently read whole objects in memory (least recently used out,
    up to `capacity` bytes; per process, so per DataLoader worker).

    A remote read is one request per chunk; an example's rows are a slice of a chunk shared with its neighbours,
    and batches are drawn across the whole cache, so without this every example would fetch its chunks again.
    """

    def __init__(self, store, capacity: int):
        super().__init__(store)
        self.capacity, self.size = capacity, 0
        self.kept: OrderedDict[str, object] = OrderedDict()

    def _with_store(self, store):
        return type(self)(store, self.capacity)

    async def get(self, key, prototype, byte_range=None):
        if byte_range is not None:
            return await self._store.get(key, prototype, byte_range)
        if key in self.kept:
            self.kept.move_to_end(key)
            return self.kept[key]
        value = await self._store.get(key, prototype)
        if value is not None and len(value) <= self.capacity:
            self.kept[key] = value
            self.size += len(value)
            while self.size > self.capacity:
                _, dropped = self.kept.popitem(last=False)
                self.size -= len(dropped)
        return value


class KnownObjectsStore(WrapperStore):
    """A read-only store that answers whole-object reads of the objects its location already knows
    (`Location.known`) from memory, and adds each object it reads to them while the location records.

    A complete cache never changes, so bytes read once by the trainer's process are the bytes a worker would read;
    each chunk among them is still checked against the chunk index by the store above this one.
    """

    def __init__(self, store, location: "Location"):
        super().__init__(store)
        self.location = location

    def _with_store(self, store):
        return type(self)(store, self.location)

    async def get(self, key, prototype, byte_range=None):
        known = self.location.known
        if byte_range is None and f"store/{key}" in known:
            data = known[f"store/{key}"]
            return None if data is None else prototype.buffer.from_bytes(data)
        value = await self._store.get(key, prototype, byte_range)
        if byte_range is None and self.location.recording:
            known[f"store/{key}"] = None if value is None else value.to_bytes()
        return value


def contained(root: Path, name: str, where: str) -> Path:
    """root / name, where `name` comes from a store's listing: an object key may hold '..' or start with '/'
    (S3 allows any key), and a copy must never be written outside `root`."""
    parts = name.replace("\\", "/").split("/")
    if not name or name.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise CacheError(f"{where}: refusing the object name {name!r} (it would be written outside {root})")
    return root.joinpath(*parts)


def writable_parent(path: Path) -> bool:
    return os.access(path.parent if path.parent.exists() else Path.cwd(), os.W_OK)
