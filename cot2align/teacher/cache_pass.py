"""`cot2align cache-teacher`: run the teacher once over both views and write the Zarr cache.

Read top to bottom:
1. load the records and the teacher tokenizer; build both views' token sequences (text truncation);
2. look at --out: complete cache of the same inputs -> nothing to do; unfinished one -> resume;
   anything else -> refuse (never overwrite);
3. load the teacher, create the store (texts, offsets, head weights, tokenizer) if new;
4. for every uncommitted block: length-sorted token-budget batches -> teacher forward on the
   device -> stored rows copied to the host -> a background thread writes the block and commits.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import transformers
from tqdm import tqdm

from cot2align.cache.block_writer import BlockWriter
from cot2align.cache.format import VIEWS, CacheError, hidden_chunk_rows, view_array_specs
from cot2align.cache.manifest import build_manifest, existing_cache, split_parts
from cot2align.cache.storage import Location
from cot2align.cache.writer import CacheWriter
from cot2align.config import CacheTeacherConfig, data_name, model_family
from cot2align.families import base_model_of
from cot2align.data.chat import resolve_prompt_format, template_sha256, use_chat_template
from cot2align.data.readers import load_records
from cot2align.logs import progress_disabled, reporter, silent
from cot2align.data.templates import load_templates
from cot2align.model_limits import check_teacher
from cot2align.modeling import (hub_commit, load_model, load_tokenizer, model_files_fingerprint, module_weights,
                                resolve_dtype, tokenizer_hash, weights_fingerprint)
from cot2align.teacher.batching import plan_batches, plan_blocks
from cot2align.teacher.forward import input_device, probe_head, teacher_batch
from cot2align.teacher.placement import placement
from cot2align.teacher.sequences import build_sequences
from cot2align.write_errors import io_failure, reported

HIDDEN_CODEC_AUTO = "zstd"  # chosen by bench/cache_pass.py, see BENCHMARKS.md


def default_out(cfg: CacheTeacherConfig) -> Path:
    return Path("cache") / f"{model_family(cfg.model)}_{data_name(cfg.data)}"


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _inputs_fingerprint(cfg: CacheTeacherConfig, data_source: dict, tok_hash: str, hidden_codec: str,
                        chat: dict | None = None) -> dict:
    """Everything that determines the cache contents, including a fingerprint of a local teacher's weight files
    (so a teacher changed at the same path is a different cache, found before loading it); the loaded weights
    are checked again after load."""
    files = {"model": model_files_fingerprint(cfg.model), "adapter": model_files_fingerprint(cfg.adapter)}
    return {
        "teacher": {"name_or_path": cfg.model, "adapter": cfg.adapter, "seed": cfg.seed,
                    **({"files": files} if any(files.values()) else {}),
                    **({"revision": cfg.revision} if cfg.revision is not None else {})},
        "tokenizer": tok_hash,
        "data": {"sha256": data_source["sha256"], "split": cfg.split, "limit": cfg.limit, "field_map": cfg.field_map},
        "templates": _sha(load_templates()),
        "settings": {"topk": cfg.topk, "max_length": cfg.max_length, "max_prompt_length": cfg.max_prompt_length,
                     "hidden_dtype": cfg.hidden_dtype, "hidden_codec": hidden_codec,
                     # only when not `full`: the caches written before --store existed keep their fingerprint
                     **({"store": cfg.store} if cfg.store != "full" else {})},
        # chat format only: a paper-format cache keeps the fingerprint it had before chat prompts existed
        **({"prompt": chat} if chat is not None else {}),
    }


@dataclass
class _Plan:
    """What the pass will store, computed from the inputs alone (no teacher weights yet)."""

    records: list
    source: dict
    tokenizer: object
    tok_hash: str
    hidden_codec: str
    fingerprint: dict
    prompt_format: str = "paper"                      # resolved: paper | chat (data/chat.py)
    sequences: list = field(default_factory=list)
    trunc: object = None
    offsets: dict = field(default_factory=dict)       # view -> int64 [n+1]
    prompt_len: dict = field(default_factory=dict)    # view -> int32 [n]


def cache_teacher(cfg: CacheTeacherConfig, log=None, model=None) -> dict:
    """Build (or resume, or confirm) the cache described by `cfg`; return a summary dict.

    Under torchrun / accelerate launch every rank runs this: the examples are split into contiguous parts of
    whole blocks, balanced by rows (from the data alone, never from timing); rank r writes part r and resumes
    it on its own; rank 0 creates the store first and completes it last. With --device-map each rank spreads
    its own teacher over its node's GPUs (teacher/placement.py): one rank per node, or the node's GPUs shared
    out between its ranks. `model` lets a caller (a benchmark, a notebook) pass the already-loaded teacher of
    `cfg.model`.
    """
    cfg.validate()
    rank, world, device, own_group = _distributed(cfg)
    say = reporter(log, __name__) if rank == 0 else silent
    location = Location(cfg.out or default_out(cfg))
    dtype = resolve_dtype(cfg.dtype, device)                            # --dtype; default bf16 on CUDA, fp32 on CPU
    try:
        # one writer per output: a second job on the same --out is refused at once (storage.Location.writer_lock)
        with location.writer_lock(CacheError, f"--out {location}", rank, say), placement(cfg) as placed:
            return _build(cfg, location, rank, world, device, dtype, say, model, placed)
    finally:
        if own_group:
            torch.distributed.destroy_process_group()


def _build(cfg: CacheTeacherConfig, location: Location, rank: int, world: int, device, dtype, say, model,
           placed: dict | None = None) -> dict:
    """The pass itself, under the writer lock; `dtype`: the teacher's compute dtype; `placed`: from_pretrained's
    device_map, max_memory and offload_folder under --device-map (None: the whole teacher on `device`)."""
    plan = _plan_inputs(cfg)                                        # 1. data, tokenizer, fingerprint
    _remove_leftovers(location, rank, say)
    existing = existing_cache(location, plan.fingerprint, world, say)   # 2. what is already at --out
    _check_dtype(existing, dtype, cfg.dtype is not None, location)
    if existing is not None and existing.get("status") == "complete":
        return {"out": location.url, "status": "complete", "skipped": True}
    t_start = time.perf_counter()
    check_teacher(cfg, plan.tokenizer, model)      # --max-length and the head fit the teacher: before anything is written
    _plan_sequences(cfg, plan)
    torch.manual_seed(cfg.seed)                                     # 3. the teacher and the store
    if model is None:
        model = load_model(cfg.model, dtype=dtype, device=device, seed=cfg.seed, adapter=cfg.adapter,
                           trust_remote_code=cfg.trust_remote_code, placement=placed)
    writer, info, specs = _open_store(cfg, location, plan, model, existing, dtype, rank, world)
    stats = _run_pass(cfg, writer, plan, model, info, specs, rank)  # 4. this rank's part
    stats["prepare_seconds"] = stats.get("prepare_seconds", 0.0) + stats.pop("started_at") - t_start
    with reported(CacheError, f"{location}: cannot mark the cache complete",
                  "every block is committed; rerun the same command to finish it"):
        stats = _complete(writer, stats, rank, world)               # 5. every part done: complete
    n = len(plan.sequences)
    say(f"{location}: {n} examples, {int(plan.offsets['std'][-1])} std rows, {int(plan.offsets['cot'][-1])} cot rows, "
        f"{stats['tokens_per_s']:.0f} teacher tokens/s" + (f" over {world} ranks" if world > 1 else ""))
    return {"out": location.url, "status": "complete", "skipped": False, "n_examples": n,
            "rows": {v: int(plan.offsets[v][-1]) for v in VIEWS}, "pass": stats}


def _remove_leftovers(location: Location, rank: int, say) -> None:
    """Half-written files of a killed run (the location knows what its kind leaves). Called under the writer lock:
    no other writer is at work here."""
    removed = location.remove_leftovers(rank)
    if removed:
        say(f"{location}: removed {len(removed)} half-written file(s) left by a killed run")


def _distributed(cfg: CacheTeacherConfig) -> tuple[int, int, torch.device, bool]:
    """(rank, world size, device, whether this call started the process group). The pass needs the group only
    for control (barriers, the ranks' pass statistics), so it is gloo whatever the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    own = world > 1 and not torch.distributed.is_initialized()
    if own:
        torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank() if world > 1 else 0
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and world > 1 and device.index is None and cfg.device_map is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    return rank, world, device, own


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def _complete(writer: CacheWriter, stats: dict, rank: int, world: int) -> dict:
    """Wait for every part; rank 0 sums the ranks' statistics (the slowest rank's seconds) and marks the cache
    complete — the last write of the pass."""
    every = [stats]
    if world > 1:
        every = [None] * world
        torch.distributed.all_gather_object(every, stats)
    total = dict(every[0])
    for key in ("tokens", "rows"):
        total[key] = sum(s[key] for s in every)
    for key in ("seconds", "forward_seconds", "write_seconds", "prepare_seconds"):
        total[key] = max(s[key] for s in every)
    for key, count in (("tokens_per_s", "tokens"), ("rows_per_s", "rows")):
        total[key] = total[count] / max(total["seconds"], 1e-9)
    total["examples_per_s"] = writer.manifest["data"]["n_examples"] / max(total["seconds"], 1e-9)
    total["ranks"] = world
    if rank == 0:
        writer.finalize({"pass": total})
    _barrier(world)
    return total


def _plan_inputs(cfg: CacheTeacherConfig) -> _Plan:
    records, source = load_records(cfg.data, cfg.split, cfg.data_root, cfg.field_map or None,
                                   data_config=cfg.data_config, data_split=cfg.data_split)
    if cfg.limit is not None:
        records = records[: cfg.limit]
        source = dict(source, sha256=_sha([source["sha256"], cfg.limit]))
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code, cfg.revision)
    prompt_format = resolve_prompt_format(cfg.prompt_format, records)
    chat = None
    if prompt_format == "chat":      # the teacher's own template; its end-of-turn token ends every response
        use_chat_template(tokenizer, cfg.chat_template, cfg.model)
        chat = {"format": "chat", "template_sha256": template_sha256(tokenizer), "end_of_turn": tokenizer.eos_token}
    tok_hash = tokenizer_hash(tokenizer)
    hidden_codec = HIDDEN_CODEC_AUTO if cfg.hidden_codec == "auto" else cfg.hidden_codec
    return _Plan(records, source, tokenizer, tok_hash, hidden_codec,
                 _inputs_fingerprint(cfg, source, tok_hash, hidden_codec, chat), prompt_format)


