"""Smaller things of the command line: -q quiets the libraries too, --revision and --attn-implementation for every
model loaded, the paper configs shipped in the package (`cot2align configs`)."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

DRIVER = """
import json, sys
from cot2align.cli import main
for args in json.loads(sys.argv[1]):
    print("RUNNING", " ".join(args), file=sys.stderr, flush=True)
    try:
        main(args)
    except SystemExit as e:
        if e.code:
            sys.exit(e.code)
"""


def run_commands(cwd: Path, commands: list[list[str]]) -> list[str]:
    """The commands one after another in one process (one import of torch); each one's stderr."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(commands)], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stderr.split("RUNNING ")[1:]


LIBRARY_NOISE = ("Loading weights", "Writing model shards", "it/s]", "%|", "Warning", "Generating")


def test_quiet_silences_the_libraries_bars_and_warnings(tmp_path):
    from cot2align.data import load_records

    records, _ = load_records("sample", "test")
    with (tmp_path / "test.csv").open("w", newline="") as f:      # read through `datasets`
        writer = csv.DictWriter(f, fieldnames=["instruction", "input", "output"])
        writer.writeheader()
        for r in records[:3]:
            writer.writerow({k: r[k] for k in ("instruction", "input", "output")})
    evaluate = ["evaluate", "--model", "m", "--data", "test.csv", "--metric", "ce", "--limit", "2"]
    sft_quiet, evaluate_quiet, evaluate_loud = run_commands(tmp_path, [
        ["sft", "--model", "tiny-gpt2", "--data", "sample", "--out", "m", "--limit", "4", "--max-steps", "1",
         "--val-examples", "0", "-q"],
        evaluate + ["-q"],
        evaluate + ["--out", "loud"]])
    for stderr in (sft_quiet, evaluate_quiet):
        assert not [noise for noise in LIBRARY_NOISE if noise in stderr], stderr
    # without -q (in the same process, after two quiet commands) the libraries speak again
    assert "Loading weights" in evaluate_loud and "cross-entropy" in evaluate_loud
