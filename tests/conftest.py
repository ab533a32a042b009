import json
import os
from pathlib import Path

import pytest

# Tokenizers shipped in the package are unpacked here, never into the user's home during tests.
os.environ.setdefault("COT2ALIGN_HOME", str(Path(__file__).parent / ".cot2align_home"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# `datasets` keeps what it prepares from Parquet/CSV files here, not in the user's ~/.cache/huggingface
os.environ.setdefault("HF_DATASETS_CACHE", str(Path(__file__).parent / ".cot2align_home" / "hf_datasets"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Under pytest-xdist (`-n N`) the cores are shared: each worker (and the subprocesses it starts) gets its share of
# threads instead of every worker's torch taking all of them.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS",
                          str(max(1, len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

FIXTURES = Path(__file__).parent / "fixtures"


def write_cot_records(path: Path, n: int = 10, cot_every: int = 2) -> Path:
    """A JSONL of real sample records; every `cot_every`-th gets a (hand-written) rationale,
    including non-ASCII, code-like and numeric text."""
    from cot2align.data import load_records

    records, _ = load_records("sample", "train")
    rationales = ["The dialogue is about a visit; #Person1# asks, so the summary names both people.",
                  "Café prices: 3 × 4.50 € = 13.50 €, then `total += tip` 🙂 gives the answer.",
                  "First, find the topic. Second, keep it short."]
    with path.open("w") as f:
        for i, r in enumerate(records[:n]):
            rec = {k: r[k] for k in ("id", "instruction", "input", "output")}
            if i % cot_every == 0:
                rec["rationale"] = rationales[i % len(rationales)]
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return path


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for a torchrun rendezvous (a fixed port may be taken on a shared host)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def explain(result, tail: int = 2500) -> str:
    """Why a command run by a test failed: its one-line `error:` messages (from any rank of a torchrun job,
    which the other ranks' tracebacks would push out of a plain tail) and then the end of its stderr."""
    errors = [line for line in result.stderr.splitlines() if "error:" in line.lower()[:40]]
    return "\n".join(errors[:10] + ["--- end of stderr ---", result.stderr[-tail:]])


def record_figure(name: str, value) -> None:
    """Add one figure to $COT2ALIGN_RELIABILITY_OUT (the README's Reliability numbers come from the tests). The
    read-modify-write holds an exclusive lock on the file, so test processes running side by side keep each
    other's figures."""
    import fcntl

    target = os.environ.get("COT2ALIGN_RELIABILITY_OUT")
    if not target:
        return
    with open(target, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        text = f.read()
        figures = json.loads(text) if text.strip() else {}
        figures[name] = value
        f.seek(0)
        f.truncate()
        f.write(json.dumps(figures, indent=1, sort_keys=True))


@pytest.fixture
def cot_jsonl(tmp_path):
    return write_cot_records(tmp_path / "cot.jsonl")


def cache_arrays(path) -> dict:
    """Every per-row array of each view of the cache at `path` (its readable examples' rows, in order) and the
    offsets: what 'identical to the uninterrupted run' compares."""
    import numpy as np

    from cot2align.cache import open_cache

    cache = open_cache(path, allow_incomplete=True)
    out = {}
    for view in ("std", "cot"):
        rows = [cache.view(i, view) for i in range(len(cache))]
        for name, value in rows[0].items():
            if isinstance(value, np.ndarray):
                out[f"{view}/{name}"] = np.concatenate([r[name] for r in rows])
        out[f"{view}/offsets"] = cache.offsets(view)
    return out


_CLI_DRIVER = """
import json, sys
from cot2align.cli import main
for args in json.loads(sys.argv[1]):
    print("RUNNING", " ".join(args), file=sys.stderr, flush=True)
    try:
        main(args)
    except SystemExit as e:
        if e.code:
            sys.exit(e.code)
"""


def run_cli_commands(cwd: Path, commands: list[list[str]], env: dict | None = None, timeout: int = 600):
    """`cot2align` commands one after another in one Python process (one import of torch), in `cwd`; each command's
    stderr starts after a "RUNNING <command>" line. `env`: the environment (default os.environ), given the repo on
    PYTHONPATH."""
    import subprocess
    import sys

    env = dict(os.environ if env is None else env, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    return subprocess.run([sys.executable, "-c", _CLI_DRIVER, json.dumps(commands)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def online_teacher_views(teacher, teacher_tokenizer, cache, examples: list[int], views, mined_rows: dict | None = None):
    """{view: TeacherView} of a fresh teacher forward on the cached `examples` (the texts the cache pass read, each
    response ending with EOS where the cache kept one): the other side of every cache-fed = online check.
    `mined_rows`: per view, the batch's MinED rows to carry over."""
    from cot2align.train.online import online_teacher_view

    texts, eos = cache.texts(), teacher_tokenizer.eos_token_id
    out = {}
    for v in views:
        rows = [cache.view(i, v) for i in examples]
        out[v] = online_teacher_view(teacher, teacher_tokenizer, [texts[f"prompt_{v}"][i] for i in examples],
                                     [texts[f"response_{v}"][i] for i in examples],
                                     [r["n_rows"] > 0 and int(r["target_ids"][-1]) == eos for r in rows], "cpu",
                                     **({"mined_rows": mined_rows[v]} if mined_rows else {}))
    return out


def assert_printed_command_builds_what_ran(command: str, settings: dict, name: str = "") -> str:
    """The `cot2align ...` line a pipeline prints for a stage's `settings`, parsed by the CLI, builds exactly the
    config the pipeline ran (a quickstart's stages, each printed before it runs). Returns the line."""
    import dataclasses
    import shlex

    import yaml
    from click.testing import CliRunner

    from cot2align.cli import main
    from cot2align.config import CacheTeacherConfig, DistillConfig, EvaluateConfig, build_config
    from cot2align.data.augment import AugmentConfig
    from cot2align.quickstart import _sft, command_line
    from cot2align.train.resolve import resolve_distill_config

    configs = {"cache-teacher": CacheTeacherConfig, "augment-cot": AugmentConfig, "evaluate": EvaluateConfig,
               "distill": DistillConfig, "sft": DistillConfig}
    line = command_line(command, settings)
    args = shlex.split(line)[2:]
    ran = build_config(configs[command], **(_sft(settings) if command == "sft" else settings))
    if command == "distill":         # --print-config would resolve against a cache that does not exist yet
        params = main.commands["distill"].make_context("distill", args).params
        params["field_map"] = dict(params["field_map"]) or None      # the command turns () into None
        printed = dataclasses.asdict(build_config(DistillConfig, **{k: v for k, v in params.items()
                                                                    if k not in {"config_file", "config",
                                                                                 "print_config", "quiet"}}))
    else:
        result = CliRunner().invoke(main, [command, *args, "--print-config"])
        assert result.exit_code == 0, (line, result.output)
        printed = yaml.safe_load(result.stdout)
    if command == "sft":              # --print-config of a training run prints it resolved (train/resolve.py)
        ran = resolve_distill_config(ran, None)
    assert printed == dataclasses.asdict(ran), (name, line)
    return line
