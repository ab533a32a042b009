"""Everything `distill` prepares before its first step, one concern per function, gathered in a `Run`.

    setup(cfg) -> Run
      _setup_distributed   rank, world size, device (torchrun / accelerate launch, or one process)
      _setup_out           the output directory (locked), a resumed run checked to be the same run
      _setup_student       the student's tokenizer and model (full fine-tuning or LoRA)
      _setup_heads         both models' heads, MinED's vocabulary map, the trainable projectors
      _setup_fsdp          shard the student's blocks (FSDP2) when asked and launched on several ranks
      _setup_data          the student's tokenisation of the cache, the loader, the validation records
      _setup_optimiser     AdamW (projectors in their own group) and the cosine schedule
      _setup_resume        the last checkpoint, when --resume
      _setup_logging       run.json, config.yaml, metrics.jsonl and the --report-to trackers (rank 0)

`cfg` is the resolved config (train/resolve.py): setup reads it and never changes it.

The order is the order of the random draws (model init, projectors, data order), which a resumed run and a
run with other world sizes must repeat exactly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import shutil
import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from peft import LoraConfig, get_peft_model
from transformers import get_cosine_schedule_with_warmup

from cot2align.cache import open_cache
from cot2align.config import ConfigError, DistillConfig, config_to_dict, fields_of_kind
from cot2align.data import load_records
from cot2align.data.chat import use_chat_template, view_prompt
from cot2align.locks import writer_lock
from cot2align.logs import reporter, silent
from cot2align.model_limits import check_student
from cot2align.losses.objective import Heads, build_projectors
from cot2align.methods import method as registered
from cot2align.methods import needs_student_hidden
from cot2align.modeling import TORCH_DTYPES, load_model, load_tokenizer, resolve_dtype, tokenizer_hash
from cot2align.train.batches import arrays_to_read, dataloader, load_heads, pad_id
from cot2align.train.checkpoint import latest_checkpoint, load_checkpoint, remove_checkpoint_leftovers
from cot2align.train.data import student_view_ids, tokenize_cache
from cot2align.train.fsdp import full_tensor, is_sharded, shard_student
from cot2align.train.metrics import append, open_metrics, read_records
from cot2align.train.outputs import open_trackers
from cot2align.train.resolve import teacher_name as teacher_of
from cot2align.train.validation import split_validation
from cot2align.write_errors import reported

RUN_MARKER = "run.json"


@dataclass
class Run:
    """One training run: its settings, models, data, optimiser and progress (what the recipe steps share)."""

    cfg: DistillConfig
    say: object                          # say(message, level): cot2align.logs.reporter (silent on ranks other than 0)
    rank: int
    world: int
    device: torch.device
    out: Path
    cache: object                        # TeacherCache, or None for SFT from plain data
    tokenizer: object
    model: torch.nn.Module               # the student (peft-wrapped for LoRA; sharded under FSDP)
    train_model: torch.nn.Module         # what the forward runs through (DDP wrapper when replicated)
    heads: Heads | None
    projectors: torch.nn.ModuleDict
    sharded: bool
    whole_params: list                   # trainable parameters every rank holds whole (FSDP: embedding, lm_head)
    params: list                         # the student's trainable parameters
    loader: torch.utils.data.DataLoader
    views: tuple[str, ...]
    val_records: list[dict]
    optimizer: torch.optim.Optimizer
    scheduler: object
    batches_per_epoch: int
    state: dict                          # epoch, batches_done, step, best metric, history (checkpointed)
    compute_dtype: torch.dtype
    scaler: torch.amp.GradScaler = None   # loss scaling under --dtype fp16 (a no-op otherwise)
    metrics_file: object = None
    trackers: list = field(default_factory=list)   # --report-to: TensorBoard, W&B (rank 0)
    started: float = field(default_factory=time.perf_counter)
    tokens_seen: int = 0
    data_wait: float = 0.0
    stopped: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def step(self) -> int:
        return self.state["step"]

    @property
    def autocast(self):
        """The forward's mixed precision: --dtype bf16 / fp16 (default bf16 on CUDA), none for fp32."""
        amp = TORCH_DTYPES[self.cfg.dtype]
        return torch.autocast(self.device.type, dtype=amp) if amp != torch.float32 else nullcontext()

    @property
    def needs_teacher(self) -> bool:
        return self.heads is not None

    @property
    def need_hidden(self) -> bool:
        return needs_student_hidden(self.cfg.method, self.cfg.cot2align, self.cfg.ot_weight > 0)


