"""One writer per output on an object store (s3://…, gs://…, memory://…): a lock object beside the cache.

A local cache is locked by a lock file created with O_EXCL (locks.py). An object store has no such file, so the
lock is an object, `<out>.lock` beside the cache (`<out>.rank<r>.lock` for rank r > 0 of a torchrun job, as on
disk; for a cache at a bucket's root, `.cot2align.lock` inside it), holding a lease:

    {"owner": a random id of this run, "host", "pid", "pid_start", "started", "command",
     "lease_s": the lease's length, "expires": when it runs out (seconds since the epoch, the holder's clock)}

The holder renews the lease every lease_s / 4 from a background thread (`COT2ALIGN_LOCK_LEASE_S`, default 300 s).
A second writer that finds a live lease is refused at once in one line naming the holder and saying when its
lease ends. A lease is stale — taken over, said in one line — when it has expired (its holder crashed or lost
its network on another host: the cache waits at most lease_s) or when its holder was on this host and its
process is gone (taken over at once, as for a lock file). Deleting the lock object is the manual override.
Hosts' clocks must agree to within a small part of the lease (NTP does).

How the object is written depends on what the store guarantees:

  * Conditional writes (`ConditionalObjects`: S3, where the server honours `If-None-Match: *` and `If-Match`
    on PutObject — AWS S3 since 2024, and SeaweedFS 4.x, which the tests run; checked by a probe object on each
    acquire, 4 small requests):
    the lock is created only if absent, and a stale lease is taken over, or a live one renewed, only if the
    object is still the version read (its ETag). Of any number of writers racing, exactly one wins, and a holder
    whose lease was taken over learns it at its next renewal.
  * Plain writes (`PlainObjects`: every other fsspec store, and an S3 server that ignores the conditions):
    check that no live lease is there, write ours, wait `COT2ALIGN_LOCK_SETTLE_S` (default 2 s), read it back;
    the last writer's lease is the one that stays, and the others see it and are refused. REMAINING RACE: two
    writers both hold the lock when one of them stalls, between seeing no lease and writing its own, for longer
    than the settle time (its write then lands after the other's read-back). Renewal is read-compare-write,
    with the same window for a holder whose lease expired while it was stalled.

A holder that learns its lease was taken over (`check()`, called before each commit of the cache's progress)
stops with one line rather than commit over another writer.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid

from cot2align.locks import process_alive, process_start

DEFAULT_LEASE_S = 300.0
DEFAULT_SETTLE_S = 2.0
BUCKET_ROOT_LOCK = ".cot2align"          # the lock of a cache at a bucket's root: <bucket>/.cot2align[.rank<r>].lock


def lock_key(root: str, rank: int = 0) -> str:
    """The lock object of the cache at `root` (a filesystem path without protocol: bucket/prefix)."""
    suffix = ".lock" if rank == 0 else f".rank{rank}.lock"
    if "/" not in root.strip("/"):                    # a bucket's root has no sibling: the lock goes inside
        return f"{root.strip('/')}/{BUCKET_ROOT_LOCK}{suffix}"
    return f"{root.rstrip('/')}{suffix}"


def is_lock_name(name: str) -> bool:
    """Whether an object name (its last path component) is a bucket-root cache's lock (not the cache's content)."""
    return name.startswith(BUCKET_ROOT_LOCK) and name.endswith(".lock")


def _seconds(variable: str, default: float) -> float:
    try:
        return float(os.environ.get(variable, default))
    except ValueError:
        raise ValueError(f"{variable}: expected a number of seconds, found {os.environ[variable]!r}") from None


# ------------------------------------------------------------------------------------------ how objects are written


class PlainObjects:
    """Lock objects on any fsspec filesystem: check, write, settle, read back (the race window in the module doc).
    A version's tag is its bytes."""

    kind = "a lease (the store offers no conditional write)"

    def __init__(self, fs, key: str, settle_s: float):
        self.fs, self.key, self.settle_s = fs, key, settle_s

    def read(self) -> tuple[bytes | None, object]:
        try:
            data = self.fs.cat_file(self.key)
        except FileNotFoundError:
            return None, None
        return data, data

    def create(self, data: bytes):
        """The new version's tag, or None when the object exists (or another writer's landed over ours)."""
        if self.read()[0] is not None:
            return None
        return self._write_and_confirm(data)

    def replace(self, data: bytes, tag):
        """The new version's tag, or None when the object is no longer the version `tag`."""
        if self.read()[1] != tag:
            return None
        return self._write_and_confirm(data)

    def _write_and_confirm(self, data: bytes):
        self.fs.pipe_file(self.key, data)
        time.sleep(self.settle_s)           # a concurrent writer's object, if any, lands by now: the last one stays
        return data if self.read()[0] == data else None

    def delete(self, tag) -> None:
        if self.read()[1] == tag:
            self.fs.rm_file(self.key)


