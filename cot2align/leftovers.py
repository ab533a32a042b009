"""What a killed writer leaves behind, and removing it on the next run.

Every write here is made whole by writing aside and renaming; a process killed between the two leaves the
aside copy, which nothing reads but which would stay forever, and counts in `cache info`'s sizes:

  - Zarr's chunk and metadata writes to a local store: `<object>.<32 hex digits>.partial` beside the object;
  - checkpoints: `checkpoints/.step-<N>.<pid>.tmp/` and `checkpoints/.latest.<pid>.tmp`;
  - caches of format version 1 were created whole in `.<cache>.creating-<pid>/` beside the cache.

The next run removes them once it holds the output's writer lock (locks.py), so no other writer of the output
is running. Those named by a pid are removed only when that process is dead too — never a live one's, even if
a lock was wrongly taken over. Zarr's names carry no pid: under the lock they are a dead writer's.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from cot2align.locks import process_alive

ZARR_PARTIAL = re.compile(r"\.[0-9a-f]{32}\.partial$")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_dead_temporaries(directory: Path, pattern: re.Pattern) -> list[Path]:
    """Entries of `directory` whose name matches `pattern` (group 1: the writer's pid) and whose writer is dead."""
    if not directory.is_dir():
        return []
    removed = []
    for entry in sorted(directory.iterdir()):
        match = pattern.fullmatch(entry.name)
        if match and int(match.group(1)) != os.getpid() and not process_alive(int(match.group(1))):
            _remove(entry)
            removed.append(entry)
    return removed


def remove_partial_writes(root: Path, skip: str | None = None) -> list[Path]:
    """Zarr's `.partial` files under `root` (leaving out the subdirectory `skip`, another writer's); call it only
    while holding the writer lock of the store."""
    removed = []
    for directory, subdirs, files in os.walk(root):
        if skip is not None and Path(directory) == root:
            subdirs[:] = [d for d in subdirs if d != skip]
        for name in files:
            if ZARR_PARTIAL.search(name):
                path = Path(directory) / name
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed
