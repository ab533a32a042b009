"""Sharing a run: its model card (a `huggingface_hub.ModelCard` with metadata the Hub reads) and the upload.

The card's YAML header names the base model (the student, when it is a Hub model), the datasets, the library
(transformers: the saved model is a plain `from_pretrained` checkpoint; peft for a kept LoRA adapter), the
tags and pipeline, the run's metrics as a model-index (validation ROUGE-L and cross-entropy of the kept
epoch, plus every `cot2align evaluate` result found under the run), and a `cot2align` section with the
teacher, the method, alpha and the cache. `ModelCard.load(run_dir).data` reads it back.

`push_to_hub(run_dir)` refreshes the card with any evaluate results, creates the repository (exist_ok) and
uploads the run directory without its checkpoints; any failure is one `HubError` line, and the local run is
left as it was (bar the refreshed card).

huggingface_hub is imported inside the functions: the command line imports this module at start-up.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

CITATION = """@article{le2025cot2align,
  title   = {CoT2Align: Cross-Chain of Thought Distillation via Optimal Transport Alignment for Language Models
             with Different Tokenizers},
  author  = {Le, Anh Duc and Vu, Tu and others},
  journal = {arXiv preprint arXiv:2502.16806},
  year    = {2025}
}"""

TAGS = ["cot2align", "knowledge-distillation", "distillation", "cross-tokenizer", "chain-of-thought", "optimal-transport"]

# What a push leaves out of the repository: training state and scratch files, not the model or its records.
IGNORE = ["checkpoints/*", "checkpoints/**", "best/*", "best/**", "best.tmp/**", "*.tmp", ".*", "wandb/**"]


class HubError(RuntimeError):
    """A one-line, user-facing problem talking to the Hugging Face Hub (the local run is intact)."""


def hub_model_id(name: str | None) -> str | None:
    """A model's Hub id (`owner/name`) when it has one: an alias's hub id, or a name that is one and is no
    local path; None for presets and local directories (the Hub refuses metadata that names no Hub model)."""
    from cot2align.config import MODEL_ALIASES

    if not isinstance(name, str) or not name:      # a datasets.Dataset passed as data has no Hub id here
        return None
    name = MODEL_ALIASES.get(name, {}).get("hub", name)
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name) and not Path(name).exists():
        return name
    return None


def hub_dataset_id(data: str | None) -> str | None:
    """A dataset's Hub id when it has one: an alias's (`dolly` -> databricks/databricks-dolly-15k), or a Hub id."""
    from cot2align.data.readers import DATASETS

    if not isinstance(data, str) or not data:
        return None
    if data in DATASETS:
        return DATASETS[data]["hub"].split(":")[0]
    return hub_model_id(data)


def _eval_result(metric_type: str, metric_name: str, value, data: str, split: str | None):
    from huggingface_hub import EvalResult

    return EvalResult(task_type="text-generation", task_name="Text generation", dataset_type=hub_dataset_id(data) or data,
                      dataset_name=data, dataset_split=split, metric_type=metric_type, metric_name=metric_name,
                      metric_value=round(float(value), 4))


def _training_results(info: dict, summary: dict) -> list:
    """The kept epoch's validation scores (the model this run saved)."""
    history = [r for r in summary.get("history", []) if r.get("epoch") == summary.get("best_epoch")]
    final = history[-1] if history else (summary.get("history") or [{}])[-1]
    data = info.get("val_data") or info.get("data") or "validation"
    names = {"val_rougeL": ("rouge", "Validation ROUGE-L (greedy)"),
             "val_ce": ("cross_entropy", "Validation cross-entropy (nats/token)"),
             "val_bits_per_byte": ("bits_per_byte", "Validation bits per byte")}
    return [_eval_result(*names[key], final[key], data, "validation") for key in names if final.get(key) is not None]


def _evaluate_results(run_dir: Path) -> list:
    """Every `cot2align evaluate` result saved under the run (RUN/eval/<data>_<split>/results.json)."""
    results = []
    for path in sorted(run_dir.glob("eval/*/results.json")):
        try:
            found = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        data, split = str(found.get("data", "?")), found.get("split")
        if "mean" in found:
            runs = len(found.get("per_run", {})) or 1
            results.append(_eval_result("rouge", f"ROUGE-L ({found.get('decoding', '?')}, {runs} runs)", found["mean"],
                                        data, split))
        if isinstance(found.get("ce"), dict):
            results.append(_eval_result("cross_entropy", "Cross-entropy of the references (nats/token)",
                                        found["ce"]["nats_per_token"], data, split))
            results.append(_eval_result("bits_per_byte", "Bits per byte of the references", found["ce"]["bits_per_byte"],
                                        data, split))
    return results


