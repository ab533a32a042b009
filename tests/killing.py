"""What the random-kill tests share (test_random_kills_cache.py, test_random_kills_distill.py, two files so that
the two ~2.5-minute tests run side by side under pytest-xdist): a real command is SIGKILLed at seeded random delays
drawn over the whole span of an uninterrupted run (start-up, store creation, blocks, checkpoints, validation, final
save) and rerun after each kill until it completes; the test then compares the result with the uninterrupted run's.

The counts (and where the kills landed) go to the JSON file named by COT2ALIGN_RELIABILITY_OUT when it is set,
so documented figures come from these tests.
"""

import json
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import explain, record_figure

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
    assert done.returncode == 0, explain(done)
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
