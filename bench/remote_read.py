"""Reading a teacher cache from local disk and from object storage: does the loader keep up?

Prints, measured in one run on the same cache, written once to local disk and once to a real S3-compatible
server on 127.0.0.1 (SeaweedFS, bench/s3server.py), each read two ways back to back:
  * before: the read path before the decoded-chunk cache and the chunk order (COT2ALIGN_DECODED_MEMORY_MB=0:
    every example read fetches, crc32c-checks and decompresses the chunks holding its rows; --sample-order
    shuffled);
  * after: the reader's decoded chunks (cache/decoded.py) and --sample-order chunks (train/sampling.py);
and for each: examples/s streaming every batch of the cache through the trainer's loader (`cache_dataloader`, the
arrays DSKD + CoT2Align reads, same workers and batch size) from local disk, from S3, and from S3 through the
local chunk copy (COT2ALIGN_CHUNK_CACHE, its second pass); the ratios after / before (target local >= 2) and
S3 / local (target >= 0.9 without the chunk copy); the loader's wait share of step time in a real `distill`
from the S3 cache and from the local one (target < 2%); the teacher pass writing to S3 vs to local disk.

CPU:  python bench/remote_read.py --work /tmp/remote_read
      python bench/remote_read.py --work /tmp/remote_read_2k --n 2000 --passes 1 --distill-steps 60
      (a cache 10x larger read once: each chunk fetched once per worker, as in an epoch over a large cache)
GPU:  python bench/remote_read.py --work W --model random:tinyllama-1.1b --student random:gpt2-30m --n 300

The server runs on this machine, so the figures measure the request path (HTTP, S3 protocol, per-object
latency of ~1 ms), not a WAN's bandwidth; with a far bucket, more DataLoader workers hide more latency.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from s3server import seaweedfs  # noqa: E402

from cot2align.cache import open_cache  # noqa: E402
from cot2align.config import CacheTeacherConfig, DistillConfig, build_config  # noqa: E402
from cot2align.data import load_records  # noqa: E402
from cot2align.modeling import load_tokenizer  # noqa: E402
from cot2align.teacher.cache_pass import cache_teacher  # noqa: E402
from cot2align.train.batches import cache_dataloader  # noqa: E402
from cot2align.train.distill import distill  # noqa: E402


def records_with_rationales(path: Path, n: int) -> Path:
    """n real sample records, every other one with a rationale (the CoT view needs one); past the sample's 300
    records they repeat, each repeat with its own id (a larger cache, whose chunks a pass reads once each)."""
    records, _ = load_records("sample", "train")
    with path.open("w") as f:
        for i in range(n):
            r = records[i % len(records)]
            rec = {k: r[k] for k in ("id", "instruction", "input", "output")}
            if i >= len(records):
                rec["id"] = f"{r['id']}-repeat{i // len(records)}"
            if i % 2 == 0:
                rec["rationale"] = "First find who speaks and what they want; then say it in one sentence."
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return path


# The two read paths compared: (decoded chunks kept per worker in MiB, the sampler's order).
PATHS = {"before": ("0", "shuffled"), "after": ("256", "chunks")}


def examples_per_s(url: str, student: str, workers: int, batch_size: int, passes: int, path: str = "after") -> dict:
    """Every batch of the cache, `passes` times, through the trainer's loader read the `path` way (PATHS):
    {"rate": examples/s over the whole stream, "first_batch_s": from the first `iter` (workers start, open the
    cache) to the first batch, "later_passes_rate": examples/s of the passes after the first (0 with one pass)}.
    Tokenisation (memoised, done when the loader is built) is outside the clock."""
    memory, order = PATHS[path]
    os.environ["COT2ALIGN_DECODED_MEMORY_MB"] = memory        # read by each worker when it opens the cache
    cache = open_cache(url)
    loader = cache_dataloader(cache, load_tokenizer(student), method="dskd", cot2align=True, batch_size=batch_size,
                              num_workers=workers, log=lambda m: None, sample_order=order)
    started, seen, first, first_pass = time.perf_counter(), 0, None, None
    for p in range(passes):
        for batch in loader:
            seen += len(batch["index"])
            first = first or time.perf_counter() - started
        if p == 0:
            first_pass = (time.perf_counter() - started, seen)
    elapsed = time.perf_counter() - started
    del os.environ["COT2ALIGN_DECODED_MEMORY_MB"]
    later = (seen - first_pass[1]) / (elapsed - first_pass[0]) if passes > 1 else 0.0
    return {"rate": seen / elapsed, "first_batch_s": first, "later_passes_rate": later}


def wait_share(url: str, student: str, workers: int, batch_size: int, out: Path, path: str = "after",
               steps: int | None = None) -> dict:
    """The loader's wait share of step time in a real `distill` (1 epoch, or its first `steps` steps)."""
    memory, order = PATHS[path]
    os.environ["COT2ALIGN_DECODED_MEMORY_MB"] = memory
    distill(build_config(DistillConfig, cache=url, student=student, method="dskd", cot2align=True, alpha=0.5,
                         epochs=1, max_steps=steps, batch_size=batch_size, lr=1e-3, num_workers=workers,
                         val_examples=0, out=str(out), overwrite=True, sample_order=order),
            log=lambda m: None, progress=False)
    del os.environ["COT2ALIGN_DECODED_MEMORY_MB"]
    last = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
            if '"data_wait_share"' in line][-1]
    return {"data_wait_share": last["data_wait_share"], "tokens_per_s": last["tokens_per_s"]}