class ConditionalObjects:
    """Lock objects on S3 with conditional PutObject: If-None-Match: * (create only if absent) and If-Match: <ETag>
    (replace only the version read). A version's tag is its ETag."""

    kind = "a conditional create (If-None-Match)"

    def __init__(self, fs, key: str):
        self.fs, self.key = fs, key
        self.bucket, self.name, _ = fs.split_path(key)

    def _call(self, method: str, **kwargs):
        return self.fs.call_s3(method, Bucket=self.bucket, Key=self.name, **kwargs)

    def read(self) -> tuple[bytes | None, object]:
        from fsspec.asyn import sync

        async def get():
            response = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self.name)
            try:
                return await response["Body"].read(), response["ETag"]
            finally:
                response["Body"].close()

        try:
            return sync(self.fs.loop, get)
        except FileNotFoundError:
            return None, None

    def create(self, data: bytes):
        """The new version's ETag, or None when the object exists."""
        return self._put(data, IfNoneMatch="*")

    def replace(self, data: bytes, tag):
        """The new version's ETag, or None when the object is no longer the version `tag`."""
        return self._put(data, IfMatch=tag)

    def _put(self, data: bytes, **condition):
        try:
            return self._call("put_object", Body=data, **condition)["ETag"]
        except OSError as e:
            if refused_by_condition(e):
                return None
            raise

    def delete(self, tag) -> None:
        if self.read()[1] == tag:
            self._call("delete_object")

    @staticmethod
    def honoured(fs, key: str) -> bool:
        """Whether the server refuses a second If-None-Match: * create of one object (a server that ignores the
        header would let every writer create the lock) and honours If-Match (a replace of the version read
        succeeds, of an older one is refused). Probed with an object of its own, removed after."""
        probe = ConditionalObjects(fs, f"{key}.probe-{uuid.uuid4().hex}")
        try:
            first = probe.create(b"1")
            if first is None or probe.create(b"2") is not None:
                return False
            return probe.replace(b"3", first) is not None and probe.replace(b"4", first) is None
        except OSError:                         # NotImplemented, InvalidArgument, …: no conditional writes
            return False
        finally:
            try:
                probe._call("delete_object")
            except OSError:
                pass


def refused_by_condition(error: OSError) -> bool:
    """A PutObject refused by its precondition: 412 PreconditionFailed, or 409 ConditionalRequestConflict (AWS:
    another conditional write of the object was in flight). s3fs turns the first into FileExistsError or an
    OSError(EINVAL) depending on the server; the botocore error is its cause."""
    if isinstance(error, FileExistsError):
        return True
    response = getattr(error.__cause__, "response", None) or {}
    code = response.get("Error", {}).get("Code")
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412)


def objects_for(fs, key: str, log=None):
    """Conditional writes where the store honours them (S3 with If-None-Match), else plain writes."""
    settle = _seconds("COT2ALIGN_LOCK_SETTLE_S", DEFAULT_SETTLE_S)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol in ("s3", "s3a"):
        if ConditionalObjects.honoured(fs, key):
            return ConditionalObjects(fs, key)
        if log is not None:
            log(f"s3://{key}: this S3 server ignores If-None-Match; the writer lock is a lease with a "
                f"{settle:g} s settle window (cot2align/object_lock.py)")
    return PlainObjects(fs, key, settle)


# ------------------------------------------------------------------------------------------ the lock


