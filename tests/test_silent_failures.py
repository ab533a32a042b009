"""Every case of the adversarial review that once gave a silent wrong result or a traceback, reproduced with tiny
models in seconds: each must now be refused in one line (rc 2; `cache verify`: rc 1) or give the correct result.

README "What it promises" maps each promise to the tests here (and to the older reliability modules:
test_reliability.py, test_hostile_input.py, test_random_kills_*.py, test_disk_faults.py, test_locks.py).
Each section below imports what it needs inside its tests, so sections stay independent of one another.
"""


# ==================================================================================================================
# 1. Damaged caches: a missing chunk, a chunk in the wrong place, a verify that agrees with open_cache
# ==================================================================================================================


# (end of section 1)


# ==================================================================================================================
# 2. Stale derived data: the students' memo of a rebuilt cache
# ==================================================================================================================


# (end of section 2)


# ==================================================================================================================
# 3. Resume: the resolved configuration, identity fields compared
# ==================================================================================================================


import pytest as _s3_pytest  # noqa: E402  (this section's fixture; sections import what they need themselves)

_S3_TEACHER, _S3_STUDENT = "tiny-qwen2", "tiny-gpt2"


def _s3_config_classes() -> list:
    """Every config dataclass of the package, found in its source (`@dataclass` + `class <Name>Config`), so that a
    config added later is checked without being listed here."""
    import importlib
    import re
    from pathlib import Path

    import cot2align

    root = Path(cot2align.__file__).parent
    found = []
    for path in sorted(root.rglob("*.py")):
        for name in re.findall(r"^@dataclass[^\n]*\nclass (\w+Config)\b", path.read_text(), re.M):
            module = ".".join(("cot2align",) + path.relative_to(root).with_suffix("").parts)
            found.append(getattr(importlib.import_module(module), name))
    return found


def test_s3_every_field_of_every_config_has_a_kind():
    import dataclasses

    from cot2align.config import KINDS, DistillConfig, fields_of_kind
    from cot2align.data.augment import AugmentConfig

    classes = _s3_config_classes()
    assert {c.__name__ for c in classes} >= {"CacheTeacherConfig", "DistillConfig", "EvaluateConfig", "LossConfig",
                                              AugmentConfig.__name__}
    unclassified = [f"{c.__name__}.{f.name}" for c in classes for f in dataclasses.fields(c)
                    if f.metadata.get("kind") not in KINDS]
    assert unclassified == [], f"fields without a kind (identity, runtime or output): {unclassified}"
    identity = set(fields_of_kind(DistillConfig, "identity"))
    assert {"method", "alpha", "lr", "warmup_ratio", "epochs", "max_steps", "batch_size", "grad_accum", "seed",
            "kd_temperature", "kl_variant", "ot_epsilon", "ot_iters", "ot_grad", "teacher_dist", "student", "lora_rank",
            "data", "split", "field_map", "limit", "cache", "max_length", "dtype"} <= identity
    assert {"device", "num_workers", "report_to", "save_every", "data_root", "out", "resume", "overwrite"} <= set(
        fields_of_kind(DistillConfig, "runtime"))
    assert {"push_to_hub", "hub_model_id", "select_by"} <= set(fields_of_kind(DistillConfig, "output"))


@_s3_pytest.fixture(scope="module")
def s3_world(tmp_path_factory):
    """A tiny cache and a run of 2 steps trained on it (finished, with a checkpoint at each step)."""
    from conftest import write_cot_records
    from cot2align.config import CacheTeacherConfig, DistillConfig, build_config
    from cot2align.teacher.cache_pass import cache_teacher
    from cot2align.train.distill import distill

    root = tmp_path_factory.mktemp("s3_resume")
    data = write_cot_records(root / "data.jsonl", n=8, cot_every=1)
    cache_teacher(build_config(CacheTeacherConfig, model=_S3_TEACHER, data=str(data), out=str(root / "cache"), topk=8,
                               batch_tokens=2048), log=lambda m: None)
    distill(build_config(DistillConfig, cache=str(root / "cache"), student=_S3_STUDENT, method="dskd", alpha=0.5,
                         lr=1e-3, max_steps=2, batch_size=4, val_examples=0, save_every=1, report_to="none",
                         out=str(root / "run")), log=lambda m: None, progress=False)
    return root


