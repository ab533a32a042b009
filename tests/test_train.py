"""The trainer: cache-fed objective = online-teacher objective, row alignment, short runs, crash/resume, bad inputs.

Tiny real architectures with real, different tokenizers: a tiny-llama teacher (Llama-2 tokenizer) and a
tiny-mistral student (Mistral tokenizer); tiny-llama as its own student for same-vocabulary KL.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from conftest import explain, free_port, online_teacher_views, write_cot_records
from cot2align.cache import open_cache
from cot2align.cache import CacheError
from cot2align.cli import main
from cot2align.config import CacheTeacherConfig, ConfigError, DistillConfig, build_config
from cot2align.losses.objective import Heads, build_projectors, default_settings, distillation_loss
from cot2align.modeling import load_model, load_tokenizer, tokenizer_hash
from cot2align.teacher.cache_pass import cache_teacher
from cot2align.train.data import DistillDataset, collate, tokenize_cache
from cot2align.train.batches import student_view, teacher_view
from cot2align.train.distill import distill
from cot2align.train.validation import is_better

TEACHER, STUDENT = "tiny-llama", "tiny-mistral"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    data = write_cot_records(root / "data.jsonl", n=16, cot_every=1)
    cfg = build_config(CacheTeacherConfig, model=TEACHER, data=str(data), out=str(root / "cache"), topk=8, batch_tokens=4096)
    cache_teacher(cfg, log=lambda m: None)
    return root / "cache"


def _objective_both_ways(cache_path, student_name, method, cot2align):
    cache = open_cache(cache_path)
    student_tok = load_tokenizer(student_name)
    torch.manual_seed(0)
    student = load_model(student_name)
    teacher = load_model(TEACHER)
    teacher_tok = load_tokenizer(TEACHER)
    vocab_map = None
    if method == "mined":
        from cot2align.align.vocab import vocab_map as build_map

        vocab_map = build_map(cache.tokenizer(), student_tok)
    ids = tokenize_cache(cache, student_tok, tokenizer_hash(student_tok), 512, "mined" if method == "mined" else None)
    views = ("std", "cot") if cot2align else ("std",)
    dataset = DistillDataset(ids, views, [0, 1, 2], cache.opened(), ("input_ids", "target_ids", "hidden", "embeds"))
    batch = collate([dataset[k] for k in range(3)], views, student_tok.eos_token_id)
    head = cache.head()
    heads = Heads(student_embed_tokens=student.get_input_embeddings().weight, student_lm_head=student.get_output_embeddings().weight,
                  teacher_embed_tokens=head["embed_tokens"], teacher_lm_head=head["lm_head"])
    if vocab_map is not None:
        heads.stu2tea, heads.tea2stu = torch.from_numpy(vocab_map.stu2tea), torch.from_numpy(vocab_map.tea2stu)
    students = {v: student_view(student, batch[v], "cpu", True) for v in views}
    cached = {v: teacher_view(batch[v], heads, "cpu", torch.float32) for v in views}
    online = online_teacher_views(teacher, teacher_tok, cache, [0, 1, 2], views,
                                  mined_rows={v: batch[v]["mined_rows"] for v in views})
    torch.manual_seed(1)
    projectors = build_projectors(method, cot2align, student.config.hidden_size, teacher.config.hidden_size)
    results = []
    for teachers in (cached, online):
        loss, parts = distillation_loss(method, 0.5, students, teachers, heads, projectors, cot2align, default_settings())
        results.append((loss, parts))
    return results, batch, cached, online, student_tok, teacher_tok


@pytest.mark.parametrize("method,cot2align", [("dskd", True), ("dskd", False), ("uld", True), ("mined", True),
                                              ("sft", True), ("kl", True)])
def test_cache_fed_objective_equals_online_teacher(cache_dir, method, cot2align):
    student_name = TEACHER if method == "kl" else STUDENT
    (cached, online), batch, cached_views, online_views, _, _ = _objective_both_ways(cache_dir, student_name, method, cot2align)
    torch.testing.assert_close(cached[0], online[0], rtol=1e-5, atol=1e-5)
    for key in cached[1]:
        torch.testing.assert_close(cached[1][key], online[1][key], rtol=1e-4, atol=1e-5)
    for view in cached_views:     # the teacher tensors themselves
        assert torch.equal(cached_views[view].mask, online_views[view].mask)
        assert torch.equal(cached_views[view].target_ids[cached_views[view].mask], online_views[view].target_ids[online_views[view].mask])
        # one bf16 rounding step apart at most (the cache pass batches differently: float32 noise can flip a rounding)
        torch.testing.assert_close(cached_views[view].hidden, online_views[view].hidden, rtol=8e-3, atol=1e-4)


def _full_student_view(model, batch_view):
    """The reference: a plain forward over every position, masks and MinED rows spread back to [B, L]."""
    from cot2align.losses.objective import StudentView

    ids, positions = batch_view["input_ids"], batch_view["positions"]
    out = model(input_ids=ids, attention_mask=batch_view["attention_mask"], output_hidden_states=True, use_cache=False)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, positions] = batch_view["response_mask"]
    mined = torch.full_like(ids, -1)
    mined[:, positions] = batch_view["mined_rows"]
    targets = torch.cat([ids[:, 1:], ids[:, -1:]], dim=1)
    return StudentView(logits=out.logits, embed=out.hidden_states[0], last=out.hidden_states[-1], input_ids=ids,
                       target_ids=targets, mask=mask), mined


@pytest.mark.parametrize("method,cot2align", [("dskd", True), ("uld", False), ("mined", True), ("sft", True), ("kl", False)])
def test_logits_at_response_positions_only_equal_a_full_forward(cache_dir, method, cot2align):
    """The trainer computes the student's logits only where some example has a response token; the objective and
    its gradient equal those of a full forward."""
    import dataclasses

    student_name = TEACHER if method == "kl" else STUDENT
    _, batch, cached, _, _, _ = _objective_both_ways(cache_dir, student_name, method, cot2align)
    views = list(cached)
    assert all(batch[v]["positions"].numel() < batch[v]["input_ids"].shape[1] for v in views)   # something was cut
    torch.manual_seed(0)
    student = load_model(student_name)
    cache = open_cache(cache_dir)
    head = cache.head()
    heads = Heads(student_embed_tokens=student.get_input_embeddings().weight, student_lm_head=student.get_output_embeddings().weight,
                  teacher_embed_tokens=head["embed_tokens"], teacher_lm_head=head["lm_head"])
    if method == "mined":
        from cot2align.align.vocab import vocab_map as build_map

        vm = build_map(cache.tokenizer(), load_tokenizer(student_name))
        heads.stu2tea, heads.tea2stu = torch.from_numpy(vm.stu2tea), torch.from_numpy(vm.tea2stu)
    torch.manual_seed(1)
    projectors = build_projectors(method, cot2align, student.config.hidden_size, cache.hidden_size)
    results = []
    for cut in (True, False):
        student.zero_grad()
        students, teachers = {}, {}
        for v in views:
            if cut:
                students[v], teachers[v] = student_view(student, batch[v], "cpu", True), cached[v]
            else:
                students[v], mined = _full_student_view(student, batch[v])
                teachers[v] = dataclasses.replace(cached[v], mined_rows=mined)
        loss, parts = distillation_loss(method, 0.5, students, teachers, heads, projectors, cot2align, default_settings())
        loss.backward()
        if cut:
            kept = students
        else:   # the view itself at the response positions: logits, both feature layers, ids (the OT terms of
            #     tiny random models are nearly constant, so the objective alone would not notice a shifted row)
            for v in views:
                for field in ("logits", "embed", "last", "input_ids", "target_ids"):
                    torch.testing.assert_close(getattr(kept[v], field)[kept[v].mask], getattr(students[v], field)[students[v].mask])
        results.append((loss.detach(), parts, [p.grad.clone() for p in student.parameters() if p.grad is not None]))
    (cut_loss, cut_parts, cut_grads), (full_loss, full_parts, full_grads) = results
    torch.testing.assert_close(cut_loss, full_loss, rtol=1e-5, atol=1e-6)
    for key in full_parts:
        torch.testing.assert_close(cut_parts[key], full_parts[key], rtol=1e-4, atol=1e-6)
    assert len(cut_grads) == len(full_grads) > 0
    for a, b in zip(cut_grads, full_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_student_rows_cover_the_same_text_as_teacher_rows(cache_dir):
    _, batch, cached_views, _, student_tok, teacher_tok = _objective_both_ways(cache_dir, STUDENT, "sft", True)
    for view, teacher_rows in cached_views.items():
        for b in range(batch[view]["input_ids"].shape[0]):
            student_targets = batch[view]["target_ids"][b][batch[view]["response_mask"][b]].tolist()   # cut to positions
            teacher_targets = teacher_rows.target_ids[b][teacher_rows.mask[b]].tolist()
            assert student_targets[-1] == student_tok.eos_token_id and teacher_targets[-1] == teacher_tok.eos_token_id
            assert student_tok.decode(student_targets[:-1]).strip() == teacher_tok.decode(teacher_targets[:-1]).strip()


def _run(cache_dir, out, **kw):
    settings = dict(cache=str(cache_dir), student=STUDENT, out=str(out), epochs=2, batch_size=4, val_examples=2,
                    val_max_new_tokens=4, lr=3e-3)
    settings.update(kw)
    return distill(build_config(DistillConfig, **settings), log=lambda m: None, progress=False)


def _train_losses(out):
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] if "loss" in r else r["ce"] for r in rows if "ce" in r]


# the fast tier keeps SFT; the KD methods' short runs (~12 s each on 2 cores) are slow-tier
@pytest.mark.parametrize("method", ["sft", *(pytest.param(m, marks=pytest.mark.slow) for m in ("kl", "uld", "mined", "dskd"))])
def test_short_run_lowers_the_loss_and_output_loads(cache_dir, tmp_path, method):
    student = TEACHER if method == "kl" else STUDENT
    summary = _run(cache_dir, tmp_path / "run", method=method, student=student, epochs=3)
    losses = _train_losses(tmp_path / "run")
    assert summary["steps"] == len(losses) == 12
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "run"))
    tok = load_tokenizer(str(tmp_path / "run"))
    out = model.generate(**tok("Hello", return_tensors="pt"), max_new_tokens=3, do_sample=False)
    assert out.shape[1] > 1
    for name in ("config.yaml", "metrics.jsonl", "README.md", "summary.json", "tensorboard"):
        assert (tmp_path / "run" / name).exists()
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    if method != "sft":
        assert (tmp_path / "run" / "loss_curve.png").exists()


def _final_trainable(out):
    path = Path(out) / "checkpoints" / (Path(out) / "checkpoints" / "latest").read_text().strip() / "trainable.safetensors"
    return load_file(str(path))


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_is_bit_identical(cache_dir, tmp_path):
    args = ["--cache", str(cache_dir), "--student", STUDENT, "--method", "dskd", "--epochs", "2", "--batch-size", "4",
            "--val-examples", "2", "--val-max-new-tokens", "2", "--save-every", "2", "--lr", "3e-3"]
    env = dict(os.environ)
    reference = tmp_path / "reference"
    subprocess.run([sys.executable, "-m", "cot2align.cli", "distill", *args, "--out", str(reference)], check=True, env=env,
                   capture_output=True)
    crashed = tmp_path / "crashed"
    killed = subprocess.run([sys.executable, "-m", "cot2align.cli", "distill", *args, "--out", str(crashed)],
                            env=dict(env, COT2ALIGN_FAULT="step:3"), capture_output=True)
    assert killed.returncode == -9
    subprocess.run([sys.executable, "-m", "cot2align.cli", "distill", *args, "--out", str(crashed), "--resume"], check=True,
                   env=env, capture_output=True)
    a, b = _final_trainable(reference), _final_trainable(crashed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ref_losses, crash_losses = _train_losses(reference), _train_losses(crashed)
    assert ref_losses[-1] == crash_losses[-1]


def test_bad_inputs(cache_dir, tmp_path):
    with pytest.raises(ConfigError, match="alpha"):
        build_config(DistillConfig, cache=str(cache_dir), alpha=1.5)
    with pytest.raises(ConfigError, match="shared vocabulary"):
        _run(cache_dir, tmp_path / "kl", method="kl", student=STUDENT)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "something.txt").write_text("another run")
    with pytest.raises(ConfigError, match="not empty"):
        _run(cache_dir, busy, method="sft")
    assert (busy / "something.txt").read_text() == "another run"
    with pytest.raises(ConfigError, match="paper setting"):
        distill(build_config(DistillConfig, cache=str(cache_dir), out=str(tmp_path / "x")), log=lambda m: None)
    # a cache still being written, and one of another format version
    writing = tmp_path / "writing"
    import shutil

    shutil.copytree(cache_dir, writing)
    from cot2align.cache.format import with_checksum

    meta = json.loads((writing / "zarr.json").read_text())
    meta["attributes"]["status"] = "writing"
    meta["attributes"] = with_checksum(meta["attributes"])      # an unfinished cache, as the writer leaves it
    (writing / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(CacheError, match="not complete"):
        _run(writing, tmp_path / "w", method="dskd")
    meta["attributes"]["status"] = "complete"
    meta["attributes"]["format_version"] = 99
    (writing / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(CacheError, match="format"):
        _run(writing, tmp_path / "v", method="dskd")


def test_sft_from_plain_data_without_a_cache(tmp_path):
    data = write_cot_records(tmp_path / "plain.jsonl", n=8)
    # no --cot2align flag: plain data has no teacher views, so CoT2Align is off by default here
    summary = distill(build_config(DistillConfig, method="sft", data=str(data), student=STUDENT,
                                   out=str(tmp_path / "sft"), epochs=1, batch_size=4, val_examples=2, val_max_new_tokens=2),
                      log=lambda m: None, progress=False)
    assert summary["steps"] == 2            # 8 records, batch 4, one epoch
    with pytest.raises(ConfigError, match="--cache is required"):
        build_config(DistillConfig, method="sft", cot2align=True, data=str(data), student=STUDENT)
    assert (tmp_path / "sft" / "config.json").exists() and _train_losses(tmp_path / "sft")


def _tree_digest(path):
    import hashlib

    digest = hashlib.sha256()
    for file in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


def test_sweep_over_two_alphas_leaves_the_cache_byte_identical(cache_dir, tmp_path):
    from cot2align.train.sweep import sweep

    before = _tree_digest(cache_dir)
    rows = sweep(str(cache_dir), [STUDENT], ["dskd"], [0.1, 0.9], str(tmp_path / "sweep"), log=lambda m: None,
                 max_steps=2, batch_size=4, val_examples=2, val_max_new_tokens=2)
    assert _tree_digest(cache_dir) == before
    assert [r["alpha"] for r in rows] == [0.1, 0.9] and all(r["steps"] == 2 for r in rows)
    table = (tmp_path / "sweep" / "results.md").read_text()
    assert table.count("\n") == 4 and "dskd" in table
    assert (tmp_path / "sweep" / "results.csv").exists() and (tmp_path / "sweep" / "rougeL_vs_alpha.png").exists()


@pytest.mark.slow
def test_a_stopped_sweep_resumes_keeping_finished_runs_and_continuing_the_interrupted_one(cache_dir, tmp_path):
    """alpha 0.1 finished, alpha 0.9 SIGKILLed after step 2: `sweep --resume` leaves the finished run's files as
    they are and ends the killed one bit-identical to an uninterrupted sweep's; without --resume it refuses."""
    from cot2align.train.sweep import sweep

    common = dict(max_steps=4, batch_size=4, val_examples=2, val_max_new_tokens=2, save_every=1)
    reference = sweep(str(cache_dir), [STUDENT], ["dskd"], [0.1, 0.9], str(tmp_path / "reference"),
                      log=lambda m: None, **common)
    stopped = tmp_path / "stopped"
    sweep(str(cache_dir), [STUDENT], ["dskd"], [0.1], str(stopped), log=lambda m: None, **common)
    finished = stopped / Path(reference[0]["out"]).name
    before = _tree_digest(finished)
    killed_out = stopped / Path(reference[1]["out"]).name
    killed = subprocess.run([sys.executable, "-m", "cot2align.cli", "distill", "--cache", str(cache_dir), "--student",
                             STUDENT, "--method", "dskd", "--alpha", "0.9", "--max-steps", "4", "--batch-size", "4",
                             "--val-examples", "2", "--val-max-new-tokens", "2", "--save-every", "1", "--out",
                             str(killed_out)], env=dict(os.environ, COT2ALIGN_FAULT="step:2"), capture_output=True)
    assert killed.returncode == -9 and not (killed_out / "summary.json").exists()
    flags = ["sweep", "--cache", str(cache_dir), "--student", STUDENT, "--method", "dskd", "--alpha", "0.1,0.9",
             "--out", str(stopped), "--max-steps", "4", "--batch-size", "4", "--val-examples", "2",
             "--val-max-new-tokens", "2"]
    refused = CliRunner().invoke(main, flags)
    last = refused.stderr.strip().splitlines()[-1]
    assert refused.exit_code == 2 and last.startswith("error: ") and "pass --resume" in last
    result = CliRunner().invoke(main, [*flags, "--resume"])
    assert result.exit_code == 0, result.output
    assert _tree_digest(finished) == before
    a, b = _final_trainable(reference[1]["out"]), _final_trainable(killed_out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = (stopped / "results.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[1].split(",")[3] == "0.1" and rows[2].split(",")[3] == "0.9"


@pytest.mark.slow
def test_two_gloo_processes_match_the_single_process_run(cache_dir, tmp_path):
    """torchrun with 2 CPU processes (gloo), batch 2 per rank, against 1 process with batch 4: the same global
    batch, so the same number of steps and a close loss curve (the batches are grouped differently)."""
    common = ["--cache", str(cache_dir), "--student", STUDENT, "--method", "dskd", "--epochs", "2", "--val-examples", "2",
              "--val-max-new-tokens", "2", "--lr", "3e-3"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    single = tmp_path / "single"
    subprocess.run([sys.executable, "-m", "cot2align.cli", "distill", *common, "--batch-size", "4", "--out", str(single)],
                   check=True, env=env, capture_output=True)
    double = tmp_path / "double"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
                             "-m", "cot2align.cli", "distill", *common, "--batch-size", "2", "--out", str(double)],
                            env=env, capture_output=True, text=True)
    assert result.returncode == 0, explain(result)
    a, b = _train_losses(single), _train_losses(double)
    assert len(a) == len(b)
    assert abs(np.mean(a) - np.mean(b)) < 0.15 * np.mean(a), (a, b)
    summary = json.loads((double / "summary.json").read_text())
    assert summary["steps"] == len(b)


def test_every_shipped_config_loads():
    configs = sorted((Path(__file__).parent.parent / "cot2align" / "configs").rglob("*.yaml"))
    distill_configs = [c for c in configs if not c.name.startswith("cache_")]
    assert len(distill_configs) >= 15
    for path in distill_configs:
        cfg = build_config(DistillConfig, path, cache="unused")
        assert cfg.student and cfg.method


def test_bare_distill_uses_the_paper_setting_and_announces_it(tmp_path):
    data = write_cot_records(tmp_path / "d.jsonl", n=6, cot_every=1)
    cache_teacher(build_config(CacheTeacherConfig, model="tiny-qwen2", data=str(data), out=str(tmp_path / "cache"), topk=4),
                  log=lambda m: None)
    messages = []
    summary = distill(build_config(DistillConfig, cache=str(tmp_path / "cache"), out=str(tmp_path / "run"), max_steps=1,
                                   val_examples=1, val_max_new_tokens=2), log=messages.append, progress=False)
    assert summary["steps"] == 1
    assert messages[0].startswith("paper setting: tiny-gpt2 <- tiny-qwen2") and "dskd + CoT2Align" in messages[0]


def test_a_student_tokenizer_that_cannot_encode_the_text_is_reported(cache_dir, monkeypatch):
    """A word-level tokenizer with an unknown token: refused when over 5% of response tokens are unknown,
    else the responses it cannot spell are counted in a warning."""
    import cot2align.train.data as data_module

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "</s>", "<s>", "the", "a", "is", "to", "and", "Person1", "Person2", "#", ":", "."]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>", bos_token="<s>")
    cache = open_cache(cache_dir)
    with pytest.raises(CacheError, match="cannot spell the cached text"):
        tokenize_cache(cache, tok, "word-level-test", 512, log=lambda m: None)
    monkeypatch.setattr(data_module, "MAX_UNKNOWN_SHARE", 1.0)
    messages = []
    ids = tokenize_cache(cache, tok, "word-level-test", 512, log=messages.append)
    assert any("unknown token" in m and "cannot be learned" in m for m in messages), messages
    assert len(ids["std_prompt_len"]) == len(cache)


