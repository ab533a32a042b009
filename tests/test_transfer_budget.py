"""bench/transfer.py's budget: the estimate of the runs still to do, and over the budget, data cut before seeds —
decided once (plan.json) so that a resumed run trains what the first invocation planned."""

import json
import sys
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import transfer  # noqa: E402  (bench/ module)


def test_over_budget_the_data_is_cut_before_the_seeds_and_the_decision_is_kept(tmp_path, capsys):
    args = SimpleNamespace(regime="both", replan=False)
    tight = {**transfer.FULL, "budget_hours": 2.0}
    plan = transfer.budget_plan(args, tight, tmp_path, transfer.ROWS, transfer.OT_ABLATION)
    said = capsys.readouterr().out
    assert plan["cuts"][:2] == ["pretrain_epochs -> 3", "pretrain_epochs -> 2"]      # the pretraining data first
    assert plan["pretrained_limit"] in (96, 64) and "cut pretrained_limit" in said
    assert tight["seeds"] == (1, 2, 3) and "[budget] still to run:" in said
    assert json.loads((tmp_path / "plan.json").read_text()) == plan

    roomy = {**transfer.FULL, "budget_hours": 100.0}
    assert transfer.budget_plan(args, roomy, tmp_path, transfer.ROWS, transfer.OT_ABLATION) == plan   # kept
    replanned = transfer.budget_plan(SimpleNamespace(regime="both", replan=True), roomy, tmp_path, transfer.ROWS,
                                     transfer.OT_ABLATION)
    assert replanned["cuts"] == [] and replanned["pretrain_epochs"] == transfer.FULL["pretrain"]["epochs"]


def test_the_estimate_counts_only_what_is_not_done(tmp_path):
    s, plan = transfer.FULL, {"pretrain_epochs": 4, "pretrained_limit": None}
    before = transfer.estimate(s, plan, tmp_path, transfer.ROWS, {}, "scratch")
    done = tmp_path / "dialogsum" / "fine-tuned" / "runs" / "alm" / "seed1"
    done.mkdir(parents=True)
    (done / "summary.json").write_text("{}")
    after = transfer.estimate(s, plan, tmp_path, transfer.ROWS, {}, "scratch")
    assert after["scratch"][0] == before["scratch"][0] - 1 and after["scratch"][1] < before["scratch"][1]
    assert before["pretrained"][0] == 0                       # the scratch regime alone
    both = transfer.estimate(s, plan, tmp_path, transfer.ROWS, {}, "pretrained")
    # every row x seed from the pretrained student, less SFT's sweep seed (a run of the lr sweep), plus GOLD's
    # pretrained diagnosis rows x seed
    runs = (len(transfer.ROWS) + len(transfer.gold_diagnosis("pretrained"))) * len(s["seeds"]) - 1
    assert both["pretrained"][0] == runs and both["lr sweep"][0] == 3
