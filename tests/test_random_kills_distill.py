"""SIGKILL at random moments of a real `cot2align distill`: rerun with --resume after each kill until it completes,
the final weights must equal the uninterrupted run's. At least 20 kills must hit a running process (killing.py)."""

import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_cot_records
from killing import CACHE_FLAGS, DISTILL_FLAGS, KILLS, SEED, Killer, command, record, timed_run


def run_progress(out: Path):
    """Where a kill left the run: its latest checkpoint, and whether the final model was written."""
    steps = sorted(p.name for p in (out / "checkpoints").glob("step-*")) if (out / "checkpoints").is_dir() else []
    return (steps[-1] if steps else "no checkpoint") + (" +summary" if (out / "summary.json").exists() else "")


@pytest.mark.slow
def test_distill_killed_at_random_moments_ends_identical(tmp_path):
    data = write_cot_records(tmp_path / "d.jsonl", n=8, cot_every=2)
    cache = tmp_path / "cache"
    timed_run(command("cache-teacher", *CACHE_FLAGS, "--data", data, "--out", cache))
    reference = tmp_path / "reference"
    span = timed_run(command("distill", "--cache", cache, *DISTILL_FLAGS, "--out", reference))
    expected = load_file(str(reference / "model.safetensors"))
    killer = Killer(span, SEED + 1, tmp_path)
    t0, rounds, landed = time.perf_counter(), 0, []
    while killer.kills < KILLS:
        rounds += 1
        out = tmp_path / f"round-{rounds}"
        out.mkdir()           # --resume of an empty directory starts afresh (of a missing one is an error)
        # --resume from the first attempt on: on an empty --out it starts afresh, after a kill it continues
        landed += killer.run_to_completion(command("distill", "--cache", cache, *DISTILL_FLAGS, "--out", out, "--resume"),
                                           lambda: run_progress(out))
        got = load_file(str(out / "model.safetensors"))
        assert got.keys() == expected.keys()
        for key in expected:
            assert torch.equal(got[key], expected[key]), f"round {rounds}: {key} differs from the uninterrupted run"
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        steps = [r["step"] for r in records if "lr" in r]
        assert steps == sorted(set(steps)), "metrics.jsonl holds a step twice"
        assert not out.with_name(f"{out.name}.lock").exists()
    record("distill", killer.figures(rounds=rounds, uninterrupted_s=round(span, 1), progress_at_kills=landed,
                                     test_s=round(time.perf_counter() - t0, 1)))
    assert killer.kills >= KILLS
