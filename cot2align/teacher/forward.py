"""One teacher forward over a padded batch, reduced on the device to what the cache stores.

Only the response rows leave the device: their last hidden state (as bf16 bits), the top-k
log-probs and ids, the log of the mass outside the top-k, and the exact log-probability of the token
that follows (ALM compares these). Full-vocabulary logits are built in row chunks on the device and
never copied to the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class HeadInfo:
    embed_kind: str       # "lookup": embedding feature = embed_tokens[ids]; "stored": per-row `embeds`
    exact_logits: bool    # logits == last_hidden @ lm_head.T (+ bias)


def input_device(model) -> torch.device:
    """Where a batch's token ids go: the device of the input embedding — for a model placed by accelerate
    (--device-map), the execution device its hook runs it on (offloaded weights sit on `meta` between uses)."""
    embed = model.get_input_embeddings()
    hook = getattr(embed, "_hf_hook", None)
    if getattr(hook, "execution_device", None) is not None:
        return torch.device(hook.execution_device)
    return embed.weight.device


def backbone(model):
    """The decoder stack without the LM head (its last_hidden_state is HF hidden_states[-1])."""
    return getattr(model, model.base_model_prefix)


@torch.inference_mode()
def probe_head(model, token_ids: list[int]) -> HeadInfo:
    """Find how this architecture's embedding feature and logits relate to the stored tensors."""
    ids = torch.tensor([token_ids], device=input_device(model))
    out = backbone(model)(input_ids=ids, output_hidden_states=True, use_cache=False)
    lookup = model.get_input_embeddings()(ids)
    embed_kind = "lookup" if torch.equal(out.hidden_states[0], lookup.to(out.hidden_states[0].device)) else "stored"
    logits = model(input_ids=ids, use_cache=False).logits.float()
    recomputed = model.get_output_embeddings()(out.last_hidden_state).float().to(logits.device)
    exact = torch.allclose(logits, recomputed, rtol=0, atol=1e-4 * max(1.0, logits.abs().max().item()))
    return HeadInfo(embed_kind=embed_kind, exact_logits=bool(exact))


def response_row_index(prompt_lens: list[int], seq_lens: list[int], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch index, position) of every stored row: t = P-1 .. L-2 of each sequence, in order."""
    b_idx, t_idx = [], []
    for b, (p, n) in enumerate(zip(prompt_lens, seq_lens)):
        b_idx.extend([b] * (n - p))
        t_idx.extend(range(p - 1, n - 1))
    return (torch.tensor(b_idx, dtype=torch.long, device=device), torch.tensor(t_idx, dtype=torch.long, device=device))


def topk_with_tail(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k of log_softmax(logits) and log(mass outside the top-k), in float32.

    The tail is a log-sum-exp over the non-top-k entries (exact even when it is tiny), not
    log(1 - sum(top-k probs)), which loses everything below float32 rounding of 1.
    """
    top_logp, top_ids, tail, _ = row_distribution(logits, k)
    return top_logp, top_ids, tail


