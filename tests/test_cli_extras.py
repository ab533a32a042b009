"""Smaller things of the command line: -q quiets the libraries too, --revision and --attn-implementation for every
model loaded, the paper configs shipped in the package (`cot2align configs`)."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import run_cli_commands

REPO = Path(__file__).resolve().parents[1]


def run_commands(cwd: Path, commands: list[list[str]]) -> list[str]:
    """The commands one after another in one process (one import of torch); each one's stderr."""
    result = run_cli_commands(cwd, commands)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stderr.split("RUNNING ")[1:]


LIBRARY_NOISE = ("Loading weights", "Writing model shards", "it/s]", "%|", "Warning", "Generating")


def test_quiet_silences_the_libraries_bars_and_warnings(tmp_path):
    from cot2align.data import load_records

    records, _ = load_records("sample", "test")
    with (tmp_path / "test.csv").open("w", newline="") as f:      # read through `datasets`
        writer = csv.DictWriter(f, fieldnames=["instruction", "input", "output"])
        writer.writeheader()
        for r in records[:3]:
            writer.writerow({k: r[k] for k in ("instruction", "input", "output")})
    evaluate = ["evaluate", "--model", "m", "--data", "test.csv", "--metric", "ce", "--limit", "2"]
    sft_quiet, evaluate_quiet, evaluate_loud = run_commands(tmp_path, [
        ["sft", "--model", "tiny-gpt2", "--data", "sample", "--out", "m", "--limit", "4", "--max-steps", "1",
         "--val-examples", "0", "-q"],
        evaluate + ["-q"],
        evaluate + ["--out", "loud"]])
    for stderr in (sft_quiet, evaluate_quiet):
        assert not [noise for noise in LIBRARY_NOISE if noise in stderr], stderr
    # without -q (in the same process, after two quiet commands) the libraries speak again
    assert "Loading weights" in evaluate_loud and "cross-entropy" in evaluate_loud


# ------------------------------------------------------------------------------- --revision, --attn-implementation

def _hub_repo(hub_cache: Path, repo_id: str, revisions: dict[str, int]) -> dict[str, str]:
    """An offline hub cache holding `repo_id` at several revisions (branch name -> tiny-gpt2 seed), laid out as
    huggingface_hub lays out downloads; the commit of each branch."""
    from cot2align.modeling import build_tiny_model, load_tokenizer

    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    commits = {}
    for number, (branch, seed) in enumerate(revisions.items()):
        commits[branch] = f"{number + 1:040x}"
        (repo / "refs" / branch).write_text(commits[branch])
        snapshot = repo / "snapshots" / commits[branch]
        build_tiny_model("tiny-gpt2", seed=seed).save_pretrained(str(snapshot))
        load_tokenizer("tiny-gpt2").save_pretrained(str(snapshot))
    return commits


def test_revision_reaches_every_model_load(tmp_path):
    commits = _hub_repo(tmp_path / "hub", "someone/tiny", {"main": 0, "v1": 1})
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    evaluate = ["evaluate", "--model", "someone/tiny", "--data", "sample", "--metric", "ce", "--limit", "2"]
    os.environ.update(env)
    try:
        run_commands(tmp_path, [
            evaluate + ["--out", "main"], evaluate + ["--revision", "v1", "--out", "v1", "--attn-implementation", "eager"],
            ["cache-teacher", "--model", "someone/tiny", "--revision", "v1", "--data", "sample", "--limit", "2",
             "--out", "cache_v1", "--topk", "4"],
            ["sft", "--model", "someone/tiny", "--revision", "v1", "--data", "sample", "--limit", "2", "--max-steps",
             "1", "--val-examples", "0", "--attn-implementation", "eager", "--out", "sft_v1"]])
    finally:
        for key in env:
            os.environ.pop(key)
    main, v1 = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("main", "v1"))
    assert main["ce"]["nats_per_token"] != v1["ce"]["nats_per_token"]          # other weights were evaluated
    assert v1["revision"] == "v1" and "revision" not in main
    manifest = json.loads((tmp_path / "cache_v1" / "zarr.json").read_text())["attributes"]
    assert manifest["teacher"]["revision"] == commits["v1"]
    import yaml

    recorded = yaml.safe_load((tmp_path / "sft_v1" / "config.yaml").read_text())
    assert (recorded["revision"], recorded["attn_implementation"]) == ("v1", "eager")