def run_card_info(config: dict, teacher: str | None, data: str | None, manifest_hash: str | None, summary: dict) -> dict:
    """What the card says about a run, from its config (a dict) and what it trained on."""
    return {"student": config.get("student"), "teacher": teacher, "data": data, "split": config.get("split"),
            "val_data": config.get("val_data"), "method": config.get("method"), "cot2align": config.get("cot2align"),
            "alpha": config.get("alpha"), "kl_variant": config.get("kl_variant"), "lora_rank": config.get("lora_rank"),
            "keep_adapter": bool(config.get("keep_adapter")), "epochs": config.get("epochs"), "lr": config.get("lr"),
            "select_by": config.get("select_by"), "cache_manifest_sha256": manifest_hash, "steps": summary.get("steps"),
            "best_epoch": summary.get("best_epoch"), "prompt_format": config.get("prompt_format")}


# How the card tells people to prompt the model: the format it was trained on.
PROMPT_FORMAT_TEXT = {
    "chat": "chat: the tokenizer's chat template (saved with it), `apply_chat_template(messages, "
            "add_generation_prompt=True)`; a response ends with the template's end-of-turn token (the tokenizer's EOS)",
    "paper": "paper: the CoT2Align paper's Alpaca-style template (\"### Instruction: ... ### Response:\")",
}


def _prompt_lines(prompt_format: str | None) -> list[str]:
    """The card's usage lines that build a prompt in the format the model was trained on."""
    if prompt_format == "chat":
        return ['messages = [{"role": "user", "content": "Summarise: ..."}]',
                "ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\")"]
    return ['prompt = "Below is an instruction that describes a task. Write a response that appropriately completes '
            'the request.\\n\\n### Instruction:\\nSummarise: ...\\n\\n### Response:\\n"']


def build_card(run_dir: Path, info: dict, summary: dict, name: str | None = None):
    """The model card of a run: Hub metadata + a short description, the training setting and the citation."""
    from huggingface_hub import ModelCard, ModelCardData

    run_dir = Path(run_dir)
    name = name or run_dir.resolve().name
    method = f"{info['method']}{' + CoT2Align' if info['cot2align'] else ''}"
    adapter = bool(info["keep_adapter"] and info["lora_rank"])
    results = _training_results(info, summary) + _evaluate_results(run_dir)
    dataset = hub_dataset_id(info["data"])
    data = ModelCardData(
        model_name=name, base_model=hub_model_id(info["student"]), datasets=[dataset] if dataset else None,
        library_name="peft" if adapter else "transformers", pipeline_tag="text-generation",
        tags=TAGS + [info["method"]] if info["method"] else list(TAGS), eval_results=results or None,
        cot2align={k: v for k, v in info.items() if v is not None})
    rows = [("student (base model)", info["student"]), ("teacher", info["teacher"] or "none (plain data)"),
            ("method", f"{method}, alpha {info['alpha']} (loss = (1 - alpha) CE + alpha (KD + CCoT))"),
            ("data", f"{info['data']} ({info['split']})"), ("cache manifest sha256", info["cache_manifest_sha256"]),
            ("training", f"{info['steps']} steps, {info['epochs']} epochs, lr {info['lr']}, kept epoch "
                         f"{info['best_epoch']} (selected by {info['select_by']})"),
            ("prompt format", PROMPT_FORMAT_TEXT.get(info.get("prompt_format") or "paper"))]
    scores = [f"- {r.metric_name} on {r.dataset_name} ({r.dataset_split}): {r.metric_value}" for r in results]
    body = "\n".join([
        f"# {name}", "",
        (f"A student language model distilled from `{info['teacher']}`" if info["teacher"] else
         "A language model fine-tuned on plain data") +
        f" with cot2align ({method}): knowledge distillation across different "
        "tokenizers with chain-of-thought optimal-transport alignment (CoT2Align).", "",
        "## Training", "", "| | |", "| --- | --- |", *[f"| {k} | {v} |" for k, v in rows], "",
        "## Results", "", *(scores or ["No validation or evaluation results were recorded."]), "",
        "## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
        *(["from peft import AutoPeftModelForCausalLM", "", f'model = AutoPeftModelForCausalLM.from_pretrained("{name}")']
          if adapter else [f'model = AutoModelForCausalLM.from_pretrained("{name}")']),
        f'tokenizer = AutoTokenizer.from_pretrained("{name}")', *_prompt_lines(info.get("prompt_format")), "```", "",
        "## Citation", "", "```bibtex", CITATION, "```", ""])
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def write_card(out: Path, cfg, cache, summary: dict) -> None:
    """README.md of a finished run (train/outputs.py)."""
    import hashlib

    from cot2align.config import config_to_dict

    manifest_hash = None
    if cache is not None:
        manifest_hash = hashlib.sha256(json.dumps(cache.manifest, sort_keys=True).encode()).hexdigest()
    config = config_to_dict(cfg)              # a datasets.Dataset given as data: by its description
    teacher = cache.manifest["teacher"]["name_or_path"] if cache is not None else None
    data = cache.manifest["data"].get("name", config["data"]) if cache is not None else config["data"]
    info = run_card_info(config, teacher, data, manifest_hash, summary)
    build_card(out, info, summary).save(Path(out) / "README.md")


