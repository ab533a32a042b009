"""From an opened cache to the objective's inputs: the public batch API the trainer itself uses.

In a notebook, or inside another training loop (TRL, an Accelerate loop):

    from cot2align.cache import open_cache
    from cot2align.losses.objective import build_projectors, distillation_loss
    from cot2align.modeling import load_model, load_tokenizer
    from cot2align.train.batches import cache_dataloader, load_heads, views

    cache = open_cache("quickstart/cache")
    student, tokenizer = load_model("tiny-gpt2"), load_tokenizer("tiny-gpt2")
    heads = load_heads(cache, student)
    loader = cache_dataloader(cache, tokenizer, method="dskd", cot2align=True, batch_size=4)
    students, teachers = views(next(iter(loader)), student, heads)
    projectors = build_projectors("dskd", True, student.config.hidden_size, cache.hidden_size)
    loss, parts = distillation_loss("dskd", 0.5, students, teachers, heads, projectors, cot2align=True)

`cache_dataloader` tokenises the cached texts for the student once (memoised, see train/data.py), reads only
the teacher arrays the method needs (methods.teacher_arrays), and yields length-bucketed, padded
batches; `views` runs the student on each view of a batch and moves the teacher's decoded rows to the device.
"""

from __future__ import annotations

import inspect

import torch

from cot2align.align.vocab import vocab_map as build_vocab_map
from cot2align.cache.profiles import default_teacher_dist, plan_reads, refusal
from cot2align.errors import ConfigError
from cot2align.losses.objective import Heads, StudentView, TeacherView
from cot2align.methods import method as registered
from cot2align.losses.teacher import HeadTeacher, TopKTeacher
from cot2align.modeling import tokenizer_hash
from cot2align.cache.format import prompt_format as cache_prompt_format
from cot2align.cache.reader import OpenedCache
from cot2align.data.chat import use_chat_template
from cot2align.train.data import DistillDataset, LengthBucketSampler, collate, tokenize_cache
from cot2align.train.sampling import SAMPLE_ORDERS, ChunkOrderedSampler


def load_heads(cache, student, student_tokenizer=None, device=None, dtype: torch.dtype | None = None,
               method: str | None = None) -> Heads:
    """Both models' embedding tables and LM heads: the student's own parameters (trained; peft-unwrapped) and
    the teacher's from the cache's head.safetensors (on `device`, in `dtype`). With `student_tokenizer`, also the
    vocabulary tables the registered `method` reads (methods.py; each built once per tokenizer pair and kept on
    disk): MinED's vocabulary map, and the method's own tables (`Method.vocab_tables`: GOLD's exact-match
    vocabulary, X-Token's projection)."""
    base = student.get_base_model() if hasattr(student, "get_base_model") else student
    device = device or base.get_input_embeddings().weight.device
    head = cache.head(device=device, dtype=dtype)
    heads = Heads(student_embed_tokens=base.get_input_embeddings().weight,
                  student_lm_head=base.get_output_embeddings().weight,
                  teacher_embed_tokens=head["embed_tokens"], teacher_lm_head=head["lm_head"],
                  teacher_lm_head_bias=head.get("lm_head_bias"))
    if student_tokenizer is not None and method is None:
        raise ValueError("load_heads: with a student tokenizer, pass method=... (the method whose vocabulary tables "
                         "to build: MinED's map, GOLD's exact-match vocabulary, X-Token's projection)")
    needs = registered(method) if student_tokenizer is not None else None
    if needs is not None and needs.vocab_map:
        vocab = build_vocab_map(cache.tokenizer(), student_tokenizer)
        heads.stu2tea = torch.from_numpy(vocab.stu2tea).to(device)
        heads.tea2stu = torch.from_numpy(vocab.tea2stu).to(device)
    if needs is not None:
        for name, table in needs.build_vocab_tables(cache.tokenizer(), student_tokenizer).items():
            heads.tables[name] = table.to(device) if isinstance(table, torch.Tensor) else table
    return heads


