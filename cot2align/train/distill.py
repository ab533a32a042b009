"""`cot2align distill`: train a student from the teacher cache (DESIGN §6). Read top to bottom:

  1. resolve the config (the paper's setting for the cache's teacher fills what is not given);
  2. load the student (full fine-tuning or LoRA) and the teacher's head weights from the cache — the
     teacher model itself is never loaded;
  3. tokenise the cached texts for the student once (memoised next to the cache);
  4. stream length-bucketed batches (DataLoader workers decode zarr chunks ahead, pinned memory);
  5. per batch: student forward on each view, the teacher's rows from the cache, the objective of
     losses/objective.py; AdamW (projectors in their own group), cosine schedule, clipping, accumulation;
  6. each epoch: validation loss and greedy ROUGE-L on a bounded subset, keep the best weights,
     checkpoint (atomic, safetensors) — `--resume` continues bit-for-bit;
  7. write the best model (loadable by from_pretrained), tokenizer, resolved config, metrics, plot, card.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import yaml

from cot2align.cache.writer import CacheError
from cot2align.config import ConfigError, DistillConfig, config_to_dict, model_family
from cot2align.losses.objective import Heads, LossConfig, StudentView, TeacherView, build_projectors, distillation_loss
from cot2align.losses.teacher import HeadTeacher, TopKTeacher
from cot2align.train import TrainingError
from cot2align.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from cot2align.train.data import DistillDataset, LengthBucketSampler, collate, tokenize_cache
from cot2align.train.fsdp import average_gradients, clip_grad_norm, full_tensor, is_sharded, shard_student

RUN_MARKER = "run.json"


def sft_defaults(model: str, flags: dict) -> dict:
    """`cot2align sft` defaults: the paper fine-tunes 7B teachers with LoRA r=256, alpha 8, lr 1e-3, 10
    epochs (Table 4), and smaller models fully (Qwen1.5-1.8B: lr 2e-5, 10 epochs)."""
    big = model in ("mistral-7b", "llama2-7b", "qwen2.5-7b-instruct")
    defaults = dict(epochs=10, lr=1e-3 if big else 2e-5, lora_rank=256 if big else 0, lora_alpha=8, lora_dropout=0.1,
                    alpha=0.0, batch_size=4, grad_accum=2 if big else 1)
    return {**defaults, **{k: v for k, v in flags.items() if v is not None}}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def distributed_context() -> tuple[int, int]:
    """(rank, world size) under torchrun / accelerate launch; (0, 1) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
    return (torch.distributed.get_rank(), world) if world > 1 else (0, 1)


def default_out(cfg: DistillConfig) -> str:
    from cot2align.config import model_family as family

    tag = f"{family(cfg.student)}_{cfg.method}{'_cot2align' if cfg.cot2align else ''}_a{cfg.alpha}"
    return str(Path("runs") / tag)


def prepare_out_dir(out: Path, cfg: DistillConfig) -> None:
    """Refuse a directory holding another run unless --resume or --overwrite."""
    marker = out / RUN_MARKER
    if out.exists() and any(out.iterdir()):
        if cfg.resume:
            if not marker.exists():
                raise ConfigError(f"--out {out}: --resume given but the directory holds no cot2align run")
            return
        if not cfg.overwrite:
            raise ConfigError(f"--out {out}: the directory is not empty (another run?); pass --resume to continue it "
                              "or --overwrite to replace it")
        shutil.rmtree(out)
    elif cfg.resume and not marker.exists():
        cfg.resume = False
    out.mkdir(parents=True, exist_ok=True)


# ------------------------------------------------------------------------------------------ model