def setup(cfg: DistillConfig, log, cache, held: ExitStack) -> Run:
    """`cfg`: the resolved config (resolve_distill_config); `cache`: the opened teacher cache (opened here when
    None). `held` keeps the writer lock of --out (rank 0) until the caller's `with` ends."""
    rank, world, device = _setup_distributed(cfg)
    say = reporter(log, "cot2align.train") if rank == 0 else silent
    if cache is None and cfg.cache:
        cache = open_cache(cfg.cache)
    teacher_name = teacher_of(cache)
    arrays = arrays_to_read(cache, cfg.method, cfg.cot2align, cfg.teacher_dist, cfg.ot_weight > 0) if cache is not None else ()
    out = _setup_out(cfg, cache, rank, world, say, held)
    seed_everything(cfg.seed)
    tokenizer, model = _setup_student(cfg, cache, teacher_name, device)
    compute_dtype = torch.bfloat16 if cfg.dtype == "bf16" else torch.float32     # the teacher's cached rows
    heads, projectors = _setup_heads(cfg, cache, model, tokenizer, device, compute_dtype)
    sharded, whole_params = _setup_fsdp(cfg, model, world, device, say)
    loader, val_records, views = _setup_data(cfg, cache, arrays, tokenizer, device, rank, world, say)
    optimizer, scheduler, params, batches_per_epoch = _setup_optimiser(cfg, model, projectors, loader)
    train_model = model
    if world > 1 and not sharded:   # DDP for the student; the (small) projectors' gradients are all-reduced by hand
        train_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    state = _setup_resume(cfg, out, model, projectors, optimizer, scheduler, device, say)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.dtype == "fp16")
    if scaler.is_enabled() and "grad_scaler" in state:
        scaler.load_state_dict(state["grad_scaler"])
    run = Run(cfg=cfg, say=say, rank=rank, world=world, device=device, out=out, cache=cache, tokenizer=tokenizer,
              model=model, train_model=train_model, heads=heads, projectors=projectors, sharded=sharded,
              whole_params=whole_params, params=params, loader=loader, views=views, val_records=val_records,
              optimizer=optimizer, scheduler=scheduler, batches_per_epoch=batches_per_epoch, state=state,
              compute_dtype=compute_dtype, scaler=scaler,
              stopped=cfg.max_steps is not None and state["step"] >= cfg.max_steps)
    if run.is_main:
        run.metrics_file, run.trackers = _setup_logging(cfg, out, teacher_name, cache, say, state if cfg.resume else None)
        _log_alignment(cfg, cache, tokenizer, run.metrics_file, say)
    return run


# ------------------------------------------------------------------------------------------ the pieces

def _setup_distributed(cfg: DistillConfig) -> tuple[int, int, torch.device]:
    """(rank, world size, device) under torchrun / accelerate launch; (0, 1, cfg.device or the default) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = torch.distributed.get_rank() if world > 1 else 0
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    return rank, world, device


def _setup_out(cfg: DistillConfig, cache, rank: int, world: int, say, held: ExitStack) -> Path:
    """Lock and prepare --out: a new run's empty directory, or the same run to continue (--resume)."""
    check_student(cfg, cache)        # --max-length fits the student (and MinED the cache): before --out is touched
    out = Path(cfg.out)
    if cache is not None and cache.location.contains(out):
        raise ConfigError(f"--out {out}: inside the teacher cache {cache.url}, which no run writes; choose another --out")
    if rank == 0:      # rank 0 alone writes --out: one lock per job (locks.py)
        held.enter_context(writer_lock(out, ConfigError, f"--out {out}", log=say))
        prepare_out_dir(out, cfg, cache)
        removed = remove_checkpoint_leftovers(out)
        if removed:
            say(f"--out {out}: removed {len(removed)} half-written checkpoint file(s) left by a killed run")
    if world > 1:
        torch.distributed.barrier()
    return out


def _setup_student(cfg: DistillConfig, cache, teacher_name, device):
    tokenizer = load_tokenizer(cfg.student, trust_remote_code=cfg.trust_remote_code, revision=cfg.revision,
                               flag="--student")
    if cfg.prompt_format == "chat":      # the student's own template; its end-of-turn token ends every response
        use_chat_template(tokenizer, cfg.chat_template, cfg.student)
    if (registered(cfg.method).same_tokenizer and cache is not None
            and tokenizer_hash(tokenizer) != cache.manifest["tokenizer"]["vocab_hash"]):
        raise ConfigError(f"--method {cfg.method}: the student tokenizer ({cfg.student}) differs from the teacher's "
                          f"({teacher_name}); it needs one shared vocabulary — use a cross-tokenizer method "
                          "(e.g. uld, mined, dskd)")
    if tokenizer.pad_token_id is None:     # padding needs a token; EOS is never a target where padding is
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, load_student(cfg, device)


