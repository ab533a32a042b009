"""`evaluate --metric ce`: the held-out cross-entropy against a hand computation, one pair at a time."""

import json
import math
import subprocess
import sys

import pytest
import torch

from cot2align.data import load_records
from cot2align.data.readers import group_references
from cot2align.data.templates import standard_prompt
from cot2align.eval import evaluate_model, reference_cross_entropy
from cot2align.modeling import load_model, load_tokenizer


def hand_cross_entropy(model, tokenizer, prompt: str, reference: str) -> tuple[float, int, int]:
    """(Σ nats, tokens, bytes) of one reference: one unpadded forward, −log softmax at each response token."""
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    response_ids = tokenizer(reference, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    nats = 0.0
    for k, token in enumerate(response_ids):
        position = len(prompt_ids) - 1 + k            # the position whose next token is response token k
        nats -= float(torch.log_softmax(logits[position], -1)[token])
    return nats, len(response_ids), len(reference.encode("utf-8"))


@pytest.mark.parametrize("preset", ["tiny-gpt2", "tiny-llama"])     # no BOS / a BOS-adding tokenizer
def test_cross_entropy_equals_hand_computation(preset):
    model = load_model(preset)
    tokenizer = load_tokenizer(preset)
    records = group_references(load_records("sample", "test")[0])[:5]
    prompts = [standard_prompt(r["instruction"], r.get("input", "")) for r in records]
    references = [r["references"] + ["Ünïcode — 3 × 4 = 12 🙂"] for r in records]    # several references each
    total, tokens, n_bytes = 0.0, 0, 0
    for prompt, refs in zip(prompts, references):
        for ref in refs:
            nats, n, b = hand_cross_entropy(model, tokenizer, prompt, ref)
            total, tokens, n_bytes = total + nats, tokens + n, n_bytes + b
    # a small token budget: several padded batches of different widths
    got = reference_cross_entropy(model, tokenizer, prompts, references, batch_tokens=700)
    assert got["n_pairs"] == sum(len(r) for r in references) and got["n_tokens"] == tokens and got["n_bytes"] == n_bytes
    assert got["nats_per_token"] == pytest.approx(total / tokens, rel=1e-5)
    assert got["bits_per_byte"] == pytest.approx(total / math.log(2) / n_bytes, rel=1e-5)
    # a trained-looking model has a lower CE than a uniform guess over the vocabulary, never above ~ln V + slack
    assert 0 < got["nats_per_token"] < math.log(model.config.vocab_size) + 3


@pytest.mark.slow
def test_evaluate_metric_ce_merges_with_rouge_and_report_shows_it(tmp_path):
    from cot2align.train.distill import distill
    from cot2align.config import DistillConfig, build_config
    from cot2align.eval import report

    run = tmp_path / "runs" / "sft"
    distill(build_config(DistillConfig, student="tiny-gpt2", method="sft", data="sample", limit=8, epochs=1,
                         batch_size=4, val_examples=2, val_max_new_tokens=4, lr=1e-3, out=str(run)),
            log=lambda m: None, progress=False)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    validation = [m for m in metrics if "val_ce" in m]
    assert validation and math.isfinite(validation[0]["val_ce"]) and validation[0]["val_bits_per_byte"] > 0
    out = tmp_path / "runs" / "sft" / "eval"
    rouge = evaluate_model(str(run), "sample", "test", [10], limit=3, max_new_tokens=4, out=str(out), log=lambda m: None)
    # the CLI, as a user runs it: the CE joins the ROUGE-L results in the same results.json
    done = subprocess.run([sys.executable, "-m", "cot2align.cli", "evaluate", "--model", str(run), "--data", "sample",
                           "--limit", "3", "--metric", "ce", "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((out / "results.json").read_text())
    assert result["mean"] == rouge["mean"] and result["per_run"] == rouge["per_run"]
    model, tokenizer = load_model(str(run)), load_tokenizer(str(run))
    records = group_references(load_records("sample", "test")[0])[:3]
    expected = reference_cross_entropy(model, tokenizer, [standard_prompt(r["instruction"], r.get("input", ""))
                                                          for r in records], [r["references"] for r in records], 256)
    assert result["ce"]["nats_per_token"] == pytest.approx(expected["nats_per_token"], rel=1e-6)
    table = report(str(tmp_path / "runs"), log=lambda m: None)
    assert f"{expected['nats_per_token']:.3f}" in table and "bits/byte" in table


@pytest.mark.slow
def test_evaluate_rejects_an_unknown_metric(tmp_path):
    done = subprocess.run([sys.executable, "-m", "cot2align.cli", "evaluate", "--model", "tiny-gpt2", "--data", "sample",
                           "--metric", "bleu"], capture_output=True, text=True)
    assert done.returncode == 2 and "bleu" in done.stderr
