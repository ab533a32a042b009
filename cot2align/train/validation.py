"""Validation during `distill`: which records, what is measured, and which epoch counts as the best."""

from __future__ import annotations

import numpy as np

from cot2align.config import DistillConfig
from cot2align.data import DataError, group_references, load_records
from cot2align.data.chat import render_prompt, view_prompt
from cot2align.data.readers import DATASETS
from cot2align.eval import generate, reference_cross_entropy, rouge_l


def validation_records(cfg: DistillConfig, cache, held_out: list[int], tokenizer=None) -> list[dict]:
    """[{prompt, references}] — the dev split of the cache's dataset when available, else held-out cached examples;
    the prompts in the run's --prompt-format (chat: the student's `tokenizer`'s template)."""
    prompt_format = cfg.prompt_format or "paper"
    source = cfg.val_data if cfg.val_data is not None else (
        cache.manifest["data"].get("name") if cache is not None else cfg.data)
    if source is not None and cfg.val_data is None and not (isinstance(source, str) and source in DATASETS
                                                            or source == "sample"):
        source = None        # a plain file has no dev split: hold out cached examples instead
    if source is not None:
        try:
            records, _ = load_records(source, "dev", cfg.data_root, cfg.field_map or None, data_config=cfg.data_config)
            grouped = group_references(records)
            return [{"prompt": view_prompt(tokenizer, r, "std", prompt_format), "references": r["references"]}
                    for r in grouped[:cfg.val_examples]]
        except (DataError, KeyError, ValueError):
            if cfg.val_data:
                raise
    if cache is None or not held_out:
        return []
    texts = cache.texts()
    prompts = (texts["prompt_std"] if prompt_format != "chat"
               else {i: render_prompt(tokenizer, cache.messages("std")[i]) for i in held_out})
    return [{"prompt": prompts[i], "references": [texts["response_std"][i]]} for i in held_out]


def split_validation(cfg: DistillConfig, cache, indices: list[int], tokenizer=None) -> tuple[list[int], list[dict]]:
    """(training indices, validation records): without a dev split, the last tenth of the examples (at most
    val_examples) is held out for validation."""
    records = validation_records(cfg, cache, [], tokenizer)
    if records or len(indices) <= 10 or cfg.val_examples <= 0:     # --val-examples 0: no validation at all
        return indices, records
    held_out = indices[len(indices) - min(cfg.val_examples, max(1, len(indices) // 10)):]
    return indices[:len(indices) - len(held_out)], validation_records(cfg, cache, held_out, tokenizer)


def validate(model, tokenizer, records: list[dict], cfg: DistillConfig, synced_gpus: bool = False) -> dict:
    """val_ce / val_bits_per_byte: the held-out cross-entropy of every reference (eval.reference_cross_entropy,
    the low-noise signal); val_rougeL: greedy ROUGE-L of the same prompts (the paper's model selection)."""
    if not records:
        return {}
    prompts = [r["prompt"] for r in records]
    ce = reference_cross_entropy(model, tokenizer, prompts, [r["references"] for r in records], max_length=cfg.max_length)
    predictions = generate(model, tokenizer, prompts, cfg.val_max_new_tokens, greedy=True, seed=cfg.seed,
                           synced_gpus=synced_gpus)
    model.train()
    scores = [rouge_l(p, r["references"]) for p, r in zip(predictions, records)]
    return {"val_ce": ce["nats_per_token"], "val_bits_per_byte": ce["bits_per_byte"],
            "val_rougeL": float(np.mean(scores))}


def is_better(rouge: float | None, val_loss: float | None, state: dict, select_by: str = "rougeL") -> bool:
    """Does this epoch beat the best so far (`--select-by`)?

    rougeL (the paper's rule): higher validation ROUGE-L wins; a tie (e.g. 0 at every epoch of a student that
    cannot yet write a summary) goes to the lower validation cross-entropy (val_loss). On a small validation set
    greedy ROUGE-L is mostly noise: an early, worse model can win by one lucky summary.
    ce: the lower validation cross-entropy wins. last: every epoch replaces the previous one (a fixed budget).
    Without any validation the latest epoch counts as the best."""
    if select_by == "last" or state["best_epoch"] is None or (rouge is None and val_loss is None):
        return True
    best_rouge, best_loss = state["best_rougeL"], state.get("best_val_loss")
    if select_by == "rougeL" and rouge is not None and best_rouge is not None and rouge != best_rouge:
        return rouge > best_rouge
    return val_loss is not None and (best_loss is None or val_loss < best_loss)
