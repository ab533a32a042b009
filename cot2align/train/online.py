"""The teacher run online on a batch — what the cache replaces. Used to prove cache-fed = online and to
time the cached trainer against an online one (bench/distill_step.py).

The teacher sequence of a view is built from the same texts as the cache pass: tokens(prompt, special
tokens) + tokens(response) + [EOS] when the response was not cut; its rows are positions P−1 … L−2.
"""

from __future__ import annotations

import torch

from cot2align.losses.objective import TeacherView
from cot2align.losses.teacher import HeadTeacher


@torch.no_grad()
def online_teacher_view(model, tokenizer, prompts: list[str], responses: list[str], with_eos: list[bool], device,
                        store_dtype: torch.dtype | None = torch.bfloat16, compute_dtype: torch.dtype = torch.float32,
                        mined_rows: torch.Tensor | None = None, embed_stored: bool = False) -> TeacherView:
    """A TeacherView over the response rows of each example, straight from a teacher forward.

    store_dtype rounds the hidden states (and, with embed_stored, the embedding feature) the way the cache
    stores them (bf16), so the two paths can be compared at float32 tolerance; None keeps the forward's
    precision. A lookup embedding (embed_stored=False) is exact in the cache too (a row of the table).
    """
    sequences, prompt_lens = [], []
    for prompt, response, eos in zip(prompts, responses, with_eos):
        prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + ([tokenizer.eos_token_id] if eos else [])
        sequences.append(prompt_ids + response_ids)
        prompt_lens.append(len(prompt_ids))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    attention = torch.zeros_like(ids)
    for b, s in enumerate(sequences):
        ids[b, :len(s)] = torch.tensor(s)
        attention[b, :len(s)] = 1
    ids, attention = ids.to(device), attention.to(device)
    out = model(input_ids=ids, attention_mask=attention, output_hidden_states=True, use_cache=False)
    rows = max(len(s) - p for s, p in zip(sequences, prompt_lens))
    hidden_size = out.hidden_states[-1].shape[-1]
    hidden = torch.zeros(len(sequences), rows, hidden_size, device=device, dtype=compute_dtype)
    embed = torch.zeros_like(hidden)
    input_ids = torch.zeros(len(sequences), rows, dtype=torch.long, device=device)
    target_ids = torch.zeros_like(input_ids)
    mask = torch.zeros(len(sequences), rows, dtype=torch.bool, device=device)
    target_logprob = torch.zeros(len(sequences), rows, device=device)     # as the cache pass: exact, τ = 1, float32

    def rounded(x):
        return x.to(store_dtype).to(compute_dtype) if store_dtype is not None else x.to(compute_dtype)

    for b, (s, p) in enumerate(zip(sequences, prompt_lens)):
        n = len(s) - p
        positions = torch.arange(p - 1, len(s) - 1, device=device)
        hidden[b, :n] = rounded(out.hidden_states[-1][b, positions])
        embed[b, :n] = (rounded if embed_stored else (lambda x: x.to(compute_dtype)))(out.hidden_states[0][b, positions])
        input_ids[b, :n] = ids[b, positions]
        target_ids[b, :n] = ids[b, positions + 1]
        mask[b, :n] = True
        target_logprob[b, :n] = torch.log_softmax(out.logits[b, positions].float(), -1).gather(
            -1, ids[b, positions + 1, None]).squeeze(-1)
    lm_head = model.get_output_embeddings()
    bias = getattr(lm_head, "bias", None)
    dist = HeadTeacher(hidden, lm_head.weight.to(compute_dtype), None if bias is None else bias.to(compute_dtype))
    return TeacherView(input_ids=input_ids, target_ids=target_ids, hidden=hidden, embed=embed, mask=mask, dist=dist,
                       mined_rows=mined_rows, target_logprob=target_logprob)
