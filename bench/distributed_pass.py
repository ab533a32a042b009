"""The teacher cache pass on N processes (torchrun): teacher tokens/s for N = 1, 2, … and the scaling ratio.

Each run is `torchrun --nproc_per_node N -m cot2align.cli cache-teacher …` into a fresh directory; the figure
is the pass's own count (every rank's teacher tokens over the slowest rank's seconds, manifest `pass`). On CPU
the machine's cores are shared out: each of N processes gets cores // N threads, so N = 2 on 2 cores measures
the split of work and the coordination overhead, not more hardware. On a node with N GPUs each rank takes its
own GPU (LOCAL_RANK). The caches of every N are checked to hold the same arrays.

CPU:  python bench/distributed_pass.py --work /tmp/dist_pass
GPU:  python bench/distributed_pass.py --work W --model random:tinyllama-1.1b --n 2000 --procs 1,2,4,8
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from remote_read import records_with_rationales  # noqa: E402

from cot2align.cache import open_cache  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_pass(procs: int, data: Path, out: Path, model: str, threads: int) -> dict:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_port",
               str(free_port()), "-m", "cot2align.cli", "cache-teacher", "--model", model, "--data", str(data),
               "--out", str(out), "--topk", "16", "--max-length", "512", "--max-prompt-length", "384"]
    started = time.perf_counter()
    done = subprocess.run(command, env=dict(os.environ, OMP_NUM_THREADS=str(threads)), capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"torchrun with {procs} processes failed:\n{done.stderr[-3000:]}")
    stats = open_cache(out).manifest["pass"]
    return {"procs": procs, "threads_per_proc": threads, "tokens_per_s": stats["tokens_per_s"],
            "pass_seconds": stats["seconds"], "wall_seconds": time.perf_counter() - started, "tokens": stats["tokens"]}


def same_arrays(a: Path, b: Path) -> bool:
    a, b = open_cache(a), open_cache(b)
    for i in range(len(a)):
        for view in ("std", "cot"):
            ra, rb = a.view(i, view), b.view(i, view)
            if any(isinstance(v, np.ndarray) and not np.array_equal(v, rb[k]) for k, v in ra.items()):
                return False
    return len(a) == len(b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", required=True)
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--n", type=int, default=300, help="examples (the shipped sample has 300)")
    parser.add_argument("--procs", default="1,2", help="comma-separated process counts")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads per process (default: the cores shared out, cores // N)")
    args = parser.parse_args()
    import torch

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    data = records_with_rationales(work / "data.jsonl", args.n)
    gpus = torch.cuda.device_count()
    device = f"{gpus} x {torch.cuda.get_device_name()}" if gpus else f"CPU, {os.cpu_count()} cores (gloo)"
    runs = []
    for procs in [int(p) for p in args.procs.split(",")]:
        threads = args.threads or (1 if gpus else max(1, (os.cpu_count() or 1) // procs))
        runs.append(run_pass(procs, data, work / f"cache_{procs}", args.model, threads))
        print(f"[{device}] {procs} process(es) x {threads} thread(s): {runs[-1]['tokens_per_s']:,.0f} teacher tokens/s "
              f"(pass {runs[-1]['pass_seconds']:.1f} s, wall {runs[-1]['wall_seconds']:.1f} s)", flush=True)
    base = runs[0]["tokens_per_s"]
    for r in runs:
        r["scaling_vs_first"] = r["tokens_per_s"] / base
        r["same_arrays_as_first"] = same_arrays(work / f"cache_{runs[0]['procs']}", work / f"cache_{r['procs']}")
    print("scaling: " + ", ".join(f"N={r['procs']}: {r['scaling_vs_first']:.2f}x" for r in runs)
          + f"; identical arrays: {all(r['same_arrays_as_first'] for r in runs)}")
    result = {"device": device, "model": args.model, "examples": args.n, "date": time.strftime("%Y-%m-%d"), "runs": runs}
    (work / "distributed_pass.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