def test_a_non_finite_loss_stops_the_run_before_the_update(cache_dir, tmp_path, monkeypatch):
    import cot2align.train.distill as distill_module
    from cot2align.train import TrainingError

    real = distill_module.distillation_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        loss, parts = real(*args, **kwargs)
        calls["n"] += 1
        return (loss * float("nan"), parts) if calls["n"] == 3 else (loss, parts)

    monkeypatch.setattr(distill_module, "distillation_loss", poisoned)
    with pytest.raises(TrainingError, match="step 3.*not finite"):
        _run(cache_dir, tmp_path / "nan", method="dskd", save_every=1)
    saved = _final_trainable(tmp_path / "nan")
    assert all(torch.isfinite(v).all() for v in saved.values())
    assert (tmp_path / "nan" / "checkpoints" / "latest").read_text().strip() == "step-00000002"


def test_best_epoch_is_the_highest_rouge_then_the_lowest_validation_loss():
    state = {"best_epoch": None, "best_rougeL": None, "best_val_loss": None}
    assert is_better(0.0, 9.0, state)                       # the first epoch always counts
    state.update(best_epoch=0, best_rougeL=0.0, best_val_loss=9.0)
    assert is_better(0.0, 7.0, state)                       # ROUGE-L tied at 0: the lower loss wins
    assert not is_better(0.0, 9.5, state)
    assert is_better(1.0, 12.0, state)                      # a higher ROUGE-L wins whatever the loss
    state.update(best_rougeL=5.0)
    assert not is_better(4.0, 1.0, state)
    assert is_better(None, None, state)                     # no validation at all: the latest epoch