def load_student(cfg: DistillConfig, device):
    from cot2align.modeling import load_model

    model = load_model(cfg.student, dtype=torch.float32, device=device, seed=cfg.seed,
                       trust_remote_code=cfg.trust_remote_code)
    if cfg.lora_rank:
        from peft import LoraConfig, get_peft_model

        targets = cfg.lora_targets if cfg.lora_targets == "all-linear" else [t.strip() for t in cfg.lora_targets.split(",")]
        model = get_peft_model(model, LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                                 target_modules=targets, task_type="CAUSAL_LM"))
    model.train()
    if getattr(model.config, "use_cache", None) is not None:
        model.config.use_cache = False
    return model


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def whole_model(model, cfg: DistillConfig, is_main: bool):
    """The student as one ordinary module, to save: the model itself, or under FSDP (a collective: every rank
    calls it) a fresh unsharded copy on rank 0's CPU holding the gathered weights (None on the other ranks)."""
    if not is_sharded(model):
        return model
    weights = {name: full_tensor(value.detach()).cpu() for name, value in model.state_dict().items()}
    if not is_main:
        return None
    with torch.random.fork_rng(devices=[]):     # building the copy must not move the training RNG streams
        copy = load_student(cfg, "cpu")
    copy.load_state_dict(weights)
    return copy


# ------------------------------------------------------------------------------------------ batches

