"""Benchmark of the student trainer (issue: trainer). Prints, measured in one run:

  * student tokens/s of a cached DSKD + CoT2Align step vs the same objective with the teacher run online
    every step (target >= 2x);
  * cached DSKD + CoT2Align step time vs plain SFT over the same two views (target <= 1.25x);
  * the share of `cot2align distill` wall time spent waiting on the DataLoader (target < 2%).

Random-initialised real architectures: TinyLlama-1.1B student (Llama-2 tokenizer), a Mistral-7B-sized
or Qwen2.5-7B-sized teacher (their real tokenizers), on real DialogSum texts with a synthetic rationale
(DialogSum has none; lengths are what matter). On CPU (--tiny): tiny-llama student, tiny-mistral teacher.

python bench/distill_step.py --data dialogsum.train.jsonl.gz [--teacher random:mistral-7b] [--n 256] [--tiny]
"""

from __future__ import annotations

import argparse
import gzip
import json
import time
from pathlib import Path

import torch


def write_records(source: str, n: int, path: Path) -> Path:
    """n DialogSum (or sample) records as cot2align JSONL, each with a rationale built from its own text."""
    from cot2align.data import load_records

    if source.endswith(".gz"):
        raw = [json.loads(line) for line in gzip.open(source, "rt")][:n]
        records = [{"id": str(r.get("fname", i)), "instruction": "Summarize the following dialogue.",
                    "input": r["dialogue"], "output": r["summary"]} for i, r in enumerate(raw)]
    else:
        records, _ = load_records(source, "train")
        records = [{k: r[k] for k in ("id", "instruction", "input", "output")} for r in records[:n]]
    with path.open("w") as f:
        for r in records:
            turns = r["input"].split("\n")
            r["rationale"] = ("First, identify the speakers and what they want. " + " ".join(turns[:3])[:600] +
                              " Then keep the main event and its outcome.")
            f.write(json.dumps(r) + "\n")
    return path


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="sample")
    parser.add_argument("--teacher", default="random:mistral-7b")
    parser.add_argument("--student", default="random:tinyllama-1.1b")
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=12, help="batches timed per mode in part 2")
    parser.add_argument("--trainer-steps", type=int, default=40, help="optimiser steps of the real trainer in part 1")
    parser.add_argument("--work", default="/tmp/c2a_bench_distill")
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    if args.tiny:
        args.teacher, args.student = "tiny-mistral", "tiny-llama"
    from cot2align.cache import open_cache
    from cot2align.config import CacheTeacherConfig, DistillConfig, build_config
    from cot2align.losses.objective import LossConfig, distillation_loss
    from cot2align.modeling import load_model, load_tokenizer, tokenizer_hash
    from cot2align.teacher.cache_pass import cache_teacher
    from cot2align.train.data import DistillDataset, LengthBucketSampler, collate, tokenize_cache
    from cot2align.train.batches import load_heads, student_view, teacher_view
    from cot2align.train.distill import distill
    from cot2align.train.setup import load_student
    from cot2align.train.online import online_teacher_view

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data = write_records(args.data, args.n, work / "records.jsonl")
    cache_path = work / f"cache_{args.teacher.replace(':', '_')}"
    cache_teacher(build_config(CacheTeacherConfig, model=args.teacher, data=str(data), out=str(cache_path), topk=64,
                               batch_tokens=16384 if device.type == "cuda" else 4096), log=lambda m: None)
    cache = open_cache(cache_path)
    cfg = build_config(DistillConfig, cache=str(cache_path), student=args.student, method="dskd", alpha=0.9, epochs=3,
                       batch_size=args.batch_size, lr=1e-5, max_steps=args.trainer_steps, out=str(work / "run"), overwrite=True,
                       val_examples=2, val_max_new_tokens=4)
    cfg = cfg.with_defaults(None)

    # 1. the real trainer: loader wait share and tokens/s (its metrics)
    summary = distill(cfg, log=lambda m: None, progress=False, cache=cache)
    rows = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "ce" in r]
    first, last = train_rows[0], train_rows[-1]
    steady = (last["data_wait_s"] - first["data_wait_s"]) / max(last["elapsed_s"] - first["elapsed_s"], 1e-9)
    print(json.dumps({"device": name, "teacher": args.teacher, "student": args.student, "steps": summary["steps"],
                      "trainer_tokens_per_s": last["tokens_per_s"], "data_wait_share_incl_start": last["data_wait_share"],
                      "data_wait_share_after_first_step": steady}), flush=True)

    # 2. one step three ways on the same batches
    student = load_student(cfg, device)
    tok = load_tokenizer(args.student)
    ids = tokenize_cache(cache, tok, tokenizer_hash(tok), cfg.max_length)
    views = ("std", "cot")
    dataset = DistillDataset(ids, views, list(range(len(cache))), cache.opened(),
                             ("input_ids", "target_ids", "hidden", "embeds"))
    sampler = LengthBucketSampler([dataset.length(k) for k in range(len(dataset))], args.batch_size, 0)
    batches = [collate([dataset[k] for k in b], views, tok.eos_token_id) for b in sampler.batches(0)[:args.steps]]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    from cot2align.losses.objective import build_projectors

    heads = load_heads(cache, student, device=device, dtype=dtype)
    projectors = build_projectors("dskd", True, student.config.hidden_size, cache.hidden_size).to(device)
    optimizer = torch.optim.AdamW(list(student.parameters()) + list(projectors.parameters()), lr=1e-5)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    teacher = tokenizer_t = None
    texts = cache.texts()

    def step(batch, mode):
        with autocast:
            students = {v: student_view(student, batch[v], device, mode != "sft") for v in views}
            if mode == "sft":       # plain CE over the same two views
                loss = sum(torch.nn.functional.cross_entropy(students[v].logits[students[v].mask].float(),
                                                             students[v].target_ids[students[v].mask]) for v in views)
            else:
                if mode == "cached":
                    teachers = {v: teacher_view(batch[v], heads, device, dtype) for v in views}
                else:
                    idx = batch["index"].tolist()
                    teachers = {}
                    for v in views:
                        last_ids = [int(cache.view(i, v)["target_ids"][-1]) for i in idx]
                        teachers[v] = online_teacher_view(teacher, tokenizer_t, [texts[f"prompt_{v}"][i] for i in idx],
                                                          [texts[f"response_{v}"][i] for i in idx],
                                                          [t == tokenizer_t.eos_token_id for t in last_ids], device,
                                                          store_dtype=None, compute_dtype=dtype)
                loss, _ = distillation_loss("dskd", 0.9, students, teachers, heads, projectors, True, LossConfig())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def timed(mode):
        step(batches[0], mode)
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for batch in batches[1:]:
            step(batch, mode)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - started) / (len(batches) - 1)

    tokens = sum(int(b[v]["attention_mask"].sum()) for b in batches[1:] for v in views) / (len(batches) - 1)
    t_sft = timed("sft")
    t_cached = timed("cached")
    t_sft = min(t_sft, timed("sft"))         # again, so allocator warm-up does not favour either side
    teacher = load_model(args.teacher, dtype=dtype, device=device)
    tokenizer_t = load_tokenizer(args.teacher)
    t_online = timed("online")
    print(json.dumps({"device": name, "teacher": args.teacher, "student": args.student, "batch": args.batch_size,
                      "student_tokens_per_step": tokens, "sft_step_s": t_sft, "cached_step_s": t_cached,
                      "online_step_s": t_online, "cached_tokens_per_s": tokens / t_cached,
                      "online_tokens_per_s": tokens / t_online, "ratio_cached_over_online_speed": t_online / t_cached,
                      "ratio_cached_over_sft_time": t_cached / t_sft}), flush=True)


if __name__ == "__main__":
    main()
