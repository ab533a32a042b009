"""Generation and ROUGE-L as the paper evaluates (DESIGN §7): ROUGE-L F-measure from `rouge-score` with the
stemmer, the maximum over an example's references, × 100.

`generate` is batched: prompts are sorted by length, left-padded, and decoded greedily or by sampling
(temperature 1.0, top-k 0, top-p 1.0 in the paper's protocol) under a fixed seed.
"""

from __future__ import annotations

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


def evaluate_model(model_path: str, data: str, split: str = "test", seeds: list[int] | None = None, greedy: bool = False,
                   out: str | None = None, limit: int | None = None, max_new_tokens: int = 512, max_prompt_tokens: int = 256,
                   batch_size: int = 16, data_root: str | None = None, device: str | None = None, log=print) -> dict:
    """The paper's protocol (DESIGN §7) on one model: per-seed ROUGE-L, mean ± std, generations as JSONL.

    Sampling with temperature 1.0, top-k 0, top-p 1.0 for each seed (default 10, 20, 30, 40, 50), or greedy
    decoding once with greedy=True. Results go to OUT/results.json (default MODEL/eval/<data>_<split>/).
    """
    import json
    import statistics
    from pathlib import Path

    from cot2align.data import load_records
    from cot2align.data.readers import group_references
    from cot2align.data.templates import standard_prompt
    from cot2align.modeling import load_model, load_tokenizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    records, source = load_records(data, split, data_root)
    examples = group_references(records)[:limit] if limit else group_references(records)
    model = load_model(model_path, dtype=torch.bfloat16 if device.startswith("cuda") else torch.float32, device=device)
    tokenizer = load_tokenizer(model_path)
    prompts = [standard_prompt(r["instruction"], r.get("input", "")) for r in examples]
    out_dir = Path(out) if out else Path(model_path) / "eval" / f"{Path(str(data)).name.split('.')[0]}_{split}"
    out_dir.mkdir(parents=True, exist_ok=True)
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
    summary = {"model": str(model_path), "data": data, "split": split, "n_examples": len(examples),
               "decoding": "greedy" if greedy else "sampling T=1.0 top-k 0 top-p 1.0", "per_run": per_run,
               "mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
               "source": source}
    (out_dir / "results.json").write_text(json.dumps(summary, indent=1))
    log(f"evaluate: ROUGE-L {summary['mean']:.2f} ± {summary['std']:.2f} over {len(values)} run(s) -> {out_dir}")
    return summary