def _check_dtype(existing: dict | None, dtype: torch.dtype, asked: bool, location: Location) -> None:
    """An unfinished cache is resumed only in the dtype it was started with (its rows must not mix precisions);
    a complete one is not reported as done when --dtype asks for another precision than it holds."""
    if existing is None or existing.get("status") == "creating":
        return
    recorded, now = existing["teacher"].get("dtype"), str(dtype).replace("torch.", "")
    if recorded != now and (asked or existing.get("status") != "complete"):
        short = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(recorded, recorded)
        raise CacheError(f"{location}: the cache was computed with the teacher in {recorded}, this run would compute "
                         f"in {now}; pass --dtype {short} to continue it, or choose another --out")


def _plan_sequences(cfg: CacheTeacherConfig, plan: _Plan) -> None:
    """Both views' teacher token sequences (the text truncated once), their row offsets and prompt lengths."""
    plan.sequences, plan.trunc = build_sequences(plan.records, plan.tokenizer, cfg.max_length, cfg.max_prompt_length,
                                                 where=str(plan.source.get("path") or plan.source.get("hub")
                                                           or plan.source.get("dataset") or cfg.data),
                                                 prompt_format=plan.prompt_format)
    for view in VIEWS:
        rows = np.array([s.views[view].n_rows for s in plan.sequences], dtype=np.int64)
        plan.offsets[view] = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)
        plan.prompt_len[view] = np.array([s.views[view].prompt_len for s in plan.sequences], dtype=np.int32)


