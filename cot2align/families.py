"""Which paper setting a teacher follows, whatever way it is named.

    family_of("mistral-7b")                  -> "mistral"   an alias
    family_of("mistralai/Mistral-7B-v0.1")   -> "mistral"   the alias's hub id (case aside)
    family_of("runs/teacher_mistral")        -> "mistral"   a LoRA adapter directory: its adapter_config.json's
                                                            base_model_name_or_path, followed
                                                         or a fine-tuned full model directory: its model card's
                                                            `base_model` (the Hub's convention, which our own
                                                            `sft` writes), else its config.json's architecture
    teacher_family(manifest["teacher"])      -> the same for a cache's teacher, falling back on the architecture the
                                                cache recorded (the directory may be gone, or on another machine)

A paper setting (config.PAPER_SETTINGS) is keyed by the teacher's family. The architecture test compares a
config's model_type, hidden size, depth and vocabulary with the paper teacher's published config.json: a
fine-tuned model keeps all four, and no two paper teachers share them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from cot2align.config import MODEL_ALIASES, PAPER_SETTINGS, TINY_PRESETS

# (model_type, hidden_size, num_hidden_layers, vocab_size) of each paper teacher's config.json on the Hub.
# vocab_size None: any (a tiny preset's vocabulary is its tokenizer's length).
PAPER_TEACHER_ARCHITECTURES: dict[str, tuple] = {
    "mistral": ("mistral", 4096, 32, 32000),        # mistralai/Mistral-7B-v0.1
    "llama2": ("llama", 4096, 32, 32000),           # meta-llama/Llama-2-7b-hf
    "qwen1.5": ("qwen2", 2048, 24, 151936),         # Qwen/Qwen1.5-1.8B
    "qwen2.5": ("qwen2", 3584, 28, 152064),         # Qwen/Qwen2.5-7B-Instruct
    **{name: (spec["model_type"], spec["config"].get("hidden_size", spec["config"].get("n_embd")),
              spec["config"].get("num_hidden_layers", spec["config"].get("n_layer")), None)
       for name, spec in TINY_PRESETS.items() if name in PAPER_SETTINGS},
}

_HUB_FAMILIES = {spec["hub"].lower(): spec["family"] for spec in MODEL_ALIASES.values() if "hub" in spec}
_MAX_HOPS = 8      # adapter -> fine-tuned dir -> base: a chain this long is a loop


def family_of(name_or_path: str | None, _hops: int = 0) -> str | None:
    """The PAPER_SETTINGS family of a model named by alias, tiny preset, hub id or local directory; None when the
    name leads to no paper teacher."""
    if not isinstance(name_or_path, str) or not name_or_path or _hops > _MAX_HOPS:
        return None
    if name_or_path in MODEL_ALIASES:
        family = MODEL_ALIASES[name_or_path]["family"]
        return family if family in PAPER_SETTINGS else None
    if name_or_path in PAPER_SETTINGS:               # a tiny preset that has a setting (tiny-qwen2)
        return name_or_path
    path = Path(name_or_path)
    if path.is_dir():
        return _directory_family(path, _hops)
    return _HUB_FAMILIES.get(name_or_path.lower())


def _directory_family(path: Path, hops: int) -> str | None:
    """A local model directory's family: the base model it names (LoRA adapter, model card), else its architecture."""
    base = named_base(path)
    if base is not None:
        family = family_of(base, hops + 1)
        if family is not None:
            return family
    return architecture_family(_read_json(path / "config.json"))


def named_base(path: Path) -> str | None:
    """The base model a local directory says it was made from: a LoRA adapter's base_model_name_or_path, else a
    model card's `base_model` (README.md front matter, the first when a list); None when it names none."""
    adapter = _read_json(path / "adapter_config.json")
    base = adapter.get("base_model_name_or_path")
    if isinstance(base, str) and base:
        return base
    card = _card_metadata(path / "README.md")
    base = card.get("base_model")
    if isinstance(base, list):
        base = base[0] if base else None
    return base if isinstance(base, str) and base else None


def base_model_of(name_or_path: str | None) -> str | None:
    """What a cache records as its teacher's base: the name a local directory's adapter or card gives (followed
    through further directories), or None for an alias, preset or hub id (the name itself says it)."""
    seen = 0
    base = None
    while isinstance(name_or_path, str) and Path(name_or_path).is_dir() and seen <= _MAX_HOPS:
        named = named_base(Path(name_or_path))
        if named is None:
            break
        base = name_or_path = named
        seen += 1
    return base


def architecture_family(config: dict) -> str | None:
    """The paper teacher whose architecture a config.json (or a cache manifest's teacher section) has."""
    model_type = config.get("model_type")
    hidden = config.get("hidden_size", config.get("n_embd"))
    layers = config.get("num_hidden_layers", config.get("num_layers", config.get("n_layer")))
    vocab = config.get("vocab_size")
    for family, (kind, size, depth, vocabulary) in PAPER_TEACHER_ARCHITECTURES.items():
        if (model_type, hidden, layers) == (kind, size, depth) and vocabulary in (None, vocab):
            return family
    return None


def teacher_family(teacher: dict | None) -> str | None:
    """The family of a cache's teacher (its manifest's `teacher` section): by its name, else the base model the
    cache recorded, else the architecture it recorded."""
    return teacher_family_source(teacher)[0]


def teacher_family_source(teacher: dict | None) -> tuple[str | None, str | None]:
    """(family, how it was found: "name" | "base model" | "architecture"), (None, None) when none matches. Only
    "architecture" is a guess: another model of the same shape (Qwen2-7B and Qwen2.5-7B share one) matches too."""
    if not teacher:
        return None, None
    for how, family in (("name", lambda: family_of(teacher.get("name_or_path"))),
                        ("base model", lambda: family_of(teacher.get("base_model"))),
                        ("architecture", lambda: architecture_family(teacher))):
        found = family()
        if found is not None:
            return found, how
    return None, None


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _card_metadata(path: Path) -> dict:
    """The YAML front matter of a model card (between the leading '---' lines), {} when none is readable."""
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return {}
    match = re.match(r"---\s*\n(.*?)\n---\s*(\n|$)", text, re.S)
    if match is None:
        return {}
    try:
        value = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return {}
    return value if isinstance(value, dict) else {}
