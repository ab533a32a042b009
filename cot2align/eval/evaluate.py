"""Evaluation (DESIGN §7): ROUGE-L of generations as the paper evaluates, and the held-out cross-entropy.

* ROUGE-L F-measure from `rouge-score` with the stemmer, the maximum over an example's references, × 100.
  `generate` is batched: prompts are sorted by length, left-padded, and decoded greedily or by sampling
  (temperature 1.0, top-k 0, top-p 1.0 in the paper's protocol) under a fixed seed.
* Cross-entropy (`reference_cross_entropy`): the teacher-forced negative log-likelihood of every reference
  response given its prompt, in nats per response token of the model's own tokenisation and in bits per
  UTF-8 byte of the reference text (comparable across tokenizers). No sampling, so no seed noise: the
  low-noise signal for comparing distillation methods on small budgets.
"""

from __future__ import annotations

import math
import os

import torch


def rouge_l(prediction: str, references: list[str]) -> float:
    """max over references of ROUGE-L F (stemmed), × 100."""
    scorer = _scorer()
    return 100.0 * max(scorer.score(ref, prediction)["rougeL"].fmeasure for ref in references)


_SCORER = None


def _scorer():
    global _SCORER
    if _SCORER is None:
        from rouge_score import rouge_scorer

        _SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return _SCORER


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 128, greedy: bool = True, seed: int = 0,
             batch_size: int = 16, max_prompt_tokens: int | None = None, synced_gpus: bool = False) -> list[str]:
    """Continuations of `prompts` (texts after the prompt, special tokens removed), in the input order.

    synced_gpus: every rank of a sharded (FSDP) model calls this with the same prompts and keeps running
    forward passes until all ranks are done (a sharded forward is a collective)."""
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
    if max_prompt_tokens is not None:
        encoded = [ids[-max_prompt_tokens:] for ids in encoded]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    outputs: list[str] = [""] * len(prompts)
    was_training = model.training
    model.eval()
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            width = max(len(encoded[i]) for i in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            attention = torch.zeros(len(chunk), width, dtype=torch.long)
            for row, i in enumerate(chunk):
                ids[row, width - len(encoded[i]):] = torch.tensor(encoded[i])
                attention[row, width - len(encoded[i]):] = 1
            sampling = {"do_sample": False} if greedy else {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0}
            generated = model.generate(input_ids=ids.to(device), attention_mask=attention.to(device),
                                       max_new_tokens=max_new_tokens, pad_token_id=pad_id,
                                       eos_token_id=tokenizer.eos_token_id, synced_gpus=synced_gpus, **sampling)
            for row, i in enumerate(chunk):
                outputs[i] = tokenizer.decode(generated[row, width:], skip_special_tokens=True).strip()
    finally:
        torch.random.set_rng_state(generator_state)
        model.train(was_training)
    return outputs


def response_sequence(tokenizer, prompt: str, reference: str, max_prompt_tokens: int | None,
                      max_length: int) -> tuple[list[int], int, int]:
    """(ids, prompt_len, n_bytes) of one (prompt, reference) pair, tokenised as the trainer does.

    ids = tokens(prompt, the tokenizer's BOS if it adds one) + tokens(reference) + [EOS]; the prompt is cut from
    the left to max_prompt_tokens (as `generate` does) and further if the pair exceeds max_length; a reference
    that alone exceeds max_length keeps its beginning, and n_bytes counts the bytes of what was kept.
    """
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    if max_prompt_tokens is not None:
        prompt_ids = prompt_ids[-max_prompt_tokens:]
    response_ids = tokenizer(reference, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    n_bytes = len(reference.encode("utf-8"))
    if len(response_ids) > max_length - 1:     # keep at least one prompt token to predict the first response token
        response_ids = response_ids[:max_length - 1]
        n_bytes = len(tokenizer.decode(response_ids, skip_special_tokens=True).encode("utf-8"))
    prompt_ids = prompt_ids[-(max_length - len(response_ids)):]
    return prompt_ids + response_ids, len(prompt_ids), n_bytes


def model_max_length(model, default: int = 2048) -> int:
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return default


@torch.no_grad()
def reference_cross_entropy(model, tokenizer, prompts: list[str], references: list[list[str]],
                            max_prompt_tokens: int | None = None, max_length: int | None = None,
                            batch_tokens: int = 8192) -> dict:
    """Teacher-forced cross-entropy of the reference responses under `model` (DESIGN §7, `--metric ce`).

    Every (prompt, reference) pair counts (a test set with 3 references per dialogue scores all 3). With
    ℓ_t = −log p(y_t | prompt, y_<t) over the response tokens of the model's own tokenisation, EOS included:

        nats_per_token = Σ ℓ_t / #tokens          bits_per_byte = Σ ℓ_t / ln 2 / #UTF-8 bytes of the references

    Batches are length-sorted and right-padded to about `batch_tokens` tokens; the log-softmax is taken in
    float32 over the response positions only.
    """
    device = next(model.parameters()).device
    max_length = max_length or model_max_length(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pairs = [response_sequence(tokenizer, prompt, ref, max_prompt_tokens, max_length)
             for prompt, refs in zip(prompts, references) for ref in refs]
    order = sorted(range(len(pairs)), key=lambda k: len(pairs[k][0]))
    total_nats, total_tokens, total_bytes = 0.0, 0, 0
    was_training = model.training
    model.eval()
    try:
        start = 0
        while start < len(order):
            # as many pairs as fit in batch_tokens at the (sorted) longest length, at least one
            end = start + 1
            while end < len(order) and (end - start + 1) * len(pairs[order[end]][0]) <= batch_tokens:
                end += 1
            chunk = [pairs[k] for k in order[start:end]]
            width = max(len(ids) for ids, _, _ in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            attention = torch.zeros((len(chunk), width), dtype=torch.long)
            response = torch.zeros((len(chunk), width), dtype=torch.bool)
            for row, (seq, prompt_len, n_bytes) in enumerate(chunk):
                ids[row, :len(seq)] = torch.tensor(seq)
                attention[row, :len(seq)] = 1
                response[row, prompt_len - 1:len(seq) - 1] = True     # positions whose next token is a response token
                total_bytes += n_bytes
            ids, attention, response = ids.to(device), attention.to(device), response.to(device)
            logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits
            targets = ids[:, 1:][response[:, :-1]]
            logprobs = torch.log_softmax(logits[:, :-1][response[:, :-1]].float(), dim=-1)
            total_nats += float(-logprobs.gather(-1, targets[:, None]).sum())
            total_tokens += int(targets.numel())
            start = end
    finally:
        model.train(was_training)
    return {"nats_per_token": total_nats / max(total_tokens, 1),
            "bits_per_byte": total_nats / math.log(2) / max(total_bytes, 1),
            "n_pairs": len(pairs), "n_tokens": total_tokens, "n_bytes": total_bytes}


METRICS = ("rougeL", "ce", "all")


def evaluate_model(model_path: str, data: str, split: str = "test", seeds: list[int] | None = None, greedy: bool = False,
                   out: str | None = None, limit: int | None = None, max_new_tokens: int = 512, max_prompt_tokens: int = 256,
                   batch_size: int = 16, data_root: str | None = None, device: str | None = None, metric: str = "rougeL",
                   log=print) -> dict:
    """Evaluate one model on a dataset split (DESIGN §7); results go to OUT/results.json (default
    MODEL/eval/<data>_<split>/), merged with what an earlier `evaluate` of another metric wrote there.

    metric "rougeL": the paper's protocol — sampling with temperature 1.0, top-k 0, top-p 1.0 for each seed
    (default 10, 20, 30, 40, 50), or greedy decoding once with greedy=True; per-run ROUGE-L, mean ± std,
    generations as JSONL. metric "ce": the held-out cross-entropy of the references (`reference_cross_entropy`,
    under key "ce"). "all": both.
    """
    import json
    import statistics
    from pathlib import Path

    from cot2align.config import ConfigError
    from cot2align.data import load_records
    from cot2align.data.readers import group_references
    from cot2align.data.templates import standard_prompt
    from cot2align.modeling import load_model, load_tokenizer

    if metric not in METRICS:
        raise ConfigError(f"metric: expected one of {', '.join(METRICS)}, got {metric!r}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    records, source = load_records(data, split, data_root)
    examples = group_references(records)[:limit] if limit else group_references(records)
    model = load_model(model_path, dtype=torch.bfloat16 if device.startswith("cuda") else torch.float32, device=device)
    tokenizer = load_tokenizer(model_path)
    prompts = [standard_prompt(r["instruction"], r.get("input", "")) for r in examples]
    out_dir = Path(out) if out else Path(model_path) / "eval" / f"{Path(str(data)).name.split('.')[0]}_{split}"
    out_dir.mkdir(parents=True, exist_ok=True)
    results_file = out_dir / "results.json"
    summary = json.loads(results_file.read_text()) if results_file.exists() else {}
    summary.update({"model": str(model_path), "data": data, "split": split, "n_examples": len(examples), "source": source})

    if metric in ("ce", "all"):
        ce = reference_cross_entropy(model, tokenizer, prompts, [r["references"] for r in examples], max_prompt_tokens)
        summary["ce"] = ce
        log(f"evaluate: cross-entropy {ce['nats_per_token']:.4f} nats/token, {ce['bits_per_byte']:.4f} bits/byte "
            f"over {ce['n_pairs']} references ({ce['n_tokens']} tokens)")

    if metric in ("rougeL", "all"):
        runs = [("greedy", None)] if greedy else [(f"seed-{s}", s) for s in (seeds or [10, 20, 30, 40, 50])]
        per_run = {}
        for name, seed in runs:
            predictions = generate(model, tokenizer, prompts, max_new_tokens, greedy=seed is None, seed=seed or 0,
                                   batch_size=batch_size, max_prompt_tokens=max_prompt_tokens)
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