def _bits_to_tensor(bits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return bits.view(torch.bfloat16).to(dtype)


def teacher_views_from_batch(batch_view: dict, heads: Heads, embed_kind: str, teacher_dist: str, vocab_size: int,
                             device, dtype) -> TeacherView:
    """The cached teacher rows of one view as a TeacherView on the device."""
    t = {k: v.to(device, non_blocking=True) for k, v in batch_view["teacher"].items()}
    if "hidden_scale" in t:
        hidden = (t["hidden"].float() * t["hidden_scale"].float()[..., None]).to(dtype)
    else:
        hidden = _bits_to_tensor(t["hidden"], dtype)
    if embed_kind == "stored":
        embed = _bits_to_tensor(t["embeds"], dtype)
    else:
        embed = heads.teacher_embed_tokens[t["input_ids"]].to(dtype)
    if teacher_dist == "topk":
        dist = TopKTeacher(t["topk_logprobs"].float(), t["topk_ids"].long(), t["tail_logprob"].float(), vocab_size)
    else:
        dist = HeadTeacher(hidden, heads.teacher_lm_head, heads.teacher_lm_head_bias)
    return TeacherView(input_ids=t["input_ids"], target_ids=t["target_ids"], hidden=hidden, embed=embed, mask=t["mask"],
                       dist=dist, mined_rows=batch_view["mined_rows"].to(device))


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
    import inspect

    inner = getattr(model, "module", model)                  # DDP
    if hasattr(inner, "get_base_model"):                     # peft
        inner = inner.get_base_model()
    return "logits_to_keep" in inspect.signature(type(inner).forward).parameters


# ------------------------------------------------------------------------------------------ validation

def validation_records(cfg: DistillConfig, cache, held_out: list[int]) -> list[dict]:
    """[{prompt, references}] — the dev split of the cache's dataset when available, else held-out cached examples."""
    from cot2align.data import load_records
    from cot2align.data.readers import DataError, group_references
    from cot2align.data.templates import standard_prompt

    from cot2align.data.readers import DATASETS

    source = cfg.val_data or (cache.manifest["data"].get("name") if cache is not None else cfg.data)
    if source and not cfg.val_data and source not in DATASETS and source != "sample":
        source = None        # a plain file has no dev split: hold out cached examples instead
    if source:
        try:
            records, _ = load_records(source, "dev", cfg.data_root)
            grouped = group_references(records)
            return [{"prompt": standard_prompt(r["instruction"], r.get("input", "")), "references": r["references"]}
                    for r in grouped[:cfg.val_examples]]
        except (DataError, KeyError, ValueError):
            if cfg.val_data:
                raise
    texts = cache.texts() if cache is not None else None
    return [{"prompt": texts["prompt_std"][i], "references": [texts["response_std"][i]]} for i in held_out] if texts else []


def validate(model, tokenizer, records: list[dict], cfg: DistillConfig, device, synced_gpus: bool = False) -> dict:
    """val_ce / val_bits_per_byte: the held-out cross-entropy of every reference (evaluation.reference_cross_entropy,
    the low-noise signal); val_rougeL: greedy ROUGE-L of the same prompts (the paper's model selection)."""
    from cot2align.evaluation import generate, reference_cross_entropy, rouge_l

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


# ------------------------------------------------------------------------------------------ the run

def is_better(rouge: float | None, val_loss: float | None, state: dict) -> bool:
    """Does this epoch beat the best so far? Higher validation ROUGE-L wins; a tie (e.g. 0 at every epoch of a
    student that cannot yet write a summary) goes to the lower validation cross-entropy (val_loss). Without any validation the
    latest epoch counts as the best."""
    if state["best_epoch"] is None or (rouge is None and val_loss is None):
        return True
    best_rouge, best_loss = state["best_rougeL"], state.get("best_val_loss")
    if rouge is not None and best_rouge is not None and rouge != best_rouge:
        return rouge > best_rouge
    return val_loss is not None and (best_loss is None or val_loss < best_loss)


def distill(cfg: DistillConfig, log=print, progress: bool = True, cache=None) -> dict:
    """Train one student; `cache` may be an already opened TeacherCache (sweep opens it once)."""
    from cot2align.cache import open_cache
    from cot2align.modeling import load_tokenizer, tokenizer_hash

    rank, world = distributed_context()
    is_main = rank == 0
    say = log if is_main else (lambda *a, **k: None)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)

    # 1. config
    if cache is None and cfg.cache:
        cache = open_cache(cfg.cache)
    teacher_name = cache.manifest["teacher"]["name_or_path"] if cache is not None else None
    setting = cfg.resolve(model_family(teacher_name) if teacher_name else None)
    if setting:
        say(f"paper setting: {setting} — method {cfg.method}{' + CoT2Align' if cfg.cot2align else ''}, "
            f"alpha {cfg.alpha}, lr {cfg.lr}, {cfg.epochs} epochs, batch {cfg.batch_size}x{cfg.grad_accum}"
            f"{f', LoRA r={cfg.lora_rank}' if cfg.lora_rank else ', full fine-tuning'}")
    out = Path(cfg.out or default_out(cfg))
    if is_main:
        prepare_out_dir(out, cfg)
    if world > 1:
        torch.distributed.barrier()
    seed_everything(cfg.seed)

    # 2. models and heads
    tokenizer = load_tokenizer(cfg.student, trust_remote_code=cfg.trust_remote_code)
    student_hash = tokenizer_hash(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    needs_teacher = cfg.method != "sft" or cfg.cot2align
    if cfg.method == "kl" and cache is not None and student_hash != cache.manifest["tokenizer"]["vocab_hash"]:
        raise ConfigError(f"--method kl: the student tokenizer ({cfg.student}) differs from the teacher's "
                          f"({teacher_name}); KL needs one shared vocabulary — use uld, mined or dskd")
    model = load_student(cfg, device)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    d_student = base.config.hidden_size if hasattr(base.config, "hidden_size") else base.config.n_embd
    heads, vocab_map = None, None
    compute_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if cache is not None and needs_teacher:
        head = cache.head(device=device, dtype=compute_dtype)
        heads = Heads(student_embed_tokens=base.get_input_embeddings().weight,
                      student_lm_head=base.get_output_embeddings().weight,
                      teacher_embed_tokens=head["embed_tokens"], teacher_lm_head=head["lm_head"],
                      teacher_lm_head_bias=head.get("lm_head_bias"))
        if cfg.method == "mined":
            from cot2align.align.vocab import vocab_map as build_map

            vocab_map = build_map(cache.tokenizer(), tokenizer)
            heads.stu2tea = torch.from_numpy(vocab_map.stu2tea).to(device)
            heads.tea2stu = torch.from_numpy(vocab_map.tea2stu).to(device)
    projectors = build_projectors(cfg.method, cfg.cot2align, d_student, cache.hidden_size if cache is not None else d_student)
    projectors.to(device)
    sharded = cfg.fsdp and world > 1
    whole_params: list = []     # trainable student parameters every rank holds whole (FSDP: embedding, lm_head)
    if sharded:
        whole_params = shard_student(model, device)
        say(f"FSDP: student blocks sharded over {world} ranks; embedding and output head kept whole")
    elif cfg.fsdp:
        say("--fsdp: a single process, nothing to shard (launch with torchrun or accelerate launch)")

    # 3. data
    views = ("std", "cot") if cfg.cot2align else ("std",)
    if cache is not None:
        student_ids = tokenize_cache(cache, tokenizer, student_hash, cfg.max_length, vocab_map,
                                     cache.tokenizer() if vocab_map is not None else None, log=say)
        n_examples = len(cache) if cfg.limit is None else min(cfg.limit, len(cache))
    else:
        student_ids = _records_as_student_ids(cfg, tokenizer)
        n_examples = len(student_ids["std_prompt_len"])
    # every example trains, with or without a kept rationale (as the authors' data layout: each example is a
    # standard record, and one with a rationale adds a CoT record); one without has an empty CoT view, which
    # adds nothing to CE/KD and keeps only OT(y, Y)/4 of L_CCoT. (Dropping them made the CoT2Align rows train on
    # fewer examples than their baselines whenever augment-cot dropped degenerate rationales.)
    all_indices = list(range(n_examples))
    held_out: list[int] = []
    val_records = validation_records(cfg, cache, [])
    if not val_records and len(all_indices) > 10:
        held_out = all_indices[-min(cfg.val_examples, max(1, len(all_indices) // 10)):]
        all_indices = all_indices[:len(all_indices) - len(held_out)]
        val_records = validation_records(cfg, cache, held_out)
    teacher_arrays = ()
    if needs_teacher and cache is not None:
        teacher_arrays = ("input_ids", "target_ids", "hidden", "hidden_scale", "embeds")
        if cfg.teacher_dist == "topk":
            teacher_arrays += ("topk_ids", "topk_logprobs", "tail_logprob")
    dataset = DistillDataset(student_ids, views, all_indices, str(cache.path) if cache is not None else None, teacher_arrays)
    sampler = LengthBucketSampler([dataset.length(k) for k in range(len(dataset))], cfg.batch_size, cfg.seed, rank, world)
    workers = cfg.num_workers if cfg.num_workers is not None else (2 if device.type == "cuda" else 0)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=workers, pin_memory=device.type == "cuda",
        collate_fn=lambda items: collate(items, views, pad_id), persistent_workers=False,
        generator=torch.Generator().manual_seed(cfg.seed), prefetch_factor=4 if workers else None)

    # 4. optimiser and schedule
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": params, "lr": cfg.lr, "weight_decay": cfg.weight_decay}]
    if len(list(projectors.parameters())):
        groups.append({"params": list(projectors.parameters()), "lr": cfg.projector_lr, "weight_decay": cfg.weight_decay})
    optimizer = torch.optim.AdamW(groups)
    batches_per_epoch = len(sampler.batches(0))
    steps_per_epoch = math.ceil(batches_per_epoch / cfg.grad_accum)
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    from transformers import get_cosine_schedule_with_warmup

    scheduler = get_cosine_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total_steps), max(total_steps, 1))
    train_model = model
    if world > 1 and not sharded:   # DDP for the student; the (small) projectors' gradients are all-reduced by hand
        train_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    # 5. resume
    state = {"epoch": 0, "batches_done": 0, "step": 0, "best_rougeL": None, "best_val_loss": None, "best_epoch": None,
             "history": []}
    if cfg.resume:
        checkpoint = latest_checkpoint(out)
        if checkpoint is not None:
            state = load_checkpoint(checkpoint, model, projectors, optimizer, scheduler, device)
            say(f"resumed from {checkpoint} (epoch {state['epoch']}, step {state['step']})")
    if is_main:
        (out / RUN_MARKER).write_text(json.dumps({"config": config_to_dict(cfg), "teacher": teacher_name}, indent=1))
        (out / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    metrics_file = (out / "metrics.jsonl").open("a") if is_main else None
    writer = _tensorboard(out) if is_main else None

    loss_cfg = LossConfig(kl_variant=cfg.kl_variant, kd_temperature=cfg.kd_temperature, ot_epsilon=cfg.ot_epsilon,
                          ot_iters=cfg.ot_iters, ot_grad=cfg.ot_grad, ot_compile=cfg.ot_compile)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    need_hidden = cfg.cot2align or cfg.method == "dskd"
    vocab_t = cache.manifest["teacher"]["vocab_size"] if cache is not None else 0
    embed_kind = cache.embed_kind if cache is not None else "lookup"
    step, started = state["step"], time.perf_counter()
    tokens_seen, data_wait = 0, 0.0
    stop = cfg.max_steps is not None and step >= cfg.max_steps

    # 6. epochs
    for epoch in range(state["epoch"], cfg.epochs):
        if stop:
            break
        sampler.epoch = epoch
        sampler.skip = state["batches_done"] if epoch == state["epoch"] else 0
        batch_no = sampler.skip
        bar = _progress(len(sampler), epoch, is_main and progress)
        window: list[dict] = []
        batches = iter(loader)
        while True:
            waited = time.perf_counter()
            batch = next(batches, None)
            data_wait += time.perf_counter() - waited
            if batch is None:
                break
            remaining_in_epoch = batches_per_epoch - batch_no
            window_size = min(cfg.grad_accum, (batch_no % cfg.grad_accum) + remaining_in_epoch)
            with autocast:
                students = {v: student_view(train_model, batch[v], device, need_hidden) for v in views}
                teachers = None
                if needs_teacher and cache is not None:
                    teachers = {v: teacher_views_from_batch(batch[v], heads, embed_kind, cfg.teacher_dist, vocab_t, device,
                                                            compute_dtype) for v in views}
                loss, parts = distillation_loss(cfg.method, cfg.alpha, students, teachers, heads, projectors,
                                                cfg.cot2align, loss_cfg)
            # the loss and every logged part in one device->host copy (one sync per micro-batch, not one per part)
            values = torch.stack([loss.detach().float().reshape(())] + [torch.as_tensor(v, device=device).float().reshape(())
                                                                        for v in parts.values()]).tolist()
            logged = dict(zip(parts, values[1:]))
            if not all(math.isfinite(v) for v in values):
                # stop before the update: a NaN gradient would silently destroy the weights
                bad = ["loss"] * (not math.isfinite(values[0])) + [k for k, v in logged.items() if not math.isfinite(v)]
                raise TrainingError(f"step {step + 1}, epoch {epoch + 1}: the loss is not finite (non-finite parts: "
                                    f"{', '.join(sorted(set(bad)))}) on cache examples "
                                    f"{batch['index'].tolist()}; nothing was updated and the last checkpoint in "
                                    f"{out / 'checkpoints'} is intact")
            (loss / window_size).backward()
            batch_no += 1
            tokens_seen += int(sum(batch[v]["attention_mask"].sum() for v in views))
            window.append(logged)
            if len(window) < window_size:
                continue
            if world > 1:
                average_gradients(list(projectors.parameters()) + whole_params)
            if sharded:
                clip_grad_norm(params + list(projectors.parameters()), cfg.max_grad_norm)
            else:
                torch.nn.utils.clip_grad_norm_(params + list(projectors.parameters()), cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            record = {"step": step, "epoch": epoch, "lr": scheduler.get_last_lr()[0],
                      **{k: float(np.mean([w[k] for w in window if k in w])) for k in window[0]},
                      "tokens_per_s": tokens_seen / max(time.perf_counter() - started, 1e-9),
                      "data_wait_share": data_wait / max(time.perf_counter() - started, 1e-9),
                      "data_wait_s": data_wait, "elapsed_s": time.perf_counter() - started}
            window = []
            if is_main:
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
                if writer is not None:
                    for key, value in record.items():
                        if key not in ("step", "epoch"):
                            writer.add_scalar(f"train/{key}", value, step)
                bar.update(cfg.grad_accum)
                bar.set_postfix(loss=f"{record['loss']:.4f}" if "loss" in record else f"{record['ce']:.4f}",
                                ce=f"{record['ce']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
            state.update(epoch=epoch, batches_done=batch_no, step=step)
            if cfg.save_every and step % cfg.save_every == 0 and (is_main or sharded):
                save_checkpoint(out, step, trainable_state(model), projectors, optimizer, scheduler, state, write=is_main)
            if os.environ.get("COT2ALIGN_KILL_AT_STEP") == str(step):   # crash tests only
                os.kill(os.getpid(), 9)
            if cfg.max_steps is not None and step >= cfg.max_steps:
                stop = True
                break
        bar.close()
        if window:   # never happens: the last window of an epoch is sized to what is left
            raise RuntimeError("internal: an incomplete accumulation window at the end of the epoch")
        # end of epoch (or of max_steps): validate, keep the best, checkpoint. Rank 0 alone under DDP; every
        # rank under FSDP, where a forward pass and gathering the weights are collectives.
        if is_main or sharded:
            scores = validate(model, tokenizer, val_records, cfg, device, synced_gpus=sharded)
            if sharded:     # one decision for all ranks: rank 0's scores
                shared = [scores]
                torch.distributed.broadcast_object_list(shared, src=0)
                scores = shared[0]
            record = {"epoch": epoch, "step": step, **scores}
            state["history"].append(record)
            if is_main:
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
                if writer is not None:
                    for key, value in scores.items():
                        writer.add_scalar(f"val/{key.removeprefix('val_')}", value, step)
            say(f"epoch {epoch + 1}/{cfg.epochs}: step {step}, " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
            rouge, loss = scores.get("val_rougeL"), scores.get("val_ce")
            if is_better(rouge, loss, state):
                state["best_rougeL"], state["best_val_loss"], state["best_epoch"] = rouge, loss, epoch
                whole = whole_model(model, cfg, is_main)
                if is_main:
                    _save_model(whole, tokenizer, out / "best.tmp", cfg)
                    shutil.rmtree(out / "best", ignore_errors=True)
                    os.replace(out / "best.tmp", out / "best")
            state.update(epoch=epoch + 1, batches_done=0, step=step)
            if stop:
                state.update(epoch=epoch, batches_done=batch_no)
            save_checkpoint(out, step, trainable_state(model), projectors, optimizer, scheduler, state, write=is_main)
        if world > 1:
            torch.distributed.barrier()

    # 7. outputs
    summary = {"steps": step, "best_epoch": state["best_epoch"], "best_val_rougeL": state["best_rougeL"],
               "history": state["history"], "out": str(out)}
    final = whole_model(model, cfg, is_main) if sharded and not (out / "best").exists() else model
    if is_main:
        metrics_file.close()
        if writer is not None:
            writer.close()
        _finalise(out, cfg, tokenizer, final, projectors, cache, summary, say)
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return summary


def _records_as_student_ids(cfg: DistillConfig, tokenizer) -> dict[str, np.ndarray]:
    """--method sft from plain data: the standard view of every record, tokenised for the student."""
    from cot2align.data import load_records
    from cot2align.data.templates import standard_prompt
    from cot2align.train.data import student_view_ids

    records, _ = load_records(cfg.data, cfg.split, cfg.data_root)
    if cfg.limit is not None:
        records = records[:cfg.limit]
    ids_all, offsets, prompt_lens = [], [0], []
    for rec in records:
        ids, prompt_len = student_view_ids(tokenizer, standard_prompt(rec["instruction"], rec.get("input", "")),
                                           rec["output"], True, cfg.max_length)
        ids_all.extend(ids)
        offsets.append(len(ids_all))
        prompt_lens.append(prompt_len)
    return {"std_ids": np.asarray(ids_all, np.int32), "std_offsets": np.asarray(offsets, np.int64),
            "std_prompt_len": np.asarray(prompt_lens, np.int32)}


def _progress(total: int, epoch: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"epoch {epoch + 1}", disable=not enabled, unit="batch", leave=False)


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:   # tensorboard not installed: metrics.jsonl still has everything
        return None
    return SummaryWriter(str(out / "tensorboard"))


def _save_model(model, tokenizer, path: Path, cfg: DistillConfig) -> None:
    """A from_pretrained-loadable copy of the current weights (LoRA merged unless --keep-adapter)."""
    shutil.rmtree(path, ignore_errors=True)
    if hasattr(model, "merge_and_unload") and not cfg.keep_adapter:
        import copy

        merged = copy.deepcopy(model).merge_and_unload()
        merged.save_pretrained(str(path), safe_serialization=True)
    else:
        model.save_pretrained(str(path), safe_serialization=True)
    tokenizer.save_pretrained(str(path))


def _finalise(out: Path, cfg: DistillConfig, tokenizer, model, projectors, cache, summary: dict, say) -> None:
    best = out / "best"
    if not best.exists():
        _save_model(model, tokenizer, best, cfg)
    for item in best.iterdir():
        target = out / item.name
        if target.is_dir():
            shutil.rmtree(target)
        shutil.copy2(item, target) if item.is_file() else shutil.copytree(item, target)
    from safetensors.torch import save_file

    if len(list(projectors.parameters())):
        save_file({k: v.detach().contiguous().cpu() for k, v in projectors.state_dict().items()},
                  str(out / "projectors.safetensors"))
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    _plot(out)
    manifest_hash = None
    if cache is not None:
        import hashlib

        manifest_hash = hashlib.sha256(json.dumps(cache.manifest, sort_keys=True).encode()).hexdigest()[:16]
    teacher = cache.manifest["teacher"]["name_or_path"] if cache is not None else "none (plain data)"
    data = cache.manifest["data"]["name"] if cache is not None else cfg.data
    final = summary["history"][-1] if summary["history"] else {}
    card = [f"# {Path(out).name}", "", "Trained with cot2align.", "",
            f"- student: `{cfg.student}`", f"- teacher: `{teacher}`", f"- cache manifest hash: `{manifest_hash}`",
            f"- method: `{cfg.method}`{' + CoT2Align' if cfg.cot2align else ''}, alpha {cfg.alpha}",
            f"- data: `{data}`", f"- steps: {summary['steps']}, best epoch: {summary['best_epoch']}",
            "- final validation: " + (", ".join(f"{k} {v:.4f}" for k, v in final.items() if k.startswith("val_")) or "n/a"),
            "", "Load with `AutoModelForCausalLM.from_pretrained(<this directory>)`."]
    (out / "README.md").write_text("\n".join(card) + "\n")
    say(f"wrote {out} (best epoch {summary['best_epoch']}, val ROUGE-L {summary['best_val_rougeL']})")


def _plot(out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in rows if "ce" in r]
    if not train:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in ("loss", "ce", "kd", "ccot"):
        if key in train[0]:
            ax.plot([r["step"] for r in train], [r[key] for r in train], label=key)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss_curve.png", dpi=100)
    plt.close(fig)


__all__ = ["distill", "CacheError"]
