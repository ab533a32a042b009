"""`cot2align evaluate`: one model on one dataset split, with the paper's protocol and/or the held-out CE."""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

import torch

from cot2align.config import ConfigError, data_name, safe_name
from cot2align.data import group_references, load_records, standard_prompt
from cot2align.eval.generation import generate
from cot2align.eval.metrics import reference_cross_entropy, rouge_l
from cot2align.logs import reporter
from cot2align.modeling import load_model, load_tokenizer

METRICS = ("rougeL", "ce", "all")


def default_eval_dir(model_path: str, data: str, split: str) -> Path:
    """MODEL/eval/<data>_<split>: one directory below the model's, whatever the --data text holds."""
    return Path(model_path) / "eval" / f"{data_name(data)}_{safe_name(split, 'split')}"


def evaluate_model(model_path: str, data: str, split: str = "test", seeds: list[int] | None = None, greedy: bool = False,
                   out: str | None = None, limit: int | None = None, max_new_tokens: int = 512, max_prompt_tokens: int = 256,
                   batch_size: int = 16, data_root: str | None = None, device: str | None = None, metric: str = "rougeL",
                   log=None, *, data_config: str | None = None, data_split: str | None = None,
                   field_map: dict | None = None) -> dict:
    """Evaluate one model on a dataset split (DESIGN §7); results go to OUT/results.json (default
    MODEL/eval/<data>_<split>/), merged with what an earlier `evaluate` of another metric wrote there.

    metric "rougeL": the paper's protocol — sampling with temperature 1.0, top-k 0, top-p 1.0 for each seed
    (default 10, 20, 30, 40, 50), or greedy decoding once with greedy=True; per-run ROUGE-L, mean ± std,
    generations as JSONL. metric "ce": the held-out cross-entropy of the references (`reference_cross_entropy`,
    under key "ce"). "all": both. Progress bars (examples/s, tokens/s) on a terminal; messages to the
    `cot2align.eval.evaluate` logger, or to `log` when given.
    """
    log = reporter(log, __name__)
    if metric not in METRICS:
        raise ConfigError(f"metric: expected one of {', '.join(METRICS)}, got {metric!r}")
    for name, value in (("limit", limit), ("max_new_tokens", max_new_tokens), ("batch_size", batch_size)):
        if value is not None and (isinstance(value, bool) or value < 1):
            raise ConfigError(f"{name}: expected a positive integer, got {value}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    records, source = load_records(data, split, data_root, field_map, data_config=data_config, data_split=data_split)
    examples = group_references(records)[:limit] if limit else group_references(records)
    model = load_model(model_path, dtype=torch.bfloat16 if device.startswith("cuda") else torch.float32, device=device)
    tokenizer = load_tokenizer(model_path)
    prompts = [standard_prompt(r["instruction"], r.get("input", "")) for r in examples]
    out_dir = Path(out) if out else default_eval_dir(model_path, data, split)
    out_dir.mkdir(parents=True, exist_ok=True)
    results_file = out_dir / "results.json"
    summary = json.loads(results_file.read_text()) if results_file.exists() else {}
    summary.update({"model": str(model_path), "data": data if isinstance(data, str) else source.get("dataset", str(data)),
                    "split": split, "n_examples": len(examples), "source": source})

    if metric in ("ce", "all"):
        ce = reference_cross_entropy(model, tokenizer, prompts, [r["references"] for r in examples], max_prompt_tokens,
                                     progress="evaluate ce")
        summary["ce"] = ce
        log(f"evaluate: cross-entropy {ce['nats_per_token']:.4f} nats/token, {ce['bits_per_byte']:.4f} bits/byte "
            f"over {ce['n_pairs']} references ({ce['n_tokens']} tokens)")

    if metric in ("rougeL", "all"):
        # the seed names a generations file: an integer, whatever an API caller passes
        runs = [("greedy", None)] if greedy else [(f"seed-{int(s)}", int(s)) for s in (seeds or [10, 20, 30, 40, 50])]
        per_run = {}
        for name, seed in runs:
            predictions = generate(model, tokenizer, prompts, max_new_tokens, greedy=seed is None, seed=seed or 0,
                                   batch_size=batch_size, max_prompt_tokens=max_prompt_tokens, progress=f"evaluate {name}")
            scores = [rouge_l(p, r["references"]) for p, r in zip(predictions, examples)]
            per_run[name] = sum(scores) / max(len(scores), 1)
            with (out_dir / f"{name}.jsonl").open("w", encoding="utf-8") as f:
                for r, p, s in zip(examples, predictions, scores):
                    f.write(json.dumps({"id": r["id"], "prediction": p, "references": r["references"], "rougeL": s},
                                       ensure_ascii=False) + "\n")
            log(f"evaluate: {name}: ROUGE-L {per_run[name]:.2f}")
        values = list(per_run.values())
        summary.update({"decoding": "greedy" if greedy else "sampling T=1.0 top-k 0 top-p 1.0", "per_run": per_run,
                        "mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0})
        log(f"evaluate: ROUGE-L {summary['mean']:.2f} ± {summary['std']:.2f} over {len(values)} run(s) -> {out_dir}")
    tmp = results_file.with_name(f".results.{os.getpid()}.json")
    tmp.write_text(json.dumps(summary, indent=1))
    tmp.replace(results_file)
    return summary