def _s3_flags(world, out, *extra: str) -> list[str]:
    """The flags the run in s3_world was started with, then `extra` (click keeps the last of a repeated option)."""
    return ["distill", "--cache", str(world / "cache"), "--student", _S3_STUDENT, "--method", "dskd", "--alpha", "0.5",
            "--lr", "0.001", "--max-steps", "2", "--batch-size", "4", "--val-examples", "0", "--save-every", "1",
            "--report-to", "none", "--out", str(out), *extra]


def _s3_stopped_run(world, tmp_path):
    """A copy of the run, stopped before its end (no summary.json): --resume would train on."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(world / "run", run)
    (run / "summary.json").unlink()
    return run


def _s3_files(root) -> dict:
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _s3_refused(result) -> str:
    """The one `error:` line of a refused command (rc 2, no traceback)."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.stderr, result.exception)
    assert "Traceback" not in result.output + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and result.stderr.strip().endswith(errors[0]), result.stderr
    return errors[0]


def test_s3_the_resolved_config_is_a_new_frozen_object_resolved_again_unchanged(tmp_path):
    import dataclasses

    from cot2align.config import DistillConfig, build_config
    from cot2align.train.resolve import resolve_distill_config

    request = build_config(DistillConfig, method="sft", data="sample", student=_S3_STUDENT, out=str(tmp_path / "r"))
    resolved = resolve_distill_config(request, None)
    assert request.dtype is None and request.cot2align is None and request.num_workers is None   # left as given
    assert resolved.cot2align is False and resolved.dtype in ("fp32", "bf16") and resolved.num_workers is not None
    assert (resolved.epochs, resolved.lr, resolved.alpha) == (3, 1e-4, 0.5)          # the general defaults
    assert resolve_distill_config(resolved, None) == resolved
    with _s3_pytest.raises(dataclasses.FrozenInstanceError):
        resolved.alpha = 0.9                 # nothing writes to a resolved config afterwards


def test_s3_print_config_is_the_resolved_config_the_run_records(s3_world, tmp_path):
    """--print-config shows dtype (fp32 on CPU), the paper's setting for the cache's teacher and the resume state
    filled in, and it is what the run then records in config.yaml."""
    import torch
    import yaml
    from click.testing import CliRunner

    from cot2align.cli import main

    out = tmp_path / "run"
    flags = ["distill", "--cache", str(s3_world / "cache"), "--max-steps", "1", "--val-examples", "0",
             "--report-to", "none", "--out", str(out)]
    printed = CliRunner().invoke(main, [*flags, "--print-config"])
    assert printed.exit_code == 0, printed.output + printed.stderr
    shown = yaml.safe_load(printed.output)
    assert shown["dtype"] == ("bf16" if torch.cuda.is_available() else "fp32")
    # the paper's setting for a tiny-qwen2 teacher (config.PAPER_SETTINGS): student, lr, epochs, alpha, variant
    assert (shown["student"], shown["lr"], shown["epochs"], shown["alpha"], shown["kl_variant"]) == (
        "tiny-gpt2", 1e-3, 2, 0.5, "forward")
    assert shown["cot2align"] is True and shown["resume"] is False and shown["num_workers"] is not None
    assert shown["out"] == str(out) and not out.exists()          # printing creates nothing
    trained = CliRunner().invoke(main, flags)
    assert trained.exit_code == 0, trained.output + trained.stderr
    assert yaml.safe_load((out / "config.yaml").read_text()) == shown


def test_s3_resume_with_changed_alpha_and_lr_is_refused_naming_both(s3_world, tmp_path):
    from click.testing import CliRunner

    from cot2align.cli import main

    run = _s3_stopped_run(s3_world, tmp_path)
    before = _s3_files(run)
    result = CliRunner().invoke(main, _s3_flags(s3_world, run, "--alpha", "0.9", "--lr", "0.0005", "--resume"))
    line = _s3_refused(result)
    assert f"--resume {run}: the run was started with alpha=0.5, lr=0.001; this command has alpha=0.9, lr=0.0005" \
           in line, line
    assert "another --out" in line
    assert _s3_files(run) == before                  # config.yaml, run.json, checkpoints: all as they were
    for flag, value, was in (("--grad-accum", "2", "grad_accum=1"), ("--seed", "11", "seed=10"),
                             ("--kd-temperature", "1.0", "kd_temperature=2.0"), ("--dtype", "fp16", "dtype=")):
        line = _s3_refused(CliRunner().invoke(main, _s3_flags(s3_world, run, flag, value, "--resume")))
        assert was in line and f"{flag[2:].replace('-', '_')}=" in line.split("this command has")[1], line
    assert _s3_files(run) == before


