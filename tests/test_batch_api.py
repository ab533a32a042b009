"""The README's batch-API example (cache -> loss in about six lines) runs as written, and the trainer's
loader reads only the teacher arrays the method declares."""

import re
from pathlib import Path

import torch

from cot2align.config import CacheTeacherConfig, build_config
from cot2align.methods import teacher_arrays
from cot2align.teacher.cache_pass import cache_teacher

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> str:
    section = README.read_text().split("### From a cache to a loss in your own loop", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_batch_api_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    # a stand-in for the quickstart/cache `cot2align quickstart` leaves (SmolLM2's, the same format): a tiny-qwen2 cache
    cache_teacher(build_config(CacheTeacherConfig, model="tiny-qwen2", data="sample", limit=8, topk=16,
                               out="quickstart/cache"), log=lambda m: None)
    namespace: dict = {}
    exec(compile(readme_example(), "README.md", "exec"), namespace)
    assert torch.isfinite(namespace["loss"])
    assert namespace["student"].get_input_embeddings().weight.grad is not None      # it trains the student
    assert set(namespace["teachers"]) == {"std", "cot"} and "kd/s2t_kd" in namespace["parts"]
    assert "'loss'" in capsys.readouterr().out


def test_each_method_declares_the_teacher_arrays_it_reads():
    assert teacher_arrays("sft", False) == ()
    assert set(teacher_arrays("uld", False, "topk")) == {"input_ids", "target_ids", "topk_ids", "topk_logprobs",
                                                         "tail_logprob"}
    assert "hidden" in teacher_arrays("uld", False, "exact")                 # exact logits come from the hidden states
    assert "hidden" in teacher_arrays("dskd", False, "topk")                  # DSKD's values
    assert "embeds" not in teacher_arrays("dskd", False, "topk")              # its keys are embedding lookups
    assert {"hidden", "embeds"} <= set(teacher_arrays("sft", True))
