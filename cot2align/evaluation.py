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
             batch_size: int = 16, max_prompt_tokens: int | None = None) -> list[str]:
    """Continuations of `prompts` (texts after the prompt, special tokens removed), in the input order."""
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
            sampling = {} if greedy else {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0}
            generated = model.generate(input_ids=ids.to(device), attention_mask=attention.to(device),
                                       max_new_tokens=max_new_tokens, do_sample=not greedy, pad_token_id=pad_id,
                                       eos_token_id=tokenizer.eos_token_id, **sampling)
            for row, i in enumerate(chunk):
                outputs[i] = tokenizer.decode(generated[row, width:], skip_special_tokens=True).strip()
    finally:
        torch.random.set_rng_state(generator_state)
        model.train(was_training)
    return outputs
