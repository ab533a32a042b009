"""cot2align inside TRL (cot2align/integrations/trl.py): the README's "Inside TRL" example runs as written, and
the trainer's loss on a batch is `cot2align distill`'s on the same batch with the same weights."""

import copy
import re
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("trl")    # the [trl] extra; CI installs it with [test]

from trl import SFTConfig  # noqa: E402

from cot2align.cache import open_cache  # noqa: E402
from cot2align.config import CacheTeacherConfig, DistillConfig, build_config  # noqa: E402
from cot2align.errors import ConfigError  # noqa: E402
from cot2align.integrations.trl import CacheCollator, Cot2AlignTrainer  # noqa: E402
from cot2align.teacher.cache_pass import cache_teacher  # noqa: E402
from cot2align.train.distill import loss_step  # noqa: E402
from cot2align.train.resolve import resolve_distill_config  # noqa: E402
from cot2align.train.setup import setup  # noqa: E402

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A stand-in for the quickstart/cache `cot2align quickstart` leaves (SmolLM2's, the same format): a tiny-qwen2
    teacher's cache of sample records."""
    root = tmp_path_factory.mktemp("trl")
    cache_teacher(build_config(CacheTeacherConfig, model="tiny-qwen2", data="sample", limit=8, topk=16,
                               out=str(root / "quickstart" / "cache")), log=lambda m: None)
    return root


def readme_example() -> str:
    section = README.read_text().split("### Inside TRL", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_trl_example_runs_and_trains_the_projectors(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    namespace: dict = {}
    exec(compile(readme_example(), "README.md", "exec"), namespace)
    trainer = namespace["trainer"]
    assert trainer.state.global_step == 2
    logged = trainer.state.log_history[-1]          # the run's summary, with cot2align's parts averaged
    assert all(torch.isfinite(torch.tensor(logged[k])) for k in ("train_loss", "ce", "kd", "ccot", "kd/s2t_kd"))
    # the projectors (DSKD's three, CoT2Align's OT projector) are in the optimiser, were stepped, and are saved
    in_optimizer = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    for p in trainer.projectors.parameters():
        assert id(p) in in_optimizer and float(trainer.optimizer.state[p]["exp_avg"].abs().sum()) > 0
    out = workdir / "runs" / "trl_dskd"
    assert (out / "model.safetensors").is_file()
    saved = load_file(str(out / "projectors.safetensors"))
    assert set(saved) == set(trainer.projectors.state_dict()) and {k.split(".")[0] for k in saved} == {"dskd", "ot"}


@pytest.mark.parametrize("method,cot2align", [("dskd", True), ("alm", True), ("gold", True)])
def test_trl_loss_equals_distill_loss_on_the_same_batch(workdir, tmp_path, method, cot2align):
    cache = open_cache(workdir / "quickstart" / "cache")
    cfg = resolve_distill_config(build_config(DistillConfig, cache=cache.url, student="tiny-gpt2", method=method,
                                              cot2align=cot2align, alpha=0.5, batch_size=4, max_steps=1,
                                              out=str(tmp_path / "run"), report_to="none"), cache)
    with ExitStack() as held:
        run = setup(cfg, lambda m: None, cache, held)
        batch = next(iter(run.loader))
        trainer = Cot2AlignTrainer(model=copy.deepcopy(run.model), processing_class=run.tokenizer, cache=cache,
                                   method=method, cot2align=cot2align, alpha=0.5,
                                   args=SFTConfig(output_dir=str(tmp_path / "trl"), bf16=False, report_to="none",
                                                  per_device_train_batch_size=4))
        trainer.projectors.load_state_dict(run.projectors.state_dict())       # same weights
        ours = trainer.collator([{"index": int(i)} for i in batch["index"]])
        _assert_same_batch(ours, batch)                                          # same batch
        torch.manual_seed(0)        # the student's dropout draws the same masks in both forwards
        distill_loss = loss_step(run, batch, epoch=0, window_size=1)["loss"]
        torch.manual_seed(0)
        trl_loss = trainer.compute_loss(trainer.model, trainer._prepare_inputs(ours))
    assert trl_loss.requires_grad
    assert float(trl_loss) == pytest.approx(distill_loss, rel=1e-6, abs=1e-6)


def _assert_same_batch(a, b):
    assert type(a) is type(b)
    if isinstance(a, dict):
        assert set(a) == set(b)
        for key in a:
            _assert_same_batch(a[key], b[key])
    else:
        assert torch.equal(a, b)


def test_trl_trainer_refuses_what_it_cannot_do(workdir):
    from cot2align.modeling import load_model, load_tokenizer

    cache = open_cache(workdir / "quickstart" / "cache")
    student, tokenizer = load_model("tiny-gpt2"), load_tokenizer("tiny-gpt2")
    with pytest.raises(ConfigError, match="method kl: the student's tokenizer differs"):
        Cot2AlignTrainer(model=student, processing_class=tokenizer, cache=cache, method="kl",
                         args=SFTConfig(output_dir="unused", bf16=False, report_to="none"))
    with pytest.raises(ConfigError, match="data_collator: expected a CacheCollator"):
        Cot2AlignTrainer(model=student, processing_class=tokenizer, cache=cache, method="alm",
                         data_collator=CacheCollator(cache, tokenizer, "dskd", True),
                         args=SFTConfig(output_dir="unused", bf16=False, report_to="none"))
    with pytest.raises(ConfigError, match="args: expected a trl.SFTConfig, got TrainingArguments"):
        from transformers import TrainingArguments
        Cot2AlignTrainer(model=student, processing_class=tokenizer, cache=cache, method="dskd",
                         args=TrainingArguments(output_dir="unused", report_to="none"))
    with pytest.raises(ConfigError, match="SFTConfig.packing"):
        Cot2AlignTrainer(model=student, processing_class=tokenizer, cache=cache, method="dskd",
                         args=SFTConfig(output_dir="unused", bf16=False, report_to="none", packing=True))
    with pytest.raises(ConfigError, match="kd-temperature: expected a number > 0"):
        Cot2AlignTrainer(model=student, processing_class=tokenizer, cache=cache, method="dskd",
                         settings={"kd_temperature": -1.0},
                         args=SFTConfig(output_dir="unused", bf16=False, report_to="none"))


def test_projectors_are_clipped_with_the_student_saved_and_restored_on_resume(workdir, tmp_path):
    from cot2align.modeling import load_model, load_tokenizer

    student, tokenizer = load_model("tiny-gpt2"), load_tokenizer("tiny-gpt2")
    args = SFTConfig(output_dir=str(tmp_path / "trl"), max_steps=1, save_steps=1, per_device_train_batch_size=4,
                     bf16=False, gradient_checkpointing=False, report_to="none", max_grad_norm=1.0)
    collator = CacheCollator(open_cache(workdir / "quickstart" / "cache"), tokenizer, "dskd", True)
    trainer = Cot2AlignTrainer(model=student, processing_class=tokenizer, cache=workdir / "quickstart" / "cache",
                               method="dskd", cot2align=True, args=args, data_collator=collator,
                               train_dataset=collator.dataset(range(4, 8)), eval_dataset=collator.dataset(range(4)))
    assert trainer.evaluate()["eval_loss"] > 0          # the same objective on the held-out examples
    logged = trainer.state.log_history[-1]              # with its parts (TRL < 1.16 returns them only here)
    assert logged["eval_ce"] > 0 and "eval_ccot" in logged
    # clipping: one norm over the student's and the projectors' gradients, as `cot2align distill` clips
    params = [*trainer.model.parameters(), *trainer.projectors.parameters()]
    for p in params:
        p.grad = torch.ones_like(p)
    norm = trainer._clip_grad_norm(trainer.model)
    assert float(norm) == pytest.approx(sum(p.numel() for p in params) ** 0.5, rel=1e-5)
    assert all(torch.allclose(p.grad, torch.full_like(p.grad, 1.0 / float(norm)), rtol=1e-4)
               for p in trainer.projectors.parameters())
    trainer.model.zero_grad(set_to_none=True)
    trainer.projectors.zero_grad(set_to_none=True)
    trainer.train()
    checkpoint = tmp_path / "trl" / "checkpoint-1"
    saved = load_file(str(checkpoint / "projectors.safetensors"))
    # a new trainer (new projectors) resuming from the checkpoint gets the trained projectors back
    again = Cot2AlignTrainer(model=load_model("tiny-gpt2"), processing_class=tokenizer,
                             cache=workdir / "quickstart" / "cache", method="dskd", cot2align=True, args=args)
    assert not all(torch.equal(v, saved[k]) for k, v in again.projectors.state_dict().items())
    again._load_from_checkpoint(str(checkpoint))
    assert all(torch.equal(v, saved[k]) for k, v in again.projectors.state_dict().items())
    (checkpoint / "projectors.safetensors").unlink()
    with pytest.raises(ConfigError, match="no projectors.safetensors"):
        again._load_from_checkpoint(str(checkpoint))


def test_every_other_registered_method_trains_a_step_inside_trl(workdir, tmp_path):
    """The methods the equality test leaves out (kl needs the teacher's tokenizer: refused above) give a finite
    loss whose gradient reaches the student, each with what the registry says it needs (MinED: the vocabulary map)."""
    from cot2align.methods import METHODS
    from cot2align.modeling import load_model, load_tokenizer

    tokenizer = load_tokenizer("tiny-gpt2")
    for method in sorted(set(METHODS) - {"kl", "dskd", "alm", "gold"}):
        trainer = Cot2AlignTrainer(model=load_model("tiny-gpt2"), processing_class=tokenizer,
                                   cache=workdir / "quickstart" / "cache", method=method, cot2align=False,
                                   args=SFTConfig(output_dir=str(tmp_path / method), bf16=False, report_to="none",
                                                  per_device_train_batch_size=4))
        trainer.model.train()
        batch = trainer._prepare_inputs(trainer.collator([{"index": i} for i in range(4)]))
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        assert torch.isfinite(loss), method
        assert trainer.model.get_input_embeddings().weight.grad is not None, method
        assert (trainer.heads is not None and trainer.heads.stu2tea is not None) == (method == "mined"), method
        assert set(trainer._metrics["train"]) >= ({"ce", "kd"} if method != "sft" else {"ce"}), method
