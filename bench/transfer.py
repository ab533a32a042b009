"""Does the teacher's knowledge reach the student? A knowledge-transfer benchmark on 2 CPU cores.

    python bench/transfer.py --work DIR            the full run, both regimes (resumable; --plan-only: the budget)
    python bench/transfer.py --work DIR --regime scratch|pretrained|both [--seeds 1,2,3]
    python bench/transfer.py --work DIR --smoke    every row once, tiny sizes, one pair (the tests run it)

A real pretrained teacher, SmolLM2-135M-Instruct (its own tokenizer), zero-shot and briefly fine-tuned, and
small GPT-2 students (the GPT-2 tokenizer: another vocabulary and segmentation), fully fine-tuned on real data
of the paper — DialogSum (train subset; dev and test from the real splits) and Alpaca (the paper's processed
dev set as training data, its test set as test) — with CoT rationales written by each teacher (`augment-cot`)
and one teacher cache per dataset and teacher (`cache-teacher`). Every student of a dataset and teacher trains
from that one cache on the same records, steps, learning rate and seeds.

Two regimes. From scratch: random-initialised students (`random:gpt2-transfer`), every pair. Pretrained (the
papers' regime), DialogSum with the fine-tuned teacher: the same student pretrained once as a plain causal LM on
Alpaca, Dolly and S-NI text checked disjoint from DialogSum (bench/pretrain_student.py), then every row starts
from it at a learning rate chosen for it on the dev split (SFT at each lr of a small sweep, one seed).

Rows: SFT, ULD, MinED, DSKD, each without and with CoT2Align (SFT + CoT2Align is the CoT view and the
Cross-CoT OT term with no KD term) on every pair; on DialogSum with the fine-tuned teacher (the ranking pair)
also ALM, GOLD and X-Token with and without CoT2Align (a row naming an unregistered method or an unknown setting
stops the run before it starts). There, from scratch, the ablations a reader of the
paper asks for: the OT gradient (`envelope`, ours, vs `unrolled`, the authors'), ε ∈ {10, 1, 0.1} for
DSKD + CoT2Align, and α ∈ {0.1, 0.5, 0.9} for DSKD (the weight of CE is 1 − α) — one seed each; and in the
pretrained regime, every seed, the OT ablation of DSKD + CoT2Align: OT at ε = 10 (the row itself), at the
calibrated ε, and with OT weight 0. Every seed, why GOLD does not transfer (GOLD_DIAGNOSIS): GOLD with the
forward KL in place of the JSD (both regimes); its exact-match part alone as TRL's JSD (pretrained) and as the
forward KL (both regimes; from scratch also with CoT2Align).

Columns: the held-out cross-entropy of the test references (nats per student token, mean ± std over the
seeds), bits per byte, greedy ROUGE-L, and each row's paired difference from SFT (the same seed; mean ± std)
in CE and ROUGE-L. Outputs under the work dir: transfer.md (the tables), transfer.png (bars with error bars),
transfer.json (every number), and one directory per stage; a rerun skips what is done. Before it starts, the
run prints its budget: runs still to do x each row's measured time; over the budget, data is cut before seeds
(plan.json keeps the decision, printed).

Cross-entropy is the low-noise signal here: students this small and this briefly trained do not yet write
summaries, so ROUGE-L is near its floor; it is reported, not relied on.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pipeline import Stages, device_label, fit_dialogue  # noqa: E402  (bench/ helpers)

TEACHER = "smollm2-135m-instruct"
STUDENT = "random:gpt2-transfer"     # GPT-2 architecture, 2 layers x 128, the GPT-2 tokenizer (config.RANDOM_PRESETS)

# Every row reads its batches in the order the first rows of this benchmark were trained in (before the chunk-ordered
# sampler became distill's default), so that rows trained across sessions compare.
SAMPLE_ORDER = "shuffled"

# Row name -> the distill settings that make it (alpha 0.5 unless the row says otherwise). The first eight are the
# rows of every table; the methods after them rank on DialogSum with the fine-tuned teacher (RANKING_PAIR) in both
# regimes. A row whose method is not registered, or whose settings name a DistillConfig field that does not exist,
# stops the run before it starts (usable_rows).
ROWS = {
    "sft": dict(method="sft", cot2align=False),
    "sft+cot2align": dict(method="sft", cot2align=True),
    "uld": dict(method="uld", cot2align=False),
    "uld+cot2align": dict(method="uld", cot2align=True),
    "mined": dict(method="mined", cot2align=False),
    "mined+cot2align": dict(method="mined", cot2align=True),
    "dskd": dict(method="dskd", cot2align=False),
    "dskd+cot2align": dict(method="dskd", cot2align=True),
    "alm": dict(method="alm", cot2align=False),
    "alm+cot2align": dict(method="alm", cot2align=True),
    "gold": dict(method="gold", cot2align=False),
    "gold+cot2align": dict(method="gold", cot2align=True),
    "xtoken": dict(method="xtoken", cot2align=False),
    "xtoken+cot2align": dict(method="xtoken", cot2align=True),
}
BASE_ROWS = tuple(ROWS)[:8]          # the rows of the pairs that do not rank (their tables as first published)
ABLATIONS = {
    "dskd+cot2align unrolled": dict(method="dskd", cot2align=True, ot_grad="unrolled"),
    "dskd+cot2align eps=1": dict(method="dskd", cot2align=True, ot_epsilon=1.0),
    "dskd+cot2align eps=0.1": dict(method="dskd", cot2align=True, ot_epsilon=0.1),
    "dskd alpha=0.1": dict(method="dskd", cot2align=False, alpha=0.1),
    "dskd alpha=0.9": dict(method="dskd", cot2align=False, alpha=0.9),
}
# Which part of CoT2Align carries its gain, in the regime the paper reports (a pretrained student), every seed:
# OT at the paper's eps = 10 is the "dskd+cot2align" row itself; these two vary it.
OT_ABLATION = {
    # hC's calibration (losses/ot.py): ε relative to each plan's cost std; 0.3 gave plans at ~0.82 of uniform entropy
    "dskd+cot2align ot calibrated eps": dict(method="dskd", cot2align=True, ot_epsilon_scale="relative", ot_epsilon=0.3),
    "dskd+cot2align ot weight 0": dict(method="dskd", cot2align=True, ot_weight=0.0),
}
# Why GOLD sits at SFT (every seed, after the ranked rows; name -> (row, the regimes it runs in)). Its loss is
# w·JSD on the exact-match tokens + (1 − w)·ULD on the rest, w = shared / teacher tokens = 0.75 for SmolLM2 → GPT-2.
# ULD alone does not transfer here, and JSD (β = 0.5) is bounded where the forward KL of MinED and X-Token is not:
# drop the ULD part, then also make the matched part the forward KL(teacher‖student); and the forward KL with the
# ULD part kept (TRL's weighting: what setting beta = 0 alone gives a TRL user).
_GOLD_MATCHED = dict(method="gold", gold_weighting="fixed", gold_matched_weight=1.0)
GOLD_DIAGNOSIS = {
    "gold, forward kl": (dict(method="gold", cot2align=False, gold_beta=0.0), ("scratch", "pretrained")),
    "gold matched part only": ({**_GOLD_MATCHED, "cot2align": False}, ("pretrained",)),
    "gold matched part only, forward kl": ({**_GOLD_MATCHED, "cot2align": False, "gold_beta": 0.0},
                                           ("scratch", "pretrained")),
    "gold matched part only, forward kl+cot2align": ({**_GOLD_MATCHED, "cot2align": True, "gold_beta": 0.0},
                                                     ("scratch",)),
}


def gold_diagnosis(regime: str) -> dict:
    return {name: row for name, (row, regimes) in GOLD_DIAGNOSIS.items() if regime in regimes}


def run_dir(name: str) -> str:
    """A row's directory name: its name without spaces or commas."""
    return name.replace(" ", "_").replace(",", "")


