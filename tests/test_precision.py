"""Precision and memory knobs on CPU: --dtype (the student's autocast, a LoRA base's weights; the teacher's compute
dtype in cache-teacher and augment-cot), --gradient-checkpointing, and finite results with each."""

import json
from contextlib import ExitStack
import math
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from conftest import write_cot_records
from cot2align.cache import CacheError, open_cache
from cot2align.cli import main
from cot2align.config import CacheTeacherConfig, ConfigError, DistillConfig, build_config
from cot2align.teacher.cache_pass import _check_dtype, cache_teacher
from cot2align.train.distill import distill
from cot2align.train.resolve import resolve_distill_config
from cot2align.train.setup import load_student, setup, student_weights_dtype

TEACHER, STUDENT = "tiny-qwen2", "tiny-gpt2"
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def data_and_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("precision")
    data = write_cot_records(root / "data.jsonl", n=8, cot_every=1)
    cache_teacher(build_config(CacheTeacherConfig, model=TEACHER, data=str(data), out=str(root / "cache"), topk=8,
                               batch_tokens=2048), log=lambda m: None)
    return data, root / "cache"


def _student_cfg(**kw):
    return build_config(DistillConfig, method="sft", cot2align=False, data="sample", student=STUDENT, **kw)


def _losses(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r.get("loss", r.get("ce")) for r in rows if "ce" in r]


def test_a_lora_base_loads_in_the_chosen_dtype_and_the_adapters_stay_float32():
    for dtype, base_dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)):
        model = load_student(_student_cfg(lora_rank=4, lora_alpha=8, lora_dropout=0.0, dtype=dtype), CPU)
        adapters = {n: p for n, p in model.named_parameters() if "lora_" in n}
        base = {n: p for n, p in model.named_parameters() if "lora_" not in n}
        assert adapters and all(p.dtype == torch.float32 and p.requires_grad for p in adapters.values()), dtype
        assert all(p.dtype == base_dtype and not p.requires_grad for p in base.values()), dtype
    # the defaults: a LoRA base in bf16 on CUDA (a 7B base is 14 GB, not 28), float32 on CPU; full fine-tuning keeps
    # float32 master weights whatever --dtype says (it is then the autocast's dtype)
    lora = _student_cfg(lora_rank=4)
    assert student_weights_dtype(lora, torch.device("cuda")) == torch.bfloat16
    assert student_weights_dtype(lora, CPU) == torch.float32
    full = load_student(_student_cfg(dtype="bf16"), CPU)
    assert all(p.dtype == torch.float32 for p in full.parameters())
    assert student_weights_dtype(_student_cfg(), torch.device("cuda")) == torch.float32
    with pytest.raises(ConfigError, match="dtype: expected one of bf16, fp16, fp32"):
        _student_cfg(dtype="int4")


@pytest.mark.parametrize("lora", [False, True])
def test_gradient_checkpointing_recomputes_the_blocks_and_gives_the_same_gradients(lora):
    extra = dict(lora_rank=4, lora_alpha=8, lora_dropout=0.0) if lora else {}
    ids = torch.tensor([[464, 2068, 7586, 21831, 18045, 625, 262, 16931]])
    grads, calls = [], []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = load_student(_student_cfg(gradient_checkpointing=checkpointing, **extra), CPU)
        base = model.get_base_model() if lora else model
        active = getattr(type(base), "is_activation_checkpointing", None)   # transformers 5.x; before: the old name
        assert (base.is_activation_checkpointing if active is not None else base.is_gradient_checkpointing) == checkpointing
        # a pre-hook on a module inside the block: the block's own hooks stay outside the checkpoint, and the
        # recomputation stops early, before the last modules of the block would run again
        count = [0]
        base.transformer.h[0].ln_1.register_forward_pre_hook(lambda *a: count.__setitem__(0, count[0] + 1))
        model(input_ids=ids, labels=ids).loss.backward()
        calls.append(count[0])
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert calls == [1, 2]           # checkpointed: the block runs again in the backward
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], msg=name)
    if lora:
        assert any(g.abs().sum() > 0 for n, g in grads[1].items() if "lora_B" in n)


def test_autocast_follows_dtype(data_and_cache, tmp_path):
    from cot2align.train.batches import views

    for dtype, expected in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        held = ExitStack()
        cache = open_cache(data_and_cache[1])
        cfg = build_config(DistillConfig, cache=str(data_and_cache[1]), student=STUDENT, method="dskd", dtype=dtype,
                           val_examples=0, out=str(tmp_path / dtype))
        run = setup(resolve_distill_config(cfg, cache), lambda m: None, cache, held)
        try:
            with run.autocast:
                students, _ = views(next(iter(run.loader)), run.train_model, run.heads, run.device, run.compute_dtype)
            assert students["std"].logits.dtype == expected
        finally:
            held.close()
            run.metrics_file.close()