def test_select_by_ce_or_last_ignores_a_lucky_rouge():
    """--select-by ce / last: on a small validation set an early epoch's one lucky greedy summary must not
    decide which model --out gets (bench/transfer.py: an epoch-0 model with 0.8 nats more held-out CE won)."""
    state = {"best_epoch": 0, "best_rougeL": 12.4, "best_val_loss": 5.56}
    assert not is_better(8.4, 4.25, state)                          # the paper's rule keeps epoch 0
    assert is_better(8.4, 4.25, state, select_by="ce")
    assert not is_better(20.0, 5.60, state, select_by="ce")
    assert is_better(0.0, 9.0, state, select_by="last")
    with pytest.raises(ConfigError, match="select_by: expected one of rougeL, ce, last"):
        build_config(DistillConfig, cache="c", select_by="best").validate()


def test_cot2align_trains_every_example_with_or_without_a_rationale(tmp_path):
    """Examples whose rationale was dropped keep their standard view in a CoT2Align run (the authors' layout):
    16 examples, 8 with a rationale, 1 held out for validation -> 15 train -> 4 batches of 4, not 2."""
    data = write_cot_records(tmp_path / "data.jsonl", n=16, cot_every=2)
    cache_teacher(build_config(CacheTeacherConfig, model=TEACHER, data=str(data), out=str(tmp_path / "cache"), topk=8,
                               batch_tokens=4096), log=lambda m: None)
    assert sum(open_cache(tmp_path / "cache").view(i, "cot", ())["n_rows"] > 0 for i in range(16)) == 8
    summary = _run(tmp_path / "cache", tmp_path / "run", method="dskd", cot2align=True, epochs=1, val_examples=1)
    assert summary["steps"] == 4
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in rows if "loss" in r)


