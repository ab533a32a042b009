"""The `cot2align` command line. Each command parses, resolves its config, calls one function, prints."""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import click

from cot2align.config import (ATTN_IMPLEMENTATIONS, DEVICE_MAPS, DTYPES, OT_EPSILON_SCALES, OT_GRADS, PROMPT_FORMATS,
                              SAMPLE_ORDERS, SELECT_BY, CacheTeacherConfig, DistillConfig, EvaluateConfig, build_config)
from cot2align.data.records import FIELD_MAP_KEYS
from cot2align.errors import CacheError, ConfigError, DataError, TrainingError
from cot2align.hub import HubError
from cot2align.logs import configure as configure_logging
from cot2align.methods import METHODS, STORE_PROFILES, TEACHER_DISTS, all_settings


USER_ERRORS = (CacheError, ConfigError, DataError, HubError, TrainingError)


class _Group(click.Group):
    """Turn known user errors, click's usage errors and what the user's storage or memory refused into one line on
    stderr and exit code 2 (no traceback); Ctrl-C exits 130. The only other code is `cache verify`'s 1 (damage
    found): README "Exit codes". A traceback is left only for an error no user input explains: a bug."""

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
        except OSError as e:       # storage the user pointed at: a permission, a full disk, a path that is a file
            click.echo(f"error: {_os_error(e)}", err=True)
            sys.exit(2)
        except MemoryError:
            click.echo("error: out of memory; lower --batch-size (or --batch-tokens, --max-length)", err=True)
            sys.exit(2)
        except RuntimeError as e:
            if type(e).__name__ != "OutOfMemoryError":      # torch's CUDA OOM; any other RuntimeError is a bug
                raise
            click.echo(f"error: out of accelerator memory ({str(e).splitlines()[0][:200]}); lower --batch-size "
                       "(or --batch-tokens, --max-length)", err=True)
            sys.exit(2)


def _os_error(error: OSError) -> str:
    """An OSError no command turned into its own message, in one line: what failed on which file."""
    reason = error.strerror or (str(error).splitlines()[0] if str(error).strip() else type(error).__name__)
    where = [str(f) for f in (error.filename, error.filename2) if f is not None]
    return f"{' -> '.join(where)}: {reason}" if where else reason


def _one_line(error: Exception) -> str:
    """The message of a user error. An error raised in a DataLoader worker comes back re-raised by torch with the
    worker's traceback in its message; its last line is the original message."""
    message = str(error).strip()
    if "Original Traceback" in message:
        message = message.splitlines()[-1].split(": ", 1)[-1]
    return message


@click.group(cls=_Group, context_settings={"max_content_width": 120, "terminal_width": 120})
@click.version_option(package_name="cot2align")
def main():
    """Distil a large teacher LLM into a student with another tokenizer (CoT2Align)."""
    configure_logging(quiet=False)     # progress messages on stderr; a command's --quiet keeps warnings only


DATA_HELP = ("Dataset: alias (dolly, alpaca, sni, dialogsum, sample), JSON/JSONL/Parquet/CSV file, save_to_disk "
             "directory, or hub id (owner/name).")
DATA_CONFIG_HELP = "The hub dataset's configuration (--data owner/name)."
DATA_SPLIT_HELP = "The dataset's split [default: as --split: train, validation|dev, test]."
REVISION_HELP = "The hub model's commit, branch or tag. [default: main]"
PROMPT_FORMAT_HELP = "Prompts: the paper's templates, or the model's chat template."
PROMPT_FORMAT_DEFAULT = "chat for messages data"
CHAT_TEMPLATE_HELP = "A Jinja chat template file replacing the model's."
ATTN_HELP = "Attention kernels (flash_attention_2 needs the flash-attn package)."


def _field_map(pairs: tuple[str, ...]) -> dict | None:
    if not pairs:
        return None
    out = {}
    for pair in pairs:
        ours, _, theirs = pair.partition("=")
        if not theirs or ours not in FIELD_MAP_KEYS:
            raise ConfigError(f"--field-map {pair}: expected OURS=THEIRS with OURS one of {', '.join(FIELD_MAP_KEYS)}")
        out[ours] = theirs
    return out


