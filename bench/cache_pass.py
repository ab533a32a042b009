"""Benchmark of the teacher cache pass (issue: cache-teacher).

Prints, measured in one run on the same batches:
  * pass throughput (teacher tokens/s including top-k, device->host copies and writing) divided by
    a plain HF forward (`model(ids, attention_mask).logits`) over the same length-sorted batches;
  * bytes per stored row by array for each hidden-state codec, and the total against the bf16
    hidden-state bytes (2 x D).

CPU:  python bench/cache_pass.py --model tiny-llama --data sample
GPU:  python bench/cache_pass.py --model random:mistral-7b --data PATH/dialogsum.train....jsonl.gz --n 2000
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from cot2align.cache.inspect import cache_info
from cot2align.config import CacheTeacherConfig, build_config
from cot2align.data.readers import load_records
from cot2align.modeling import load_model, load_tokenizer
from cot2align.teacher.batching import plan_batches
from cot2align.teacher.cache_pass import cache_teacher
from cot2align.teacher.sequences import build_sequences


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def plain_forward_tokens_per_s(model, sequences, batch_tokens, pad_id, device) -> float:
    items = [(i, "std") for i, s in enumerate(sequences) if s.views["std"].n_rows] + \
            [(i, "cot") for i, s in enumerate(sequences) if s.views["cot"].n_rows]
    lengths = [len(sequences[i].views[v].input_ids) for i, v in items]
    batches = plan_batches(items, lengths, batch_tokens)

    def run(batch):
        seqs = [sequences[i].views[v].input_ids for i, v in batch]
        longest = max(map(len, seqs))
        ids = torch.full((len(seqs), longest), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, s in enumerate(seqs):
            ids[b, : len(s)] = torch.tensor(s)
            mask[b, : len(s)] = 1
        model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
        return sum(map(len, seqs))

    run(batches[0])  # warm-up
    sync(device)
    t0 = time.perf_counter()
    tokens = sum(run(b) for b in batches)
    sync(device)
    return tokens / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--data", default="sample")
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--batch-tokens", type=int, default=16384)
    ap.add_argument("--topk", type=int, default=64)
    ap.add_argument("--codecs", default="raw,zstd,lz4")
    ap.add_argument("--out", default="bench/out/cache_pass")
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    t0 = time.perf_counter()
    model = load_model(args.model, dtype=dtype, device=device)
    print(f"# model {args.model} loaded in {time.perf_counter() - t0:.1f} s on {device_name}", flush=True)
    tok = load_tokenizer(args.model)
    records, _ = load_records(args.data, "train")
    records = records[: args.n]
    sequences, _ = build_sequences(records, tok, 512, 256)
    n_tokens = sum(len(s.views[v].input_ids) for s in sequences for v in ("std", "cot"))
    n_rows = sum(s.views[v].n_rows for s in sequences for v in ("std", "cot"))
    print(f"# {len(records)} examples, {n_tokens} teacher tokens, {n_rows} stored rows", flush=True)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    plain = plain_forward_tokens_per_s(model, sequences, args.batch_tokens, pad_id, device)
    print(f"plain forward: {plain:,.0f} tokens/s", flush=True)

    results = []
    for codec in args.codecs.split(","):
        out = Path(args.out) / codec
        shutil.rmtree(out, ignore_errors=True)
        cfg = build_config(CacheTeacherConfig, model=args.model, data=args.data, out=str(out), limit=args.n,
                           topk=args.topk, batch_tokens=args.batch_tokens, hidden_codec=codec)
        summary = cache_teacher(cfg, log=lambda m: None, model=model)
        info = cache_info(out)
        ratio = summary["pass"]["tokens_per_s"] / plain
        row = {"device": device_name, "model": args.model, "codec": codec, "pass_tokens_per_s": summary["pass"]["tokens_per_s"],
               "plain_tokens_per_s": plain, "ratio_pass_over_plain": ratio,
               "rows_per_s": summary["pass"]["rows_per_s"], "write_seconds": summary["pass"]["write_seconds"],
               "pass_seconds": summary["pass"]["seconds"],
               "bytes_per_row": {k: round(v["bytes_per_row"], 1) for k, v in info["arrays"].items()},
               "ratio_by_array": {k: round(v["ratio"], 2) for k, v in info["arrays"].items()},
               "total_bytes_per_row": info["bytes_per_row"], "total_vs_bf16_hidden": info["bytes_per_row_vs_bf16_hidden"]}
        results.append(row)
        print(json.dumps(row), flush=True)
        shutil.rmtree(out, ignore_errors=True)
    print("\n| codec | pass tok/s | plain tok/s | ratio | bytes/row total | vs bf16 hidden | hidden ratio |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['codec']} | {r['pass_tokens_per_s']:,.0f} | {r['plain_tokens_per_s']:,.0f} | "
              f"{r['ratio_pass_over_plain']:.3f} | {r['total_bytes_per_row']:.0f} | {r['total_vs_bf16_hidden']:.3f} | "
              f"{r['ratio_by_array']['hidden']:.2f} |")


if __name__ == "__main__":
    main()
