"""What a finished `distill` run leaves in its --out directory, besides checkpoints:

    config.json, model.safetensors, tokenizer files   the best epoch's student (from_pretrained-loadable;
                                                      LoRA merged unless --keep-adapter)
    projectors.safetensors                            DSKD / OT projectors (to continue or inspect)
    summary.json, metrics.jsonl, tensorboard/         what happened
    loss_curve.png, README.md                         a plot and a model card
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
from pathlib import Path

from safetensors.torch import save_file
from tqdm.auto import tqdm

from cot2align.config import DistillConfig
from cot2align.plotting import pyplot
from cot2align.train.metrics import read_records


def save_model(model, tokenizer, path: Path, cfg: DistillConfig) -> None:
    """A from_pretrained-loadable copy of the current weights (LoRA merged unless --keep-adapter)."""
    shutil.rmtree(path, ignore_errors=True)
    if hasattr(model, "merge_and_unload") and not cfg.keep_adapter:
        model = copy.deepcopy(model).merge_and_unload()
    model.save_pretrained(str(path), safe_serialization=True)
    tokenizer.save_pretrained(str(path))


def save_best(model, tokenizer, out: Path, cfg: DistillConfig) -> None:
    """Replace out/best with the current weights, atomically (written aside, then renamed)."""
    save_model(model, tokenizer, out / "best.tmp", cfg)
    shutil.rmtree(out / "best", ignore_errors=True)
    os.replace(out / "best.tmp", out / "best")


def tensorboard_writer(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:   # tensorboard not installed: metrics.jsonl still has everything
        return None
    return SummaryWriter(str(out / "tensorboard"))


def progress_bar(total: int, epoch: int, enabled: bool):
    return tqdm(total=total, desc=f"epoch {epoch + 1}", disable=not enabled, unit="batch", leave=False)


def write_outputs(out: Path, cfg: DistillConfig, tokenizer, model, projectors, cache, summary: dict) -> None:
    """The best epoch's model at the top of --out (saving the final weights if no epoch was kept), the
    projectors, summary.json, the loss plot and the model card. The model files are moved up from best/, not
    copied: one copy of the weights per run."""
    best = out / "best"
    if not best.exists():
        save_model(model, tokenizer, best, cfg)
    for item in best.iterdir():
        target = out / item.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(item, target)
    best.rmdir()
    if len(list(projectors.parameters())):
        save_file({k: v.detach().contiguous().cpu() for k, v in projectors.state_dict().items()},
                  str(out / "projectors.safetensors"))
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    plot_losses(out)
    (out / "README.md").write_text(model_card(out, cfg, cache, summary))


def model_card(out: Path, cfg: DistillConfig, cache, summary: dict) -> str:
    manifest_hash = None
    if cache is not None:
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
    return "\n".join(card) + "\n"


def plot_losses(out: Path) -> None:
    """loss_curve.png: the objective and its parts per optimiser step (nothing without matplotlib)."""
    plt = pyplot()
    if plt is None:
        return
    train = [r for r in read_records(out / "metrics.jsonl") if "ce" in r]
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