# ------------------------------------------------------------------------------------------ options from the configs
#
# Every option of a command that has a config is one field of that config's dataclass (config.py): same name,
# same type, the dataclass default shown in the help, and None when not given — so a value from --config is
# never overridden by a flag the user did not pass. tests/test_cli.py checks that each command's options and
# its dataclass's fields match one to one.

SPLITS = click.Choice(["train", "dev", "test"])


def _field(cls, name: str, *decls: str, help: str = "", default_text: str | None = None, **kwargs):
    """A click option for the field `name` of the config dataclass `cls`."""
    field = {f.name: f for f in dataclasses.fields(cls)}[name]
    base = str(field.type).replace("| None", "").strip()
    if base == "bool" and not any("/" in d for d in decls):
        kwargs.setdefault("is_flag", True)
    elif base != "bool":
        kwargs.setdefault("type", {"int": int, "float": float}.get(base, str))
    default = field.default if field.default is not dataclasses.MISSING else None
    hidden = default is None or default is False or default == "" or default == {}
    shown = default_text if default_text is not None else (None if hidden else default)
    if shown is not None:
        help = f"{help} [default: {shown}]".strip()
    return click.option(*(decls or (f"--{name.replace('_', '-')}",)), name, default=None, help=help, **kwargs)


def _config_options(command):
    """--config FILE and --print-config, shared by every command that has a config."""
    command = click.option("--print-config", is_flag=True, help="Print the resolved config as YAML and exit.")(command)
    return click.option("--config", "config_file", type=click.Path(), help="YAML config; flags override it.")(command)


def _print_config(cfg) -> None:
    import yaml

    from cot2align.config import config_to_dict

    click.echo(yaml.safe_dump(config_to_dict(cfg), sort_keys=False).rstrip())


C = CacheTeacherConfig


@main.command("cache-teacher")
@_config_options
@_field(C, "model", help="Teacher: alias, hub id, local path, or LoRA adapter dir.")
@_field(C, "adapter", help="A LoRA adapter (peft) merged into --model.")
@_field(C, "data", help=DATA_HELP)
@_field(C, "split", type=SPLITS)
@_field(C, "out", help="Cache directory.", default_text="cache/<teacher family>_<data>")
@_field(C, "topk", help="Teacher log-probs kept per row.")
@_field(C, "batch_tokens", help="Padded tokens per teacher batch.")
@_field(C, "max_length", help="Teacher tokens per sequence.")
@_field(C, "max_prompt_length", help="Teacher tokens of the prompt.")
@_field(C, "hidden_dtype", type=click.Choice(["bf16", "int8"]), help="Storage of the hidden states.")
@_field(C, "hidden_codec", type=click.Choice(["auto", "raw", "zstd", "lz4"]), help="Compression of the hidden states.")
@_field(C, "resume", help="Continue an unfinished cache (a plain re-run does too).")
@_field(C, "data_root", help="Local dataset files.", default_text="$COT2ALIGN_DATA_ROOT or ./data")
@_field(C, "field_map", "--field-map", multiple=True, help="OURS=THEIRS field name mapping (repeatable).")
@_field(C, "data_config", help=DATA_CONFIG_HELP)
@_field(C, "data_split", help=DATA_SPLIT_HELP)
@_field(C, "device", default_text="cuda if available, else cpu")
@_field(C, "dtype", type=click.Choice(DTYPES), help="Teacher compute dtype.", default_text="bf16 on CUDA, fp32 on CPU")
@_field(C, "seed", help="Seed of a tiny-* preset teacher.")
@_field(C, "limit", help="Only the first N records.")
@_field(C, "block_examples", help="Examples per committed block.")
@_field(C, "trust_remote_code", help="Run the model repo's own code (only on this flag).")
@_field(C, "revision", help=REVISION_HELP)
@_field(C, "attn_implementation", type=click.Choice(ATTN_IMPLEMENTATIONS), help=ATTN_HELP, default_text="sdpa")
@_field(C, "prompt_format", type=click.Choice(PROMPT_FORMATS), help=PROMPT_FORMAT_HELP,
        default_text=PROMPT_FORMAT_DEFAULT)
