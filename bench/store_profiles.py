"""What a `cache-teacher --store logits` cache saves, and what training from it costs (BENCHMARKS.md "Store
profiles").

    python bench/store_profiles.py sizes --work DIR [--n 40] [--ks 16,64,128]
    python bench/store_profiles.py ce --work DIR [--train 400] [--test 100] [--epochs 2] [--seeds 1,2,3]
    python bench/store_profiles.py sizes|ce --work DIR --smoke        tiny sizes (the tests run it)

`sizes`: bytes per response row by array, for each store profile (full | logits) and top-k, measured with `cache
info` on caches of the first N DialogSum training dialogues, from two teachers: the real SmolLM2-135M-Instruct
(D = 576, V = 49152) and a Mistral-7B-shaped one — Mistral's hidden size, vocabulary and tokenizer (D = 4096, V =
32000), random weights and one decoder layer: the arrays a cache stores depend on D, V, k and the distributions,
not on the depth, so 7B weights are never built. A random teacher's distributions are flatter than a trained
one's, so its top-k arrays compress less: its figures bound a real Mistral's from above.

`ce`: the held-out cross-entropy (nats per student token, DialogSum test references) of MinED and ULD students
trained from a `logits` cache (the stored top-k + tail, --teacher-dist topk) and from a `full` cache (the exact
distribution, hidden · lm_headᵀ), the same SmolLM2 teacher, records, steps and seeds (random:gpt2-transfer
students, as bench/transfer.py's from-scratch regime): what a user gives up for the smaller cache.

Outputs under --work: sizes.json / sizes.md, ce.json / ce.md; a rerun keeps the caches and runs already there.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

TEACHER = "smollm2-135m-instruct"
STUDENT = "random:gpt2-transfer"
MISTRAL_SHAPE = dict(hidden_size=4096, intermediate_size=1024, num_hidden_layers=1, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096, sliding_window=None,
                     tie_word_embeddings=False)
PASS = dict(max_length=512, max_prompt_length=384, batch_tokens=8192)
SMOKE = dict(n=3, ks=(4,), train=6, test=3, epochs=1, seeds=(1,))


def write_dialogsum(path: Path, split: str, n: int, data_root: str | None, smoke: bool = False) -> Path:
    """The first n DialogSum records of `split` as a JSONL file (the cache pass and evaluate read the same file);
    --smoke: the package's own sample records (the tests need no dataset)."""
    from cot2align.data import load_records

    if not path.exists():
        records = load_records("sample" if smoke else "dialogsum", split, data_root)[0][:n]
        with path.open("w") as f:
            for r in records:
                f.write(json.dumps({k: r[k] for k in ("id", "instruction", "input", "output")}) + "\n")
    return path


