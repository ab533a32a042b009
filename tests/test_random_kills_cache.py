"""SIGKILL at random moments of a real `cot2align cache-teacher`: rerun after each kill until it completes, every
cache array must equal the uninterrupted run's. At least 20 kills must hit a running process (killing.py)."""

import json
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import cache_arrays, write_cot_records
from killing import CACHE_FLAGS, KILLS, SEED, Killer, command, record, timed_run


def cache_progress(out: Path):
    """Where a kill left the cache: its status and committed blocks."""
    try:
        status = json.loads((out / "zarr.json").read_text())["attributes"]["status"]
        blocks = json.loads((out / "parts" / "0" / "zarr.json").read_text())["attributes"]["blocks_done"]
    except (OSError, ValueError, KeyError):
        return "nothing yet"
    return f"{status}:{blocks}"


@pytest.mark.slow
def test_cache_teacher_killed_at_random_moments_ends_identical(tmp_path):
    data = write_cot_records(tmp_path / "d.jsonl", n=40, cot_every=3)
    reference = tmp_path / "reference"
    span = timed_run(command("cache-teacher", *CACHE_FLAGS, "--data", data, "--out", reference))
    expected = cache_arrays(reference)
    killer = Killer(span, SEED, tmp_path)
    t0, rounds, landed = time.perf_counter(), 0, []
    while killer.kills < KILLS:        # each round a fresh --out, killed and rerun until it completes
        rounds += 1
        out = tmp_path / f"round-{rounds}"
        out.mkdir()           # --resume of an empty directory starts afresh (of a missing one is an error)
        landed += killer.run_to_completion(command("cache-teacher", *CACHE_FLAGS, "--data", data, "--out", out),
                                           lambda: cache_progress(out))
        got = cache_arrays(out)
        assert got.keys() == expected.keys()
        for key in expected:
            assert np.array_equal(got[key], expected[key]), f"round {rounds}: {key} differs from the uninterrupted run"
        assert not list(out.rglob("*.partial")) and not out.with_name(f"{out.name}.lock").exists()
    record("cache-teacher", killer.figures(rounds=rounds, uninterrupted_s=round(span, 1), progress_at_kills=landed,
                                           test_s=round(time.perf_counter() - t0, 1)))
    assert killer.kills >= KILLS