def _open_store(cfg: CacheTeacherConfig, location: Location, plan: _Plan, model, existing: dict | None, dtype,
                rank: int, world: int):
    """(writer, head probe, array specs): rank 0 creates the store — everything that does not depend on the
    teacher's outputs — while the other ranks wait; or every rank reopens the unfinished one (refused when the
    teacher's weights changed)."""
    weights = weights_fingerprint(model)
    info = probe_head(model, plan.sequences[0].views["std"].input_ids[:16])
    head_in, head_out = model.get_input_embeddings(), model.get_output_embeddings()
    hidden_size, vocab_size = head_out.weight.shape[1], head_out.weight.shape[0]
    if cfg.topk > vocab_size:      # checked before anything is written: such a cache could never be finished
        raise CacheError(f"--topk {cfg.topk}: expected at most the teacher's vocabulary size ({vocab_size})")
    specs = view_array_specs(hidden_size, cfg.topk, vocab_size, cfg.hidden_dtype, info.embed_kind == "stored",
                             plan.hidden_codec, profile=cfg.store)
    if existing is not None and existing.get("status") == "writing":
        if existing["fingerprint"]["weights"] != weights:
            raise CacheError(f"{location}: the teacher weights differ from those the cache was started with; "
                             "refusing to mix them — choose another --out")
        return CacheWriter.reopen(location), info, specs
    if rank == 0:
        block_max_rows = max(hidden_chunk_rows(hidden_size), (256 << 20) // (2 * hidden_size))
        rows_per_example = sum(plan.offsets[v][1:] - plan.offsets[v][:-1] for v in VIEWS)
        block_starts = plan_blocks(rows_per_example, cfg.block_examples, block_max_rows)
        parts = split_parts(block_starts, plan.offsets, world)
        manifest = build_manifest(**_describe_inputs(cfg, model, plan, weights, info, block_max_rows, dtype), specs=specs,
                                  topk=cfg.topk, hidden_dtype=cfg.hidden_dtype, hidden_codec=plan.hidden_codec,
                                  parts=parts, block_starts=block_starts, profile=cfg.store)
        with reported(CacheError, f"{location}: cannot create the cache",
                      "nothing of it is used yet; rerun the same command to create it again"):
            _create(location, manifest, plan, model, specs, head_in, head_out)
    _barrier(world)
    return CacheWriter.reopen(location), info, specs


def _create(location: Location, manifest: dict, plan: _Plan, model, specs: dict, head_in, head_out) -> CacheWriter:
    inputs, outputs = module_weights(head_in), module_weights(head_out)    # on the CPU, also when offloaded
    head = {"embed_tokens": inputs["weight"], "lm_head": outputs["weight"]}
    if outputs.get("bias") is not None:
        head["lm_head_bias"] = outputs["bias"]
    texts = {"id": [s.id for s in plan.sequences]}
    for view in VIEWS:
        texts[f"prompt_{view}"] = [s.views[view].prompt for s in plan.sequences]
        texts[f"response_{view}"] = [s.views[view].response for s in plan.sequences]
        if plan.prompt_format == "chat":     # the turns a student renders in its own template
            texts[f"messages_{view}"] = [json.dumps(s.views[view].messages, ensure_ascii=False)
                                         if s.views[view].messages is not None else "" for s in plan.sequences]
    with tempfile.TemporaryDirectory() as tmp:
        plan.tokenizer.save_pretrained(tmp)
        model.config.save_pretrained(tmp)
        return CacheWriter.create(location, manifest, texts, plan.offsets, plan.prompt_len, specs, head, Path(tmp))


def _run_pass(cfg: CacheTeacherConfig, writer: CacheWriter, plan: _Plan, model, info, specs, part: int) -> dict:
    """Every uncommitted block of this rank's part: length-sorted token-budget batches -> teacher forward ->
    stored rows copied to the host -> the background writer assembles, writes and commits the block. A resumed
    pass runs exactly the batches of the original one (the manifest's blocks and batch budget), so the arrays
    are bit-identical."""
    block_starts = writer.manifest["progress"]["blocks"]
    batch_tokens = writer.manifest["settings"]["batch_tokens"]
    first_block, end_block = writer.manifest["store"]["parts"][part]["blocks"]
    done = writer.blocks_done(part)
    device = input_device(model)
    pad_id = plan.tokenizer.pad_token_id if plan.tokenizer.pad_token_id is not None else plan.tokenizer.eos_token_id
    counts = {"tokens": 0, "rows": 0, "forward_seconds": 0.0}
    bar = tqdm(total=block_starts[end_block] - block_starts[first_block],
               initial=block_starts[first_block + done] - block_starts[first_block], unit="ex",
               desc=f"teacher pass{f' (part {part})' if len(writer.manifest['store']['parts']) > 1 else ''}",
               dynamic_ncols=True, disable=progress_disabled(), position=part)
    t_pass = time.perf_counter()
    background = BlockWriter(writer, specs, block_starts, plan.offsets, part,
                                   lambda block: writer.commit(part, block + 1 - first_block))
    background.start()
    try:
        for block in range(first_block + done, end_block):
            _run_block(cfg, plan, model, info, block_starts, block, batch_tokens, pad_id, device, background, counts,
                       bar, t_pass)
            background.put(("end", block, None))
        background.put(None)
        background.join()
        if background.error is not None:
            raise background.error
    except BaseException as e:
        if background.error is None and background.is_alive():
            background.inbox.put(None)  # stop the writer; the uncommitted block is redone on resume
        reason = io_failure(e)
        if reason is None:
            raise
        # disk full, read-only, quota: say what is kept; a rerun redoes the block from the manifest's progress
        raise CacheError(f"{writer.location}: cannot write the cache ({reason}); its {writer.blocks_done(part)} "
                         f"committed block(s){f' of part {part}' if part else ''} are intact — free space (or make "
                         "it writable) and rerun the same command to resume") from None
    finally:
        bar.close()
    return _pass_stats(writer.manifest.get("pass", {}), time.perf_counter() - t_pass, counts,
                       background.write_seconds, device, len(plan.sequences), t_pass)


def _run_block(cfg, plan: _Plan, model, info, block_starts, block, batch_tokens, pad_id, device, background, counts,
               bar, t_pass) -> None:
    """The teacher over every non-empty view of the block's examples, batch by batch, to the writer."""
    items, lengths = [], []
    for ex in range(block_starts[block], block_starts[block + 1]):
        for view in VIEWS:
            seq = plan.sequences[ex].views[view]
            if seq.n_rows:
                items.append((ex, view))
                lengths.append(len(seq.input_ids))
    for batch in plan_batches(items, lengths, batch_tokens):
        seqs = [plan.sequences[ex].views[view] for ex, view in batch]
        t0 = time.perf_counter()
        result = teacher_batch(model, info, [s.input_ids for s in seqs], [s.prompt_len for s in seqs],
                               cfg.topk, cfg.hidden_dtype, pad_id, keep_hidden="hidden" in background.specs)
        host, event = _to_host(result)
        counts["forward_seconds"] += time.perf_counter() - t0
        placements = [(ex, view, s.n_rows) for (ex, view), s in zip(batch, seqs)]
        background.put(("batch", block, (event, host, placements)))
        counts["tokens"] += sum(len(s.input_ids) for s in seqs)
        counts["rows"] += sum(s.n_rows for s in seqs)
        elapsed = max(time.perf_counter() - t_pass, 1e-9)
        bar.update(len(batch) / max(1, len(items)) * (block_starts[block + 1] - block_starts[block]))
        bar.set_postfix(rows_s=f"{counts['rows'] / elapsed:.0f}", tok_s=f"{counts['tokens'] / elapsed:.0f}")


def _pass_stats(previous: dict, seconds: float, counts: dict, write_seconds: float, device, n: int, started: float) -> dict:
    """Throughput of the pass, summed with an interrupted earlier part's (the manifest's `pass`)."""
    stats = {
        "seconds": previous.get("seconds", 0.0) + seconds,
        "forward_seconds": previous.get("forward_seconds", 0.0) + counts["forward_seconds"],
        "write_seconds": previous.get("write_seconds", 0.0) + write_seconds,
        "tokens": previous.get("tokens", 0) + counts["tokens"],
        "rows": previous.get("rows", 0) + counts["rows"],
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "prepare_seconds": previous.get("prepare_seconds", 0.0),
        "started_at": started,
    }
    stats["tokens_per_s"] = stats["tokens"] / max(stats["seconds"], 1e-9)
    stats["rows_per_s"] = stats["rows"] / max(stats["seconds"], 1e-9)
    stats["examples_per_s"] = n / max(stats["seconds"], 1e-9)
    return stats


def _to_host(result: dict):
    """Start copying a batch's stored rows to pinned host memory; return (tensors, what to wait on or None). A
    teacher placed over several GPUs leaves its rows on more than one: each device's copies get their event."""
    host, devices = {}, []
    for name, tensor in result.items():
        if name == "topk_ids":
            tensor = tensor.to(torch.int32)
        if tensor.device.type == "cuda":
            buf = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            buf.copy_(tensor, non_blocking=True)
            host[name] = buf
            devices.append(tensor.device) if tensor.device not in devices else None
        else:
            host[name] = tensor.contiguous()
    if not devices:
        return host, None
    events = []
    for device in devices:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(device))
        events.append(event)
    return host, _Events(events)


