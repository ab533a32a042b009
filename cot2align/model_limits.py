"""What a model can take, checked before a command writes anything.

Two limits a model's own forward does not report well:

  * its positions: a model with learned position embeddings (GPT-2's `n_positions`) fails with an IndexError
    deep in its embedding on a longer sequence, after a cache or a run was already started; a rotary model
    (Llama, Qwen2, Mistral: `max_position_embeddings`) runs on, out of what it was trained for. A `--max-length`
    above the limit is refused in one line. Configs without such a field (ALiBi models) are not checked.
  * its output head against its tokenizer: a head with fewer rows than the tokenizer has tokens gives some
    token ids no logit, and MinED's vocabulary map (which may pick any teacher id) then indexes past the head.
    A larger head is normal (Qwen pads its vocabulary to a multiple of 64; the extra rows are never targets).

The limits come from the model's config, read without loading the weights where that is cheap (a preset, a local
directory, a hub model's config.json), so a 7B model is refused in a second, not after minutes of loading.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cot2align.errors import CacheError, ConfigError
from cot2align.methods import method as registered

# The config fields that bound a model's sequence length, by family: most (Llama, Qwen2, Mistral, GPT-NeoX, OPT,
# Phi) use max_position_embeddings; GPT-2 and GPT-J n_positions (GPT-2's config maps one name onto the other);
# MPT max_seq_len; ChatGLM seq_length.
POSITION_FIELDS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length")


@dataclass(frozen=True)
class ModelLimits:
    positions: int | None = None        # the longest sequence the model takes (None: its config states none)
    positions_field: str | None = None  # the config field that says so, as spelled in its config.json
    head_rows: int | None = None        # rows of its output head (None: not known without loading it)


def limits_of_config(config) -> ModelLimits:
    """The limits a transformers config states; head_rows is its vocab_size (the head's rows in every causal LM
    of transformers)."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    positions = field = None
    for name in POSITION_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            positions, field = value, getattr(config, "attribute_map", {}).get(name, name)
            break
    vocab = getattr(config, "vocab_size", None)
    return ModelLimits(positions, field, vocab if isinstance(vocab, int) and vocab > 0 else None)


def limits_of_model(model) -> ModelLimits:
    """The limits of a loaded model: positions from its config, head_rows from its output head itself."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    limits = limits_of_config(base.config)
    rows = int(head.weight.shape[0]) if head is not None and getattr(head, "weight", None) is not None else None
    return ModelLimits(limits.positions, limits.positions_field, rows)


def limits_of_name(name_or_path: str, trust_remote_code: bool = False) -> ModelLimits:
    """The limits of the model `name_or_path` names, from its config alone; empty limits when the config cannot be
    read cheaply (a GGUF file, a hub model that cannot be reached): the loader then reports what is wrong, and a
    model that loads is run unchecked, as before."""
    from transformers import AutoConfig

    from cot2align.config import MODEL_ALIASES, RANDOM_PRESETS, TINY_PRESETS

    for presets in (TINY_PRESETS, RANDOM_PRESETS):
        if name_or_path in presets:
            spec = presets[name_or_path]
            limits = limits_of_config(AutoConfig.for_model(spec["model_type"], **spec["config"]))
            # a tiny preset's head is built from its tokenizer's size (modeling.build_tiny_model): it always fits
            return limits if "vocab_size" in spec["config"] else ModelLimits(limits.positions, limits.positions_field)
    alias = MODEL_ALIASES.get(name_or_path, {})
    if "gguf_package" in alias:
        return ModelLimits()
    source = alias.get("hub", name_or_path)
    path = Path(source)
    if path.is_dir() and (path / "adapter_config.json").exists() and not (path / "config.json").exists():
        from cot2align.modeling import _adapter_base

        source = _adapter_base(path)          # a LoRA adapter: its base model has the config
    try:
        return limits_of_config(AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code))
    except Exception:   # noqa: BLE001 — unreadable here means unchecked here: loading the model reports the cause
        return ModelLimits()


def check_positions(limits: ModelLimits, max_length: int, who: str, error: type[Exception]) -> None:
    """Refuse a --max-length above the model's positions, naming both."""
    if limits.positions is not None and max_length > limits.positions:
        raise error(f"--max-length {max_length}: {who} takes at most {limits.positions} positions "
                    f"({limits.positions_field} in its config); pass --max-length {limits.positions} or less")


def check_head_covers_tokenizer(limits: ModelLimits, tokenizer_size: int, who: str) -> None:
    """Refuse a teacher whose output head has fewer rows than its tokenizer has tokens."""
    if limits.head_rows is not None and tokenizer_size > limits.head_rows:
        raise CacheError(f"{who}: its output head has {limits.head_rows} rows but its tokenizer has {tokenizer_size} "
                         f"tokens, so ids {limits.head_rows}..{tokenizer_size - 1} have no logit; expected a head at "
                         "least as large as the tokenizer (a tokenizer with added tokens needs the model's embeddings "
                         "resized too: model.resize_token_embeddings(len(tokenizer)))")


def check_teacher(cfg, tokenizer, model=None) -> None:
    """`cache-teacher`: the teacher takes --max-length tokens and its head covers its tokenizer. From `model` when
    the caller passed one, else from the config of --model (before its weights are loaded)."""
    limits = limits_of_model(model) if model is not None else limits_of_name(cfg.model, cfg.trust_remote_code)
    who = f"the teacher {cfg.model}"
    check_positions(limits, cfg.max_length, who, CacheError)
    check_head_covers_tokenizer(limits, len(tokenizer), who)


def check_student(cfg, cache=None) -> None:
    """`distill` (every method, sft included): the student takes --max-length tokens; and for MinED, the cache's
    teacher head covers its tokenizer (a cache written before cache-teacher refused such a teacher)."""
    check_positions(limits_of_name(cfg.student, cfg.trust_remote_code), cfg.max_length, f"the student {cfg.student}",
                    ConfigError)
    if cache is not None and registered(cfg.method).vocab_map:
        rows, size = cache.manifest["teacher"]["vocab_size"], cache.manifest["tokenizer"]["size"]
        if size > rows:
            raise CacheError(f"{cache.url}: --method {cfg.method} needs a logit for every teacher token, but the cached head "
                             f"has {rows} rows for a tokenizer of {size} tokens; rebuild the cache (cache-teacher now "
                             "refuses such a teacher) or use another --method")
