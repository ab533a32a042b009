"""The evaluation metrics (README 'Evaluation protocol').

* `rouge_l`: ROUGE-L F-measure from `rouge-score` with the stemmer, the maximum over an example's references,
  × 100 — the paper's metric.
* `reference_cross_entropy`: the teacher-forced negative log-likelihood of every reference response given its
  prompt, in nats per response token of the model's own tokenisation and in bits per UTF-8 byte of the
  reference text (comparable across tokenizers). No sampling, so no seed noise: the low-noise signal for
  comparing distillation methods on small budgets.
"""

from __future__ import annotations

import math

import torch
from rouge_score import rouge_scorer

from cot2align.logs import progress_bar

_SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, references: list[str]) -> float:
    """max over references of ROUGE-L F (stemmed), × 100."""
    return 100.0 * max(_SCORER.score(ref, prediction)["rougeL"].fmeasure for ref in references)


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
                            batch_tokens: int = 8192, progress: str | None = None) -> dict:
    """Teacher-forced cross-entropy of the reference responses under `model` (README 'Evaluation protocol', `--metric ce`).

    Every (prompt, reference) pair counts (a test set with 3 references per dialogue scores all 3). With
    ℓ_t = −log p(y_t | prompt, y_<t) over the response tokens of the model's own tokenisation, EOS included:

        nats_per_token = Σ ℓ_t / #tokens          bits_per_byte = Σ ℓ_t / ln 2 / #UTF-8 bytes of the references

    Batches are length-sorted and right-padded to about `batch_tokens` tokens; the log-softmax is taken in
    float32 over the response positions only. `progress`: a progress bar's description (on a terminal), or None.
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
    bar = progress_bar(len(pairs), progress or "", unit="reference", enabled=progress is not None)
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
            bar.update(end - start)
            bar.set_postfix(tok_s=f"{total_tokens / max(bar.format_dict['elapsed'], 1e-9):.0f}", refresh=False)
            start = end
    finally:
        bar.close()
        model.train(was_training)
    return {"nats_per_token": total_nats / max(total_tokens, 1),
            "bits_per_byte": total_nats / math.log(2) / max(total_bytes, 1),
            "n_pairs": len(pairs), "n_tokens": total_tokens, "n_bytes": total_bytes}
