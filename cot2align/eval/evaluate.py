"""`cot2align evaluate`: one model on one dataset split, with the paper's protocol and/or the held-out CE."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import torch

from cot2align.config import ConfigError, data_name, safe_name
from cot2align.data import group_references, load_records
from cot2align.data.chat import resolve_prompt_format, use_chat_template, view_prompt
from cot2align.eval.generation import generate
from cot2align.eval.results import (RESULTS, examples_sha256, read_earlier, remove_leftovers,
                                      remove_stale_generations, results_to_extend, write_atomically)
from cot2align.eval.metrics import reference_cross_entropy, rouge_l
from cot2align.locks import writer_lock
from cot2align.logs import reporter
from cot2align.modeling import load_model, load_tokenizer, model_files_fingerprint

METRICS = ("rougeL", "ce", "all")


def default_eval_dir(model_path: str, data: str, split: str) -> Path:
    """MODEL/eval/<data>_<split>: one directory below the model's, whatever the --data text holds."""
    return Path(model_path) / "eval" / f"{data_name(data)}_{safe_name(split, 'split')}"


def evaluate_model(model_path: str, data: str, split: str = "test", seeds: list[int] | None = None, greedy: bool = False,
                   out: str | None = None, limit: int | None = None, max_new_tokens: int = 512, max_prompt_tokens: int = 256,
                   batch_size: int = 16, data_root: str | None = None, device: str | None = None, metric: str = "rougeL",
                   log=None, *, data_config: str | None = None, data_split: str | None = None,
                   field_map: dict | None = None, overwrite: bool = False, revision: str | None = None,
                   attn_implementation: str | None = None, prompt_format: str | None = None,
                   chat_template: str | None = None) -> dict:
    """Evaluate one model on a dataset split; results go to OUT/results.json (default
    MODEL/eval/<data>_<split>/), merged with what an earlier `evaluate` of another metric wrote there — only when
    that was the same model, data, split and limit (eval/results.py), else refused; `overwrite` replaces it.

    metric "rougeL": the paper's protocol — sampling with temperature 1.0, top-k 0, top-p 1.0 for each seed
    (default 10, 20, 30, 40, 50), or greedy decoding once with greedy=True; per-run ROUGE-L, mean ± std,
    generations as JSONL. metric "ce": the held-out cross-entropy of the references (`reference_cross_entropy`,
    under key "ce"). "all": both. Progress bars (examples/s, tokens/s) on a terminal; messages to the
    `cot2align.eval.evaluate` logger, or to `log` when given.

    prompt_format: paper (the paper's template) or chat (the model's own chat template, or the Jinja file
    `chat_template`; generation stops at its end-of-turn token); default chat for conversational data, else paper.
    """
    log = reporter(log, __name__)
    _check_arguments(metric, limit, max_new_tokens, batch_size)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    records, source = load_records(data, split, data_root, field_map, data_config=data_config, data_split=data_split)
    examples = group_references(records)[:limit] if limit else group_references(records)
    prompt_format = resolve_prompt_format(prompt_format, records)
    tokenizer = load_tokenizer(model_path, revision=revision)
    if prompt_format == "chat":      # the model's own template; its end-of-turn token ends an answer
        use_chat_template(tokenizer, chat_template, model_path)
    out_dir = Path(out) if out else default_eval_dir(model_path, data, split)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir}: is a file; expected a directory (for results.json and the generations)")
    current = {"model": str(model_path), "data": data if isinstance(data, str) else source.get("dataset", str(data)),
               "split": split, "n_examples": len(examples), "source": source,
               "model_fingerprint": model_files_fingerprint(str(model_path)), "examples_sha256": examples_sha256(examples),
               **({"revision": revision} if revision is not None else {}),
               **({"prompt_format": "chat"} if prompt_format == "chat" else {})}
    # one writer per --out (locks.py): two evaluations at once would interleave one results.json
    with writer_lock(out_dir, ConfigError, f"--out {out_dir}", log=log):
        out_dir.mkdir(parents=True, exist_ok=True)
        if remove_leftovers(out_dir):
            log(f"--out {out_dir}: removed the half-written files of a killed evaluate")
        earlier = read_earlier(out_dir)
        summary = {**results_to_extend(out_dir, current, overwrite), **current}     # refused before any work
        model = load_model(model_path, dtype=torch.bfloat16 if device.startswith("cuda") else torch.float32, device=device,
                           revision=revision, attn_implementation=attn_implementation)
        prompts = [view_prompt(tokenizer, r, "std", prompt_format) for r in examples]
        if metric in ("ce", "all"):
            ce = reference_cross_entropy(model, tokenizer, prompts, [r["references"] for r in examples],
                                         max_prompt_tokens, progress="evaluate ce")
            summary["ce"] = ce
            log(f"evaluate: cross-entropy {ce['nats_per_token']:.4f} nats/token, {ce['bits_per_byte']:.4f} bits/byte "
                f"over {ce['n_pairs']} references ({ce['n_tokens']} tokens)")
        if metric in ("rougeL", "all"):
            # the seed names a generations file: an integer, whatever an API caller passes
            runs = [("greedy", None)] if greedy else [(f"seed-{int(s)}", int(s)) for s in (seeds or [10, 20, 30, 40, 50])]
            summary.update(_rouge(model, tokenizer, prompts, examples, runs, out_dir, log,
                                  max_new_tokens=max_new_tokens, batch_size=batch_size, max_prompt_tokens=max_prompt_tokens))
        write_atomically(out_dir / RESULTS, json.dumps(summary, indent=1))
        remove_stale_generations(out_dir, earlier, summary)
    return summary


def _check_arguments(metric: str, limit, max_new_tokens, batch_size) -> None:
    if metric not in METRICS:
        raise ConfigError(f"metric: expected one of {', '.join(METRICS)}, got {metric!r}")
    for name, value in (("limit", limit), ("max_new_tokens", max_new_tokens), ("batch_size", batch_size)):
        if value is not None and (isinstance(value, bool) or value < 1):
            raise ConfigError(f"{name}: expected a positive integer, got {value}")


def _rouge(model, tokenizer, prompts: list[str], examples: list[dict], runs: list[tuple], out_dir: Path, log,
           **decoding) -> dict:
    """The paper's protocol: one decoding per run (a seed, or greedy), its generations in OUT/<run>.jsonl, and
    ROUGE-L per run, mean ± std over the runs."""
    per_run = {}
    for name, seed in runs:
        predictions = generate(model, tokenizer, prompts, greedy=seed is None, seed=seed or 0, progress=f"evaluate {name}",
                               **decoding)
        scores = [rouge_l(p, r["references"]) for p, r in zip(predictions, examples)]
        per_run[name] = sum(scores) / max(len(scores), 1)
        write_atomically(out_dir / f"{name}.jsonl", "".join(
            json.dumps({"id": r["id"], "prediction": p, "references": r["references"], "rougeL": s}, ensure_ascii=False)
            + "\n" for r, p, s in zip(examples, predictions, scores)))
        log(f"evaluate: {name}: ROUGE-L {per_run[name]:.2f}")
    values = list(per_run.values())
    result = {"decoding": "greedy" if runs[0][1] is None else "sampling T=1.0 top-k 0 top-p 1.0", "per_run": per_run,
              "mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}
    log(f"evaluate: ROUGE-L {result['mean']:.2f} ± {result['std']:.2f} over {len(values)} run(s) -> {out_dir}")
    return result