def read_rates(local: Path, url: str, work: Path, read: dict) -> dict:
    """examples/s of each source read each way (PATHS), before and after back to back per source."""
    rates = {}
    for path in PATHS:
        rates[f"local_{path}"] = examples_per_s(str(local), **read, path=path)
    for path in PATHS:
        rates[f"s3_{path}"] = examples_per_s(url, **read, path=path)
    for path in PATHS:
        os.environ["COT2ALIGN_CHUNK_CACHE"] = str(work / f"chunk_cache_{path}")
        examples_per_s(url, **dict(read, passes=1), path=path)                  # fills the local chunk copy
        rates[f"s3_chunk_copy_{path}"] = examples_per_s(url, **read, path=path)
        del os.environ["COT2ALIGN_CHUNK_CACHE"]
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", required=True)
    parser.add_argument("--model", default="tiny-llama", help="teacher (a tiny or random: preset, or a path)")
    parser.add_argument("--student", default="tiny-gpt2")
    parser.add_argument("--n", type=int, default=200,
                        help="examples (the shipped sample's 300 records, repeated past that with new ids)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--distill-steps", type=int, default=None,
                        help="stop each distill after this many steps (default: one epoch; on a loaded machine "
                             "DSKD + CoT2Align steps are slow)")
    args = parser.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    data = records_with_rationales(work / "data.jsonl", args.n)
    settings = dict(model=args.model, data=str(data), topk=16, max_length=512, max_prompt_length=384)
    result: dict = {"model": args.model, "student": args.student, "examples": args.n, "workers": args.workers,
                    "batch_size": args.batch_size, "distill_steps": args.distill_steps,
                    "date": time.strftime("%Y-%m-%d")}
    import torch
    result["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"

    local = work / "local_cache"
    t0 = time.perf_counter()
    cache_teacher(build_config(CacheTeacherConfig, out=str(local), **settings), log=lambda m: None)
    result["write_local_s"] = time.perf_counter() - t0
    with seaweedfs(work / "seaweed") as s3:
        url = f"{s3['bucket']}/caches/bench"
        t0 = time.perf_counter()
        cache_teacher(build_config(CacheTeacherConfig, out=url, **settings), log=lambda m: None)
        result["write_s3_s"] = time.perf_counter() - t0
        result["cache_bytes"] = sum(p.stat().st_size for p in local.rglob("*") if p.is_file())
        read = dict(student=args.student, workers=args.workers, batch_size=args.batch_size, passes=args.passes)
        result["examples_per_s"] = rates = read_rates(local, url, work, read)
        print(json.dumps(rates), flush=True)
        (work / "remote_read.json").write_text(json.dumps(result, indent=1))      # the reads, before the runs
        train = dict(student=args.student, workers=args.workers, batch_size=args.batch_size, steps=args.distill_steps)
        for path in PATHS:
            result[f"distill_s3_{path}"] = wait_share(url, **train, out=work / f"run_s3_{path}", path=path)
        result["distill_local_after"] = wait_share(str(local), **train, out=work / "run_local", path="after")
    whole = {name: r["rate"] for name, r in rates.items()}
    later = {name: r["later_passes_rate"] for name, r in rates.items()}
    result["ratios"] = ratios = {
        "local_after_over_before": whole["local_after"] / whole["local_before"],
        "s3_after_over_before": whole["s3_after"] / whole["s3_before"],
        "s3_over_local_before": whole["s3_before"] / whole["local_before"],
        "s3_over_local_after": whole["s3_after"] / whole["local_after"],
        "s3_over_local_after_later_passes": later["s3_after"] / later["local_after"] if args.passes > 1 else None,
        "s3_chunk_copy_over_local_before": whole["s3_chunk_copy_before"] / whole["local_before"],
        "s3_chunk_copy_over_local_after": whole["s3_chunk_copy_after"] / whole["local_after"]}
    print(f"[{result['device']}] streaming {args.n} examples x {args.passes} passes, {args.workers} workers, "
          f"batch {args.batch_size}, examples/s before -> after (first batch after, s; passes after the first):")
    for source in ("local", "s3", "s3_chunk_copy"):
        after = rates[f"{source}_after"]
        print(f"  {source:14s} {whole[f'{source}_before']:8.1f} -> {after['rate']:8.1f}  "
              f"({after['rate'] / whole[f'{source}_before']:.2f}x; first batch {after['first_batch_s']:.2f} s; "
              f"later passes {after['later_passes_rate']:.1f})")
    print(f"  S3 / local: before {ratios['s3_over_local_before']:.2f}, after {ratios['s3_over_local_after']:.2f} "
          f"(target >= 0.9" + (f"; passes after the first {ratios['s3_over_local_after_later_passes']:.2f}"
                                  if args.passes > 1 else "") + "); "
          f"local after / before {ratios['local_after_over_before']:.2f} (target >= 2)")
    print(f"distill loader wait share: S3 before {100 * result['distill_s3_before']['data_wait_share']:.2f}%, after "
          f"{100 * result['distill_s3_after']['data_wait_share']:.2f}% (target < 2%), local after "
          f"{100 * result['distill_local_after']['data_wait_share']:.2f}%; teacher pass to S3 "
          f"{result['write_s3_s']:.1f} s, to local disk {result['write_local_s']:.1f} s")
    (work / "remote_read.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