@_field(C, "chat_template", help=CHAT_TEMPLATE_HELP)
@_field(C, "store", type=click.Choice(STORE_PROFILES),
        help="What the cache keeps: full, or logits (token ids, top-k + tail, realised-token log-probs; no hidden "
             "states: serves kl, uld, mined, alm, gold, xtoken with --teacher-dist topk, and CoT2Align's CoT view "
             "with --ot-weight 0; not DSKD or the OT term).")
@_field(C, "device_map", type=click.Choice(DEVICE_MAPS),
        help="Spread a teacher too large for one GPU over the node's GPUs, then CPU, then disk (accelerate).")
@_field(C, "max_memory", metavar="DEVICE=SIZE,...", help="With --device-map: memory per device, e.g. 0=70GiB,cpu=200GiB.")
@_field(C, "offload_folder", help="With --device-map: where layers offloaded to disk go.",
        default_text="a temporary directory")
def cache_teacher_cmd(config_file, print_config, field_map, **flags):
    """Run the teacher once over the std and CoT views of a dataset and write the Zarr cache."""
    cfg = build_config(CacheTeacherConfig, config_file, field_map=_field_map(field_map), **flags)
    if print_config:
        return _print_config(cfg)
    from cot2align.teacher.cache_pass import cache_teacher

    cache_teacher(cfg)


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
    """Check the manifest, the teacher files and every chunk; exit 1 naming each problem."""
    from cot2align.cache.inspect import verify_cache
    from cot2align.cache.storage import Location

    if "://" not in path and not os.path.lexists(path):     # a mistyped path is a usage error (2), not damage (1)
        raise CacheError(f"{path}: no such file or directory")
    if "://" in path:       # an object store that cannot be reached at all is a usage error (2) too, not damage
        Location(path).read_text("zarr.json")
    problems = verify_cache(path)
    if problems:
        for p in problems:
            click.echo(f"FAIL {p}", err=True)
        sys.exit(1)
    click.echo(f"OK {path}: every chunk read and checked")


@cache_group.command("merge")
@click.argument("caches", nargs=-1, required=True)
@click.option("--out", required=True, help="The merged cache (a new directory or URL).")
@click.option("--copy", "copy_files", is_flag=True,
              help="Copy the chunk files even on one filesystem (default there: hard links).")
def cache_merge_cmd(caches, out, copy_files):
    """Merge caches built by separate jobs (same teacher, tokenizer, templates, settings) into one, in the order
    given; verified."""
    from cot2align.cache.merge import merge_caches

    merge_caches(list(caches), out, copy_files)


@cache_group.command("align-stats")
@click.argument("path")
@click.option("--student", required=True, help="The student's tokenizer: alias, hub id or local path.")
@click.option("--limit", type=int, default=200, show_default=True, help="Examples to measure (both views).")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
@click.option("--revision", help=REVISION_HELP)
@click.option("--trust-remote-code", is_flag=True, help="Run the tokenizer repo's own code.")
def cache_align_stats_cmd(path, student, limit, as_json, revision=None, trust_remote_code=False):
    """How the student's tokens line up with the cached teacher's: chunks, exact matches, MinED's pairing."""
    from cot2align.align.stats import alignment_stats, format_stats
    from cot2align.cache import open_cache
    from cot2align.modeling import load_tokenizer

    if limit < 1:
        raise ConfigError(f"--limit: expected a positive integer, got {limit}")
    stats = alignment_stats(open_cache(path, check_tokenizer=False),
                            load_tokenizer(student, trust_remote_code=trust_remote_code, revision=revision,
                                           flag="--student"), limit)
    click.echo(json.dumps(stats, indent=2) if as_json else format_stats(stats))


D = DistillConfig
_PAPER = "the paper's setting"