def _setup_heads(cfg: DistillConfig, cache, model, tokenizer, device, dtype):
    """Heads (None when no teacher term is used) and the projectors the objective trains."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    d_student = base.config.hidden_size if hasattr(base.config, "hidden_size") else base.config.n_embd
    heads = None
    method = registered(cfg.method)
    if cache is not None and (method.kd is not None or cfg.cot2align):
        heads = load_heads(cache, base, tokenizer, device=device, dtype=dtype, method=cfg.method)
    projectors = build_projectors(cfg.method, cfg.cot2align, d_student, cache.hidden_size if cache is not None else d_student,
                                  transport=cfg.ot_weight > 0)
    return heads, projectors.to(device)


def _setup_fsdp(cfg: DistillConfig, model, world: int, device, say) -> tuple[bool, list]:
    if cfg.fsdp and world > 1:
        whole = shard_student(model, device)
        say(f"FSDP: student blocks sharded over {world} ranks; embedding and output head kept whole")
        return True, whole
    if cfg.fsdp:
        say("--fsdp: a single process, nothing to shard (launch with torchrun or accelerate launch)")
    return False, []


def _setup_data(cfg: DistillConfig, cache, arrays: tuple[str, ...], tokenizer, device, rank: int, world: int, say):
    """(loader, validation records, views); `arrays`: the cached teacher arrays to read (batches.arrays_to_read). Every example trains, with or without a kept rationale (the
    authors' data layout: each example is a standard record, one with a rationale adds a CoT record); one
    without has an empty CoT view, which adds nothing to CE/KD and keeps only OT(y, Y)/4 of L_CCoT."""
    views = ("std", "cot") if cfg.cot2align else ("std",)
    if cache is not None:
        student_ids = tokenize_cache(cache, tokenizer, tokenizer_hash(tokenizer), cfg.max_length,
                                     registered(cfg.method).alignment, log=say, prompt_format=cfg.prompt_format)
        n_examples = len(cache) if cfg.limit is None else min(cfg.limit, len(cache))
    else:
        student_ids = records_as_student_ids(cfg, tokenizer)
        n_examples = len(student_ids["std_prompt_len"])
    indices, val_records = split_validation(cfg, cache, list(range(n_examples)), tokenizer)
    loader = dataloader(student_ids, views, indices, cache.opened() if cache is not None else None, arrays,
                        pad_id(tokenizer), cfg.batch_size, cfg.seed, cfg.num_workers, device.type == "cuda", rank, world,
                        cfg.sample_order)
    return loader, val_records, views


def _setup_optimiser(cfg: DistillConfig, model, projectors, loader):
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": params, "lr": cfg.lr, "weight_decay": cfg.weight_decay}]
    if len(list(projectors.parameters())):
        groups.append({"params": list(projectors.parameters()), "lr": cfg.projector_lr, "weight_decay": cfg.weight_decay})
    optimizer = torch.optim.AdamW(groups)
    batches_per_epoch = len(loader.batch_sampler.batches(0))
    total_steps = math.ceil(batches_per_epoch / cfg.grad_accum) * cfg.epochs
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total_steps), max(total_steps, 1))
    return optimizer, scheduler, params, batches_per_epoch


def _setup_resume(cfg: DistillConfig, out: Path, model, projectors, optimizer, scheduler, device, say) -> dict:
    state = {"epoch": 0, "batches_done": 0, "step": 0, "best_rougeL": None, "best_val_loss": None, "best_epoch": None,
             "history": []}
    if cfg.resume:
        checkpoint = latest_checkpoint(out, log=say)
        if checkpoint is not None:
            state = load_checkpoint(checkpoint, model, projectors, optimizer, scheduler, device)
            say(f"resumed from {checkpoint} (epoch {state['epoch']}, step {state['step']})")
    return state


def _setup_logging(cfg: DistillConfig, out: Path, teacher_name, cache, say, resumed_state: dict | None):
    marker = {"config": config_to_dict(cfg), "teacher": teacher_name, "cache_identity": cache_identity(cache)}
    with reported(ConfigError, f"--out {out}: cannot write the run's files", "nothing was trained yet; free space (or make it writable) and rerun"):
        tmp = out / f".{RUN_MARKER}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(marker, indent=1))
        os.replace(tmp, out / RUN_MARKER)
        (out / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    return open_metrics(out, resumed_state), open_trackers(out, cfg, say)


def _log_alignment(cfg: DistillConfig, cache, tokenizer, metrics_file, say) -> None:
    """A cross-tokenizer run starts by measuring how the student's tokens line up with the teacher's
    (align/stats.py) on 100 cached examples: the figures go to metrics.jsonl, a degenerate alignment is said
    before hours of training are spent on it."""
    method = registered(cfg.method)
    if cache is None or method.kd is None or method.same_tokenizer:
        return
    if any("alignment" in r for r in read_records(Path(metrics_file.name))):
        return           # a resumed run: measured when it started (same cache, same tokenizer)
    from cot2align.align.stats import alignment_stats

    stats = alignment_stats(cache, tokenizer, limit=100, with_mined=method.vocab_map)
    append(metrics_file, {"step": 0, "alignment": stats})
    for warning in stats["warnings"]:
        say(f"token alignment: {warning}", logging.WARNING)


# ------------------------------------------------------------------------------------------ helpers

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def cache_identity(cache) -> str | None:
    """The teacher cache a run trains on, by content (its fingerprint), not by path: a moved cache is the same."""
    if cache is None:
        return None
    return hashlib.sha256(json.dumps(cache.manifest.get("fingerprint"), sort_keys=True).encode()).hexdigest()[:16]


def prepare_out_dir(out: Path, cfg: DistillConfig, cache=None) -> None:
    """Refuse a directory holding another run unless --resume (the same run: check_same_run) or --overwrite (which
    deletes only a cot2align run directory, never anything else). `cfg` is resolved: its `resume` is already
    false for an empty directory (a run killed before its first write starts afresh)."""
    marker = out / RUN_MARKER
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: is a file; expected a directory for the run")
    if out.exists() and any(out.iterdir()):
        if cfg.resume:
            if not marker.exists():
                raise ConfigError(f"--out {out}: --resume given but the directory holds no cot2align run")
            check_same_run(marker, cfg, cache)
            # the run trains on (finished_summary let it through: its summary torn): until its end it is not
            # finished, and its summary.json is written again then
            (out / "summary.json").unlink(missing_ok=True)
            return
        if not cfg.overwrite:
            raise ConfigError(f"--out {out}: the directory is not empty (another run?); pass --resume to continue it "
                              "or --overwrite to replace it")
        if not marker.exists():
            raise ConfigError(f"--out {out}: --overwrite refused — the directory holds files that are not a cot2align "
                              f"run ({RUN_MARKER} not found); choose another --out")
        shutil.rmtree(out)
    elif cfg.resume and not out.exists():
        raise ConfigError(f"--resume: {out} does not exist, so there is no run to resume; drop --resume to start one")
    out.mkdir(parents=True, exist_ok=True)


def finished_summary(cfg: DistillConfig, cache) -> dict | None:
    """`--resume` (resolved config) of a run that has finished (its summary.json, written last, exists): that
    summary, after the same-run check — nothing is trained or rewritten, so the kept epoch's model stays as it is.
    None otherwise. A longer --epochs or --max-steps is another run (identity fields), refused here too."""
    out = Path(cfg.out)
    if not cfg.resume or not (out / "summary.json").is_file() or not (out / RUN_MARKER).is_file():
        return None
    check_same_run(out / RUN_MARKER, cfg, cache)
    try:
        summary = json.loads((out / "summary.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None                 # torn: finish the run again from its last checkpoint
    return dict(summary, out=str(out))


# What makes a run the same run: every identity field of DistillConfig (config.py), the cache by its content.
RUN_IDENTITY = tuple(name for name in fields_of_kind(DistillConfig, "identity") if name != "cache")
# What a run recorded before a field existed used, where that is not the field's default: runs before
# --sample-order read in the shuffled order (a resume under the new default would read other batches); runs
# before --prompt-format (which resolves to a value) trained on the paper's prompts.
BEFORE_THE_FIELD = {"sample_order": "shuffled", "prompt_format": "paper"}


def check_same_run(marker: Path, cfg: DistillConfig, cache) -> dict:
    """Refuse, in one line naming every difference, to continue a run under other identity fields than it was
    started with, or on a cache of other content; the recorded config when it is the same run. A run recorded
    before a field existed is compared with that field's default: the value the run used, since every field added
    since (ot_weight, a method's new knob, ...) defaults to what the code did before it existed — except those of
    BEFORE_THE_FIELD, compared with the value runs used then."""
    try:
        recorded = json.loads(marker.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ConfigError(f"{marker}: unreadable (not JSON); cannot tell which run this is — cannot --resume") from None
    old, now = recorded.get("config", {}), config_to_dict(cfg)     # a `datasets` object as data: by description
    if "cache_identity" in recorded and recorded["cache_identity"] != cache_identity(cache):
        raise ConfigError(f"--resume {marker.parent}: the run was started on another teacher cache (recorded "
                          f"{old.get('cache')!r}, now {cfg.cache!r}: different content); resume with the same cache")
    defaults = {f.name: f.default for f in dataclasses.fields(DistillConfig)} | BEFORE_THE_FIELD
    old = {name: old.get(name, defaults.get(name)) for name in RUN_IDENTITY} | old
    changed = [name for name in RUN_IDENTITY if old[name] != now[name]]
    if changed:
        was = ", ".join(f"{name}={old[name]!r}" for name in changed)
        has = ", ".join(f"{name}={now[name]!r}" for name in changed)
        raise ConfigError(f"--resume {marker.parent}: the run was started with {was}; this command has {has} — "
                          "resume with the same settings, or start a new run with another --out")
    return old


def student_weights_dtype(cfg: DistillConfig, device) -> torch.dtype:
    """Full fine-tuning: float32 master weights (AdamW updates are lost in bf16), --dtype is the autocast's.
    LoRA: the frozen base in --dtype (default bf16 on CUDA: a 7B base is 14 GB, not 28), the adapters float32."""
    return resolve_dtype(cfg.dtype, device) if cfg.lora_rank else torch.float32


def load_student(cfg: DistillConfig, device):
    """The student, full fine-tuning or LoRA (peft) over every linear layer (weights: student_weights_dtype), with
    gradient checkpointing when asked."""
    model = load_model(cfg.student, dtype=student_weights_dtype(cfg, device), device=device, seed=cfg.seed,
                       trust_remote_code=cfg.trust_remote_code, revision=cfg.revision,
                       attn_implementation=cfg.attn_implementation)
    if cfg.gradient_checkpointing:
        _enable_gradient_checkpointing(model, cfg)
    if cfg.lora_rank:
        targets = cfg.lora_targets if cfg.lora_targets == "all-linear" else [t.strip() for t in cfg.lora_targets.split(",")]
        model = get_peft_model(model, LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                                 target_modules=targets, task_type="CAUSAL_LM"))
    model.train()
    if getattr(model.config, "use_cache", None) is not None:
        model.config.use_cache = False
    return model


def _enable_gradient_checkpointing(model, cfg: DistillConfig) -> None:
    """Recompute each block's activations in the backward (non-reentrant checkpointing: works with frozen inputs,
    keeps the RNG streams, so dropout and resume are unchanged). Under LoRA the embedding output must require
    grad for the recomputed blocks to reach the adapters."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(f"--gradient-checkpointing: {cfg.student} ({type(model).__name__}) does not support it")
    if hasattr(model, "activation_checkpointing_enable"):     # transformers >= 5.x's name; the old one warns
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora_rank:
        model.enable_input_require_grads()


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


def records_as_student_ids(cfg: DistillConfig, tokenizer) -> dict[str, np.ndarray]:
    """--method sft from plain data: the standard view of every record (in --prompt-format), tokenised for the
    student."""
    records, _ = load_records(cfg.data, cfg.split, cfg.data_root, cfg.field_map or None,
                              data_config=cfg.data_config, data_split=cfg.data_split)
    if cfg.limit is not None:
        records = records[:cfg.limit]
    ids_all, offsets, prompt_lens = [], [0], []
    for rec in records:
        ids, prompt_len = student_view_ids(tokenizer, view_prompt(tokenizer, rec, "std", cfg.prompt_format),
                                           rec["output"], True, cfg.max_length)
        ids_all.extend(ids)
        offsets.append(len(ids_all))
        prompt_lens.append(prompt_len)
    return {"std_ids": np.asarray(ids_all, np.int32), "std_offsets": np.asarray(offsets, np.int64),
            "std_prompt_len": np.asarray(prompt_lens, np.int32)}
