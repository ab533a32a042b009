"""Wall time of each quickstart stage (issue: pipeline). Prints one JSON line with every stage's seconds,
the total, and the device.

python bench/pipeline.py [--teacher tiny-qwen2|smollm2-135m-instruct] [--student tiny-gpt2] [--limit 100]

Not yet here: the real-model row (SmolLM2-135M-Instruct teacher fine-tuned on DialogSum, students of
another tokenizer, 5 seeds) — see BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import tempfile

import torch

from cot2align.quickstart import run_quickstart


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--teacher", default="tiny-qwen2")
    parser.add_argument("--student", default="tiny-gpt2")
    parser.add_argument("--limit", type=int, default=100)
    args = parser.parse_args()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    with tempfile.TemporaryDirectory() as out:
        run_quickstart(out, args.teacher, args.student, args.limit, log=lambda m: None)
        with open(f"{out}/timings.json") as f:
            timings = json.load(f)
    print(json.dumps({"device": device, "teacher": args.teacher, "student": args.student, "limit": args.limit,
                      "stages_s": {k: round(v, 1) for k, v in timings.items()},
                      "total_s": round(sum(timings.values()), 1)}))


if __name__ == "__main__":
    main()