# The training flags `distill` and `sft` share (DistillConfig fields).
_TRAINING_OPTIONS = [
    _field(D, "split", type=SPLITS),
    _field(D, "data_root", default_text="$COT2ALIGN_DATA_ROOT or ./data"),
    _field(D, "data_config", help=DATA_CONFIG_HELP),
    _field(D, "data_split", help=DATA_SPLIT_HELP),
    _field(D, "field_map", multiple=True, help="OURS=THEIRS field names of --data / --val-data (repeatable)."),
    _field(D, "epochs", default_text=_PAPER),
    _field(D, "max_steps", help="Stop after this many optimiser steps."),
    _field(D, "lr", help="Peak learning rate (cosine schedule).", default_text=_PAPER),
    _field(D, "batch_size", help="Examples per step and process.", default_text=_PAPER),
    _field(D, "grad_accum", help="Batches per optimiser step.", default_text=_PAPER),
    _field(D, "warmup_ratio"),
    _field(D, "weight_decay"),
    _field(D, "max_grad_norm"),
    _field(D, "lora_rank", help="LoRA rank; 0: full fine-tuning.", default_text=_PAPER),
    _field(D, "lora_alpha", default_text="8"),
    _field(D, "lora_dropout", default_text="0.1"),
    _field(D, "lora_targets", help="Module names, comma-separated."),
    _field(D, "keep_adapter", help="Save the LoRA adapter, not merged weights."),
    _field(D, "seed"),
    _field(D, "sample_order", type=click.Choice(SAMPLE_ORDERS), metavar="ORDER",
           help="chunks (batches of cache neighbours: faster reads) or shuffled."),
    _field(D, "max_length", help="Student tokens per sequence."),
    _field(D, "device", default_text="cuda if available, else cpu"),
    _field(D, "num_workers", help="DataLoader workers.", default_text="2 on GPU, 0 on CPU"),
    _field(D, "fsdp", help="Under torchrun: shard the student (FSDP2), not DDP."),
    _field(D, "val_data", help="Validation data.", default_text="the dev split, else held-out examples"),
    _field(D, "val_examples", help="Validation examples (0: none)."),
    _field(D, "select_by", type=click.Choice(SELECT_BY), help="Which epoch --out gets."),
    _field(D, "val_max_new_tokens", help="Greedy validation generation length."),
    _field(D, "save_every", help="Also checkpoint every N steps (0: each epoch)."),
    _field(D, "resume", help="Continue the run in --out."),
    _field(D, "overwrite", help="Replace the run in --out."),
    _field(D, "limit", help="Only the first N training examples."),
    _field(D, "trust_remote_code", help="Run the model repo's own code."),
    _field(D, "report_to", help="Trackers besides metrics.jsonl: tensorboard, wandb (comma-separated), or none."),
    _field(D, "push_to_hub", help="Upload the finished model and its card to the Hugging Face Hub."),
    _field(D, "hub_model_id", help="The Hub repository, NAME or OWNER/NAME.", default_text="the --out name"),
    _field(D, "hub_private", help="Create the Hub repository private."),
    _field(D, "dtype", type=click.Choice(DTYPES), help="Autocast; with LoRA also the frozen base's weights.",
           default_text="bf16 on CUDA (a LoRA base loads in bf16), fp32 on CPU"),
    _field(D, "gradient_checkpointing", help="Recompute activations in the backward: less memory, more compute."),
    _field(D, "revision", help=REVISION_HELP),
    _field(D, "attn_implementation", type=click.Choice(ATTN_IMPLEMENTATIONS), help=ATTN_HELP, default_text="sdpa"),
    _field(D, "prompt_format", type=click.Choice(PROMPT_FORMATS), help=PROMPT_FORMAT_HELP, default_text="the cache's"),
    # in the README and --print-config; distill --help is full (it fits a screen)
    _field(D, "chat_template", help=CHAT_TEMPLATE_HELP, hidden=True),
]


def _training_options(command):
    for option in reversed(_TRAINING_OPTIONS):
        command = option(command)
    return command