RANKING_PAIR = ("dialogsum", "fine-tuned")

# both teachers on DialogSum (where fine-tuning matters: zero-shot SmolLM2 scores ~10 ROUGE-L there), the
# instruct model as it is on Alpaca (its home ground); a fourth pair would add ~50 minutes on 2 cores
PAIRS = (("dialogsum", "zero-shot"), ("dialogsum", "fine-tuned"), ("alpaca", "zero-shot"))
# pretrain: the pretrained regime's student (bench/pretrain_student.py): 512-token packed sequences (the rows'
# max_length, so every position the rows use is trained), 8 of them a step, 4 epochs of the ~0.77M-token corpus.
# lr_sweep: SFT from that student at each lr (first seed), chosen by held-out CE on select_dev DialogSum dev records.
FULL = dict(pairs=PAIRS, seeds=(1, 2, 3), train=128, val=8, test=50, max_prompt_tokens=256, teacher_steps=24,
            teacher_batch=4, teacher_lr=5e-5, cot_tokens=96, epochs=5, batch_size=8, lr=3e-3, max_length=512,
            val_new_tokens=16, test_new_tokens=32, ablation_seeds=(1,),
            pretrain=dict(seq_len=512, batch=8, epochs=4, lr=2e-3, max_records=None),
            lr_sweep=(3e-3, 1e-3, 3e-4), select_dev=50, pretrained_rows=None, budget_hours=4.0)
# the smoke run (the test suite's) takes the one pair that exercises every stage: teacher fine-tuning, every row,
# every ablation; the Alpaca pair differs only in its data, which the test prepares on its own. Its pretrained
# regime: a few steps of pretraining on a few records, a two-lr sweep, one distilled row beside SFT, GOLD's diagnosis.
SMOKE = dict(pairs=(("dialogsum", "fine-tuned"),), seeds=(1,), train=6, val=2,
             test=3, max_prompt_tokens=160, teacher_steps=1, teacher_batch=2, teacher_lr=5e-5, cot_tokens=8, epochs=1,
             batch_size=3, lr=3e-3, max_length=320, val_new_tokens=4, test_new_tokens=4, ablation_seeds=(1,),
             pretrain=dict(seq_len=64, batch=4, epochs=1, lr=2e-3, max_records=24),
             lr_sweep=(3e-3, 1e-3), select_dev=2, pretrained_rows=("sft", "dskd+cot2align"), budget_hours=4.0)


