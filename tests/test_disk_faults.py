"""A full disk (ENOSPC) or read-only storage (EROFS), injected at the write itself: during a cache block, a
checkpoint save, the final model save and a metrics.jsonl append. Each stops the command with one line (exit 2, no
traceback), leaves the last committed block / checkpoint intact, and a rerun resumes to the uninterrupted result.
A cache whose side refuses the students' memo is still usable (the memo goes to COT2ALIGN_HOME)."""

import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr.storage._local as zarr_local
from click.testing import CliRunner
from safetensors import SafetensorError
from safetensors.torch import load_file

import cot2align.train.metrics as metrics
from conftest import cache_arrays, write_cot_records
from cot2align.cache import open_cache
from cot2align.cache.writer import CacheWriter
from cot2align.cli import main
from cot2align.locks import lock_path
from cot2align.modeling import load_tokenizer, tokenizer_hash
from cot2align.train import checkpoint, outputs
from cot2align.train.data import memo_paths, tokenize_cache

CACHE_FLAGS = ["--model", "tiny-llama", "--topk", "4", "--block-examples", "2", "--max-length", "128",
               "--max-prompt-length", "64"]
DISTILL_FLAGS = ["--student", "tiny-gpt2", "--method", "dskd", "--no-cot2align", "--epochs", "2", "--batch-size", "2",
                 "--val-examples", "1", "--val-max-new-tokens", "1", "--save-every", "1", "--lr", "3e-3"]


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def no_space(path="") -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def one_line_error(result, *needles) -> str:
    """The command stopped with exit 2 and one `error:` line (the last on stderr) holding every needle."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and all(n in line for n in needles), line
    return line


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def reference_cache(tmp_path_factory):
    """An uninterrupted cache."""
    root = tmp_path_factory.mktemp("faults")
    data = write_cot_records(root / "data.jsonl", n=8, cot_every=2)
    assert cli("cache-teacher", *CACHE_FLAGS, "--data", data, "--out", root / "cache").exit_code == 0
    return {"data": data, "cache": root / "cache"}


@pytest.fixture(scope="module")
def reference(reference_cache):
    """The cache and an uninterrupted distill run from it."""
    run = reference_cache["cache"].parent / "run"
    result = cli("distill", "--cache", reference_cache["cache"], *DISTILL_FLAGS, "--out", run)
    assert result.exit_code == 0, result.output
    return dict(reference_cache, run=run)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_a_failed_cache_block_write_keeps_the_committed_blocks_and_a_rerun_completes(reference_cache, tmp_path,
                                                                                      monkeypatch, code):
    reference = reference_cache
    commits, real_put, real_commit = [], zarr_local._put, CacheWriter.commit

    def commit(self, part, blocks_done):
        real_commit(self, part, blocks_done)
        commits.append(blocks_done)

    def put(path, value, exclusive=False):       # the chunk writes of the third block fail, as a full disk would
        if len(commits) >= 2 and "/parts/0/" in str(path) and "/c/" in str(path):
            raise OSError(code, os.strerror(code), str(path))
        return real_put(path, value, exclusive)

    monkeypatch.setattr(CacheWriter, "commit", commit)
    monkeypatch.setattr(zarr_local, "_put", put)
    out = tmp_path / "cache"
    result = cli("cache-teacher", *CACHE_FLAGS, "--data", reference["data"], "--out", out)
    one_line_error(result, f"{out}: cannot write the cache ({os.strerror(code)}", "its 2 committed block(s) are intact",
                   "rerun the same command to resume")
    monkeypatch.undo()
    manifest = json.loads((out / "zarr.json").read_text())["attributes"]
    assert manifest["status"] == "writing" and not lock_path(out).exists()
    committed, expected = cache_arrays(out), cache_arrays(reference["cache"])
    assert len(open_cache(out, allow_incomplete=True)) == manifest["progress"]["blocks"][2] == 4
    for key, value in committed.items():           # what was committed is exactly the reference's first rows
        assert np.array_equal(value, expected[key][:len(value)]), key
    result = cli("cache-teacher", *CACHE_FLAGS, "--data", reference["data"], "--out", out)
    assert result.exit_code == 0 and "resuming" in result.stderr, result.output
    got = cache_arrays(out)
    assert got.keys() == expected.keys() and all(np.array_equal(got[k], expected[k]) for k in expected)


@pytest.mark.slow
def test_a_failed_checkpoint_save_keeps_the_last_checkpoint_and_resume_ends_identical(reference, tmp_path,
                                                                                       monkeypatch):
    real = checkpoint.save_file

    def save_file(tensors, path):       # safetensors reports a full disk as this (seen on a full tmpfs)
        if ".step-00000003." in str(path):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(tensors, path)

    monkeypatch.setattr(checkpoint, "save_file", save_file)
    out = tmp_path / "run"
    result = cli("distill", "--cache", reference["cache"], *DISTILL_FLAGS, "--out", out)
    one_line_error(result, "cannot write checkpoint step-00000003 (No space left on device (os error 28))",
                   "the last checkpoint, step-00000002, is intact", "rerun with --resume")
    monkeypatch.undo()
    assert (out / "checkpoints" / "latest").read_text() == "step-00000002"
    assert not list((out / "checkpoints").glob(".step-*"))       # the half-written one is removed
    result = cli("distill", "--cache", reference["cache"], *DISTILL_FLAGS, "--out", out, "--resume")
    assert result.exit_code == 0 and "resumed from" in result.stderr, result.output
    assert_same_weights(out, reference["run"])


@pytest.mark.slow
def test_a_failed_final_model_save_is_redone_by_resume(reference, tmp_path, monkeypatch):
    real = os.replace

    def replace(src, dst, **kw):      # the final model is moved up from best/ into --out
        if Path(src).name == "model.safetensors" and Path(src).parent.name == "best":
            raise no_space(dst)
        return real(src, dst, **kw)

    monkeypatch.setattr(outputs.os, "replace", replace)
    out = tmp_path / "run"
    result = cli("distill", "--cache", reference["cache"], *DISTILL_FLAGS, "--out", out)
    one_line_error(result, f"--out {out}: cannot write the final model (No space left on device: {out}",
                   "the checkpoints are intact", "rerun with --resume")
    monkeypatch.undo()
    assert not (out / "model.safetensors").exists() and (out / "best" / "model.safetensors").exists()
    result = cli("distill", "--cache", reference["cache"], *DISTILL_FLAGS, "--out", out, "--resume")
    assert result.exit_code == 0, result.output
    assert_same_weights(out, reference["run"])
    assert (out / "summary.json").exists() and (out / "loss_curve.png").exists()


@pytest.mark.slow
def test_a_torn_metrics_line_from_a_full_disk_does_not_break_resume(reference, tmp_path, monkeypatch):
    real = metrics._write_all

    def write_all(file, data):         # half of step 3's line reaches the disk, then it is full
        if b'"step": 3,' in data and b'"lr"' in data:
            real(file, data[:len(data) // 2])
            raise no_space(file.name)
        return real(file, data)

    monkeypatch.setattr(metrics, "_write_all", write_all)
    out = tmp_path / "run"
    result = cli("distill", "--cache", reference["cache"], *DISTILL_FLAGS, "--out", out)
    one_line_error(result, f"{out / 'metrics.jsonl'}: cannot append (No space left on device)", "rerun with --resume")
    monkeypatch.undo()
    last = (out / "metrics.jsonl").read_bytes().splitlines()[-1]
    with pytest.raises(ValueError):
        json.loads(last)                # torn
    result = cli("distill", "--cache", reference["cache"], *DISTILL_FLAGS, "--out", out, "--resume")
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    expected = [json.loads(line) for line in (reference["run"] / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], "lr" in r) for r in records] == [(r["step"], "lr" in r) for r in expected]
    assert [r.get("loss", r.get("val_ce")) for r in records] == [r.get("loss", r.get("val_ce")) for r in expected]
    assert_same_weights(out, reference["run"])
    assert (out / "loss_curve.png").exists()


def test_a_cache_on_read_only_storage_keeps_the_students_memo_in_cot2align_home(reference_cache, tmp_path,
                                                                                 monkeypatch):
    reference = reference_cache
    cache_dir = tmp_path / "ro" / "cache"
    shutil.copytree(reference["cache"], cache_dir)
    cache = open_cache(cache_dir)
    tokenizer = load_tokenizer("tiny-gpt2")
    beside, home = memo_paths(cache, tokenizer_hash(tokenizer), 128, None)
    assert beside.parent == tmp_path / "ro" / "cache.students" and home.parent == cache.home_dir("students")
    real = np.savez

    def savez(path, **arrays):          # the cache's storage is read-only (as root, chmod would not stop us)
        if ".students" in str(path):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real(path, **arrays)

    monkeypatch.setattr(np, "savez", savez)
    said = []
    first = tokenize_cache(cache, tokenizer, tokenizer_hash(tokenizer), 128, log=said.append)
    assert not beside.exists() and home.exists()
    assert "Read-only file system" in said[0] and str(home.parent) in said[0]
    monkeypatch.setattr("cot2align.train.data._tokenize_view", lambda *a: pytest.fail("the memo was not reused"))
    again = tokenize_cache(cache, tokenizer, tokenizer_hash(tokenizer), 128, log=said.append)
    assert first.keys() == again.keys() and all(np.array_equal(first[k], again[k]) for k in first)
    monkeypatch.undo()
    home.unlink()
    # a whole run when the memo's directory cannot even be created (its name is taken by a file)
    beside.parent.rmdir()
    beside.parent.write_text("not a directory")
    result = cli("distill", "--cache", cache_dir, *DISTILL_FLAGS, "--max-steps", "1", "--out", tmp_path / "run")
    assert result.exit_code == 0 and "keeping it in" in result.stderr, result.output
    assert any(home.parent.glob("*.npz"))
    shutil.rmtree(home.parent)