def test_val_examples_zero_holds_out_nothing():
    """--val-examples 0 trains on every example with no validation (indices[-0:] once held out all of them)."""
    from cot2align.train.validation import split_validation

    class Cache:       # the two things split_validation reads of a cache of a plain file (no dev split)
        manifest = {"data": {"name": "records.jsonl"}}

        def texts(self):
            return {"prompt_std": [f"p{i}" for i in range(40)], "response_std": [f"r{i}" for i in range(40)]}

    indices = list(range(40))
    train, records = split_validation(build_config(DistillConfig, cache="c", val_examples=0), Cache(), indices)
    assert train == indices and records == []
    train, records = split_validation(build_config(DistillConfig, cache="c", val_examples=3), Cache(), indices)
    assert train == indices[:37] and [r["prompt"] for r in records] == ["p37", "p38", "p39"]


def test_finishing_again_keeps_the_kept_model_and_completes_a_half_moved_one(tmp_path):
    """write_outputs after an earlier finalise of the same run moved best/ up (killed before summary.json, or a
    run extended by --resume whose new epochs did not win): the model at the top is the kept one and stays — the
    current (final) weights must not replace it. A kill half-way through the move is completed from best/."""
    from cot2align.train.outputs import save_model, write_outputs

    cfg = build_config(DistillConfig, student=STUDENT, method="sft", cot2align=False, data="sample")
    tokenizer = load_tokenizer(STUDENT)
    kept, final = load_model(STUDENT, seed=1), load_model(STUDENT, seed=2)
    projectors = build_projectors("sft", False, 8, 8)
    summary = {"steps": 2, "best_epoch": 0, "best_val_rougeL": 1.0, "history": [], "out": str(tmp_path)}

    def top_weights(out):
        return load_file(str(out / "model.safetensors"))

    moved = tmp_path / "moved"
    save_model(kept, tokenizer, moved, cfg)                  # what the first finalise left at the top
    (moved / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0, "ce": 1.0}\n')
    write_outputs(moved, cfg, tokenizer, final, projectors, None, summary)
    expected = {k: v for k, v in kept.state_dict().items() if k in top_weights(moved)}
    assert len(expected) >= 4
    assert all(torch.equal(top_weights(moved)[k], v) for k, v in expected.items())
    assert json.loads((moved / "summary.json").read_text())["steps"] == 2

    half = tmp_path / "half"
    save_model(kept, tokenizer, half / "best", cfg)
    (half / "best" / "config.json").replace(half / "config.json")      # moved before the kill; the rest was not
    (half / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0, "ce": 1.0}\n')
    write_outputs(half, cfg, tokenizer, final, projectors, None, summary)
    assert not (half / "best").exists() and (half / "config.json").exists()
    assert all(torch.equal(top_weights(half)[k], v) for k, v in expected.items())


