"""Outputs users share and logs where people look (issue 15, items 4 and 5): the model card's Hub metadata,
`push` / `--push-to-hub` (the Hub is unreachable here: HfApi's two network calls are replaced by recorders,
and the real client is used for the unreachable case), `--report-to`, `--quiet` and the progress bars."""

import hashlib
import io
import json
import logging
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.hf_api import RepoUrl

from cot2align.cli import main
from cot2align.config import CacheTeacherConfig, ConfigError, DistillConfig, build_config
from cot2align.data.augment import AugmentConfig, augment_cot
from cot2align.eval import evaluate_model
from cot2align.hub import build_card, hub_dataset_id, hub_model_id, run_card_info
from cot2align.teacher.cache_pass import cache_teacher
from cot2align.train.distill import distill

HUB_ID = "someone/tiny-distilled"


@pytest.fixture(autouse=True)
def _library_logging():
    """The CLI configures the `cot2align` logger for its process; give the next test the logger as it was."""
    logger = logging.getLogger("cot2align")
    saved = logger.handlers[:], logger.level, logger.propagate
    yield
    logger.handlers[:], logger.level, logger.propagate = saved[0], saved[1], saved[2]


class HubCalls:
    """HfApi.create_repo and upload_folder, recorded instead of sent."""

    def __init__(self, monkeypatch):
        self.calls = []
        monkeypatch.setattr(HfApi, "create_repo", self.create_repo)
        monkeypatch.setattr(HfApi, "upload_folder", self.upload_folder)

    def create_repo(self, repo_id, **kwargs):    # a bound method: HfApi.create_repo(api, ...) never passes `api`
        self.calls.append(("create_repo", repo_id, kwargs))
        owner = "someone" if "/" not in repo_id else ""
        return RepoUrl(f"https://huggingface.co/{owner + '/' if owner else ''}{repo_id}")

    def upload_folder(self, **kwargs):
        folder = Path(kwargs["folder_path"])
        self.calls.append(("upload_folder", kwargs["repo_id"], {**kwargs, "card": (folder / "README.md").read_text()}))
        return None


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny dskd + CoT2Align run (tiny-qwen2 teacher, tiny-gpt2 student) with --report-to none and
    --push-to-hub, the Hub's calls recorded."""
    root = tmp_path_factory.mktemp("sharing")
    data = root / "cot.jsonl"      # short records: the run is about its outputs, not its training
    data.write_text("".join(json.dumps({"id": f"r{i}", "instruction": f"Add {i} and {i + 1}.", "output": f"{2 * i + 1}.",
                                        "rationale": f"{i} plus {i + 1} is {2 * i + 1}."}) + "\n" for i in range(8)))
    cache_teacher(build_config(CacheTeacherConfig, model="tiny-qwen2", data=str(data), out=str(root / "cache"), topk=4),
                  log=lambda m: None)
    with pytest.MonkeyPatch.context() as monkeypatch:
        hub = HubCalls(monkeypatch)
        summary = distill(build_config(DistillConfig, cache=str(root / "cache"), student="tiny-gpt2", out=str(root / "run"),
                                       max_steps=1, epochs=1, batch_size=2, val_examples=2, val_max_new_tokens=4,
                                       alpha=0.4, val_data="sample", report_to="none", push_to_hub=True,
                                       hub_model_id=HUB_ID),
                          log=lambda m: None, progress=False)
    return root / "run", summary, hub.calls


