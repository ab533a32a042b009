"""Batched generation with left padding — the one helper `evaluate`, validation and `augment-cot` share.

Prompts of a batch are left-padded so every continuation starts at the same column; decoding is greedy, or
sampling with top-k 0 and top-p 1.0 at a given temperature (the paper's protocol: temperature 1.0).
"""

from __future__ import annotations

import torch

from cot2align.logs import progress_bar


def left_padded(encoded: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) [B, width] with each sequence right-aligned."""
    width = max(len(ids) for ids in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, seq in enumerate(encoded):
        ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
        attention[row, width - len(seq):] = 1
    return ids, attention


@torch.no_grad()
def generate_batch(model, tokenizer, encoded: list[list[int]], max_new_tokens: int, greedy: bool,
                   temperature: float = 1.0, synced_gpus: bool = False) -> list[list[int]]:
    """The new token ids of each prompt of one batch (EOS and what follows it included, as generated)."""
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids, attention = left_padded(encoded, pad_id)
    sampling = {"do_sample": False} if greedy else {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
    out = model.generate(input_ids=ids.to(device), attention_mask=attention.to(device), max_new_tokens=max_new_tokens,
                         pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id, synced_gpus=synced_gpus, **sampling)
    return out[:, ids.shape[1]:].tolist()


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 128, greedy: bool = True, seed: int = 0,
             batch_size: int = 16, max_prompt_tokens: int | None = None, synced_gpus: bool = False,
             progress: str | None = None) -> list[str]:
    """Continuations of `prompts` (texts after the prompt, special tokens removed), in the input order.

    Prompts are sorted by length into batches; the global RNG is seeded for the call and restored after.
    synced_gpus: every rank of a sharded (FSDP) model calls this with the same prompts and keeps running
    forward passes until all ranks are done (a sharded forward is a collective).
    progress: the description of a progress bar (examples/s, generated tokens/s, ETA; on a terminal), or None.
    """
    encoded = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
    if max_prompt_tokens is not None:
        encoded = [ids[-max_prompt_tokens:] for ids in encoded]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    outputs: list[str] = [""] * len(prompts)
    was_training = model.training
    model.eval()
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    bar = progress_bar(len(prompts), progress or "", unit="example", enabled=progress is not None)
    tokens = 0
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            new = generate_batch(model, tokenizer, [encoded[i] for i in chunk], max_new_tokens, greedy,
                                 synced_gpus=synced_gpus)
            for i, ids in zip(chunk, new):
                outputs[i] = tokenizer.decode(ids, skip_special_tokens=True).strip()
                tokens += ids.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in ids else len(ids)
            bar.update(len(chunk))
            bar.set_postfix(tok_s=f"{tokens / max(bar.format_dict['elapsed'], 1e-9):.0f}", refresh=False)
    finally:
        bar.close()
        torch.random.set_rng_state(generator_state)
        model.train(was_training)
    return outputs