def _resolved(cfg: DistillConfig) -> DistillConfig:
    """The config as distill / sft will run and record it (train/resolve.py): the paper's setting for the cache's
    teacher, the dtype of the device, the output directory and the resume state filled in."""
    from cot2align.train.resolve import resolve_distill_config

    cache = None
    if cfg.cache:
        from cot2align.cache import open_cache

        cache = open_cache(cfg.cache, check_tokenizer=False)
    return resolve_distill_config(cfg, cache)


def _method_settings(command):
    """One option per hyperparameter of the registered methods (methods.py), e.g. --uld-temperature. They are many
    and grow with the registry, so `distill --help` leaves them to `cot2align methods`, which lists each method's."""
    for setting in reversed(all_settings().values()):
        choices = {"type": click.Choice(setting.check)} if isinstance(setting.check, tuple) else {}
        command = _field(D, setting.name, help=setting.help, default_text=_PAPER if setting.default is None else None,
                         hidden=True, **choices)(command)
    return command


@main.command("distill")
@_config_options
@_field(D, "cache", help="Teacher cache directory or URL (from cache-teacher).")
@_field(D, "student", help="Alias, hub id or local path.", default_text=_PAPER)
@_field(D, "method", type=click.Choice(list(METHODS)),
        help="The KD loss; `cot2align methods` describes each and its settings.")
@_field(D, "cot2align", "--cot2align/--no-cot2align", help="Add the CoT view and the Cross-CoT OT loss.",
        default_text="on")
@_field(D, "alpha", help="L = (1-a) CE + a (KD + CCoT).", default_text=_PAPER)
@_field(D, "out", help="Output directory.", default_text="runs/<student>_<method>...")
@_field(D, "data", help="--method sft without a cache: the dataset.")
@_field(D, "projector_lr")
@_method_settings
@_field(D, "ot_epsilon", help="Sinkhorn entropic regularisation.")
@_field(D, "ot_epsilon_scale", type=click.Choice(OT_EPSILON_SCALES), metavar="SCALE",
        help="absolute, or relative: epsilon x each plan's cost std.")
@_field(D, "ot_weight", help="Weight of the OT terms (0: none).")
@_field(D, "ot_iters", help="Sinkhorn iterations.")
@_field(D, "ot_grad", type=click.Choice(OT_GRADS), help="OT gradient.")
@_field(D, "ot_compile", help="torch.compile the Sinkhorn loop.")
@_field(D, "teacher_dist", type=click.Choice(TEACHER_DISTS), help="Teacher distribution.",
        default_text="exact when the cache stores hidden states, else topk")
@_training_options
def distill_cmd(config_file, print_config, **flags):
    """Train a student from a teacher cache (DSKD + CoT2Align by default)."""
    cfg = build_config(DistillConfig, config_file, **dict(flags, field_map=_field_map(flags["field_map"])))
    if print_config:
        return _print_config(_resolved(cfg))
    from cot2align.train.distill import distill

    _print_summary(distill(cfg))


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


# sweep: lists where distill takes one value; the other flags are DistillConfig fields shared by every run.
SWEEP_LISTS = ("student", "method", "alpha")


@main.command("methods")
def methods_cmd():
    """List the distillation methods: what each is, what it reads from the cache, its settings."""
    from cot2align.methods import describe

    click.echo(describe())


@main.group("configs", invoke_without_command=True)
@click.pass_context
def configs_group(ctx):
    """The paper's configs shipped with cot2align: list them, show one, copy one to edit. Any of them is also a
    --config value as it is (`--config configs/tiny.yaml`, or just `--config tiny`)."""
    if ctx.invoked_subcommand is None:
        from cot2align import shipped_configs

        width = max(map(len, shipped_configs.names()))
        for name in shipped_configs.names():
            click.echo(f"{name:<{width}}  {shipped_configs.first_line(shipped_configs.read(name))}")


@configs_group.command("show")
@click.argument("name")
def configs_show_cmd(name):
    """Print the shipped config NAME."""
    from cot2align import shipped_configs

    click.echo(shipped_configs.read(name).rstrip())


