"""What a finished `distill` run leaves in its --out directory, besides checkpoints:

    config.json, model.safetensors, tokenizer files   the best epoch's student (from_pretrained-loadable;
                                                      LoRA merged unless --keep-adapter)
    projectors.safetensors                            DSKD / OT projectors (to continue or inspect)
    summary.json, metrics.jsonl, tensorboard/         what happened (tensorboard/ and wandb/ as --report-to says)
    loss_curve.png, README.md                         a plot and a model card (Hub metadata: cot2align/hub.py)
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import threading
from pathlib import Path

from safetensors.torch import save_file

from cot2align import logs
from cot2align.config import DistillConfig, config_to_dict, report_targets
from cot2align.hub import write_card
from cot2align.plotting import pyplot
from cot2align.train.metrics import read_records
from cot2align.write_errors import io_failure


def save_model(model, tokenizer, path: Path, cfg: DistillConfig) -> None:
    """A from_pretrained-loadable copy of the current weights (LoRA merged unless --keep-adapter)."""
    shutil.rmtree(path, ignore_errors=True)
    if hasattr(model, "merge_and_unload") and not cfg.keep_adapter:
        model = copy.deepcopy(model).merge_and_unload()
    generation = getattr(model, "generation_config", None)
    if cfg.prompt_format == "chat" and generation is not None:
        # the tokenizer (saved below with its chat template) ends a turn with its EOS, the end-of-turn token:
        # model.generate stops there too
        generation.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(str(path), safe_serialization=True)
    tokenizer.save_pretrained(str(path))


def save_best(model, tokenizer, out: Path, cfg: DistillConfig) -> None:
    """Replace out/best with the current weights, atomically (written aside, then renamed)."""
    save_model(model, tokenizer, out / "best.tmp", cfg)
    shutil.rmtree(out / "best", ignore_errors=True)
    os.replace(out / "best.tmp", out / "best")


def _report_writer_errors_once() -> None:
    """TensorBoard writes from a thread of its own. A write that fails there (a full disk) is kept for the
    run's thread, which raises it at its next log or at close, where call_trackers makes it one warning; the
    writer thread also re-raises it, and Python would print that copy as a traceback. Leave that copy out,
    and only that one: an error the writer thread has not kept still reaches the hook that was installed."""
    installed = threading.excepthook
    if getattr(installed, "cot2align_tensorboard", False):
        return

    def hook(args) -> None:
        kept = getattr(args.thread, "exception", None) is args.exc_value
        if not (kept and type(args.thread).__name__ == "_AsyncWriterThread"):
            installed(args)

    hook.cot2align_tensorboard = True
    threading.excepthook = hook


class TensorBoard:
    """Scalars under --out/tensorboard (`tensorboard --logdir runs/`)."""

    name = "tensorboard"

    def __init__(self, out: Path, cfg: DistillConfig):
        from torch.utils.tensorboard import SummaryWriter

        _report_writer_errors_once()
        self.writer = SummaryWriter(str(out / "tensorboard"))

    def log(self, scalars: dict[str, float], step: int) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class WandB:
    """A Weights & Biases run named after --out, in project $WANDB_PROJECT (default cot2align), files under
    --out/wandb; the resolved config is its config. Offline with WANDB_MODE=offline."""

    name = "wandb"

    def __init__(self, out: Path, cfg: DistillConfig):
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "cot2align"), name=out.resolve().name,
                              dir=str(out), config=config_to_dict(cfg))

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


TRACKERS = {"tensorboard": TensorBoard, "wandb": WandB}


def open_trackers(out: Path, cfg: DistillConfig, say) -> list:
    """The trackers of --report-to (metrics.jsonl is written whatever it says)."""
    trackers = []
    for name in report_targets(cfg.report_to):
        try:
            trackers.append(TRACKERS[name](out, cfg))
        except Exception as e:     # not installed, or its server unreachable: metrics.jsonl still has everything
            reason = io_failure(e) or f"{type(e).__name__}: {e}"
            say(f"--report-to {name}: not available ({reason}); metrics go to metrics.jsonl only", logging.WARNING)
    return trackers


def call_trackers(trackers: list, say, method: str, *args) -> None:
    """`tracker.<method>(*args)` on each tracker. A tracker that fails (its disk full, its server gone) is turned
    off with one warning and the run goes on: metrics.jsonl holds every value, and a failure that matters to the
    run itself (a checkpoint or metrics.jsonl that cannot be written) stops it with its own error."""
    for tracker in list(trackers):
        try:
            getattr(tracker, method)(*args)
        except Exception as e:
            trackers.remove(tracker)
            reason = io_failure(e) or f"{type(e).__name__}: {e}"
            say(f"--report-to {tracker.name}: {reason}; turned off for the rest of the run "
                "(metrics.jsonl has every value)", logging.WARNING)
            if method != "close":
                try:
                    tracker.close()         # let it end cleanly (W&B would otherwise wait at exit)
                except Exception:
                    pass


def progress_bar(total: int, epoch: int, enabled: bool):
    """The epoch's bar (batches/s, ETA, loss): on a terminal, unless quiet."""
    return logs.progress_bar(total, f"epoch {epoch + 1}", unit="batch", enabled=enabled, leave=False)


def write_outputs(out: Path, cfg: DistillConfig, tokenizer, model, projectors, cache, summary: dict) -> None:
    """The best epoch's model at the top of --out (saving the final weights if no epoch was kept), the
    projectors, summary.json, the loss plot and the model card. The model files are moved up from best/, not
    copied: one copy of the weights per run."""
    best = out / "best"
    # best/ is written at every epoch that wins (the first always does), so it is missing here only when an earlier
    # finalise of this run moved it up already (a --resume after a kill, or of a run extended with more steps whose
    # new epochs did not win): the model at the top is then the kept one and stays.
    if not best.exists() and not has_saved_model(out):
        save_model(model, tokenizer, best, cfg)
    if best.exists():
        for item in best.iterdir():         # a kill half-way leaves the rest in best/ for the next finalise
            target = out / item.name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(item, target)
        best.rmdir()
    if len(list(projectors.parameters())):
        save_file({k: v.detach().contiguous().cpu() for k, v in projectors.state_dict().items()},
                  str(out / "projectors.safetensors"))
    plot_losses(out)
    write_card(out, cfg, cache, summary)
    tmp = out / "summary.json.tmp"          # last, and whole: its presence means every output is written
    tmp.write_text(json.dumps(summary, indent=1))
    os.replace(tmp, out / "summary.json")


def has_saved_model(out: Path) -> bool:
    """A from_pretrained-loadable model (full weights or a kept LoRA adapter) at the top of --out."""
    return any(out.glob("model*.safetensors")) or (out / "adapter_model.safetensors").exists()


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
