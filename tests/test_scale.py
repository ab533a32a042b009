"""Outgrowing one machine: the teacher pass on several ranks (torchrun, gloo), and caches on a real
S3-compatible object store (SeaweedFS started on 127.0.0.1 by the tests) — written, verified, trained from."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from conftest import explain, free_port, write_cot_records
from cot2align.cache import CacheError, open_cache
from cot2align.cache.inspect import cache_info, verify_cache
from cot2align.cache.manifest import split_parts

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from s3server import seaweedfs  # noqa: E402  (bench/s3server.py: shared with bench/remote_read.py)

TEACHER = "tiny-llama"
PASS = ["--model", TEACHER, "--topk", "8", "--block-examples", "4", "--batch-tokens", "2048", "--max-length", "256",
        "--max-prompt-length", "128"]


def _cli(args, env=None, launcher=None) -> subprocess.CompletedProcess:
    launch = launcher or [sys.executable, "-m", "cot2align.cli"]
    return subprocess.run([*launch, *args], env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})),
                          capture_output=True, text=True)


def _torchrun() -> list[str]:
    """torchrun with two processes on a free rendezvous port."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
            "-m", "cot2align.cli"]


def assert_same_cache(a, b) -> None:
    """Every array of every example and view, the texts and the offsets, equal."""
    a, b = open_cache(a), open_cache(b)
    assert len(a) == len(b) and a.texts() == b.texts()
    for view in ("std", "cot"):
        assert np.array_equal(a.offsets(view), b.offsets(view))
        for i in range(len(a)):
            rows_a, rows_b = a.view(i, view), b.view(i, view)
            assert set(rows_a) == set(rows_b)
            for name, value in rows_a.items():
                if isinstance(value, np.ndarray):
                    assert np.array_equal(value, rows_b[name]), f"example {i} {view}/{name} differs"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_cot_records(tmp_path_factory.mktemp("scale") / "data.jsonl", n=24, cot_every=2)