@configs_group.command("cp")
@click.argument("name")
@click.argument("dest")
def configs_cp_cmd(name, dest):
    """Copy the shipped config NAME to DEST (a file, or a directory) to edit; then --config DEST."""
    from cot2align import shipped_configs

    click.echo(f"wrote {shipped_configs.copy(name, dest)}")


@main.command("sweep")
@click.option("--config", "config_file", type=click.Path(), help="YAML config shared by every run.")
@click.option("--cache", required=True, help="Teacher cache directory or URL.")
@click.option("--student", help="Comma-separated students.", default=None, show_default=_PAPER)
@click.option("--method", default="dskd", show_default=True, help="Comma-separated methods.")
@click.option("--alpha", required=True, help="Comma-separated alpha values, e.g. 0.1,0.5,0.9.")
@click.option("--out", required=True, help="Directory for the runs and the results table.")
@_field(D, "cot2align", "--cot2align/--no-cot2align", default_text="on")
@_field(D, "epochs", default_text=_PAPER)
@_field(D, "max_steps")
@_field(D, "batch_size", default_text=_PAPER)
@_field(D, "lr", default_text=_PAPER)
@_field(D, "seed")
@_field(D, "device", default_text="cuda if available, else cpu")
@_field(D, "val_examples")
@_field(D, "val_max_new_tokens")
@_field(D, "overwrite")
@_field(D, "resume", help="Continue a stopped sweep: finished runs are kept, an interrupted one continues from its "
        "checkpoint, the rest start.")
@_field(D, "report_to", help="Trackers for every run besides metrics.jsonl: tensorboard, wandb, or none.")
def sweep_cmd(config_file, cache, student, method, alpha, out, **flags):
    """Train students x methods x alpha from one cache; write one results table and a plot."""
    alphas = _list(alpha, float, "--alpha")
    for a in alphas:
        if not 0.0 <= a <= 1.0:
            raise ConfigError(f"--alpha: expected values in [0, 1], got {a}")
    from cot2align.train.sweep import sweep

    rows = sweep(cache, _list(student) or [None], _list(method), alphas, out, config_file, **flags)
    click.echo(f"{len(rows)} runs; results in {out}/results.md")


@main.command("sft")
@_config_options
@_field(D, "student", "--model", help="Model to fine-tune (a teacher, or a student baseline).")
@_field(D, "data", help=DATA_HELP)
@_field(D, "out", help="Output directory.")
@_training_options
def sft_cmd(config_file, print_config, **flags):
    """Fine-tune a model on the standard view (the paper fine-tunes every teacher first)."""
    from cot2align.config import sft_defaults

    for required in ("student", "data", "out"):
        if flags[required] is None and config_file is None:
            raise ConfigError(f"--{'model' if required == 'student' else required}: required")
    model = flags["student"] or ""
    flags["field_map"] = _field_map(flags["field_map"])
    cfg = build_config(DistillConfig, config_file, method="sft", cot2align=False, **sft_defaults(model, flags))
    if print_config:
        return _print_config(_resolved(cfg))
    from cot2align.train.distill import distill

    _print_summary(distill(cfg))


@main.command("augment-cot")
@_config_options
@click.option("--model", help="The (fine-tuned) teacher that writes the rationales. Required.")
@click.option("--data", help=DATA_HELP + " Required.")
@click.option("--out", help="Output JSONL (appended to; a rerun resumes). Required.")
@click.option("--split", type=SPLITS, help="[default: train]")
@click.option("--data-root", help="[default: $COT2ALIGN_DATA_ROOT or ./data]")
@click.option("--data-config", help=DATA_CONFIG_HELP)
@click.option("--data-split", help=DATA_SPLIT_HELP)
@click.option("--field-map", multiple=True, help="OURS=THEIRS field name mapping (repeatable).")
@click.option("--dtype", type=click.Choice(DTYPES), help="Teacher dtype. [default: bf16 on CUDA, fp32 on CPU]")
@click.option("--backend", type=click.Choice(["hf", "vllm"]), help="[default: hf]")
@click.option("--max-new-tokens", type=int, help="Rationale length limit. [default: 256]")
@click.option("--temperature", type=float, help="Sampling temperature. [default: 1.0]")
@click.option("--seed", type=int, help="[default: 0]")
@click.option("--batch-size", type=int, help="[default: 16]")
@click.option("--limit", type=int, help="Only the first N records.")
@click.option("--adapter", help="A LoRA adapter merged into --model.")
@click.option("--device", help="[default: cuda if available, else cpu]")
@click.option("--trust-remote-code", is_flag=True, default=None, help="Run the model repo's own code.")
@click.option("--revision", help=REVISION_HELP)
@click.option("--attn-implementation", type=click.Choice(ATTN_IMPLEMENTATIONS), help=ATTN_HELP + " [default: sdpa]")
@click.option("--prompt-format", type=click.Choice(PROMPT_FORMATS),
              help=f"{PROMPT_FORMAT_HELP} [default: {PROMPT_FORMAT_DEFAULT}]")
