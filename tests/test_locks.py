"""One writer per output (cot2align/locks.py) and the removal of a killed run's half-written files (leftovers.py):
a second cache-teacher / distill / augment-cot on an output in use is refused at once naming the holder; a lock
left by a dead process is taken over and the run completes."""

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import write_cot_records
from cot2align.cli import main
from cot2align.config import ConfigError
from cot2align.locks import _take_over, acquire, lock_path, process_start, release, writer_lock


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def stale_lock(out: Path, pid: int | None = None, pid_start: int | None = None) -> Path:
    path = lock_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"pid": pid if pid is not None else dead_pid(), "host": socket.gethostname(),
                                "started": "2026-01-01T00:00:00+0000", "command": "cot2align (killed)",
                                "pid_start": pid_start}))
    return path


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def refused_naming(result, pid: int) -> None:
    assert result.exit_code == 2, result.output
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: --out ") and "in use by another run" in line, line
    assert f"pid {pid} on {socket.gethostname()}, started 20" in line, line
    assert "Traceback" not in result.output


def test_the_lock_names_its_holder_and_is_released_also_on_an_exception(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(RuntimeError), writer_lock(out, ConfigError) as path:
        assert path == tmp_path / "run.lock"
        holder = json.loads(path.read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        assert holder["pid_start"] == process_start(os.getpid()) and re.match(r"\d{4}-\d\d-\d\dT", holder["started"])
        with pytest.raises(ConfigError, match=f"in use by another run \\(pid {os.getpid()} on "):
            acquire(path, ConfigError, "--out run")
        raise RuntimeError("the run fails")
    assert not path.exists()
    assert lock_path(out, rank=1) == tmp_path / "run.rank1.lock"


def test_a_lock_held_by_another_live_process_is_refused(tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from cot2align.locks import writer_lock; "
                               "from cot2align.config import ConfigError\n"
                               f"with writer_lock({str(out)!r}, ConfigError):\n    print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError) as refused:
            acquire(lock_path(out), ConfigError, f"--out {out}")
        message = str(refused.value)
        assert f"pid {holder.pid} on {socket.gethostname()}, started " in message and "\n" not in message
    finally:
        holder.kill()
        holder.wait()
    record = acquire(lock_path(out), ConfigError, "--out out")      # its holder is dead now: taken over
    release(lock_path(out), record)


def test_stale_locks_dead_pid_or_reused_pid_are_taken_over_another_host_is_not(tmp_path):
    said = []
    path = stale_lock(tmp_path / "a")
    release(path, acquire(path, ConfigError, "a", said.append))
    assert not path.exists() and "taking over the lock of a run that is gone (pid" in said[0]
    # our own pid, but a different process start time: the pid was reused, the holder is gone
    path = stale_lock(tmp_path / "b", pid=os.getpid(), pid_start=(process_start(os.getpid()) or 0) + 1)
    release(path, acquire(path, ConfigError, "b"))
    path = lock_path(tmp_path / "c")
    path.write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "2026-01-01T00:00:00"}))
    with pytest.raises(ConfigError, match=f"pid 1 on elsewhere.*delete {path}"):
        acquire(path, ConfigError, "c")


def test_of_two_processes_taking_over_one_stale_lock_only_one_wins(tmp_path):
    path = stale_lock(tmp_path / "out")
    stale = json.loads(path.read_text())
    winner = acquire(path, ConfigError, "out")            # the first taker: removes the stale lock, creates its own
    _take_over(path, stale)                               # the second acted on the same stale reading, too late
    assert json.loads(path.read_text()) == winner         # the winner's lock is back in place, still the winner's
    with pytest.raises(ConfigError, match="in use"):
        acquire(path, ConfigError, "out")
    assert not list(tmp_path.glob("*.stale-*"))


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("locks")
    data = write_cot_records(root / "data.jsonl", n=6, cot_every=2)
    result = cli("cache-teacher", "--model", "tiny-llama", "--data", data, "--out", root / "cache", "--topk", "4",
                 "--block-examples", "2", "--max-length", "128", "--max-prompt-length", "64")
    assert result.exit_code == 0, result.output
    return root / "cache", data


