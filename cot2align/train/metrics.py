"""metrics.jsonl: one JSON line per optimiser step (a "train" record, with `lr`) and per validation ("val"), and
at each start of a cross-tokenizer run the token alignment's figures (an "alignment" record, align/stats.py).

Each line goes to the file in one unbuffered append, so a crash loses nothing logged and leaves nothing in a
Python buffer to fail again at exit. A run stopped by a full disk mid-append, or killed, can leave a torn last
line — and lines for the steps after its last checkpoint, which the resumed run trains and logs again. So on
--resume the file is cut back to what the checkpoint covers: the train records up to its step and the
validations in its history. The resumed run's file then holds each step once, as an uninterrupted run's does.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from cot2align.train import TrainingError
from cot2align.write_errors import reported

RECOVERY = "the last checkpoint is intact; free space (or make --out writable) and rerun with --resume"


def read_records(path: Path) -> list[dict]:
    """Every whole record of the file; a torn line (a crash or a full disk mid-append) is skipped."""
    records = []
    for line in path.read_bytes().split(b"\n"):
        try:
            record = json.loads(line)
        except ValueError:          # empty, torn, or not UTF-8
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def cut_back(path: Path, step: int, validations: int) -> None:
    """Keep the train records up to `step` and the first `validations` val records (a checkpoint's state);
    rewritten aside and renamed, so a failure here leaves the old file."""
    kept, val_seen = [], 0
    for record in read_records(path):
        if "alignment" in record:      # the figures a run logs at each start: kept
            kept.append(record)
        elif "lr" in record:
            if record.get("step", 0) <= step:
                kept.append(record)
        elif val_seen < validations:
            kept.append(record)
            val_seen += 1
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    os.replace(tmp, path)


def open_metrics(out: Path, resumed_state: dict | None):
    """The file to append to: cut back to a resumed checkpoint's `state`, or new lines after a fresh start."""
    path = out / "metrics.jsonl"
    with reported(TrainingError, f"{path}: cannot rewrite", RECOVERY):
        if resumed_state is not None and path.exists():
            cut_back(path, resumed_state["step"], len(resumed_state.get("history", [])))
        return path.open("ab", buffering=0)


def _write_all(file, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[file.write(view):]


def append(file, record: dict) -> None:
    """One record, as one line."""
    with reported(TrainingError, f"{file.name}: cannot append", RECOVERY):
        _write_all(file, (json.dumps(record) + "\n").encode())