@click.option("--chat-template", help=CHAT_TEMPLATE_HELP)
def augment_cot_cmd(config_file, print_config, **flags):
    """Generate a chain-of-thought rationale for every training record with the teacher."""
    from cot2align.data.augment import AugmentConfig, augment_cot

    cfg = build_config(AugmentConfig, config_file, **dict(flags, field_map=_field_map(flags["field_map"])))
    if print_config:
        return _print_config(cfg)
    for required in ("model", "data", "out"):
        if getattr(cfg, required) is None:
            raise ConfigError(f"--{required}: required (as a flag or in --config)")
    summary = augment_cot(cfg)
    click.echo(json.dumps(summary))


E = EvaluateConfig


@main.command("evaluate")
@_config_options
@_field(E, "model", help="A model directory (e.g. a distill --out). Required.")
@_field(E, "data", help=DATA_HELP + " Required.")
@_field(E, "data_config", help=DATA_CONFIG_HELP)
@_field(E, "data_split", help=DATA_SPLIT_HELP)
@_field(E, "field_map", multiple=True, help="OURS=THEIRS field name mapping (repeatable).")
@_field(E, "split", type=SPLITS)
@_field(E, "metric", type=click.Choice(["rougeL", "ce", "all"]),
        help="rougeL: the paper's protocol; ce: held-out cross-entropy; all: both.")
@_field(E, "seeds", help="Sampling seeds, comma-separated.")
@_field(E, "greedy", help="Greedy decoding once instead of sampling per seed.")
@_field(E, "out", help="Directory for generations and results.json.", default_text="MODEL/eval/<data>_<split>")
@_field(E, "limit", help="Only the first N examples.")
@_field(E, "max_new_tokens")
@_field(E, "batch_size")
@_field(E, "data_root", default_text="$COT2ALIGN_DATA_ROOT or ./data")
@_field(E, "device", default_text="cuda if available, else cpu")
@_field(E, "overwrite", help="Replace the results in --out, even of another model, data, split or limit.")
@_field(E, "revision", help=REVISION_HELP)
@_field(E, "attn_implementation", type=click.Choice(ATTN_IMPLEMENTATIONS), help=ATTN_HELP, default_text="sdpa")
@_field(E, "prompt_format", type=click.Choice(PROMPT_FORMATS), help=PROMPT_FORMAT_HELP,
        default_text=PROMPT_FORMAT_DEFAULT)
@_field(E, "chat_template", help=CHAT_TEMPLATE_HELP)
def evaluate_cmd(config_file, print_config, **flags):
    """ROUGE-L with the paper's protocol (sampling T=1.0 per seed, mean ± std) and/or the held-out cross-entropy."""
    cfg = build_config(EvaluateConfig, config_file, **dict(flags, field_map=_field_map(flags["field_map"])))
    if print_config:
        return _print_config(cfg)
    for required in ("model", "data"):
        if getattr(cfg, required) is None:
            raise ConfigError(f"--{required}: required (as a flag or in --config)")
    seed_list = _list(cfg.seeds, int, "--seeds")
    if cfg.metric != "ce" and not cfg.greedy and not seed_list:
        raise ConfigError("--seeds: expected at least one seed (or --greedy)")
    from cot2align.eval import evaluate_model

    summary = evaluate_model(cfg.model, cfg.data, cfg.split, seed_list, cfg.greedy, cfg.out, cfg.limit, cfg.max_new_tokens,
                             batch_size=cfg.batch_size, data_root=cfg.data_root, device=cfg.device, metric=cfg.metric,
                             data_config=cfg.data_config, data_split=cfg.data_split, field_map=cfg.field_map or None,
                             overwrite=cfg.overwrite, revision=cfg.revision,
                             attn_implementation=cfg.attn_implementation, prompt_format=cfg.prompt_format,
                             chat_template=cfg.chat_template)
    click.echo(json.dumps({k: v for k, v in summary.items() if k != "source"}))


