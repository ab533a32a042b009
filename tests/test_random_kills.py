"""SIGKILL at random moments: a real `cot2align cache-teacher` and a real `cot2align distill` are killed at seeded
random delays drawn over the whole span of an uninterrupted run (start-up, store creation, blocks, checkpoints,
validation, final save), rerun after each kill until they complete, and the result must equal the uninterrupted
run's: every cache array, or the final weights. At least 20 kills must hit a running process per command.

The counts (and where the kills landed) go to the JSON file named by COT2ALIGN_RELIABILITY_OUT when it is set,
so documented figures come from this test.
"""

import json
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import cache_arrays, record_figure, write_cot_records

KILLS = 20
SEED = 14
CACHE_FLAGS = ["--model", "tiny-llama", "--topk", "8", "--block-examples", "2", "--batch-tokens", "2048",
               "--max-length", "256", "--max-prompt-length", "128"]
DISTILL_FLAGS = ["--student", "tiny-gpt2", "--method", "dskd", "--no-cot2align", "--epochs", "2", "--batch-size", "2",
                 "--val-examples", "1", "--val-max-new-tokens", "1", "--save-every", "1", "--lr", "3e-3",
                 "--limit", "8"]


def command(*args) -> list[str]:
    return [sys.executable, "-m", "cot2align.cli", *map(str, args)]


def timed_run(args: list[str]) -> float:
    t0 = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return time.perf_counter() - t0


class Killer:
    """Starts the command, kills it at a random moment in [0.3 s, span], reruns, until an attempt completes."""

    def __init__(self, span: float, seed: int, log_dir: Path):
        self.rng = random.Random(seed)
        self.span, self.log_dir = span, log_dir
        self.kills, self.attempts, self.took_over, self.removed = 0, 0, 0, 0
        self.delays: list[float] = []

    def run_to_completion(self, args: list[str], progress) -> list:
        """Kill-and-rerun until the command completes; returns `progress()` seen after each kill."""
        seen = []
        while True:
            self.attempts += 1
            log = self.log_dir / f"attempt-{self.attempts}.log"
            with log.open("w") as err:
                proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=err)
                delay = self.rng.uniform(0.3, self.span)
                try:
                    proc.wait(timeout=delay)
                except subprocess.TimeoutExpired:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
            text = log.read_text()
            self.took_over += "taking over the lock" in text
            self.removed += sum(int(n) for n in re.findall(r"removed (\d+) half-written", text))
            if proc.returncode == -signal.SIGKILL:      # it was running when the kill came
                self.kills += 1
                self.delays.append(round(delay, 2))
                seen.append(progress())
                continue
            assert proc.returncode == 0, text[-3000:]
            return seen

    def figures(self, **extra) -> dict:
        return {"kills": self.kills, "attempts": self.attempts, "stale_locks_taken_over": self.took_over,
                "half_written_files_removed": self.removed, "kill_delays_s": self.delays, "seed": SEED, **extra}


def record(name: str, figures: dict) -> None:
    print(name, json.dumps(figures))
    record_figure(name, figures)


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
