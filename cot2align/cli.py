"""The `cot2align` command line. Each command parses, resolves its config, calls one function, prints."""

from __future__ import annotations

import json
import sys

import click

from cot2align.cache.writer import CacheError
from cot2align.config import CacheTeacherConfig, ConfigError, build_config
from cot2align.data.readers import DataError

USER_ERRORS = (CacheError, ConfigError, DataError)


class _Group(click.Group):
    """Turn known user errors into one line on stderr and exit code 2 (no traceback)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except USER_ERRORS as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)


@click.group(cls=_Group)
@click.version_option(package_name="cot2align")
def main():
    """Distil a large teacher LLM into a student with another tokenizer (CoT2Align)."""


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
@click.option("--data", help="Dataset alias (dolly, alpaca, sni, dialogsum, sample) or a JSON/JSONL file.")
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
@click.option("--device")
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


@main.command("quickstart")
@click.option("--out", default="cache/quickstart", show_default=True, help="Where the cache goes.")
@click.option("--limit", default=100, show_default=True, help="Records of the shipped sample to use.")
def quickstart_cmd(out, limit):
    """The embedded default: a tiny Qwen2 teacher -> teacher cache of the shipped sample -> its summary."""
    from cot2align.cache.inspect import cache_info, format_info
    from cot2align.teacher.cache_pass import cache_teacher

    cfg = build_config(CacheTeacherConfig, model="tiny-qwen2", data="sample", out=out, limit=limit)
    click.echo(f"$ cot2align cache-teacher --model tiny-qwen2 --data sample --limit {limit} --out {out}", err=True)
    cache_teacher(cfg, log=lambda m: click.echo(m, err=True))
    click.echo(f"$ cot2align cache info {out}", err=True)
    click.echo(format_info(cache_info(out)))


if __name__ == "__main__":
    main()
