"""One writer per output: an exclusive lock file beside what a command writes (`<out>.lock`).

The lock file is created with O_CREAT|O_EXCL — exactly one process can create it — and holds JSON naming its
holder: {pid, host, started (ISO time), command, pid_start}. A second command on the same output is refused at
once with a one-line error naming the holder, before it writes anything.

A lock whose holder was killed (SIGKILL, OOM, power loss) stays on disk. It is stale when its host is this host
and its pid is no longer alive — or is alive but started at another moment (`pid_start`, the process start time
from /proc/<pid>/stat: a recycled pid is not the holder). A stale lock is taken over: renamed aside (atomic, so
of two processes taking over the same stale lock only one moves it), checked to be the stale one just read (else
the other taker's fresh lock was moved, and is put back), then created again with O_EXCL. A lock held on another
host cannot be checked from here and is never taken over; the error says which file to delete if that host's
run is really gone. An output reached through a symlink is locked at its real path (`lock_path`). Hosts are told apart by name, pids by this host's process table: containers that share one
output directory need distinct host names.

These locks are for local paths; an object store's output (s3://…) is locked by a lease object instead
(object_lock.py).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path


def lock_path(out: str | Path, rank: int = 0) -> Path:
    """The lock of an output: `<out>.lock` (rank 0, which every job has, so two jobs always meet there), and
    `<out>.rank<r>.lock` for the other ranks of a torchrun job that each write a part of one output.

    The lock sits beside the output's real path, its symlinks resolved: `--out alias`, where `alias` links to
    `real/c`, and `--out real/c` are one output and must meet on one lock (`real/c.lock`), not on `alias.lock`
    and `real/c.lock`. A symlink whose target does not exist yet resolves to that target too, and `--out .`
    has a name once resolved."""
    out = Path(out).resolve()
    return out.with_name(f"{out.name}.lock" if rank == 0 else f"{out.name}.rank{rank}.lock")


def process_start(pid: int) -> int | None:
    """The start time of process `pid` (clock ticks since boot, /proc/<pid>/stat field 22); None where there is
    no /proc or no such process. Together with the pid it names one process, even after the pid is reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) is in parentheses and may itself hold spaces or ')': split after the last ')'
    return int(stat[stat.rindex(")") + 2:].split()[19])


def process_alive(pid: int, started: int | None = None) -> bool:
    """Whether process `pid` (started at `started`, when known) still runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:       # alive, under another user
        pass
    if started is not None:
        now = process_start(pid)
        return now is None or now == started
    return True


def _describe(holder: dict) -> str:
    return (f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"
            + (f": {holder['command']}" if holder.get("command") else ""))


def _read(path: Path) -> dict | None:
    """The holder recorded in a lock file; None when it is gone; {} when it cannot be parsed."""
    for _ in range(20):
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            time.sleep(0.05)      # the holder may be between its exclusive create and its write
    return {}


def _is_stale(holder: dict) -> bool:
    if not holder:                # unparseable for a second: its creator died between create and write
        return True
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    return not process_alive(holder["pid"], holder.get("pid_start"))


def _create(path: Path, record: dict) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(record))
        f.flush()
        os.fsync(f.fileno())
    return True


def _take_over(path: Path, stale: dict) -> None:
    """Remove the stale lock `stale` read at `path` — and nothing else."""
    aside = path.with_name(f"{path.name}.stale-{os.getpid()}")
    try:
        os.replace(path, aside)
    except FileNotFoundError:     # another process removed it first
        return
    if _read(aside) == stale:
        aside.unlink(missing_ok=True)
        return
    try:                          # we moved another taker's fresh lock: put it back (never over a newer one)
        os.link(aside, path)
    except FileExistsError:
        pass
    aside.unlink(missing_ok=True)


def acquire(path: Path, error, what: str, log=None) -> dict:
    """Create the lock `path` for this process, taking over a stale one (said through `log`); raise `error` (a
    user-error class) naming the holder when a live process holds it. Returns the record written."""
    record = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(sys.argv),
              "pid_start": process_start(os.getpid())}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            if _create(path, record):
                return record
            holder = _read(path)
            if holder is None:
                continue
            if not _is_stale(holder):
                raise error(f"{what}: in use by another run ({_describe(holder)}); wait for it to finish, or "
                            f"delete {path} if that run is gone")
            if log is not None:
                log(f"{what}: taking over the lock of a run that is gone ({_describe(holder) if holder else 'unreadable'})")
            _take_over(path, holder)
    except OSError as e:
        raise error(f"{path}: cannot create the lock file ({e.strerror})") from None
    raise error(f"{path}: could not take the lock (other processes keep taking it)")


def release(path: Path, record: dict) -> None:
    """Remove our own lock (not one a later run wrote after wrongly judging ours stale)."""
    if _read(path) == record:
        path.unlink(missing_ok=True)


@contextmanager
def writer_lock(out: str | Path, error, what: str | None = None, rank: int = 0, log=None):
    """Hold the exclusive writer lock of `out` for the duration of the block (released on exceptions too)."""
    path = lock_path(out, rank)
    record = acquire(path, error, what or str(out), log)
    try:
        yield path
    finally:
        release(path, record)