@pytest.fixture(scope="module")
def single(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "cache"
    done = _cli(["cache-teacher", "--data", str(data), "--out", str(out), *PASS])
    assert done.returncode == 0, explain(done)
    return out


def test_parts_are_whole_blocks_balanced_by_rows():
    offsets = {"std": np.array([0, 10, 20, 25, 30, 70, 80, 90]), "cot": np.zeros(8, dtype=np.int64)}
    block_starts = [0, 2, 4, 5, 7]                  # rows per block: 20, 10, 40, 20
    parts = split_parts(block_starts, offsets, 2)
    assert [p["blocks"] for p in parts] == [[0, 2], [2, 4]]         # 30 | 60: the cut nearest half of 90
    assert [p["examples"] for p in parts] == [[0, 4], [4, 7]] and parts[1]["rows"]["std"] == [30, 90]
    assert split_parts(block_starts, offsets, 1) == [{"examples": [0, 7], "blocks": [0, 4],
                                                      "rows": {"std": [0, 90], "cot": [0, 0]}}]
    many = split_parts(block_starts, offsets, 6)                   # more ranks than blocks: some parts empty
    assert len(many) == 6 and sum(p["blocks"][1] - p["blocks"][0] for p in many) == 4


@pytest.mark.slow
def test_two_ranks_write_the_single_process_cache_and_resume_after_a_kill(data, single, tmp_path):
    out = tmp_path / "two"
    done = _cli(["cache-teacher", "--data", str(data), "--out", str(out), *PASS], launcher=_torchrun())
    assert done.returncode == 0, explain(done)
    assert_same_cache(out, single)
    assert verify_cache(out) == [] and cache_info(out)["parts"] == 2
    manifest = open_cache(out).manifest
    assert manifest["pass"]["ranks"] == 2 and len(manifest["store"]["parts"]) == 2

    # rank 1 killed (SIGKILL) after writing a block but before committing it; torchrun takes rank 0 down too
    killed = tmp_path / "killed"
    crash = _cli(["cache-teacher", "--data", str(data), "--out", str(killed), *PASS], launcher=_torchrun(),
                 env={"COT2ALIGN_FAULT": f"commit:{manifest['store']['parts'][1]['blocks'][0] + 1}@rank1"})
    assert crash.returncode != 0
    with pytest.raises(CacheError, match="not complete"):
        open_cache(killed)
    # another number of writers is refused in one line, the unfinished cache untouched
    before = sorted(p.relative_to(killed).as_posix() for p in killed.rglob("*"))
    refused = _cli(["cache-teacher", "--data", str(data), "--out", str(killed), *PASS])
    assert refused.returncode == 2 and "split for 2 writer(s)" in refused.stderr and "Traceback" not in refused.stderr
    assert sorted(p.relative_to(killed).as_posix() for p in killed.rglob("*")) == before
    # the same launch again resumes each rank's part
    rerun = _cli(["cache-teacher", "--data", str(data), "--out", str(killed), *PASS], launcher=_torchrun())
    assert rerun.returncode == 0, explain(rerun)
    assert "resuming" in rerun.stderr
    assert_same_cache(killed, single)


# ------------------------------------------------------------------------------------------ object storage

@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A SeaweedFS server (master, volume, filer, S3 gateway) on free local ports, its data in a temp dir; the
    S3 endpoint and credentials exported as the usual AWS_* variables; a bucket created (bench/s3server.py)."""
    with seaweedfs(tmp_path_factory.mktemp("seaweed")) as server:
        yield server


@pytest.mark.slow
def test_cache_on_s3_equals_local_and_trains_the_same_student(s3, data, single, tmp_path):
    url = f"{s3['bucket']}/caches/tiny"
    done = _cli(["cache-teacher", "--data", str(data), "--out", url, *PASS], env=s3["env"])
    assert done.returncode == 0, explain(done)
    assert_same_cache(url, single)
    assert verify_cache(url) == []
    # read again through a local chunk cache (COT2ALIGN_CHUNK_CACHE): the same arrays, the chunks kept on disk
    os.environ["COT2ALIGN_CHUNK_CACHE"] = str(tmp_path / "chunks")
    try:
        assert_same_cache(url, single)
    finally:
        del os.environ["COT2ALIGN_CHUNK_CACHE"]
    kept = [p.relative_to(tmp_path / "chunks").as_posix() for p in (tmp_path / "chunks").rglob("*") if p.is_file()]
    assert any("/parts/0/std/hidden/c/" in name for name in kept) and len(kept) > 10
    info = _cli(["cache", "info", url], env=s3["env"])
    assert info.returncode == 0 and url in info.stdout
    # a student trained from the remote cache equals the one trained from local disk
    runs = {}
    for name, cache in (("local", str(single)), ("remote", url)):
        out = tmp_path / name
        trained = _cli(["distill", "--cache", cache, "--student", "tiny-mistral", "--method", "dskd", "--alpha", "0.5",
                        "--epochs", "1", "--batch-size", "4", "--lr", "1e-3", "--val-examples", "2",
                        "--val-max-new-tokens", "4", "--out", str(out)], env=s3["env"])
        assert trained.returncode == 0, explain(trained)
        runs[name] = load_file(str(out / "model.safetensors"))
    assert runs["local"].keys() == runs["remote"].keys()
    for key in runs["local"]:
        assert np.array_equal(runs["local"][key].numpy(), runs["remote"][key].numpy()), key
    # the remote cache was only read: the student's memo went to a local directory, not beside the cache
    assert not s3["fs"].exists(f"{url.removeprefix('s3://')}.students")


@pytest.mark.slow
def test_remote_kill_then_rerun_is_identical_and_a_flipped_byte_is_named(s3, data, single, tmp_path):
    url = f"{s3['bucket']}/caches/killed"
    crash = _cli(["cache-teacher", "--data", str(data), "--out", url, *PASS], env={**s3["env"], "COT2ALIGN_FAULT": "write:2:cot"})
    assert crash.returncode == -signal.SIGKILL
    manifest = json.loads(s3["fs"].cat(f"{url.removeprefix('s3://')}/zarr.json"))["attributes"]
    assert manifest["status"] == "writing"
    rerun = _cli(["cache-teacher", "--data", str(data), "--out", url, *PASS], env=s3["env"])
    assert rerun.returncode == 0, explain(rerun)
    assert "resuming" in rerun.stderr
    assert_same_cache(url, single)
    # one flipped byte in one chunk object of the hidden states: verify names the array and the chunk
    chunk = sorted(s3["fs"].find(f"{url.removeprefix('s3://')}/parts/0/std/hidden/c"))[0]
    blob = bytearray(s3["fs"].cat(chunk))
    blob[len(blob) // 2] ^= 0x40
    s3["fs"].pipe(chunk, bytes(blob))
    problems = verify_cache(url)
    assert problems and "parts/0/std/hidden/c/0/0: unreadable chunk" in problems[0]
