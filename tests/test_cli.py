"""The command line: each command's options are its config dataclass's fields (one source of truth), every
command with a config takes --config and --print-config, help names the defaults and starts fast."""

import dataclasses
import subprocess
import sys
import time

import pytest
import yaml
from click.testing import CliRunner

from cot2align.cli import main
from cot2align.config import CacheTeacherConfig, DistillConfig, EvaluateConfig
from cot2align.data.augment import AugmentConfig
from cot2align.methods import all_settings

# Options that are not config fields, by command.
NOT_FIELDS = {"config_file", "print_config", "quiet"}
# Config fields a command fills itself rather than from a flag.
FILLED_BY_COMMAND = {"sft": {"method", "cot2align", "alpha", "cache", "projector_lr", "ot_epsilon", "ot_iters", "ot_grad",
                             "ot_compile", "ot_epsilon_scale", "ot_weight", "teacher_dist", *all_settings()}}
COMMANDS = {"cache-teacher": CacheTeacherConfig, "distill": DistillConfig, "sft": DistillConfig,
            "augment-cot": AugmentConfig, "evaluate": EvaluateConfig}


def _options(command: str) -> set[str]:
    return {p.name for p in main.commands[command].params}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_options_and_config_fields_match_one_to_one(command):
    fields = {f.name for f in dataclasses.fields(COMMANDS[command])} - FILLED_BY_COMMAND.get(command, set())
    options = _options(command) - NOT_FIELDS
    assert options == fields, (f"flags without a field: {sorted(options - fields)}; "
                               f"fields without a flag: {sorted(fields - options)}")
    assert {"config_file", "print_config"} <= _options(command)


def test_sweep_options_are_distill_fields():
    fields = {f.name for f in dataclasses.fields(DistillConfig)}
    assert _options("sweep") - NOT_FIELDS <= fields


def test_print_config_shows_the_resolved_config(tmp_path):
    (tmp_path / "c.yaml").write_text("lr: 1e-3\nepochs: 3\n")
    result = CliRunner().invoke(main, ["distill", "--config", str(tmp_path / "c.yaml"), "--method", "sft",
                                       "--no-cot2align", "--data", "sample", "--student", "tiny-gpt2", "--print-config"])
    assert result.exit_code == 0, result.output
    shown = yaml.safe_load(result.stdout)
    assert shown["lr"] == 0.001 and shown["epochs"] == 3 and shown["method"] == "sft"
    assert shown["alpha"] == 0.5 and shown["batch_size"] == 4          # filled as distill would run it
    for command in ("cache-teacher", "evaluate", "augment-cot"):
        result = CliRunner().invoke(main, [command, "--print-config", "--seed", "3"] if command != "evaluate"
                                    else [command, "--print-config", "--limit", "3"])
        assert result.exit_code == 0, (command, result.output)
        assert yaml.safe_load(result.stdout)["seed" if command != "evaluate" else "limit"] == 3


def test_every_command_reads_a_yaml_config(tmp_path):
    (tmp_path / "e.yaml").write_text("metric: ce\nlimit: '2'\n")          # a quoted number is coerced
    result = CliRunner().invoke(main, ["evaluate", "--config", str(tmp_path / "e.yaml"), "--print-config"])
    assert yaml.safe_load(result.stdout)["limit"] == 2
    (tmp_path / "bad.yaml").write_text("limit: lots\n")
    result = CliRunner().invoke(main, ["evaluate", "--config", str(tmp_path / "bad.yaml"), "--print-config"])
    assert result.exit_code == 2 and "bad.yaml: limit: expected an integer, got 'lots'" in result.stderr


def test_help_names_defaults_fits_a_screen_and_starts_without_torch():
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", "import sys; from cot2align.cli import main; "
                             "print(sorted(m for m in ('torch', 'zarr', 'transformers') if m in sys.modules))"],
                            capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]", result.stdout            # --help imports none of them
    assert time.perf_counter() - started < 30                        # generous: the point is no torch import
    for command in ("distill", "cache-teacher", "evaluate", "augment-cot", "sft", "sweep"):
        text = CliRunner().invoke(main, [command, "--help"]).output
        assert len(text.splitlines()) <= 70, (command, len(text.splitlines()))   # distill: 67 lines at 120 columns
    distill_help = CliRunner().invoke(main, ["distill", "--help"]).output
    for shown in ("--ot-epsilon FLOAT", "[default: 10.0]", "--weight-decay FLOAT", "[default: 0.01]",
                  "--lr FLOAT", "[default: the paper's setting]"):
        assert shown in distill_help, shown


def test_the_quickstart_prints_commands_equivalent_to_what_it_runs(tmp_path):
    """Each printed `cot2align ...` line, parsed by the CLI, builds exactly the config the quickstart ran."""
    from conftest import assert_printed_command_builds_what_ran

    from cot2align.quickstart import stage_settings

    for name, (command, settings) in stage_settings(str(tmp_path / "qs"), "tiny-qwen2", "tiny-gpt2", 24).items():
        assert_printed_command_builds_what_ran(command, settings, name)
