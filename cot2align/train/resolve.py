"""A run's configuration, resolved once.

    resolve_distill_config(flags + YAML, cache) -> the config the run trains under and records

It fills every value a run would otherwise derive on its way: the accelerate launcher's settings, the paper's
setting for the cache's teacher (config.py, DistillConfig.with_defaults), the teacher's distribution the cache
serves by default (exact with hidden states, topk from a `--store logits` cache: cache/profiles.py), the device, the dtype that device
implies, the DataLoader workers, the output directory and the resume state. The result is a new frozen
DistillConfig that nothing changes afterwards: `--print-config` prints it, the finished-run check, setup and the
--resume check read it, and config.yaml records it.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from cot2align.cache.format import prompt_format
from cot2align.cache.profiles import default_teacher_dist
from cot2align.config import DistillConfig, model_family, paper_setting
from cot2align.data.chat import resolve_prompt_format
from cot2align.families import teacher_family_source
from cot2align.logs import silent
from cot2align.modeling import dtype_name, resolve_dtype

# `accelerate launch` passes the user's accelerate config to the processes it starts as environment variables;
# these two are cot2align settings too, and are taken from there when the command line leaves them unset.
ACCELERATE_PRECISION = {"bf16": "bf16", "fp16": "fp16", "no": "fp32"}


def accelerate_settings(cfg: DistillConfig, environ=None) -> tuple[dict, list[str]]:
    """(values, what was taken): --dtype from ACCELERATE_MIXED_PRECISION and --fsdp from ACCELERATE_USE_FSDP when
    not given (flags and YAML values win). The process count and machines come from the launcher itself."""
    environ = os.environ if environ is None else environ
    values, taken = {}, []
    precision = environ.get("ACCELERATE_MIXED_PRECISION")
    if cfg.dtype is None and precision in ACCELERATE_PRECISION:
        values["dtype"] = ACCELERATE_PRECISION[precision]
        taken.append(f"dtype {values['dtype']} (mixed_precision {precision})")
    if not cfg.fsdp and environ.get("ACCELERATE_USE_FSDP", "").lower() in ("true", "1"):
        values["fsdp"] = True
        taken.append("fsdp (use_fsdp)")
    return values, taken


def teacher_name(cache) -> str | None:
    return cache.manifest["teacher"]["name_or_path"] if cache is not None else None


def default_out(cfg: DistillConfig) -> str:
    tag = f"{model_family(cfg.student)}_{cfg.method}{'_cot2align' if cfg.cot2align else ''}_a{cfg.alpha}"
    return str(Path("runs") / tag)


def default_prompt_format(cfg: DistillConfig, cache) -> str:
    """--prompt-format, else the format the cache's prompts are in, else (--data without a cache) chat for
    conversational data and paper for instruction data (data/chat.py)."""
    if cfg.prompt_format is not None:
        return cfg.prompt_format
    if cache is not None:
        return prompt_format(cache.manifest)
    from cot2align.data.readers import load_records

    records, _ = load_records(cfg.data, cfg.split, cfg.data_root, cfg.field_map or None, data_config=cfg.data_config,
                              data_split=cfg.data_split)
    return resolve_prompt_format(None, records)


def resume_state(asked: bool, out: Path) -> bool:
    """--resume of an empty directory (a run killed before its first write) starts afresh: not a resume. A missing
    --out stays asked for, so that setup refuses it ('no run to resume')."""
    return bool(asked) and not (out.is_dir() and not any(out.iterdir()))


def resolve_distill_config(cfg: DistillConfig, cache, say=silent) -> DistillConfig:
    """The resolved config of a `distill` / `sft` run from `cfg` (flags + YAML) and the opened teacher cache (None
    for SFT from plain data); `say` tells what was filled from the launcher and which paper setting applies.
    Resolving a resolved config gives it back unchanged."""
    from_launcher, taken = accelerate_settings(cfg)
    if taken:
        say(f"from the accelerate config: {', '.join(taken)}")
    family, found_by = teacher_family_source(cache.manifest["teacher"]) if cache is not None else (None, None)
    filled = dataclasses.replace(cfg, **from_launcher).with_defaults(family, teacher_name(cache))
    setting = paper_setting(family, filled.student)
    if setting:
        say(f"paper setting: {setting} — method {filled.method}{' + CoT2Align' if filled.cot2align else ''}, "
            f"alpha {filled.alpha}, lr {filled.lr}, {filled.epochs} epochs, batch {filled.batch_size}x{filled.grad_accum}"
            f"{f', LoRA r={filled.lora_rank}' if filled.lora_rank else ', full fine-tuning'}"
            + (f" (the teacher was matched to {family} by its architecture alone, which other models of its shape "
               "share; pass --student to choose the student yourself)" if found_by == "architecture" else ""))
    device = torch.device(filled.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = filled.out or default_out(filled)
    return dataclasses.replace(
        filled, prompt_format=default_prompt_format(filled, cache), device=str(device),
        dtype=dtype_name(resolve_dtype(filled.dtype, device)),
        teacher_dist=filled.teacher_dist or default_teacher_dist(cache.manifest if cache is not None else None),
        num_workers=filled.num_workers if filled.num_workers is not None else (2 if device.type == "cuda" else 0),
        out=out, resume=resume_state(filled.resume, Path(out)))
