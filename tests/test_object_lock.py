"""One writer per s3:// cache: the lease object of object_lock.py, against a real S3 server (SeaweedFS on 127.0.0.1,
which honours If-None-Match and If-Match on PutObject) and, for the plain-write lease, an in-memory fsspec store."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import fsspec
import pytest

from conftest import explain, write_cot_records
from cot2align.cache import CacheError
from cot2align.cache.inspect import verify_cache
from cot2align.cache.storage import Location
from cot2align.object_lock import ConditionalObjects, ObjectLock, PlainObjects, lock_key, objects_for

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from s3server import seaweedfs  # noqa: E402

PASS = ["--model", "tiny-llama", "--topk", "8", "--block-examples", "4", "--batch-tokens", "2048", "--max-length", "256",
        "--max-prompt-length", "128"]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with seaweedfs(tmp_path_factory.mktemp("seaweed")) as server:
        yield server


def _lock(url: str, what: str = "--out", log=None) -> ObjectLock:
    location = Location(url)
    key = lock_key(location.root)
    return ObjectLock(location.fs, key, location.fs.unstrip_protocol(key), CacheError, what, log)


def _foreign_lease(fs, key: str, expires: float) -> None:
    """A lease written by a run on another host (whose process this host cannot check)."""
    fs.pipe_file(key, json.dumps({"owner": "x", "host": "elsewhere", "pid": 1, "started": "2026-01-01T00:00:00",
                                  "command": "cot2align cache-teacher", "lease_s": 60, "expires": expires}).encode())


def test_seaweedfs_honours_conditional_puts(s3):
    """The finding the lock rests on: SeaweedFS refuses a second If-None-Match: * create and an If-Match on a
    stale ETag with 412, so the lock uses conditional writes there (as on AWS S3)."""
    key = f"{s3['bucket'].removeprefix('s3://')}/probe/lock"
    objects = objects_for(s3["fs"], key)
    assert isinstance(objects, ConditionalObjects)
    first = objects.create(b"a")
    assert first is not None and objects.create(b"b") is None
    second = objects.replace(b"c", first)
    assert second is not None and objects.replace(b"d", first) is None
    assert objects.read() == (b"c", second)


def test_second_writer_refused_in_one_line_then_proceeds_after_release(s3):
    url = f"{s3['bucket']}/locks/one"
    held = _lock(url).acquire()
    try:
        with pytest.raises(CacheError) as refused:
            _lock(url, "--out " + url).acquire()
        message = str(refused.value)
        assert "\n" not in message and f"pid {os.getpid()}" in message and "lease runs until" in message
        assert f"delete {url}.lock" in message
    finally:
        held.release()
    assert not s3["fs"].exists(f"{url.removeprefix('s3://')}.lock")
    _lock(url).acquire().release()             # the next writer proceeds


def test_of_many_racing_writers_exactly_one_wins(s3):
    url = f"{s3['bucket']}/locks/race"
    start = threading.Barrier(12)

    def attempt(_):
        lock = _lock(url)
        start.wait()
        try:
            return lock.acquire()
        except CacheError:
            return None

    with ThreadPoolExecutor(12) as pool:
        winners = [lock for lock in pool.map(attempt, range(12)) if lock is not None]
    assert len(winners) == 1
    winners[0].release()


def test_expired_lease_taken_over_live_one_refused(s3):
    url = f"{s3['bucket']}/locks/expired"
    key = f"{url.removeprefix('s3://')}.lock"
    _foreign_lease(s3["fs"], key, time.time() + 600)
    with pytest.raises(CacheError, match="on elsewhere.*lease runs until"):
        _lock(url).acquire()
    _foreign_lease(s3["fs"], key, time.time() - 1)        # its holder crashed: the lease ran out
    said = []
    lock = _lock(url, log=said.append).acquire()
    assert len(said) == 1 and "taking over the writer lock of a run that is gone (pid 1 on elsewhere" in said[0]
    assert json.loads(s3["fs"].cat_file(key))["owner"] == lock.owner
    lock.release()


def test_renewed_lease_outlives_its_length_and_a_taken_over_one_stops_its_holder(s3, monkeypatch):
    monkeypatch.setenv("COT2ALIGN_LOCK_LEASE_S", "1")
    url = f"{s3['bucket']}/locks/renewed"
    key = f"{url.removeprefix('s3://')}.lock"
    held = _lock(url, "--out " + url).acquire()
    time.sleep(2.5)                                       # 2.5 leases: still held, renewed every 0.25 s
    with pytest.raises(CacheError, match="in use by another run"):
        _lock(url).acquire()
    held.check()
    _foreign_lease(s3["fs"], key, time.time() + 600)       # someone else's lease replaces ours (we "stalled")
    time.sleep(0.8)
    with pytest.raises(CacheError, match="lost its writer lock.*stopping before it commits") as lost:
        held.check()
    assert "\n" not in str(lost.value)
    held.release()
    assert json.loads(s3["fs"].cat_file(key))["host"] == "elsewhere"     # the other run's lock is left alone


def test_plain_write_lease_on_a_store_without_conditional_writes(monkeypatch):
    monkeypatch.setenv("COT2ALIGN_LOCK_SETTLE_S", "0.05")
    url = "memory://locks-plain/cache"
    held = _lock(url).acquire()
    assert isinstance(held.objects, PlainObjects)
    with pytest.raises(CacheError, match="in use by another run"):
        _lock(url).acquire()
    held.release()
    fs = fsspec.filesystem("memory")
    assert not fs.exists("/locks-plain/cache.lock")
    _foreign_lease(fs, "/locks-plain/cache.lock", time.time() - 1)
    _lock(url).acquire().release()


def test_a_bucket_root_cache_keeps_its_lock_inside_and_still_reads_as_empty(s3):
    assert lock_key("bucket") == "bucket/.cot2align.lock" and lock_key("bucket/c", 2) == "bucket/c.rank2.lock"
    s3["fs"].mkdir("rootcache")
    location = Location("s3://rootcache")
    with location.writer_lock(CacheError, "--out s3://rootcache"):
        assert s3["fs"].exists("rootcache/.cot2align.lock") and location.is_empty()


def _cli(args, env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cot2align.cli", *args], capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1", **env))


@pytest.mark.slow
def test_cache_teacher_refuses_a_second_s3_writer_and_a_killed_writer_resumes(s3, tmp_path):
    data = write_cot_records(tmp_path / "data.jsonl", n=12)
    url = f"{s3['bucket']}/caches/locked"
    command = ["cache-teacher", "--data", str(data), "--out", url, *PASS]
    with Location(url).writer_lock(CacheError, "--out " + url):        # another writer holds the cache
        refused = _cli(command, s3["env"])
    assert refused.returncode == 2, explain(refused)
    lines = [line for line in refused.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "in use by another run" in lines[0] and f"{url}.lock" in lines[0]
    assert not s3["fs"].exists(url.removeprefix("s3://"))              # it wrote nothing

    crash = _cli(command, {**s3["env"], "COT2ALIGN_FAULT": "write:1:cot"})
    assert crash.returncode == -signal.SIGKILL
    assert s3["fs"].exists(f"{url.removeprefix('s3://')}.lock")        # a killed writer leaves its lease behind
    rerun = _cli(command, s3["env"])                                   # same host, process gone: taken over at once
    assert rerun.returncode == 0, explain(rerun)
    assert "taking over the writer lock" in rerun.stderr and "resuming" in rerun.stderr
    assert not s3["fs"].exists(f"{url.removeprefix('s3://')}.lock")
    assert verify_cache(url) == []


@pytest.mark.slow
def test_an_unreachable_store_is_one_line_at_the_lock(tmp_path):
    """No credentials and a closed port: cache-teacher stops at its writer lock with one line, exit 2."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none"),
               AWS_EC2_METADATA_DISABLED="true",
               COT2ALIGN_STORAGE_OPTIONS='{"client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}}')
    data = write_cot_records(tmp_path / "data.jsonl", n=2)
    done = subprocess.run([sys.executable, "-m", "cot2align.cli", "cache-teacher", "--data", str(data), "--out",
                           "s3://nobucket/x", *PASS], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "cannot write the writer lock to the object store" in done.stderr, done.stderr