def _write_jsonl(path: Path, records: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    tmp.replace(path)


def fitting_records(dataset: str, records: list[dict], n: int, tokenizer, s: dict) -> list[dict]:
    """The first n records whose standard prompt fits s["max_prompt_tokens"] teacher tokens (a DialogSum
    dialogue is cut from its end first)."""
    from cot2align.data.templates import standard_prompt

    kept = []
    for record in records:
        if dataset == "dialogsum":
            record = fit_dialogue(record, tokenizer, s["max_prompt_tokens"])
        prompt = standard_prompt(record["instruction"], record.get("input", ""))
        if len(tokenizer(prompt)["input_ids"]) <= s["max_prompt_tokens"]:
            kept.append(record)
        if len(kept) == n:
            break
    return kept


def prepare_data(dataset: str, s: dict, root: Path, data_root: str | None) -> dict[str, str]:
    """train / dev / test JSONL of real records whose standard prompt fits s["max_prompt_tokens"] teacher tokens
    (short examples keep a 2-core run within budget; a DialogSum dialogue is cut from its end if needed)."""
    from cot2align.data import load_records
    from cot2align.data.readers import default_data_root, read_file
    from cot2align.modeling import load_tokenizer

    out = root / "data"
    paths = {split: out / f"{split}.jsonl" for split in ("train", "dev", "test")}
    if all(p.exists() for p in paths.values()):
        return {k: str(v) for k, v in paths.items()}
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(TEACHER)

    def short(records: list[dict], n: int) -> list[dict]:
        return fitting_records(dataset, records, n, tokenizer, s)

    if dataset == "dialogsum":
        train = short(load_records("dialogsum", "train", data_root)[0], s["train"])
        dev = short(load_records("dialogsum", "dev", data_root)[0], s["val"])
        # the real test release: 500 dialogues, 3 reference summaries each (the quality anchors' test set)
        test_file = Path(data_root or default_data_root()) / "dialogsum" / "dialogsum.test.jsonl"
        test = short(read_file(test_file), s["test"])
    else:   # the paper's processed Alpaca dev (500) and test (500) sets are what ../shared/data holds
        dev_all = short(load_records(dataset, "dev", data_root)[0], s["train"] + s["val"])
        train, dev = dev_all[:s["train"]], dev_all[s["train"]:]
        test = short(load_records(dataset, "test", data_root)[0], s["test"])
    for split, records in (("train", train), ("dev", dev), ("test", test)):
        _write_jsonl(paths[split], records)
    return {k: str(v) for k, v in paths.items()}


def selection_dev(s: dict, root: Path, data_root: str | None) -> str:
    """root/data/dev_select.jsonl: s["select_dev"] DialogSum dev records (fitted like the others), on which the
    pretrained student's learning rate is chosen — more than the validation subset, and never the test split."""
    from cot2align.data import load_records
    from cot2align.modeling import load_tokenizer

    path = root / "data" / "dev_select.jsonl"
    if not path.exists():
        records = load_records("dialogsum", "dev", data_root)[0]
        _write_jsonl(path, fitting_records("dialogsum", records, s["select_dev"], load_tokenizer(TEACHER), s))
    return str(path)


def teacher_model(kind: str, paths: dict, s: dict, root: Path, stages: Stages, tag: str) -> str:
    """The zero-shot teacher is the alias itself; the fine-tuned one is `sft` for s["teacher_steps"] steps."""
    from cot2align.config import DistillConfig, build_config
    from cot2align.train.distill import distill

    if kind == "zero-shot":
        return TEACHER
    out = root / "teacher"
    stages.run(f"{tag} teacher sft", out / "summary.json", lambda: distill(build_config(
        DistillConfig, student=TEACHER, method="sft", cot2align=False, data=paths["train"], val_data=paths["dev"],
        val_examples=s["val"], val_max_new_tokens=s["val_new_tokens"], max_steps=s["teacher_steps"], epochs=100,
        batch_size=s["teacher_batch"], lr=s["teacher_lr"], alpha=0.0, max_length=s["max_length"], out=str(out),
        overwrite=True, seed=0), log=lambda m: None, progress=False))
    # trained: its checkpoints (weights and AdamW state, 1.6 GB for a 135M model in fp32) are never read again
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return str(out)


def teacher_cache(teacher: str, paths: dict, s: dict, root: Path, stages: Stages, tag: str) -> Path:
    """The teacher's own rationales (augment-cot), then its cache over both views."""
    from cot2align.data.augment import AugmentConfig, augment_cot
    from cot2align.config import CacheTeacherConfig, build_config
    from cot2align.teacher.cache_pass import cache_teacher

    cot = root / "cot.jsonl"
    stages.run(f"{tag} augment-cot", root / "cot.done", lambda: (
        augment_cot(AugmentConfig(model=teacher, data=paths["train"], out=str(cot), max_new_tokens=s["cot_tokens"],
                                  batch_size=16, seed=0), log=lambda m: None),
        (root / "cot.done").touch()))
    cache = root / "cache"
    stages.run(f"{tag} cache-teacher", root / "cache.done", lambda: (
        cache_teacher(build_config(CacheTeacherConfig, model=teacher, data=str(cot), out=str(cache), topk=16,
                                   max_length=s["max_length"], max_prompt_length=s["max_prompt_tokens"] + 24,
                                   resume=cache.exists()), log=lambda m: None),
        (root / "cache.done").touch()))
    return cache


def student(row: dict, seed: int, cache: Path | None, paths: dict, s: dict, out: Path, stages: Stages, tag: str,
            report_only: bool = False, start: dict | None = None) -> dict | None:
    """Train one student and evaluate its final weights on the test split: CE (nats/token, bits/byte) and greedy
    ROUGE-L. Every row gets the same steps (`--select-by last`): with 8 validation examples, greedy ROUGE-L —
    the paper's best-epoch rule — crowned an epoch-0 model in some runs (0.8 nats worse held-out CE).
    `start`: the pretrained regime's {"model": its directory, "lr": the chosen lr, "limit": records or None}."""
    from cot2align.config import DistillConfig, build_config
    from cot2align.eval import evaluate_model
    from cot2align.train.distill import distill

    if report_only and not (out / "summary.json").exists():
        return None
    settings = {"alpha": 0.5, "sample_order": SAMPLE_ORDER, **row}
    source = dict(cache=str(cache)) if cache is not None else dict(data=paths["train"])
    start = start or {"model": STUDENT, "lr": s["lr"], "limit": None}
    if out.exists() and not (out / "summary.json").exists():
        shutil.rmtree(out)                       # an interrupted run starts again (it takes a minute)
    stages.run(f"{tag} train", out / "summary.json", lambda: distill(build_config(
        DistillConfig, student=start["model"], out=str(out), lr=start["lr"], limit=start["limit"], epochs=s["epochs"],
        batch_size=s["batch_size"],
        warmup_ratio=0.05, val_data=paths["dev"], val_examples=s["val"], val_max_new_tokens=s["val_new_tokens"],
        max_length=s["max_length"], seed=seed, num_workers=0, select_by="last",
        **source, **settings),
        log=lambda m: None, progress=False))
    summary = json.loads((out / "summary.json").read_text())
    model, name = out, "eval"
    if summary["best_epoch"] != summary["history"][-1]["epoch"]:     # trained before select_by="last" was used here
        model, name = final_weights(out), "eval_final"
    results = out / name / "results.json"
    if report_only and not results.exists():
        return None
    stages.run(f"{tag} {'evaluate' if name == 'eval' else 'evaluate final'}", results, lambda: evaluate_model(
        str(model), paths["test"], "test", greedy=True, metric="all", out=str(out / name),
        max_new_tokens=s["test_new_tokens"], max_prompt_tokens=s["max_prompt_tokens"] + 40, log=lambda m: None))
    if not report_only:       # trained and evaluated: only the results are read again
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    result = json.loads(results.read_text())
    return {"ce": result["ce"]["nats_per_token"], "bpb": result["ce"]["bits_per_byte"], "rougeL": result["mean"],
            "steps": summary["steps"], "train_s": stages.times().get(f"{tag} train")}


def final_weights(out: Path) -> Path:
    """out/final: the run's last checkpoint as a loadable model (its config and tokenizer are out's)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    final = out / "final"
    if final.exists():
        return final
    checkpoint = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    model = AutoModelForCausalLM.from_pretrained(out)
    missing, unexpected = model.load_state_dict(load_file(str(checkpoint / "trainable.safetensors")), strict=False)
    tied = {"lm_head.weight"}
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"{checkpoint}: weights do not fit the model (missing {missing}, unexpected {unexpected})")
    tmp = out / "final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for item in out.iterdir():
        if item.name.startswith("tokenizer") or item.name == "special_tokens_map.json":
            shutil.copy2(item, tmp / item.name)
    tmp.replace(final)
    return final


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def run(args) -> dict:
    """Every stage in an order that keeps the tables useful if the run is cut short: each pair's rows seed by
    seed (every row's seed 1 before any row's seed 2), the ablations right after the pair they vary; then the
    pretrained regime (pretraining, the lr sweep, its rows seed by seed with the OT ablation, GOLD's diagnosis).
    With --report-only nothing is trained: the tables hold the runs that are done (a row's seeds are listed)."""
    s = settings(args)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    stages = Stages(work)
    started = time.perf_counter()
    rows = usable_rows(ROWS)
    ot_ablation = usable_rows(OT_ABLATION) if s["pretrained_rows"] is None else {}
    plan = budget_plan(args, s, work, rows, ot_ablation)
    if args.plan_only:
        return {"plan": plan}
    results: dict = {}
    if args.regime in ("scratch", "both"):
        results.update(scratch_regime(args, s, work, stages, rows))
    if args.regime in ("pretrained", "both"):
        table = pretrained_regime(args, s, plan, work, stages, rows, ot_ablation)
        if table is not None:
            results[PRETRAINED_TITLE] = table
    return {"device": device_label(), "date": time.strftime("%Y-%m-%d"), "smoke": args.smoke, "settings": s,
            "plan": plan, "student": STUDENT, "teacher": TEACHER, "wall_s": round(time.perf_counter() - started, 1),
            "stage_s": round(sum(stages.times().values()), 1), "tables": results}


def settings(args) -> dict:
    s = dict(SMOKE if args.smoke else FULL)
    if args.seeds:
        s["seeds"] = tuple(int(x) for x in args.seeds.split(",") if x.strip())
    if args.pairs == "ranking":       # only the pair the new rows and the pretrained regime use; the other pairs'
        s["pairs"] = (RANKING_PAIR,)  # tables stay as published (bench/results/transfer_cpu_2026-11-23)
    if args.no_ablations:             # seeds in parallel chains: one chain runs the ablations, the others pass this
        s["ablation_seeds"] = ()
    return s


def usable_rows(rows: dict) -> dict:
    """The rows, each checked against the method registry and DistillConfig's fields: a misspelt method or setting
    stops the benchmark before it starts instead of silently dropping a row from a 4-hour run."""
    import dataclasses

    from cot2align.config import DistillConfig
    from cot2align.methods import METHODS

    fields = {f.name for f in dataclasses.fields(DistillConfig)}
    for name, row in rows.items():
        missing = sorted(set(row) - fields)
        if row["method"] not in METHODS:
            raise SystemExit(f"[row {name}] method {row['method']!r} is not registered (methods.py)")
        if missing:
            raise SystemExit(f"[row {name}] DistillConfig has no field {', '.join(missing)}")
    return dict(rows)


def pair_setup(dataset: str, kind: str, s: dict, work: Path, stages: Stages, data_root: str | None):
    """A pair's data, teacher and teacher cache (each a stage, skipped when done)."""
    paths = prepare_data(dataset, s, work / dataset, data_root)
    root = work / dataset / kind
    root.mkdir(parents=True, exist_ok=True)
    tag = f"{dataset} {kind}"
    teacher = teacher_model(kind, paths, s, root, stages, tag)
    cache = teacher_cache(teacher, paths, s, root, stages, tag)
    return paths, root, tag, teacher, cache


def pair_table(runs: dict, teacher: str, cache: Path, paths: dict, s: dict, root: Path, stages: Stages, tag: str,
               report_only: bool) -> dict:
    table = {name: rows_table(by_seed) for name, by_seed in runs.items()
             if any(r is not None for r in by_seed.values())}
    if "sft" in table:
        for row in table.values():
            row["paired"] = paired_difference(row, table["sft"])
    table["teacher"] = teacher_scores(teacher, paths, s, root, stages, tag, report_only)
    manifest = json.loads((cache / "zarr.json").read_text())["attributes"]
    table["cot_examples"] = manifest["data"]["n_cot_examples"]
    return table


def scratch_regime(args, s: dict, work: Path, stages: Stages, rows: dict) -> dict:
    """Random-initialised students: every pair's base rows, the ranking rows and GOLD's diagnosis on RANKING_PAIR,
    the ablations."""
    results = {}
    for dataset, kind in s["pairs"]:
        paths, root, tag, teacher, cache = pair_setup(dataset, kind, s, work, stages, args.data_root)
        every = ({**rows, **usable_rows(gold_diagnosis("scratch"))} if (dataset, kind) == RANKING_PAIR
                 else {n: rows[n] for n in BASE_ROWS if n in rows})
        runs: dict[str, dict] = {name: {} for name in every}
        for seed in s["seeds"]:
            for name in every:
                # SFT needs no teacher: trained once per dataset from the plain records, shared by its teachers
                out = work / dataset / "sft" if name == "sft" else root / "runs" / run_dir(name)
                runs[name][seed] = student(every[name], seed, None if name == "sft" else cache, paths, s,
                                           out / f"seed{seed}", stages,
                                           f"{dataset if name == 'sft' else tag} {name} seed{seed}", args.report_only)
        if s["ablation_seeds"] and (dataset, kind) == RANKING_PAIR:
            for name, row in usable_rows(ABLATIONS).items():
                runs[name] = {seed: student(row, seed, cache, paths, s, root / "runs" / run_dir(name) /
                                            f"seed{seed}", stages, f"{tag} {name} seed{seed}", args.report_only)
                              for seed in s["ablation_seeds"]}
        results[f"{dataset} / {kind} teacher"] = pair_table(runs, teacher, cache, paths, s, root, stages, tag,
                                                            args.report_only)
    return results


# ---- the pretrained regime ----------------------------------------------------------------------------------------

PRETRAINED_TITLE = "dialogsum / fine-tuned teacher / pretrained student"
SWEEP_SEED = 1          # the lr sweep's seed, whatever --seeds says (so the chosen lr does not move with it)


def pretrained_model(s: dict, plan: dict, work: Path, stages: Stages, args) -> Path | None:
    """WORK/pretrained/student: the GPT-2 student pretrained once (bench/pretrain_student.py); None under
    --report-only before it exists."""
    import pretrain_student

    out = work / "pretrained" / "student"
    if args.report_only and not (out / "pretrain.json").exists():
        return None
    settings = {**s["pretrain"], "epochs": plan["pretrain_epochs"]}
    stages.run("pretrain student", out / "pretrain.json", lambda: pretrain_student.pretrain(
        out, args.data_root, log=lambda m: print(m, flush=True), **settings))
    return out


def _variant(lr: float, limit: int | None) -> str:
    return f"lr{lr:g}" + (f"_n{limit}" if limit else "")


def choose_lr(s: dict, plan: dict, model: Path, paths: dict, select: str, work: Path, stages: Stages,
              args) -> tuple[float | None, dict]:
    """SFT from the pretrained student at each lr of s["lr_sweep"] (seed SWEEP_SEED), each scored by held-out CE
    on the selection dev records; the lowest wins. Returns (the lr, {lr: dev CE}); (None, ...) under --report-only
    while the sweep is unfinished."""
    from cot2align.eval import evaluate_model

    scores = {}
    for lr in s["lr_sweep"]:
        start = {"model": str(model), "lr": lr, "limit": plan["pretrained_limit"]}
        out = work / "dialogsum" / "pretrained_sft" / _variant(lr, plan["pretrained_limit"]) / f"seed{SWEEP_SEED}"
        if student(ROWS["sft"], SWEEP_SEED, None, paths, s, out, stages,
                   f"dialogsum pretrained sft {_variant(lr, plan['pretrained_limit'])} seed{SWEEP_SEED}",
                   args.report_only, start) is None:
            continue
        results = out / "eval_dev" / "results.json"
        if args.report_only and not results.exists():
            continue
        stages.run(f"dialogsum pretrained sft {_variant(lr, plan['pretrained_limit'])} dev ce", results, lambda: evaluate_model(
            str(out), select, "dev", metric="ce", out=str(out / "eval_dev"),
            max_prompt_tokens=s["max_prompt_tokens"] + 40, log=lambda m: None))
        scores[lr] = json.loads(results.read_text())["ce"]["nats_per_token"]
    if len(scores) < len(s["lr_sweep"]):
        return None, scores
    chosen = min(scores, key=scores.get)
    print(f"[pretrained regime] lr {chosen:g} chosen on the dev split (held-out CE "
          + ", ".join(f"lr {lr:g}: {ce:.3f}" for lr, ce in scores.items()) + ")", flush=True)
    return chosen, scores


def pretrained_regime(args, s: dict, plan: dict, work: Path, stages: Stages, rows: dict, ot_ablation: dict) -> dict | None:
    """RANKING_PAIR's rows, the OT ablation and GOLD's diagnosis, every student starting from the pretrained one at
    the chosen lr."""
    from cot2align.eval import evaluate_model

    dataset, kind = RANKING_PAIR
    paths, root, tag, teacher, cache = pair_setup(dataset, kind, s, work, stages, args.data_root)
    model = pretrained_model(s, plan, work, stages, args)
    if model is None:
        return None
    lr, sweep = choose_lr(s, plan, model, paths, selection_dev(s, work / dataset, args.data_root), work, stages, args)
    if lr is None:
        return None
    start = {"model": str(model), "lr": lr, "limit": plan["pretrained_limit"]}
    variant = _variant(lr, plan["pretrained_limit"])
    names = [n for n in rows if s["pretrained_rows"] is None or n in s["pretrained_rows"]]
    every = {**{n: rows[n] for n in names}, **ot_ablation, **usable_rows(gold_diagnosis("pretrained"))}
    runs: dict[str, dict] = {name: {} for name in every}
    for seed in s["seeds"]:
        for name, row in every.items():
            if name == "sft":          # SFT needs no teacher; its sweep seed at the chosen lr is already done
                out, what = work / dataset / "pretrained_sft" / variant, f"{dataset} pretrained sft {variant}"
            else:
                out, what = root / "pretrained" / variant / run_dir(name), f"{tag} pretrained {name}"
            runs[name][seed] = student(row, seed, None if name == "sft" else cache, paths, s, out / f"seed{seed}",
                                       stages, f"{what} seed{seed}", args.report_only, start)
    table = pair_table(runs, teacher, cache, paths, s, root, stages, tag, args.report_only)
    untrained = work / "pretrained" / "student_test_ce" / "results.json"
    if not args.report_only or untrained.exists():
        stages.run("pretrained student test ce", untrained, lambda: evaluate_model(
            str(model), paths["test"], "test", metric="ce", out=str(untrained.parent),
            max_prompt_tokens=s["max_prompt_tokens"] + 40, log=lambda m: None))
    pretrain = json.loads((model / "pretrain.json").read_text())
    table["pretrained"] = {"lr": lr, "sweep": {f"{k:g}": v for k, v in sweep.items()}, "limit": plan["pretrained_limit"],
                           "pretrain": {k: pretrain[k] for k in ("records", "tokens", "epochs", "steps", "seq_len",
                                                                 "batch", "lr", "final_loss", "wall_s",
                                                                 "dropped_dialogsum_overlap")},
                           "test_ce_before_dialogsum": (json.loads(untrained.read_text())["ce"]["nats_per_token"]
                                                        if untrained.exists() else None)}
    return table


# ---- the budget ---------------------------------------------------------------------------------------------------

REFERENCE_TIMINGS = Path(__file__).resolve().parent / "results" / "transfer_cpu_2026-11-23" / "timings.json"
CORPUS_TOKENS = 767_509          # the pretraining corpus of ../shared/data, GPT-2 tokens (measured)
PRETRAIN_TOKENS_PER_S = 1470     # 2x128 GPT-2, 8 x 512 packed tokens a step: 2.79 s on 2 idle cores (2026-12-03)


def row_seconds(work: Path) -> dict[str, float]:
    """Median seconds of one run (train + evaluate) of each row on the ranking pair (DialogSum: its fine-tuned
    teacher's cache holds the most rationales, so its CoT rows are the slowest) measured so far: this work dir's
    timings, else the published run's. A row never measured gets the median of the measured rows with the same
    CoT2Align flag."""
    import re

    times = {name: seconds for name, seconds in {**json.loads(REFERENCE_TIMINGS.read_text()),
                                                 **Stages(work).times()}.items()
             if name.startswith(("dialogsum fine-tuned ", "dialogsum sft ", "dialogsum pretrained "))}
    measured = {}
    for name in {**ROWS, **ABLATIONS, **OT_ABLATION}:
        pattern = re.compile(rf" {re.escape(name)} seed\d+ (train|evaluate)$")
        train = [v for k, v in times.items() if pattern.search(k) and k.endswith("train")]
        evaluate = [v for k, v in times.items() if pattern.search(k) and not k.endswith("train")]
        if train:
            measured[name] = statistics.median(train) + (statistics.median(evaluate) if evaluate else 0.0)
    for name in {**ROWS, **OT_ABLATION}:
        if name not in measured:
            alike = [v for n, v in measured.items() if ("cot2align" in n) == ("cot2align" in name) and n in ROWS]
            measured[name] = statistics.median(alike)
    return measured


def _pending(out: Path) -> bool:
    return not (out / "summary.json").exists()


def estimate(s: dict, plan: dict, work: Path, rows: dict, ot_ablation: dict, regime: str) -> dict[str, list]:
    """{part: [runs, seconds]} of what is still to do (rows x seeds x each row's measured time per run)."""
    per_row = row_seconds(work)
    # "published": the rows and ablations of the first published tables, redone only when this work dir lacks them
    # (outside the budget, which is for the new runs)
    parts = {"published": [0, 0.0], "scratch": [0, 0.0], "pretraining": [0, 0.0], "lr sweep": [0, 0.0],
             "pretrained": [0, 0.0]}

    def add(part: str, name: str, out: Path, scale: float = 1.0) -> None:
        if _pending(out):
            parts[part][0] += 1
            parts[part][1] += per_row[name] * scale

    if regime in ("scratch", "both"):
        for dataset, kind in s["pairs"]:
            names = list(rows) if (dataset, kind) == RANKING_PAIR else [n for n in BASE_ROWS if n in rows]
            for name in names:
                base = work / dataset / "sft" if name == "sft" else work / dataset / kind / "runs" / name
                for seed in s["seeds"]:
                    add("published" if name in BASE_ROWS else "scratch", name, base / f"seed{seed}")
            for name in gold_diagnosis("scratch") if (dataset, kind) == RANKING_PAIR else ():
                for seed in s["seeds"]:        # timed as the GOLD row with the same CoT2Align flag
                    add("scratch", "gold+cot2align" if "cot2align" in name else "gold",
                        work / dataset / kind / "runs" / run_dir(name) / f"seed{seed}")
            for name in ABLATIONS if s["ablation_seeds"] and (dataset, kind) == RANKING_PAIR else ():
                for seed in s["ablation_seeds"]:
                    add("published", name, work / dataset / kind / "runs" / run_dir(name) / f"seed{seed}")
    if regime in ("pretrained", "both"):
        limit = plan["pretrained_limit"]
        scale = (limit or s["train"]) / s["train"]
        if not (work / "pretrained" / "student" / "pretrain.json").exists():
            tokens = CORPUS_TOKENS if s["pretrain"]["max_records"] is None else 160 * s["pretrain"]["max_records"]
            parts["pretraining"] = [1, tokens * plan["pretrain_epochs"] / PRETRAIN_TOKENS_PER_S]
        sft_runs = work / "dialogsum" / "pretrained_sft"
        for lr in s["lr_sweep"]:
            add("lr sweep", "sft", sft_runs / _variant(lr, limit) / f"seed{SWEEP_SEED}", scale)
        names = [n for n in rows if s["pretrained_rows"] is None or n in s["pretrained_rows"]] + list(ot_ablation)
        for name in names:        # the chosen lr is not known yet: every run counts, but SFT's sweep seed
            runs = len(s["seeds"]) - (name == "sft" and SWEEP_SEED in s["seeds"])
            parts["pretrained"][0] += runs
            parts["pretrained"][1] += per_row[name] * scale * runs
        parts["pretrained"][0] += len(gold_diagnosis("pretrained")) * len(s["seeds"])
        parts["pretrained"][1] += per_row["gold"] * scale * len(gold_diagnosis("pretrained")) * len(s["seeds"])
    return parts


def budget_plan(args, s: dict, work: Path, rows: dict, ot_ablation: dict) -> dict:
    """What the pretrained regime trains on, decided once (WORK/plan.json; --replan decides again): the full
    sizes, unless the new runs' estimate exceeds s["budget_hours"] — then data is cut before seeds: first the
    pretraining epochs (4 -> 2), then the pretrained regime's training records (all -> 3/4 -> 1/2 of them, the
    first ones of the same cache). The estimate and every cut are printed."""
    path = work / "plan.json"
    if path.exists() and not args.replan:
        plan = json.loads(path.read_text())
        print(f"[plan] from {path}: {plan}", flush=True)
    else:
        plan = {"pretrain_epochs": s["pretrain"]["epochs"], "pretrained_limit": None, "cuts": []}
        cuts = [("pretrain_epochs", e) for e in range(s["pretrain"]["epochs"] - 1, 1, -1)]
        cuts += [("pretrained_limit", s["train"] * 3 // 4), ("pretrained_limit", s["train"] // 2)]
        for key, value in cuts:
            if _total(estimate(s, plan, work, rows, ot_ablation, args.regime)) <= s["budget_hours"] * 3600:
                break
            plan[key] = value
            plan["cuts"].append(f"{key} -> {value}")
            print(f"[plan] over the {s['budget_hours']:g} h budget: cut {key} to {value}", flush=True)
        path.write_text(json.dumps(plan, indent=1))
    parts = estimate(s, plan, work, rows, ot_ablation, args.regime)
    total = _total(parts)
    print("[budget] still to run: " + "; ".join(f"{part} {runs} run{'s' * (runs != 1)} ~{seconds / 60:.0f} min"
                                              for part, (runs, seconds) in parts.items() if runs)
          + f"; new runs {total / 3600:.2f} h of 2 idle cores (target {s['budget_hours']:g} h; per-run times measured "
          f"in this work dir, else in {REFERENCE_TIMINGS.parent.name})"
          + (" — still over it: seeds are kept, choose them with --seeds" if total > s["budget_hours"] * 3600 else ""),
          flush=True)
    return plan


def _total(parts: dict) -> float:
    """Seconds of the new runs (the budget's concern)."""
    return sum(seconds for part, (_, seconds) in parts.items() if part != "published")


def paired_difference(row: dict, sft: dict) -> dict:
    """The row minus SFT seed by seed (the same seed: the same data order), mean ± std over the common seeds."""
    common = [seed for seed in row["per_seed_ce"] if seed in sft["per_seed_ce"]]
    if not common:
        return {"seeds": 0}
    return {"seeds": len(common),
            "ce": _mean_std([row["per_seed_ce"][k] - sft["per_seed_ce"][k] for k in common]),
            "rougeL": _mean_std([row["per_seed_rougeL"][k] - sft["per_seed_rougeL"][k] for k in common])}


def rows_table(runs: dict[int, dict]) -> dict:
    """One row of a table: mean and std over seeds of each column, the per-seed CE, the steps."""
    seeds = sorted(seed for seed, r in runs.items() if r is not None)
    row = {key: _mean_std([runs[seed][key] for seed in seeds]) for key in ("ce", "bpb", "rougeL")}
    row["per_seed_ce"] = {seed: runs[seed]["ce"] for seed in seeds}
    row["per_seed_rougeL"] = {seed: runs[seed]["rougeL"] for seed in seeds}
    row["steps"] = runs[seeds[0]]["steps"]
    return row


def teacher_scores(teacher: str, paths: dict, s: dict, root: Path, stages: Stages, tag: str,
                   report_only: bool = False) -> dict | None:
    """The teacher on the same test split, in its own tokenisation (bits/byte compares across tokenizers)."""
    from cot2align.eval import evaluate_model

    results = root / "teacher_eval" / "results.json"
    if report_only and not results.exists():
        return None
    stages.run(f"{tag} teacher evaluate", results, lambda: evaluate_model(
        teacher, paths["test"], "test", greedy=True, metric="all", out=str(root / "teacher_eval"),
        max_new_tokens=s["test_new_tokens"], max_prompt_tokens=s["max_prompt_tokens"] + 40, log=lambda m: None))
    result = json.loads(results.read_text())
    return {"ce": result["ce"]["nats_per_token"], "bpb": result["ce"]["bits_per_byte"], "rougeL": result["mean"]}


META = ("teacher", "cot_examples", "pretrained")        # a table's keys that are not rows


def _pretrained_said(info: dict) -> str:
    pre = info["pretrain"]
    sweep = ", ".join(f"lr {lr}: {ce:.3f}" for lr, ce in info["sweep"].items())
    before = info["test_ce_before_dialogsum"]
    return (f"Every student starts from `random:gpt2-transfer` pretrained as a plain causal LM on Alpaca, Dolly and "
            f"S-NI text ({pre['records']} records, {pre['tokens']} GPT-2 tokens, {pre['dropped_dialogsum_overlap']} "
            f"dropped for sharing a 13-word run with DialogSum; {pre['epochs']} epochs, {pre['steps']} steps of "
            f"{pre['batch']} x {pre['seq_len']} tokens at peak lr {pre['lr']:g}; final training loss "
            f"{pre['final_loss']:.2f}; {pre['wall_s']:.0f} s)"
            + (f", test CE before any DialogSum training {before:.3f}" if before is not None else "")
            + f". Learning rate **{info['lr']:g}**, chosen by SFT's held-out CE on the dev split ({sweep})"
            + (f"; trained on the first {info['limit']} records (cut for the budget)" if info["limit"] else "") + ".")


def _row_line(name: str, row: dict) -> str:
    (ce, ce_sd), (bpb, bpb_sd), (rouge, rouge_sd) = row["ce"], row["bpb"], row["rougeL"]
    per_seed = ", ".join(f"s{seed} {v:.3f}" for seed, v in row["per_seed_ce"].items())
    paired = row.get("paired", {"seeds": 0})
    if paired["seeds"]:
        (d_ce, d_ce_sd), (d_rouge, d_rouge_sd) = paired["ce"], paired["rougeL"]
        deltas = f"{d_ce:+.3f} ± {d_ce_sd:.3f} | {d_rouge:+.2f} ± {d_rouge_sd:.2f}"
    else:
        deltas = "– | –"
    return (f"| {name} | {ce:.3f} ± {ce_sd:.3f} | {bpb:.4f} ± {bpb_sd:.4f} | {rouge:.2f} ± {rouge_sd:.2f} | "
            f"{deltas} | {per_seed} |")


def markdown(summary: dict) -> str:
    lines = []
    for title, table in summary["tables"].items():
        teacher = table["teacher"]
        said = (f"Teacher on the same test split: {teacher['ce']:.3f} nats/token (its own tokens), "
                f"{teacher['bpb']:.4f} bits/byte, greedy ROUGE-L {teacher['rougeL']:.2f}; " if teacher else
                "Teacher not yet evaluated; ")
        lines += [f"### {title}", "", said + f"{table['cot_examples']} of the training examples kept a rationale.", ""]
        if table.get("pretrained"):
            lines += [_pretrained_said(table["pretrained"]), ""]
            if any(name in table for name in OT_ABLATION):
                lines += ["OT ablation (every seed): `dskd+cot2align` is OT at the paper's ε = 10; "
                          + "; ".join(f"`{name}`: {', '.join(f'{k}={v}' for k, v in row.items() if k not in ('method', 'cot2align'))}"
                                      for name, row in OT_ABLATION.items() if name in table) + ".", ""]
        if any(name in table for name in GOLD_DIAGNOSIS):
            lines += ["GOLD diagnosis (every seed): "
                      + "; ".join(f"`{name}`: {', '.join(f'{k}={v}' for k, v in row.items() if k != 'method')}"
                                  for name, (row, _) in GOLD_DIAGNOSIS.items() if name in table) + ".", ""]
        lines += ["| row | held-out CE, nats/token | bits/byte | greedy ROUGE-L | Δ CE vs SFT, paired | "
                  "Δ ROUGE-L vs SFT, paired | per-seed CE |", "|---|---|---|---|---|---|---|"]
        lines += [_row_line(name, row) for name, row in table.items() if name not in META]
        lines.append("")
    settings = summary["settings"]
    lines.append(f"Students: {summary['student']} ({len(settings['seeds'])} seeds; ablation rows "
                 f"{len(settings['ablation_seeds'])}), {settings['train']} training "
                 f"records, {settings['epochs']} epochs, batch {settings['batch_size']}, lr {settings['lr']} from "
                 f"scratch; test {settings['test']} examples. Δ: the row minus SFT of the same seed, mean ± std over "
                 f"the seeds both have. {summary['device']}, {summary['date']}, wall {summary['wall_s']:.0f} s.")
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> None:
    from cot2align.plotting import pyplot

    plt = pyplot()
    if plt is None:
        return
    tables = summary["tables"]
    fig, axes = plt.subplots(1, len(tables), figsize=(6 * len(tables), 4.5), squeeze=False)
    for ax, (title, table) in zip(axes[0], tables.items()):
        names = [n for n in table if n not in META]
        means = [table[n]["ce"][0] for n in names]
        stds = [table[n]["ce"][1] for n in names]
        colors = ["tab:gray" if n == "sft" else "tab:orange" if "cot2align" in n else "tab:blue" for n in names]
        ax.bar(range(len(names)), means, yerr=stds, capsize=3, color=colors)
        if "sft" in table:
            ax.axhline(table["sft"]["ce"][0], color="k", lw=0.8, ls="--")
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
        low = min(m - s for m, s in zip(means, stds))
        high = max(m + s for m, s in zip(means, stds))
        ax.set_ylim(low - 0.1 * (high - low + 1e-3), high + 0.1 * (high - low + 1e-3))
        ax.set_ylabel("held-out CE (nats/token, lower is better)")
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", required=True, help="working directory (resumable)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, every row once (tests)")
    parser.add_argument("--report-only", action="store_true", help="train nothing: tables of the runs done so far")
    parser.add_argument("--data-root", default=os.environ.get("COT2ALIGN_DATA_ROOT"))
    parser.add_argument("--regime", choices=("scratch", "pretrained", "both"), default="both",
                        help="random-initialised students (the published tables and the ranking rows), students "
                             "started from the pretrained one, or both")
    parser.add_argument("--seeds", help="comma-separated training seeds (default 1,2,3; smoke 1)")
    parser.add_argument("--pairs", choices=("all", "ranking"), default="all",
                        help="every teacher/dataset pair, or only the ranking pair (DialogSum, fine-tuned teacher)")
    parser.add_argument("--no-ablations", action="store_true",
                        help="skip the from-scratch ablations (when seeds run as parallel chains on one work dir, let "
                             "one chain run them: two processes must never train the same run; start such chains "
                             "once the shared stages — teachers, caches, pretraining, lr sweep — are done)")
    parser.add_argument("--plan-only", action="store_true", help="print the budget estimate and the plan; run nothing")
    parser.add_argument("--replan", action="store_true",
                        help="decide the budget cuts again (else WORK/plan.json keeps the first decision)")
    args = parser.parse_args()
    summary = run(args)
    if args.plan_only:
        return
    work = Path(args.work)
    (work / "transfer.json").write_text(json.dumps(summary, indent=1))
    text = markdown(summary)
    (work / "transfer.md").write_text(text)
    plot(summary, work / "transfer.png")
    print(text)
    print(json.dumps({"device": summary["device"], "wall_s": summary["wall_s"], "out": str(work / "transfer.md")}))


if __name__ == "__main__":
    main()