def mistral_shaped(dtype):
    """A random Mistral-architecture model with Mistral-7B's hidden size and vocabulary and one decoder layer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from cot2align.modeling import load_tokenizer

    tokenizer = load_tokenizer("tiny-mistral")          # Mistral's tokenizer (config.TINY_PRESETS)
    config = AutoConfig.for_model("mistral", bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                  **MISTRAL_SHAPE)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def build_cache(out: Path, data: Path, store: str, topk: int, teacher: str, model=None, smoke: bool = False) -> Path:
    from cot2align.config import CacheTeacherConfig, build_config
    from cot2align.teacher.cache_pass import cache_teacher

    settings = dict(PASS, max_length=256, max_prompt_length=192, batch_tokens=2048) if smoke else PASS
    cache_teacher(build_config(CacheTeacherConfig, model=teacher, data=str(data), out=str(out), store=store, topk=topk,
                               **settings), log=lambda m: print(m, flush=True), model=model)
    return out


def sizes(args, work: Path) -> dict:
    """bytes per response row by array for each teacher, k and profile (cache info's stored chunk bytes)."""
    import torch

    from cot2align.cache.inspect import cache_info

    data = write_dialogsum(work / "train.jsonl", "train", args.n, args.data_root, args.smoke)
    if args.smoke:          # tiny presets of the same tokenizers' families
        teachers = {"tiny-llama": ("tiny-llama", None, args.ks), "tiny-mistral": ("tiny-mistral", None, args.ks)}
    else:
        teachers = {"smollm2-135m": (TEACHER, None, args.ks),
                    "mistral-7b-shaped": ("tiny-mistral", mistral_shaped(torch.float32), args.mistral_ks)}
    out = {}
    for label, (teacher, model, ks) in teachers.items():
        for k in ks:
            for store in ("full", "logits"):
                cache = build_cache(work / "caches" / f"{label}_k{k}_{store}", data, store, k, teacher, model, args.smoke)
                info = cache_info(cache)
                out[f"{label} k={k} {store}"] = {
                    "teacher": label, "k": k, "store": store, "D": info["teacher"]["hidden_size"],
                    "V": info["teacher"]["vocab_size"], "rows": sum(info["rows"].values()),
                    "bytes_per_row": info["bytes_per_row"],
                    "arrays": {name: round(a["bytes_per_row"], 2) for name, a in info["arrays"].items()}}
    (work / "sizes.json").write_text(json.dumps(out, indent=1))
    (work / "sizes.md").write_text(sizes_table(out))
    print(sizes_table(out))
    return out


def sizes_table(results: dict) -> str:
    lines = ["| teacher | k | store | hidden (+embeds) | top-k ids + log-probs | ids, tail, target_logprob | total B/row |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for r in results.values():
        a = r["arrays"]
        hidden = sum(a.get(n, 0) for n in ("hidden", "hidden_scale", "embeds"))
        topk = a["topk_ids"] + a["topk_logprobs"]
        rest = sum(a.get(n, 0) for n in ("input_ids", "target_ids", "tail_logprob", "target_logprob"))
        lines.append(f"| {r['teacher']} (D={r['D']}, V={r['V']}) | {r['k']} | {r['store']} | {hidden:.0f} | {topk:.0f} | "
                     f"{rest:.1f} | **{r['bytes_per_row']:.0f}** |")
    return "\n".join(lines) + "\n"


ROWS = {"mined exact (full cache)": ("mined", "full", "exact"), "mined topk (logits cache)": ("mined", "logits", "topk"),
        "uld exact (full cache)": ("uld", "full", "exact"), "uld topk (logits cache)": ("uld", "logits", "topk")}


def held_out_ce(args, work: Path) -> dict:
    """Each row × seed: distill from its cache, then the held-out CE of the test references."""
    from cot2align.config import DistillConfig, build_config
    from cot2align.eval import evaluate_model
    from cot2align.train.distill import distill

    train = write_dialogsum(work / "train.jsonl", "train", args.train, args.data_root, args.smoke)
    test = write_dialogsum(work / "test.jsonl", "test", args.test, args.data_root, args.smoke)
    teacher = "tiny-llama" if args.smoke else TEACHER
    caches = {store: build_cache(work / "caches" / store, train, store, 64, teacher, smoke=args.smoke)
              for store in ("full", "logits")}
    student = "tiny-gpt2" if args.smoke else STUDENT
    runs: dict = {}
    for row, (method, store, dist) in ROWS.items():
        for seed in args.seeds:
            out = work / "runs" / f"{method}_{dist}_seed{seed}"
            results = out / "eval" / "results.json"
            if not results.exists():
                if not (out / "summary.json").exists():
                    distill(build_config(DistillConfig, cache=str(caches[store]), student=student, out=str(out),
                                         method=method, cot2align=False, teacher_dist=dist, epochs=args.epochs,
                                         batch_size=4, lr=1e-3, alpha=0.5, seed=seed, val_examples=2,
                                         val_max_new_tokens=4, select_by="last", overwrite=True),
                            log=lambda m: print(m, flush=True), progress=False)
                evaluate_model(str(out), str(test), "test", metric="ce", out=str(out / "eval"), overwrite=True)
            runs.setdefault(row, {})[seed] = json.loads(results.read_text())["ce"]["nats_per_token"]
    out = {row: {"per_seed": per_seed, "mean": statistics.fmean(per_seed.values()),
                 "std": statistics.stdev(per_seed.values()) if len(per_seed) > 1 else 0.0}
           for row, per_seed in runs.items()}
    (work / "ce.json").write_text(json.dumps(out, indent=1))
    table = ["| row | held-out CE (nats/token), mean ± std over seeds |", "|---|---:|"]
    table += [f"| {row} | {r['mean']:.4f} ± {r['std']:.4f} |" for row, r in out.items()]
    (work / "ce.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=("sizes", "ce"))
    parser.add_argument("--work", required=True)
    parser.add_argument("--data-root", default=None, help="Where dialogsum/ is [default: $COT2ALIGN_DATA_ROOT]")
    parser.add_argument("--n", type=int, default=40, help="sizes: DialogSum training dialogues cached")
    parser.add_argument("--ks", default="16,64,128", help="sizes: the top-k values")
    parser.add_argument("--mistral-ks", default="16,64,128", help="sizes: the Mistral-shaped teacher's top-k values")
    parser.add_argument("--train", type=int, default=400, help="ce: training dialogues")
    parser.add_argument("--test", type=int, default=100, help="ce: test dialogues")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--smoke", action="store_true", help="tiny teacher, student and sizes (the tests)")
    args = parser.parse_args(argv)
    args.ks = tuple(int(k) for k in args.ks.split(","))
    args.mistral_ks = tuple(int(k) for k in args.mistral_ks.split(","))
    args.seeds = tuple(int(s) for s in args.seeds.split(","))
    if args.smoke:
        args.n, args.ks, args.train, args.test, args.epochs, args.seeds = (
            SMOKE["n"], SMOKE["ks"], SMOKE["train"], SMOKE["test"], SMOKE["epochs"], SMOKE["seeds"])
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    return sizes(args, work) if args.part == "sizes" else held_out_ce(args, work)


if __name__ == "__main__":
    main()