@main.command("report")
@click.argument("runs_dir")
def report_cmd(runs_dir):
    """A Table-1-style Markdown table and a bar chart from the evaluate results under RUNS_DIR."""
    from cot2align.eval import report

    report(runs_dir, log=click.echo)


@main.command("push")
@click.argument("run_dir")
@click.option("--hub-model-id", help="NAME or OWNER/NAME [default: the run's --hub-model-id, else RUN_DIR's name].")
@click.option("--private", is_flag=True, default=None, help="Create the repository private.")
def push_cmd(run_dir, hub_model_id, private):
    """Upload a finished distill/sft run (model, tokenizer, model card, metrics; not its checkpoints) to the Hub."""
    from cot2align.hub import push_to_hub

    click.echo(push_to_hub(run_dir, hub_model_id, private))


@main.command("quickstart")
@click.option("--out", default="quickstart", show_default=True, help="Directory for every stage's output.")
@click.option("--tiny", is_flag=True, help="The 2-minute connectivity check instead: the whole pipeline with random "
              "tiny models (tiny-qwen2 teacher, tiny-gpt2 student) on the shipped sample; nothing is learnt.")
@click.option("--full", is_flag=True, help="Fine-tune the teacher on the slice (sft) and let it write the rationales "
              "(augment-cot) instead of caching the instruct teacher with its shipped rationales (~30 min more on "
              "2 cores).")
@click.option("--seed", default=1, show_default=True, type=int, help="The students' seed.")
@click.option("--teacher", help="[default: smollm2-135m-instruct; --tiny: tiny-qwen2]")
@click.option("--student", help="[default: random:gpt2-transfer; --tiny: tiny-gpt2]")
@click.option("--limit", type=int, help="Training records [default: the shipped slice's 64; --tiny: 100 of sample].")
def quickstart_cmd(out, tiny, full, seed, teacher, student, limit):
    """Distil the real SmolLM2-135M-Instruct teacher into a small GPT-2-tokenizer student on a shipped DialogSum
    slice, beside the same student trained alone (SFT), and print both held-out cross-entropies and their
    difference (about 5 minutes on 2 CPU cores). Each stage prints its equivalent command."""
    if tiny and full:
        raise ConfigError("--tiny and --full: choose one (--tiny runs random tiny models; --full the real teacher's "
                          "whole chain)")
    if tiny:
        from cot2align.quickstart import run_quickstart

        run_quickstart(out, teacher or "tiny-qwen2", student or "tiny-gpt2", limit or 100)
        return
    from cot2align.quickstart_distil import STUDENT, TEACHER, run_distil_quickstart

    result = run_distil_quickstart(out, teacher or TEACHER, student or STUDENT, limit, seed, full)
    click.echo(result["text"])


def _set_quiet(ctx, param, value):
    if value:
        configure_logging(quiet=True)


def _add_quiet_option(group: click.Group) -> None:
    """Every command takes -q/--quiet: warnings and errors only (no progress messages or bars)."""
    for command in group.commands.values():
        if isinstance(command, click.Group):
            _add_quiet_option(command)
        elif not any(p.name == "quiet" for p in command.params):
            command.params.append(click.Option(["-q", "--quiet"], is_flag=True, expose_value=False, callback=_set_quiet,
                                               help="Warnings and errors only: no progress messages or bars."))


_add_quiet_option(main)


if __name__ == "__main__":
    main()