def test_a_second_cache_teacher_distill_or_augment_on_an_output_in_use_is_refused(tiny_cache, tmp_path):
    cache, data = tiny_cache
    commands = {
        "cache": ["cache-teacher", "--model", "tiny-llama", "--data", data],
        "run": ["distill", "--cache", cache, "--student", "tiny-gpt2", "--method", "sft", "--max-steps", "1"],
        "cot.jsonl": ["augment-cot", "--model", "tiny-qwen2", "--data", data, "--max-new-tokens", "2"],
    }
    for name, args in commands.items():
        out = tmp_path / name
        with writer_lock(out, ConfigError):
            t0 = time.perf_counter()
            result = cli(*args, "--out", out)
            refused_naming(result, os.getpid())
            assert not out.exists(), f"{name}: something was written"
            assert time.perf_counter() - t0 < 30


def _planted_leftovers(cache: Path) -> dict[str, Path]:
    """What killed writers leave: Zarr's half-written objects, a format-1 creation directory of a dead process
    (removed) and one of a live process (kept)."""
    paths = {"chunk": cache / "parts/0/std/hidden/c/0/0.0123456789abcdef0123456789abcdef.partial",
             "meta": cache / "zarr.fedcba9876543210fedcba9876543210.partial",
             "dead": cache.parent / f".{cache.name}.creating-{dead_pid()}",
             "live": cache.parent / f".{cache.name}.creating-{os.getppid()}"}
    for name, path in paths.items():
        if name in ("dead", "live"):
            path.mkdir()
        else:
            path.write_bytes(b"half")
    return paths


@pytest.mark.slow
def test_stale_locks_are_taken_over_leftovers_removed_and_the_runs_complete(tiny_cache, tmp_path):
    cache, data = tiny_cache
    planted = _planted_leftovers(cache)
    stale_lock(cache)
    result = cli("cache-teacher", "--model", "tiny-llama", "--data", data, "--out", cache, "--topk", "4",
                 "--block-examples", "2", "--max-length", "128", "--max-prompt-length", "64")
    assert result.exit_code == 0, result.output
    assert "taking over the lock" in result.stderr and "removed 3 half-written file(s)" in result.stderr
    assert [name for name, path in planted.items() if path.exists()] == ["live"]
    assert not lock_path(cache).exists()

    run = tmp_path / "run"
    stale_lock(run)
    args = ["distill", "--cache", cache, "--student", "tiny-gpt2", "--method", "sft", "--no-cot2align",
            "--batch-size", "2", "--val-examples", "1", "--val-max-new-tokens", "1", "--save-every", "1", "--out", run]
    result = cli(*args, "--max-steps", "2")
    assert result.exit_code == 0 and "taking over the lock" in result.stderr, result.output
    (run / "summary.json").unlink()         # as if killed after its last checkpoint: --resume finishes it
    dead_tmp = run / "checkpoints" / f".step-00000002.{dead_pid()}.tmp"
    live_tmp = run / "checkpoints" / f".latest.{os.getppid()}.tmp"
    dead_tmp.mkdir()
    live_tmp.write_text("step-00000002")
    result = cli(*args, "--max-steps", "2", "--resume")
    assert result.exit_code == 0 and "removed 1 half-written checkpoint file(s)" in result.stderr, result.output
    assert not dead_tmp.exists() and live_tmp.exists()
    assert json.loads((run / "summary.json").read_text())["steps"] == 2 and not lock_path(run).exists()

    jsonl = tmp_path / "cot.jsonl"
    stale_lock(jsonl)
    result = cli("augment-cot", "--model", "tiny-qwen2", "--data", data, "--out", jsonl, "--max-new-tokens", "2",
                 "--limit", "2")
    assert result.exit_code == 0 and "taking over the lock" in result.stderr, result.output
    assert len(jsonl.read_text().splitlines()) == 2 and not lock_path(jsonl).exists()
