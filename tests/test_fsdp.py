"""FSDP (`cot2align distill --fsdp`) on 2 CPU processes (gloo): the sharded run reaches the same weights as the
replicated (DDP) run, its saved model holds the gathered weights, and a SIGKILL + --resume is bit-identical.

Tiny-llama teacher, tiny-mistral student (different real tokenizers), DSKD + CoT2Align: the objective reads
the student's lm_head outside the forward and trains projectors, the two things FSDP has to leave whole.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import explain, free_port, write_cot_records
from cot2align.config import CacheTeacherConfig, build_config
from cot2align.teacher.cache_pass import cache_teacher

TEACHER, STUDENT = "tiny-llama", "tiny-mistral"
ENV = dict(os.environ, OMP_NUM_THREADS="1")
pytestmark = pytest.mark.slow      # two processes under torchrun


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    data = write_cot_records(root / "data.jsonl", n=16, cot_every=1)
    cache_teacher(build_config(CacheTeacherConfig, model=TEACHER, data=str(data), out=str(root / "cache"), topk=8),
                  log=lambda m: None)
    return root / "cache"


def _launch(cache_dir, out, *extra, env=ENV):
    args = ["--cache", str(cache_dir), "--student", STUDENT, "--method", "dskd", "--cot2align", "--epochs", "2",
            "--batch-size", "2", "--val-examples", "2", "--val-max-new-tokens", "3", "--lr", "3e-3", "--save-every", "2"]
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(free_port()), "-m", "cot2align.cli", "distill", *args, "--out", str(out), *extra],
                          env=env, capture_output=True, text=True)


def _checkpoint(out, name):
    checkpoints = Path(out) / "checkpoints"
    return load_file(str(checkpoints / (checkpoints / "latest").read_text().strip() / name))


@pytest.fixture(scope="module")
def fsdp_run(cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp_run") / "run"
    result = _launch(cache_dir, out, "--fsdp")
    assert result.returncode == 0, explain(result)
    return out


def test_fsdp_reaches_the_ddp_weights(cache_dir, fsdp_run, tmp_path):
    ddp = tmp_path / "ddp"
    result = _launch(cache_dir, ddp)
    assert result.returncode == 0, explain(result)
    for name in ("trainable.safetensors", "projectors.safetensors", "optimizer.safetensors"):
        sharded, replicated = _checkpoint(fsdp_run, name), _checkpoint(ddp, name)
        assert sharded.keys() == replicated.keys(), name
        for key in sharded:     # whole tensors in the checkpoint, whatever the sharding
            assert sharded[key].shape == replicated[key].shape, key
            torch.testing.assert_close(sharded[key], replicated[key], rtol=1e-4, atol=1e-6, msg=f"{name}: {key}")
    # the saved models (FSDP: gathered from the shards into a fresh copy) hold the same weights and generate
    from transformers import AutoModelForCausalLM

    sharded_model, replicated_model = (AutoModelForCausalLM.from_pretrained(str(d)) for d in (fsdp_run, ddp))
    replicated_state = replicated_model.state_dict()
    for key, value in sharded_model.state_dict().items():
        torch.testing.assert_close(value, replicated_state[key], rtol=1e-4, atol=1e-6, msg=key)
    assert sharded_model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2, do_sample=False).shape == (1, 5)


def test_fsdp_sigkill_then_resume_is_bit_identical(cache_dir, fsdp_run, tmp_path):
    crashed = tmp_path / "crashed"
    killed = _launch(cache_dir, crashed, "--fsdp", env=dict(ENV, COT2ALIGN_FAULT="step:3"))
    assert killed.returncode != 0
    resumed = _launch(cache_dir, crashed, "--fsdp", "--resume")
    assert resumed.returncode == 0, explain(resumed)
    for name in ("trainable.safetensors", "projectors.safetensors"):
        a, b = _checkpoint(fsdp_run, name), _checkpoint(crashed, name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_fsdp_with_lora_saves_the_same_merged_model_as_ddp(cache_dir, tmp_path):
    """LoRA under FSDP: frozen and trainable weights in the same sharded block; the merged model matches DDP's."""
    from transformers import AutoModelForCausalLM

    lora = ("--lora-rank", "4", "--lora-alpha", "8", "--epochs", "1")
    runs = {"fsdp": _launch(cache_dir, tmp_path / "fsdp", *lora, "--fsdp"),
            "ddp": _launch(cache_dir, tmp_path / "ddp", *lora)}
    for name, result in runs.items():
        assert result.returncode == 0, (name, explain(result))
    sharded, replicated = (AutoModelForCausalLM.from_pretrained(str(tmp_path / name)).state_dict() for name in runs)
    for key, value in sharded.items():
        torch.testing.assert_close(value, replicated[key], rtol=1e-4, atol=1e-6, msg=key)
    trained = _checkpoint(tmp_path / "fsdp", "trainable.safetensors")
    assert trained and all("lora_" in key for key in trained)
    assert any(value.abs().sum() > 0 for key, value in trained.items() if "lora_B" in key)   # the adapter did train