def test_revision_and_attention_refused_in_one_line(tmp_path):
    import pytest

    from cot2align.config import CacheTeacherConfig, DistillConfig, EvaluateConfig, build_config, field_kind
    from cot2align.data.augment import AugmentConfig
    from cot2align.errors import ConfigError
    from cot2align.modeling import load_model, load_tokenizer

    for cls in (CacheTeacherConfig, DistillConfig, EvaluateConfig, AugmentConfig):
        assert (field_kind(cls, "revision"), field_kind(cls, "attn_implementation")) == ("identity", "runtime")
    with pytest.raises(ConfigError, match="--revision v1: tiny-gpt2 is a built-in preset") as error:
        load_model("tiny-gpt2", revision="v1")
    assert "\n" not in str(error.value)
    local = tmp_path / "local"
    load_model("tiny-gpt2").save_pretrained(str(local))
    with pytest.raises(ConfigError, match="is a local path, which has no revisions"):
        load_model(str(local), revision="v1")
    with pytest.raises(ConfigError, match="is a local path"):
        load_tokenizer(str(local), revision="v1")
    assert load_model(str(local), attn_implementation="eager").config._attn_implementation == "eager"
    assert load_model("tiny-qwen2", attn_implementation="eager").config._attn_implementation == "eager"
    assert load_model("tiny-qwen2").config._attn_implementation == "sdpa"
    config_file = tmp_path / "c.yaml"
    config_file.write_text("attn_implementation: flash\n")
    with pytest.raises(ConfigError, match="attn_implementation: expected one of sdpa, eager, flash_attention_2"):
        build_config(EvaluateConfig, config_file)
    import importlib.util

    if importlib.util.find_spec("flash_attn") is None:
        for cls in (CacheTeacherConfig, DistillConfig, EvaluateConfig, AugmentConfig):
            with pytest.raises(ConfigError, match="flash-attn package, which is not installed"):
                build_config(cls, **({"cache": "c"} if cls is DistillConfig else {}),
                             attn_implementation="flash_attention_2")
    with pytest.raises(ConfigError, match="vllm chooses its own"):
        build_config(AugmentConfig, backend="vllm", attn_implementation="eager")


# ------------------------------------------------------------------------------------- the shipped configs

def test_configs_list_show_copy_and_config_by_shipped_name(tmp_path, monkeypatch):
    import pytest
    from click.testing import CliRunner

    from cot2align import shipped_configs
    from cot2align.cli import main
    from cot2align.config import DistillConfig, build_config
    from cot2align.errors import ConfigError

    names = shipped_configs.names()
    assert {"tiny", "cache_tiny", "cache_mistral_dolly", "distill/tinyllama_mistral_dskd"} <= set(names)
    assert len([n for n in names if n.startswith("distill/")]) >= 15
    assert not (REPO / "configs").exists()         # one copy: the package's
    runner = CliRunner()
    listed = runner.invoke(main, ["configs"])
    assert listed.exit_code == 0 and "distill/tinyllama_mistral_dskd" in listed.output
    assert "TinyLLaMA-1.1B <- Mistral-7B" in listed.output
    shown = runner.invoke(main, ["configs", "show", "distill/tinyllama_mistral_dskd"])
    assert shown.exit_code == 0 and "student: tinyllama-1.1b" in shown.output
    missing = runner.invoke(main, ["configs", "show", "nope"])
    assert missing.exit_code == 2 and "no such shipped config" in missing.output and "tiny" in missing.output
    monkeypatch.chdir(tmp_path)                    # not the repository: the package's copies are read
    copied = runner.invoke(main, ["configs", "cp", "configs/tiny.yaml", "mine"])
    assert copied.exit_code == 0 and (tmp_path / "mine").is_file()
    (tmp_path / "dir").mkdir()
    assert runner.invoke(main, ["configs", "cp", "distill/tinyllama_mistral_uld", "dir"]).exit_code == 0
    assert (tmp_path / "dir" / "tinyllama_mistral_uld.yaml").is_file()
    again = runner.invoke(main, ["configs", "cp", "tiny", "mine"])
    assert again.exit_code == 2 and "exists" in again.output
    # the README's --config configs/tiny.yaml, from a directory without it; an edited copy at that path wins
    for spelled in ("configs/tiny.yaml", "tiny", "tiny.yaml"):
        cfg = build_config(DistillConfig, spelled, cache="c")
        assert (cfg.student, cfg.method, cfg.kd_temperature) == ("tiny-gpt2", "dskd", 2.0)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "tiny.yaml").write_text("student: tiny-llama\n")
    assert build_config(DistillConfig, "configs/tiny.yaml", cache="c").student == "tiny-llama"
    with pytest.raises(ConfigError, match="file not found .*cot2align configs"):
        build_config(DistillConfig, "configs/none.yaml", cache="c")


# ------------------------------------------------------------------------------------- data/: no import cycle

def _imports(module_file: Path) -> set[str]:
    import ast

    names = set()
    for node in ast.walk(ast.parse(module_file.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_data_modules_import_one_way():
    """records (normalisation) <- hf (datasets sources) <- readers (the dispatch): neither imports a later one."""
    data = REPO / "cot2align" / "data"
    assert not {"cot2align.data.readers", "cot2align.data.hf"} & _imports(data / "records.py")
    assert "cot2align.data.readers" not in _imports(data / "hf.py")
    for order in (["cot2align.data.hf", "cot2align.data.readers"], ["cot2align.data.records", "cot2align.config"]):
        code = "import importlib; [importlib.import_module(m) for m in %r]" % order
        assert subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(REPO))).returncode == 0
    from cot2align import config
    from cot2align.data import hf

    assert config._is_dataset is hf.is_dataset_object          # one test of "a datasets object", not two