def cache_dataloader(cache, tokenizer, method: str = "dskd", cot2align: bool = True, batch_size: int = 8,
                     max_length: int = 512, teacher_dist: str | None = None, seed: int = 0, indices=None,
                     num_workers: int = 0, pin_memory: bool = False, rank: int = 0, world: int = 1,
                     log=None, transport: bool = True, prompt_format: str | None = None,
                     sample_order: str = "chunks") -> torch.utils.data.DataLoader:
    """Length-bucketed batches of cached examples (`indices`, default all) for `method` (± CoT2Align).

    `prompt_format` (default: the cache's): chat renders the cached turns in the student tokenizer's chat template
    and makes its EOS the template's end-of-turn token (data/chat.use_chat_template: the tokenizer is changed so).

    Each batch is {"index": [B], "std": {...}[, "cot": {...}]}: per view the student's input_ids and
    attention_mask [B, L], `positions` [K] (where some example has a response token), response_mask,
    target_ids and MinED's rows [B, K], and the teacher's decoded rows [B, M, ...] with their mask.
    `sample_order`: shuffled (batches drawn from the whole cache) or chunks (a stretch of cache neighbours at a
    time, which share chunks: train/sampling.py).
    `teacher_dist` None: exact when the cache stores hidden states, else topk (cache/profiles.py).
    """
    prompt_format = prompt_format or cache_prompt_format(cache.manifest)
    if prompt_format == "chat":
        use_chat_template(tokenizer, None, getattr(tokenizer, "name_or_path", None) or "the student")
    student_ids = tokenize_cache(cache, tokenizer, tokenizer_hash(tokenizer), max_length, registered(method).alignment,
                                 log=log, prompt_format=prompt_format)
    return dataloader(student_ids, ("std", "cot") if cot2align else ("std",),
                      range(len(cache)) if indices is None else indices, cache.opened(),
                      arrays_to_read(cache, method, cot2align, teacher_dist, transport), pad_id(tokenizer), batch_size, seed,
                      num_workers, pin_memory, rank, world, sample_order)


def arrays_to_read(cache, method: str, cot2align: bool, teacher_dist: str | None = None,
                   transport: bool = True) -> tuple[str, ...]:
    """The cached teacher arrays a run of `method` reads from this cache (methods.teacher_arrays, planned against
    what the cache stores by cache/profiles.py `plan_reads`); `teacher_dist` None: the cache's default (exact with
    hidden states, topk without); `transport` False: --ot-weight 0. The one place a run the cache cannot serve is
    refused, in one line naming the missing arrays and what would provide them: a `--store logits` cache under
    DSKD, CoT2Align's OT or the exact distribution (`--store full`), or a cache older than `target_logprob` under
    --teacher-dist topk (whose hidden states otherwise stand in for it: hidden · lm_headᵀ)."""
    teacher_dist = teacher_dist or default_teacher_dist(cache.manifest)
    why = refusal(cache.manifest, cache.url, method, cot2align, teacher_dist, transport)
    if why is not None:
        raise ConfigError(why)
    return plan_reads(cache.manifest, method, cot2align, teacher_dist, transport)[0]


def dataloader(student_ids: dict, views_used: tuple[str, ...], indices, cache: OpenedCache | None, arrays: tuple[str, ...],
               pad: int, batch_size: int, seed: int, num_workers: int = 0, pin_memory: bool = False, rank: int = 0,
               world: int = 1, sample_order: str = "chunks") -> torch.utils.data.DataLoader:
    """The DataLoader over tokenised examples (from a cache, or plain records for SFT without one), in
    `sample_order` (train/sampling.py: chunks, or shuffled)."""
    dataset = DistillDataset(student_ids, views_used, list(indices), cache, arrays)
    lengths = [dataset.length(k) for k in range(len(dataset))]
    if sample_order == "chunks":
        sampler = ChunkOrderedSampler(lengths, dataset.indices, batch_size, seed, rank, world)
    elif sample_order == "shuffled":
        sampler = LengthBucketSampler(lengths, batch_size, seed, rank, world)
    else:
        raise ValueError(f"sample_order: expected one of {', '.join(SAMPLE_ORDERS)}, got {sample_order!r}")
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=num_workers, pin_memory=pin_memory,
        collate_fn=lambda items: collate(items, views_used, pad), persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(seed), prefetch_factor=4 if num_workers else None)


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def views(batch: dict, model, heads: Heads | None = None, device=None, dtype: torch.dtype | None = None,
          need_hidden: bool = True) -> tuple[dict[str, StudentView], dict[str, TeacherView] | None]:
    """The student's forward on every view of `batch`, and the teacher's rows of each view (None without a
    teacher): the `student` and `teacher` arguments of `distillation_loss`."""
    device = device or next(model.parameters()).device
    dtype = dtype or (torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32)
    names = [v for v in ("std", "cot") if v in batch]
    students = {v: student_view(model, batch[v], device, need_hidden) for v in names}
    if heads is None or "teacher" not in batch[names[0]]:
        return students, None
    return students, {v: teacher_view(batch[v], heads, device, dtype) for v in names}