def test_the_model_card_carries_hub_metadata(run_dir):
    run, summary, _ = run_dir
    card = ModelCard.load(run / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "text-generation"
    assert {"cot2align", "knowledge-distillation", "dskd"} <= set(data["tags"])
    assert data["cot2align"]["teacher"] == "tiny-qwen2" and data["cot2align"]["method"] == "dskd"
    assert data["cot2align"]["alpha"] == 0.4 and data["cot2align"]["cot2align"] is True
    assert len(data["cot2align"]["cache_manifest_sha256"]) == 64
    assert "base_model" not in data     # a preset is no Hub model: the Hub would refuse the name
    metrics = {r.metric_type: r for r in card.data.eval_results}
    final = summary["history"][-1]
    assert metrics["rouge"].metric_value == pytest.approx(final["val_rougeL"], abs=1e-4)
    assert metrics["cross_entropy"].metric_value == pytest.approx(final["val_ce"], abs=1e-4)
    assert metrics["rouge"].dataset_split == "validation"
    assert "CoT2Align: Cross-Chain of Thought Distillation" in card.text and "2502.16806" in card.text


def test_hub_models_and_datasets_are_named_in_the_card(tmp_path):
    assert hub_model_id("gpt2-120m") == "openai-community/gpt2" and hub_model_id("tiny-gpt2") is None
    assert hub_model_id(str(tmp_path)) is None and hub_model_id("Qwen/Qwen2.5-7B-Instruct") == "Qwen/Qwen2.5-7B-Instruct"
    assert hub_dataset_id("dolly") == "databricks/databricks-dolly-15k" and hub_dataset_id("sni") == "yizhongw/self_instruct"
    summary = {"steps": 10, "best_epoch": 0, "history": [{"epoch": 0, "step": 10, "val_ce": 2.5, "val_rougeL": 21.0}]}
    info = run_card_info({"student": "gpt2-120m", "method": "dskd", "cot2align": True, "alpha": 0.5, "lora_rank": 8,
                          "keep_adapter": True, "split": "train"}, "qwen1.5-1.8b", "dolly", None, summary)
    data = build_card(tmp_path, info, summary).data
    assert data.base_model == "openai-community/gpt2" and data.datasets == ["databricks/databricks-dolly-15k"]
    assert data.library_name == "peft"      # a kept LoRA adapter loads through peft
    assert data.eval_results[0].dataset_type == "databricks/databricks-dolly-15k"


def test_push_to_hub_flag_uploads_the_run_with_its_card(run_dir):
    run, summary, calls = run_dir
    assert [c[0] for c in calls] == ["create_repo", "upload_folder"]
    assert calls[0][1] == HUB_ID and calls[0][2]["private"] is False
    upload = calls[1][2]
    assert upload["repo_id"] == HUB_ID and Path(upload["folder_path"]) == run
    assert "checkpoints/**" in upload["ignore_patterns"] and "library_name: transformers" in upload["card"]
    assert summary["hub_url"] == f"https://huggingface.co/{HUB_ID}"


def test_push_command_adds_evaluate_results_to_the_card(run_dir, monkeypatch):
    run, _, _ = run_dir
    evaluate_model(str(run), "sample", "test", greedy=True, limit=2, max_new_tokens=4, metric="all", log=lambda m: None)
    hub = HubCalls(monkeypatch)
    result = CliRunner().invoke(main, ["push", str(run), "--hub-model-id", "tiny-run", "--private"])
    assert result.exit_code == 0, result.output + result.stderr
    assert result.stdout.strip() == "https://huggingface.co/someone/tiny-run"
    assert hub.calls[0][1] == "tiny-run" and hub.calls[0][2]["private"] is True
    assert hub.calls[1][1] == "someone/tiny-run"      # the namespace the Hub resolved
    results = ModelCard.load(run / "README.md").data.eval_results
    assert {(r.dataset_name, r.dataset_split, r.metric_type) for r in results} >= {
        ("sample", "test", "rouge"), ("sample", "test", "cross_entropy"), ("sample", "validation", "rouge")}
    assert 'from_pretrained("tiny-run")' in ModelCard.load(run / "README.md").text


def test_an_unreachable_hub_is_one_line_and_the_run_is_intact(run_dir):
    run, _, _ = run_dir
    before = hashlib.sha256((run / "model.safetensors").read_bytes()).hexdigest()
    result = CliRunner().invoke(main, ["push", str(run)])       # HF_HUB_OFFLINE=1 (conftest): the real client refuses
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: push to the Hugging Face Hub failed")
    assert f"cot2align push {run}" in result.stderr and "Traceback" not in result.output
    assert hashlib.sha256((run / "model.safetensors").read_bytes()).hexdigest() == before
    assert ModelCard.load(run / "README.md").data.library_name == "transformers"


def test_push_refuses_a_directory_without_a_model(tmp_path):
    result = CliRunner().invoke(main, ["push", str(tmp_path)])
    assert result.exit_code == 2 and result.stderr.startswith("error: ") and "no saved model" in result.stderr


def _sft(tmp_path, **kw):
    cfg = build_config(DistillConfig, student="tiny-gpt2", method="sft", cot2align=False, data="sample", limit=4,
                       max_steps=1, epochs=1, batch_size=4, val_examples=1, val_max_new_tokens=2, alpha=0.0,
                       out=str(tmp_path / "run"), **kw)
    return distill(cfg, log=lambda m: None, progress=False)


def test_report_to_none_writes_no_tensorboard_and_tensorboard_does(run_dir, tmp_path):
    run, _, _ = run_dir
    assert not (run / "tensorboard").exists() and (run / "metrics.jsonl").read_text().strip()
    _sft(tmp_path, report_to="tensorboard")
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


# the writer thread's copy of the error must not escape as a thread traceback (it would be this warning)
@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_tracker_that_cannot_write_is_turned_off_and_the_run_goes_on(tmp_path, monkeypatch):
    """TensorBoard's own event file hits a full disk after its first record (the failure raised by its writer
    thread, as it is in use): one warning and no thread traceback, the run finishes, and metrics.jsonl holds
    every value."""
    import errno
    import os

    from tensorboard.summary.writer.record_writer import RecordWriter

    real_write, written = RecordWriter.write, []

    def write(self, data):
        if written:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "events.out.tfevents")
        written.append(data)
        return real_write(self, data)

    monkeypatch.setattr(RecordWriter, "write", write)
    messages = []
    cfg = build_config(DistillConfig, student="tiny-gpt2", method="sft", cot2align=False, data="sample", limit=8,
                       max_steps=4, epochs=1, batch_size=2, val_examples=1, val_max_new_tokens=2, alpha=0.0,
                       out=str(tmp_path / "run"), report_to="tensorboard")
    summary = distill(cfg, log=messages.append, progress=False)
    assert summary["steps"] == 4 and (tmp_path / "run" / "model.safetensors").exists()
    warnings = [m for m in messages if "--report-to tensorboard" in m]
    assert len(warnings) == 1 and "No space left on device" in warnings[0] and "turned off" in warnings[0]
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sorted(set(steps)) == [1, 2, 3, 4]