def _describe(holder: dict) -> str:
    return (f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"
            + (f": {holder['command']}" if holder.get("command") else ""))


def _utc(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(seconds))


def _parse(data: bytes) -> dict:
    try:
        holder = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return {}
    return holder if isinstance(holder, dict) else {}


def is_stale(holder: dict, now: float) -> bool:
    """A lease that ran out, or whose holder ran on this host and is gone; an unreadable lock object is stale."""
    expires = holder.get("expires")
    if not isinstance(expires, (int, float)) or now > expires:
        return True
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
        return not process_alive(holder["pid"], holder.get("pid_start"))
    return False


class ObjectLock:
    """The writer lock of one object-store output: `acquire()`, a renewal thread while held, `check()` before
    each commit, `release()`."""

    def __init__(self, fs, key: str, url: str, error, what: str, log=None):
        self.fs, self.key, self.url, self.error, self.what, self.log = fs, key, url, error, what, log
        self.lease_s = _seconds("COT2ALIGN_LOCK_LEASE_S", DEFAULT_LEASE_S)
        self.owner = uuid.uuid4().hex
        self.started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.objects = None
        self.tag = None                         # the version of the lock object we wrote last
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._guard = threading.Lock()          # the renewal thread and release never write at once

    def _record(self) -> bytes:
        now = time.time()
        return json.dumps({"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(),
                           "pid_start": process_start(os.getpid()),
                           "started": self.started, "command": " ".join(sys.argv),
                           "lease_s": self.lease_s, "expires": now + self.lease_s}, sort_keys=True).encode()

    def acquire(self) -> "ObjectLock":
        """Take the lock, or raise `error` naming the live holder; a stale lease is taken over (said via `log`)."""
        self.objects = objects_for(self.fs, self.key, self.log)
        for _ in range(5):
            record = self._record()
            self.tag = self.objects.create(record)
            if self.tag is not None:
                return self._held()
            data, tag = self.objects.read()
            if data is None:
                continue                        # released meanwhile: try again
            holder = _parse(data)
            if not is_stale(holder, time.time()):
                raise self.error(
                    f"{self.what}: in use by another run ({_describe(holder)}); its lease runs until "
                    f"{_utc(holder['expires'])} — wait for it to finish, or, if that run is gone, rerun after that "
                    f"time or delete {self.url}")
            if self.log is not None:
                self.log(f"{self.what}: taking over the writer lock of a run that is gone "
                         f"({_describe(holder) if holder else 'unreadable lock object'}; {self.url})")
            self.tag = self.objects.replace(record, tag)
            if self.tag is not None:
                return self._held()
        raise self.error(f"{self.url}: could not take the writer lock (other processes keep taking it)")

    def _held(self) -> "ObjectLock":
        self._thread = threading.Thread(target=self._renew_until_stopped, name="cot2align-lease", daemon=True)
        self._thread.start()
        return self

    def _renew_until_stopped(self) -> None:
        deadline = time.time() + self.lease_s
        while not self._stop.wait(self.lease_s / 4):
            with self._guard:
                if self._stop.is_set():
                    return
                try:
                    tag = self.objects.replace(self._record(), self.tag)
                    if tag is None:
                        self.lost = "another run took the writer lock over"
                        return
                    self.tag, deadline = tag, time.time() + self.lease_s
                except Exception as e:         # the store unreachable for now: retry until the lease runs out
                    if time.time() > deadline:
                        self.lost = f"the lease could not be renewed before it ran out ({e})"
                        return

    def check(self) -> None:
        """Raise `error` when this run no longer holds the lock (called before each commit of progress)."""
        if self.lost is not None:
            raise self.error(f"{self.what}: this run lost its writer lock ({self.lost}; was it stalled for longer "
                             f"than the {self.lease_s:g} s lease?); stopping before it commits over another writer")

    def release(self) -> None:
        """Stop renewing and remove the lock object if it is still ours."""
        self._stop.set()
        with self._guard:
            if self.lost is None and self.tag is not None:
                try:
                    self.objects.delete(self.tag)
                except Exception:
                    pass                        # unreachable now: the lease runs out on its own
        if self._thread is not None:
            self._thread.join(timeout=5)