def row_distribution(logits: torch.Tensor, k: int, targets: torch.Tensor | None = None):
    """(top-k log-probs, their ids, tail log-mass, log-prob of `targets` or None) of log_softmax(logits) at
    temperature 1, in float32 — one log-softmax for all four. The target's log-prob is exact (float32), whether or
    not the token is in the top-k."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    top_logp, top_ids = logp.topk(min(k, logp.shape[-1]), dim=-1)
    target = None if targets is None else logp.gather(-1, targets.to(logp.device).long()[..., None]).squeeze(-1)
    tail = logp.scatter(-1, top_ids, float("-inf")).logsumexp(-1)
    return top_logp, top_ids, tail, target


@torch.inference_mode()
def teacher_batch(model, info: HeadInfo, sequences: list[list[int]], prompt_lens: list[int], topk: int,
                  hidden_dtype: str = "bf16", pad_id: int = 0, logit_chunk_rows: int = 2048,
                  keep_hidden: bool = True) -> dict[str, torch.Tensor]:
    """Run the teacher on right-padded `sequences`; return the stored-row tensors (on the device; a model placed
    over several devices by accelerate leaves the ids on its input device and the rest where its head ran).

    Keys: input_ids, target_ids [R] int32; hidden [R, D] (bf16 bits as int16, or int8 plus
    hidden_scale [R] float16); topk_ids [R, k] int64; topk_logprobs [R, k] float16;
    tail_logprob [R] float32; target_logprob [R] float32 (log-softmax at τ = 1 gathered at target_ids);
    embeds [R, D] (bf16 bits) when info.embed_kind == "stored". Without `keep_hidden` (a `--store logits`
    cache) neither hidden, hidden_scale nor embeds.
    """
    device = input_device(model)
    seq_lens = [len(s) for s in sequences]
    longest = max(seq_lens)
    ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for b, s in enumerate(sequences):
        ids[b, : len(s)] = torch.tensor(s)
        mask[b, : len(s)] = 1
    ids, mask = ids.to(device, non_blocking=True), mask.to(device, non_blocking=True)
    b_idx, t_idx = response_row_index(prompt_lens, seq_lens, device)

    want_embeds = info.embed_kind == "stored" and keep_hidden
    out = backbone(model)(input_ids=ids, attention_mask=mask, output_hidden_states=want_embeds, use_cache=False)
    last = out.last_hidden_state                                      # on the device of the final norm
    hidden = last[b_idx.to(last.device), t_idx.to(last.device)]      # [R, D] post final norm
    if info.exact_logits:
        head = model.get_output_embeddings()
        logits_of = lambda rows: head(hidden[rows])                   # noqa: E731
    else:  # soft-capped or scaled heads: use the model's own logits at the stored rows
        full = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        logits_of = lambda rows: full[b_idx[rows].to(full.device), t_idx[rows].to(full.device)]   # noqa: E731

    targets = ids[b_idx, t_idx + 1]
    parts_lp, parts_ids, parts_tail, parts_target = [], [], [], []
    for start in range(0, hidden.shape[0], logit_chunk_rows):
        rows = slice(start, start + logit_chunk_rows)
        lp, tid, tail, target = row_distribution(logits_of(rows), topk, targets[rows])
        parts_lp.append(lp.to(torch.float16))
        parts_ids.append(tid)
        parts_tail.append(tail)
        parts_target.append(target)
    result = {
        "input_ids": ids[b_idx, t_idx].to(torch.int32),
        "target_ids": targets.to(torch.int32),
        "topk_logprobs": torch.cat(parts_lp) if parts_lp else hidden.new_zeros((0, topk), dtype=torch.float16),
        "topk_ids": torch.cat(parts_ids) if parts_ids else torch.zeros((0, topk), dtype=torch.long, device=device),
        "tail_logprob": torch.cat(parts_tail) if parts_tail else hidden.new_zeros((0,), dtype=torch.float32),
        "target_logprob": torch.cat(parts_target) if parts_target else hidden.new_zeros((0,), dtype=torch.float32),
    }
    if not keep_hidden:
        return result
    if hidden_dtype == "bf16":
        result["hidden"] = hidden.to(torch.bfloat16).view(torch.int16)
    else:  # symmetric per-row absmax int8
        h32 = hidden.float()
        scale = (h32.abs().amax(dim=-1) / 127.0).clamp_min(1e-6).to(torch.float16).float()
        result["hidden"] = torch.round(h32 / scale[:, None]).clamp(-127, 127).to(torch.int8)
        result["hidden_scale"] = scale.to(torch.float16)
    if want_embeds:
        first = out.hidden_states[0]
        result["embeds"] = first[b_idx.to(first.device), t_idx.to(first.device)].to(torch.bfloat16).view(torch.int16)
    return result