def test_s3_resume_with_changed_runtime_fields_and_a_moved_cache_continues(s3_world, tmp_path):
    """Workers, trackers, checkpoint cadence and the cache's path may change: the cache is compared by content."""
    import shutil

    import yaml
    from click.testing import CliRunner

    from cot2align.cli import main

    run = _s3_stopped_run(s3_world, tmp_path)
    moved = tmp_path / "moved_cache"
    shutil.copytree(s3_world / "cache", moved)
    flags = _s3_flags(s3_world, run, "--num-workers", "1", "--report-to", "tensorboard", "--save-every", "0",
                      "--cache", str(moved), "--resume")
    result = CliRunner().invoke(main, flags)
    assert result.exit_code == 0, result.output + result.stderr
    recorded = yaml.safe_load((run / "config.yaml").read_text())
    assert (recorded["num_workers"], recorded["report_to"], recorded["cache"]) == (1, "tensorboard", str(moved))
    assert (run / "summary.json").is_file()


def test_s3_a_finished_run_resumed_with_another_identity_field_is_refused(s3_world, tmp_path):
    """The same flags: nothing to do. A longer schedule or another alpha: another run, refused in one line."""
    import shutil

    from click.testing import CliRunner

    from cot2align.cli import main

    run = tmp_path / "run"
    shutil.copytree(s3_world / "run", run)
    before = _s3_files(run)
    same = CliRunner().invoke(main, _s3_flags(s3_world, run, "--resume"))
    assert same.exit_code == 0 and "finished earlier (2 steps); nothing to do" in same.stderr, same.stderr
    line = _s3_refused(CliRunner().invoke(main, _s3_flags(s3_world, run, "--max-steps", "4", "--resume")))
    assert "started with max_steps=2; this command has max_steps=4" in line, line
    line = _s3_refused(CliRunner().invoke(main, _s3_flags(s3_world, run, "--alpha", "0.7", "--resume")))
    assert "started with alpha=0.5; this command has alpha=0.7" in line, line
    assert _s3_files(run) == before


def test_s3_a_run_recorded_before_a_field_existed_is_compared_on_what_it_recorded(s3_world, tmp_path):
    import json

    from cot2align.cache import open_cache
    from cot2align.config import ConfigError, DistillConfig, build_config
    from cot2align.train.resolve import resolve_distill_config
    from cot2align.train.setup import check_same_run

    run = _s3_stopped_run(s3_world, tmp_path)
    marker = run / "run.json"
    recorded = json.loads(marker.read_text())
    for name in ("lr", "kd_temperature", "val_examples"):       # as if written by an older cot2align
        del recorded["config"][name]
    marker.write_text(json.dumps(recorded))
    cache = open_cache(s3_world / "cache")
    cfg = dict(cache=str(s3_world / "cache"), student=_S3_STUDENT, method="dskd", alpha=0.5, max_steps=2, batch_size=4,
               save_every=1, report_to="none", out=str(run), resume=True)
    older = resolve_distill_config(build_config(DistillConfig, lr=5e-4, kd_temperature=1.0, val_examples=3, **cfg),
                                   cache)
    assert check_same_run(marker, older, cache)["alpha"] == 0.5          # nothing recorded to compare them with
    with _s3_pytest.raises(ConfigError, match=r"started with alpha=0.5; this command has alpha=0.9 "):
        check_same_run(marker, resolve_distill_config(build_config(DistillConfig, **dict(cfg, alpha=0.9)), cache),
                       cache)


# (end of section 3)


# ==================================================================================================================
# 4. Outputs: evaluate's results.json, symlinked outputs, no writable home, exit codes
# ==================================================================================================================


# (end of section 4)


# ==================================================================================================================
# 5. Crashes that are one-line errors: positions, a head smaller than the tokenizer, exact logits out of memory
# ==================================================================================================================


# (end of section 5)