@pytest.mark.slow
def test_a_finished_run_is_not_extended_by_resume(cache_dir, tmp_path):
    """--resume with the run's own length does nothing; --resume --max-steps 4 of a run that finished at 2 is
    another run (the cosine schedule's length is an identity setting), refused in one line with nothing changed;
    the longer run starts in another --out."""
    out = tmp_path / "run"
    common = ["--cache", str(cache_dir), "--student", STUDENT, "--method", "sft", "--no-cot2align", "--batch-size", "4",
              "--val-examples", "1", "--val-max-new-tokens", "2", "--save-every", "1"]
    assert CliRunner().invoke(main, ["distill", *common, "--out", str(out), "--max-steps", "2"]).exit_code == 0
    again = CliRunner().invoke(main, ["distill", *common, "--out", str(out), "--max-steps", "2", "--resume"])
    assert again.exit_code == 0 and "finished earlier (2 steps); nothing to do" in again.stderr
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    longer = CliRunner().invoke(main, ["distill", *common, "--out", str(out), "--max-steps", "4", "--resume"])
    assert longer.exit_code == 2 and "started with max_steps=2; this command has max_steps=4" in longer.stderr
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    result = CliRunner().invoke(main, ["distill", *common, "--out", str(tmp_path / "longer"), "--max-steps", "4"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "longer" / "summary.json").read_text())["steps"] == 4