class _Events:
    """The copies of one batch on each device it touched, waited on together (BlockWriter calls synchronize)."""

    def __init__(self, events: list):
        self.events = events

    def synchronize(self) -> None:
        for event in self.events:
            event.synchronize()


def _describe_inputs(cfg, model, plan: _Plan, weights, info, block_max_rows, dtype) -> dict:
    """What this pass records of its teacher, the tokenizer, the data and its settings — the manifest's
    descriptive sections (cache/manifest.py lays out the rest: the format, the store, the progress)."""
    tokenizer, records, source, trunc = plan.tokenizer, plan.records, plan.source, plan.trunc
    cot_texts = [r.get("cot_output") or "" for r in records]
    config, head_out = model.config, model.get_output_embeddings()
    teacher = {
        "name_or_path": cfg.model, "adapter": cfg.adapter, "seed": cfg.seed,
        "base_model": base_model_of(cfg.model),      # what a local teacher says it was made from (families.py)
        "revision": hub_commit(cfg.model, cfg.revision) or getattr(config, "_commit_hash", None), "weights": weights,
        "model_type": config.model_type, "dtype": str(dtype).replace("torch.", ""),
        "hidden_size": int(head_out.weight.shape[1]), "vocab_size": int(head_out.weight.shape[0]),
        "num_layers": int(getattr(config, "num_hidden_layers", getattr(config, "n_layer", 0))),
        "exact_logits": info.exact_logits, "embed_kind": info.embed_kind,
        "lm_head_bias": getattr(head_out, "bias", None) is not None,
    }
    tokenizer_info = {
        "name_or_path": cfg.model, "vocab_hash": plan.tok_hash, "size": len(tokenizer),
        "bos_id": tokenizer.bos_token_id, "eos_id": tokenizer.eos_token_id, "pad_id": tokenizer.pad_token_id,
        "prompt_special_tokens": True, "response_special_tokens": False, "eos_appended": True,
        # chat format: eos_id is the template's end-of-turn token, which ends every response
        **({"end_of_turn": tokenizer.eos_token} if plan.prompt_format == "chat" else {}),
    }
    data = {
        **source, "n_examples": len(records), "n_cot_examples": sum(1 for t in cot_texts if t),
        "templates": load_templates(),
        "cot_source_sha256": hashlib.sha256("\x00".join(cot_texts).encode()).hexdigest(),
        "truncated": {"prompt": trunc.prompt_truncated, "response": trunc.response_truncated},
        "limit": cfg.limit, "field_map": cfg.field_map, "prompt_format": plan.prompt_format,
        **({"chat_template_sha256": template_sha256(tokenizer)} if plan.prompt_format == "chat" else {}),
    }
    settings = {"max_length": cfg.max_length, "max_prompt_length": cfg.max_prompt_length,
                "batch_tokens": cfg.batch_tokens, "block_examples": cfg.block_examples, "block_max_rows": block_max_rows}
    return dict(teacher=teacher, tokenizer=tokenizer_info, data=data, settings=settings,
                fingerprint={"inputs": plan.fingerprint, "weights": weights},
                software={"torch": torch.__version__, "transformers": transformers.__version__})
