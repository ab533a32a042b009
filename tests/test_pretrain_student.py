"""bench/pretrain_student.py: the pretrained-student regime's corpus shares nothing with DialogSum, and a killed
pretraining resumes to exactly the weights of an uninterrupted one, saved as a model directory distill can load."""

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = str(ROOT / "tests" / "fixtures" / "data")
sys.path.insert(0, str(ROOT / "bench"))

import pretrain_student  # noqa: E402  (bench/ module)


def test_a_record_quoting_dialogsum_is_dropped_and_the_rest_kept():
    from cot2align.data import load_records

    records, sources = pretrain_student.corpus_records(DATA)
    assert {s["dataset"] for s in sources} == {"alpaca", "dolly", "sni"}
    dialogue = load_records("dialogsum", "dev", DATA)[0][0]["input"]
    # the same dialogue as another dataset would carry it: other speaker tags, other line breaks
    disguised = dialogue.replace("#Person1#:", "M:").replace("#Person2#:", "W:").replace("\n", " ")
    quoting = {"id": "x", "instruction": "Answer the question about the conversation.", "input": disguised,
               "output": "Yes."}
    kept, dropped = pretrain_student.without_dialogsum(records + [quoting], DATA)
    assert dropped == 1 and quoting not in kept and len(kept) == len(records)


def _weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_killed_pretraining_resumes_to_the_same_weights(tmp_path):
    settings = dict(seq_len=32, batch=8, epochs=2, lr=2e-3, max_records=6, save_every=2)   # 3 steps an epoch
    whole = pretrain_student.pretrain(tmp_path / "whole", DATA, log=lambda m: None, **settings)

    class Killed(Exception):
        pass

    def kill_after_first_checkpoint(message: str) -> None:
        if "pretraining step 2/" in message:
            raise Killed

    with pytest.raises(Killed):
        pretrain_student.pretrain(tmp_path / "resumed", DATA, log=kill_after_first_checkpoint, **settings)
    assert not (tmp_path / "resumed").exists()                 # no model directory until it is complete
    said = []
    resumed = pretrain_student.pretrain(tmp_path / "resumed", DATA, log=said.append, **settings)
    assert any("resumed pretraining at step 2" in m for m in said)
    assert whole["steps"] == resumed["steps"] > 2 and whole["final_loss"] == resumed["final_loss"]
    a, b = _weights(tmp_path / "whole"), _weights(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "resumed.checkpoint").exists()
    assert json.loads((tmp_path / "resumed" / "pretrain.json").read_text())["dropped_dialogsum_overlap"] == 0

    # what `cot2align distill --student DIR` loads: the weights (safetensors) and the GPT-2 tokenizer
    from cot2align.modeling import load_model, load_tokenizer

    model = load_model(str(tmp_path / "resumed"))
    assert torch.equal(model.get_input_embeddings().weight, a["transformer.wte.weight"])
    assert load_tokenizer(str(tmp_path / "resumed")).eos_token_id == load_tokenizer("random:gpt2-transfer").eos_token_id


def test_chunked_linear_cross_entropy_matches_a_float64_reference():
    """Values and gradients of the fused chunked loss = F.cross_entropy over the full logits, in float64."""
    torch.manual_seed(0)
    hidden = torch.randn(37, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 8, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    loss = pretrain_student.LinearCrossEntropy.apply(hidden, weight, targets, 10)    # 4 chunks, the last short
    (loss * 3.0).backward()
    got = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    reference = torch.nn.functional.cross_entropy(hidden @ weight.T, targets)
    (reference * 3.0).backward()
    assert torch.allclose(loss, reference, rtol=1e-12, atol=1e-12)
    assert torch.allclose(got[0], hidden.grad, rtol=1e-10, atol=1e-12)
    assert torch.allclose(got[1], weight.grad, rtol=1e-10, atol=1e-12)


def test_the_packed_loss_is_the_models_own_causal_lm_loss():
    from cot2align.modeling import build_random_model

    model = build_random_model(pretrain_student.STUDENT, 0, torch.float32)        # eval mode: no dropout
    blocks = torch.randint(0, 50257, (2, 24))
    ours = pretrain_student.causal_lm_loss(model, blocks, chunk=16)
    assert torch.allclose(ours, model(input_ids=blocks, labels=blocks).loss, rtol=1e-5)