def student_view(model, batch_view: dict, device, need_hidden: bool) -> StudentView:
    """The student's forward on one view, kept at the batch's response positions (`positions`, see collate).

    Every loss reads response positions only, so the LM head runs there alone (the model's `logits_to_keep`):
    on prompt-heavy data such as DialogSum (~35 response tokens after a ~275-token prompt) that skips most of
    the [tokens x vocabulary] logits, their memory and their backward. Models without `logits_to_keep` compute
    every position and are cut afterwards (same values).
    """
    ids = batch_view["input_ids"].to(device, non_blocking=True)
    positions = batch_view["positions"].to(device, non_blocking=True)
    keep = {"logits_to_keep": positions} if _accepts_logits_to_keep(model) else {}
    out = model(input_ids=ids, attention_mask=batch_view["attention_mask"].to(device, non_blocking=True),
                output_hidden_states=need_hidden, use_cache=False, **keep)
    logits = out.logits if keep else out.logits[:, positions]
    embed, last = (out.hidden_states[0][:, positions], out.hidden_states[-1][:, positions]) if need_hidden else (None, None)
    return StudentView(logits=logits, embed=embed, last=last, input_ids=ids[:, positions],
                       target_ids=batch_view["target_ids"].to(device), mask=batch_view["response_mask"].to(device))


def _accepts_logits_to_keep(model) -> bool:
    """Does the causal LM inside the wrappers (DDP, peft) take `logits_to_keep` (transformers >= 4.50)?"""
    inner = getattr(model, "module", model)                  # DDP
    if hasattr(inner, "get_base_model"):                     # peft
        inner = inner.get_base_model()
    return "logits_to_keep" in inspect.signature(type(inner).forward).parameters


def teacher_view(batch_view: dict, heads: Heads, device, dtype: torch.dtype) -> TeacherView:
    """The cached teacher rows of one view on the device. The cache decoded them already (cache/reader.py);
    what is left is the device, the compute dtype, and which distribution the batch carries: the stored
    top-k + tail when it has them, else the exact logits recomputed from the hidden states (hidden · W_tᵀ)."""
    t = {name: value.to(device, non_blocking=True) for name, value in batch_view["teacher"].items()}
    hidden = t["hidden"].to(dtype) if "hidden" in t else None
    embed = t["embeds"].to(dtype) if "embeds" in t else heads.teacher_embed_tokens[t["input_ids"]].to(dtype)
    if "topk_ids" in t:
        dist = TopKTeacher(t["topk_logprobs"], t["topk_ids"], t["tail_logprob"], heads.teacher_lm_head.shape[0])
    else:
        dist = HeadTeacher(hidden, heads.teacher_lm_head, heads.teacher_lm_head_bias)
    aligned = {name: batch_view[name].to(device) for name in ("student_chunks", "teacher_chunks") if name in batch_view}
    logprob = t["target_logprob"].float() if "target_logprob" in t else None
    return TeacherView(input_ids=t["input_ids"], target_ids=t["target_ids"], hidden=hidden, embed=embed,
                       mask=t["mask"], dist=dist, mined_rows=batch_view["mined_rows"].to(device), target_logprob=logprob,
                       **aligned)