@pytest.mark.parametrize("settings", [
    dict(lora_rank=4, lora_alpha=8, dtype="bf16", gradient_checkpointing=True),
    pytest.param(dict(dtype="fp16"), marks=pytest.mark.slow),      # full fine-tuning, fp16 autocast + loss scaling
    pytest.param(dict(gradient_checkpointing=True), marks=pytest.mark.slow),   # the CPU default: fp32
], ids=["lora-bf16-checkpointing", "full-fp16", "full-fp32-checkpointing"])
def test_short_distill_runs_stay_finite_and_record_the_choice(data_and_cache, tmp_path, settings):
    out = tmp_path / "run"
    summary = distill(build_config(DistillConfig, cache=str(data_and_cache[1]), student=STUDENT, method="dskd",
                                   max_steps=2, batch_size=4, val_examples=0, save_every=1, out=str(out), **settings),
                      log=lambda m: None, progress=False)
    losses = _losses(out)
    assert summary["steps"] == 2 and len(losses) == 2 and all(math.isfinite(v) for v in losses), losses
    recorded = yaml.safe_load((out / "config.yaml").read_text())
    assert recorded["dtype"] == settings.get("dtype", "fp32")
    assert recorded["gradient_checkpointing"] == settings.get("gradient_checkpointing", False)
    state = json.loads((out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip() / "state.json").read_text())
    assert ("grad_scaler" in state) == (settings.get("dtype") == "fp16")
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(str(out))
    assert all(torch.isfinite(p).all() for p in saved.parameters())


def test_sft_takes_dtype_and_gradient_checkpointing(data_and_cache, tmp_path):
    out = tmp_path / "sft"
    result = CliRunner().invoke(main, ["sft", "--model", STUDENT, "--data", str(data_and_cache[0]), "--lora-rank", "4",
                                       "--dtype", "bf16", "--gradient-checkpointing", "--max-steps", "2",
                                       "--batch-size", "4", "--val-examples", "0", "--out", str(out)])
    assert result.exit_code == 0, result.output + result.stderr
    recorded = yaml.safe_load((out / "config.yaml").read_text())
    assert recorded["dtype"] == "bf16" and recorded["gradient_checkpointing"] is True and recorded["lora_rank"] == 4
    assert all(math.isfinite(v) for v in _losses(out))


def test_cache_teacher_dtype_is_the_teachers_compute_dtype_and_is_kept_on_resume(data_and_cache, tmp_path):
    data, fp32_cache = data_and_cache
    out = tmp_path / "bf16"
    settings = dict(model=TEACHER, data=str(data), topk=8, batch_tokens=2048, out=str(out))
    cache_teacher(build_config(CacheTeacherConfig, dtype="bf16", **settings), log=lambda m: None)
    bf16, fp32 = open_cache(out), open_cache(fp32_cache)
    assert bf16.manifest["teacher"]["dtype"] == "bfloat16" and fp32.manifest["teacher"]["dtype"] == "float32"
    a, b = bf16.hidden_tensor(bf16[0]["std"]).float(), fp32.hidden_tensor(fp32[0]["std"]).float()
    assert torch.isfinite(a).all() and not torch.equal(a, b)          # computed in bf16: close, not equal
    torch.testing.assert_close(a, b, rtol=0.1, atol=0.1)
    # a complete cache in another precision than --dtype asks for is refused; without --dtype it is reported done
    with pytest.raises(CacheError, match=r"computed with the teacher in bfloat16, this run would compute in float32; "
                                         r"pass --dtype bf16"):
        cache_teacher(build_config(CacheTeacherConfig, dtype="fp32", **settings), log=lambda m: None)
    assert cache_teacher(build_config(CacheTeacherConfig, **settings), log=lambda m: None)["skipped"]
    # an unfinished one is resumed only in its own dtype, asked for or not (rows must not mix precisions)
    with pytest.raises(CacheError, match="pass --dtype bf16 to continue it"):
        _check_dtype({"status": "writing", "teacher": {"dtype": "bfloat16"}}, torch.float32, False, out)
    _check_dtype({"status": "writing", "teacher": {"dtype": "bfloat16"}}, torch.bfloat16, False, out)


def test_augment_cot_loads_the_teacher_in_dtype(data_and_cache, tmp_path, monkeypatch):
    from cot2align.data import augment as augment_module

    loaded = []
    original = augment_module.load_model

    def spy(*args, **kwargs):
        model = original(*args, **kwargs)
        loaded.append(next(model.parameters()).dtype)
        return model

    monkeypatch.setattr(augment_module, "load_model", spy)
    out = tmp_path / "cot.jsonl"
    result = CliRunner().invoke(main, ["augment-cot", "--model", TEACHER, "--data", str(data_and_cache[0]), "--limit", "2",
                                       "--max-new-tokens", "4", "--dtype", "bf16", "--out", str(out)])
    assert result.exit_code == 0, result.output + result.stderr
    assert loaded == [torch.bfloat16] and len(out.read_text().splitlines()) == 2


def test_accelerate_launch_settings_fill_what_the_command_line_leaves_unset(monkeypatch):
    from cot2align.train.resolve import accelerate_settings, resolve_distill_config

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    cfg = build_config(DistillConfig, method="sft", cot2align=False, data="sample", student=STUDENT)
    assert accelerate_settings(cfg) == ({"dtype": "fp16", "fsdp": True},
                                        ["dtype fp16 (mixed_precision fp16)", "fsdp (use_fsdp)"])
    resolved = resolve_distill_config(cfg, None)
    assert resolved.dtype == "fp16" and resolved.fsdp and cfg.dtype is None      # a new config; the request as given
    given = build_config(DistillConfig, cache="c", dtype="bf16")          # a flag wins over the launcher's config
    assert accelerate_settings(given)[0] == {"fsdp": True}
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    plain = build_config(DistillConfig, cache="c")
    assert accelerate_settings(plain) == ({"dtype": "fp32"}, ["dtype fp32 (mixed_precision no)"])