def test_a_tracker_that_cannot_start_is_left_out_with_a_warning(tmp_path, monkeypatch):
    from cot2align.train import outputs

    def unreachable(self, out, cfg):
        raise ConnectionError("wandb.ai: Name or service not known")

    monkeypatch.setattr(outputs.TensorBoard, "__init__", unreachable)
    messages = []
    cfg = build_config(DistillConfig, student="tiny-gpt2", method="sft", cot2align=False, data="sample", limit=4,
                       max_steps=1, epochs=1, batch_size=4, val_examples=1, val_max_new_tokens=2, alpha=0.0,
                       out=str(tmp_path / "run"), report_to="tensorboard")
    assert distill(cfg, log=messages.append, progress=False)["steps"] == 1
    assert any("--report-to tensorboard: not available (wandb.ai: Name or service not known)" in m for m in messages), messages


def test_report_to_is_checked_before_anything_runs(tmp_path, monkeypatch):
    for bad in ("tensorbord", "none,wandb", ""):
        with pytest.raises(ConfigError, match="report_to: expected"):
            build_config(DistillConfig, cache="c", report_to=bad)
    monkeypatch.setitem(sys.modules, "wandb", None)      # as if not installed
    result = CliRunner().invoke(main, ["sft", "--model", "tiny-gpt2", "--data", "sample", "--out", str(tmp_path / "r"),
                                       "--report-to", "tensorboard,wandb"])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert "wandb is not installed" in result.stderr and not (tmp_path / "r").exists()


@pytest.mark.slow
def test_report_to_wandb_offline_logs_the_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    _sft(tmp_path, report_to="wandb")
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_augment_cot_and_evaluate_show_progress_bars_with_a_rate(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "stderr", _Terminal())
    augment_cot(AugmentConfig(model="tiny-gpt2", data="sample", limit=3, max_new_tokens=4, batch_size=2,
                              out=str(tmp_path / "cot.jsonl")), log=lambda m: None)
    evaluate_model("tiny-gpt2", "sample", "test", [10], limit=2, max_new_tokens=4, metric="all",
                   out=str(tmp_path / "eval"), log=lambda m: None)
    shown = sys.stderr.getvalue()
    assert "augment-cot" in shown and "record/s" in shown and "3/3" in shown
    assert "evaluate seed-10" in shown and "example/s" in shown and "tok_s=" in shown
    assert "evaluate ce" in shown and "reference/s" in shown


def test_quiet_keeps_warnings_only_and_library_messages_go_to_logging(tmp_path, caplog):
    command = ["augment-cot", "--model", "tiny-gpt2", "--data", "sample", "--limit", "2", "--max-new-tokens", "4"]
    loud = CliRunner().invoke(main, command + ["--out", str(tmp_path / "a.jsonl")])
    quiet = CliRunner().invoke(main, command + ["--out", str(tmp_path / "b.jsonl"), "--quiet"])
    assert loud.exit_code == quiet.exit_code == 0, loud.stderr + quiet.stderr
    assert "augment-cot: 2 records" in loud.stderr and quiet.stderr == ""
    assert json.loads(quiet.stdout)["generated"] == 2       # the result still prints
    logging.getLogger("cot2align").setLevel(logging.NOTSET)   # as a library user has it
    logging.getLogger("cot2align").propagate = True
    with caplog.at_level(logging.INFO, logger="cot2align"):
        augment_cot(AugmentConfig(model="tiny-gpt2", data="sample", limit=2, out=str(tmp_path / "c.jsonl"), max_new_tokens=4))
    assert any(r.name == "cot2align.data.augment" and r.levelno == logging.INFO and "2 to generate" in r.getMessage()
               for r in caplog.records)