def refresh_card(run_dir: Path, name: str | None = None):
    """The run's card rebuilt from what the run recorded (its card's `cot2align` section, else run.json and
    summary.json), with every evaluate result now under it; saved to README.md and returned."""
    from huggingface_hub import ModelCard

    run_dir = Path(run_dir)
    summary = _read_json(run_dir / "summary.json")
    info = None
    if (run_dir / "README.md").exists():
        info = ModelCard.load(run_dir / "README.md", ignore_metadata_errors=True).data.to_dict().get("cot2align")
    if not info:      # a run written before cards had metadata
        marker = _read_json(run_dir / "run.json")
        config = marker.get("config", {})
        info = run_card_info(config, marker.get("teacher"), config.get("data") or Path(str(config.get("cache"))).name,
                             None, summary)
    info = {**run_card_info({}, None, None, None, summary), **info}
    card = build_card(run_dir, info, summary, name)
    card.save(run_dir / "README.md")
    return card


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise HubError(f"{path.parent}: not a finished cot2align run ({path.name} not found)") from None
    except (OSError, ValueError) as e:
        raise HubError(f"{path}: unreadable ({e})") from None


def _is_model_dir(run_dir: Path) -> bool:
    has_config = (run_dir / "config.json").exists() or (run_dir / "adapter_config.json").exists()
    return has_config and any(run_dir.glob("*.safetensors"))


def warn_if_no_token(say) -> None:
    """At the start of a run with --push-to-hub: say so now if the push at its end cannot authenticate."""
    from huggingface_hub import get_token

    if get_token() is None:
        say("--push-to-hub: no Hugging Face token found (`hf auth login`, or HF_TOKEN); the push at the end of the run "
            "will fail unless one is set by then (`cot2align push OUT` retries it)", logging.WARNING)


def push_to_hub(run_dir: str | Path, repo_id: str | None = None, private: bool | None = None, token: str | None = None,
                log=None) -> str:
    """Upload a finished run (the model, tokenizer, card, metrics, plots; not the checkpoints) to the Hub.

    repo_id: NAME (the logged-in user's namespace) or OWNER/NAME [default: the hub_model_id the run was trained
    with, else the run directory's name]. Returns the repository's URL; raises HubError in one line."""
    from cot2align.logs import reporter

    say = reporter(log, __name__)
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise HubError(f"{run_dir}: not a directory")
    if not _is_model_dir(run_dir):
        raise HubError(f"{run_dir}: no saved model (config.json and *.safetensors); is this a finished run?")
    config = _read_json(run_dir / "run.json").get("config", {}) if (run_dir / "run.json").exists() else {}
    repo_id = repo_id or config.get("hub_model_id") or run_dir.resolve().name
    private = bool(config.get("hub_private")) if private is None else private
    refresh_card(run_dir, repo_id.split("/")[-1])
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        say(f"push: uploading {run_dir} to {url.repo_id}")
        api.upload_folder(repo_id=url.repo_id, folder_path=str(run_dir), ignore_patterns=IGNORE,
                          commit_message=f"cot2align: upload {run_dir.resolve().name}")
    except Exception as e:    # network, authentication, permissions: whatever the hub client raises
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise HubError(f"push to the Hugging Face Hub failed ({type(e).__name__}: {first}); the run is intact in "
                       f"{run_dir} — log in (`hf auth login` or HF_TOKEN) and retry with `cot2align push "
                       f"{run_dir}`") from None
    say(f"push: {url}")
    return str(url)
