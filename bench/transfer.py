"""Does the teacher's knowledge reach the student? A knowledge-transfer benchmark on 2 CPU cores.

    python bench/transfer.py --work DIR            the full run (about 4 hours on 2 cores; resumable)
    python bench/transfer.py --work DIR --smoke    every row once, tiny sizes, one pair (~1.5 minutes; the tests run it)

A real pretrained teacher, SmolLM2-135M-Instruct (its own tokenizer), zero-shot and briefly fine-tuned, and
small random-initialised GPT-2 students (the GPT-2 tokenizer: another vocabulary and segmentation), fully
fine-tuned on real data of the paper — DialogSum (train subset; dev and test from the real splits) and
Alpaca (the paper's processed dev set as training data, its test set as test) — with CoT rationales
written by each teacher (`augment-cot`) and one teacher cache per dataset and teacher (`cache-teacher`).
Every student of a dataset and teacher trains from that one cache on the same records, steps, learning rate
and seeds.

Rows: SFT, ULD, MinED, DSKD, each without and with CoT2Align (SFT + CoT2Align is the CoT view and the
Cross-CoT OT term with no KD term). On DialogSum with the fine-tuned teacher, the ablations a reader of the
paper asks for: the OT gradient (`envelope`, ours, vs `unrolled`, the authors'), ε ∈ {10, 1, 0.1} for
DSKD + CoT2Align, and α ∈ {0.1, 0.5, 0.9} for DSKD (the weight of CE is 1 − α) — one seed each (2 cores
allow no more within the run's budget), to be read against the same seed of the row each one varies.

Columns: the held-out cross-entropy of the test references (nats per student token, mean ± std over the
seeds), bits per byte, and greedy ROUGE-L; and each row's difference from SFT in CE. Outputs under the work
dir: transfer.md (the tables), transfer.png (bars with error bars), transfer.json (every number), and one
directory per stage; a rerun skips what is done.

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

# Row name -> the distill settings that make it (alpha 0.5 unless the row says otherwise).
ROWS = {
    "sft": dict(method="sft", cot2align=False),
    "sft+cot2align": dict(method="sft", cot2align=True),
    "uld": dict(method="uld", cot2align=False),
    "uld+cot2align": dict(method="uld", cot2align=True),
    "mined": dict(method="mined", cot2align=False),
    "mined+cot2align": dict(method="mined", cot2align=True),
    "dskd": dict(method="dskd", cot2align=False),
    "dskd+cot2align": dict(method="dskd", cot2align=True),
}
ABLATIONS = {
    "dskd+cot2align unrolled": dict(method="dskd", cot2align=True, ot_grad="unrolled"),
    "dskd+cot2align eps=1": dict(method="dskd", cot2align=True, ot_epsilon=1.0),
    "dskd+cot2align eps=0.1": dict(method="dskd", cot2align=True, ot_epsilon=0.1),
    "dskd alpha=0.1": dict(method="dskd", cot2align=False, alpha=0.1),
    "dskd alpha=0.9": dict(method="dskd", cot2align=False, alpha=0.9),
}

# both teachers on DialogSum (where fine-tuning matters: zero-shot SmolLM2 scores ~10 ROUGE-L there), the
# instruct model as it is on Alpaca (its home ground); a fourth pair would add ~50 minutes on 2 cores
PAIRS = (("dialogsum", "zero-shot"), ("dialogsum", "fine-tuned"), ("alpaca", "zero-shot"))
FULL = dict(pairs=PAIRS, seeds=(1, 2, 3), train=128, val=8, test=50, max_prompt_tokens=256, teacher_steps=24,
            teacher_batch=4, teacher_lr=5e-5, cot_tokens=96, epochs=5, batch_size=8, lr=3e-3, max_length=512,
            val_new_tokens=16, test_new_tokens=32, ablation_seeds=(1,))
# the smoke run (the test suite's) takes the one pair that exercises every stage: teacher fine-tuning, every row,
# every ablation; the Alpaca pair differs only in its data, which the test prepares on its own
SMOKE = dict(pairs=(("dialogsum", "fine-tuned"),), seeds=(1,), train=6, val=2,
             test=3, max_prompt_tokens=160, teacher_steps=1, teacher_batch=2, teacher_lr=5e-5, cot_tokens=8, epochs=1,
             batch_size=3, lr=3e-3, max_length=320, val_new_tokens=4, test_new_tokens=4, ablation_seeds=(1,))


def _write_jsonl(path: Path, records: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    tmp.replace(path)


def prepare_data(dataset: str, s: dict, root: Path, data_root: str | None) -> dict[str, str]:
    """train / dev / test JSONL of real records whose standard prompt fits s["max_prompt_tokens"] teacher tokens
    (short examples keep a 2-core run within budget; a DialogSum dialogue is cut from its end if needed)."""
    from cot2align.data import load_records
    from cot2align.data.readers import default_data_root, read_file
    from cot2align.data.templates import standard_prompt
    from cot2align.modeling import load_tokenizer

    out = root / "data"
    paths = {split: out / f"{split}.jsonl" for split in ("train", "dev", "test")}
    if all(p.exists() for p in paths.values()):
        return {k: str(v) for k, v in paths.items()}
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(TEACHER)

    def short(records: list[dict], n: int) -> list[dict]:
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
            report_only: bool = False) -> dict | None:
    """Train one student and evaluate its final weights on the test split: CE (nats/token, bits/byte) and greedy
    ROUGE-L. Every row gets the same steps (`--select-by last`): with 8 validation examples, greedy ROUGE-L —
    the paper's best-epoch rule — crowned an epoch-0 model in some runs (0.8 nats worse held-out CE)."""
    from cot2align.config import DistillConfig, build_config
    from cot2align.eval import evaluate_model
    from cot2align.train.distill import distill

    if report_only and not (out / "summary.json").exists():
        return None
    settings = {"alpha": 0.5, **row}
    source = dict(cache=str(cache)) if cache is not None else dict(data=paths["train"])
    if out.exists() and not (out / "summary.json").exists():
        shutil.rmtree(out)                       # an interrupted run starts again (it takes a minute)
    stages.run(f"{tag} train", out / "summary.json", lambda: distill(build_config(
        DistillConfig, student=STUDENT, out=str(out), lr=s["lr"], epochs=s["epochs"], batch_size=s["batch_size"],
        warmup_ratio=0.05, val_data=paths["dev"], val_examples=s["val"], val_max_new_tokens=s["val_new_tokens"],
        max_length=s["max_length"], seed=seed, num_workers=0, select_by="last", **source, **settings),
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
            "steps": summary["steps"]}


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
    seed (every row's seed 1 before any row's seed 2), the ablations right after the pair they vary.
    With --report-only nothing is trained: the tables hold the runs that are done (a row's seeds are listed)."""
    s = SMOKE if args.smoke else FULL
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    stages = Stages(work)
    started = time.perf_counter()
    results: dict = {}
    for dataset in dict.fromkeys(d for d, _ in s["pairs"]):
        paths = prepare_data(dataset, s, work / dataset, args.data_root)
        for kind in [k for d, k in s["pairs"] if d == dataset]:
            root = work / dataset / kind
            root.mkdir(parents=True, exist_ok=True)
            tag = f"{dataset} {kind}"
            teacher = teacher_model(kind, paths, s, root, stages, tag)
            cache = teacher_cache(teacher, paths, s, root, stages, tag)
            runs: dict[str, dict] = {name: {} for name in ROWS}
            for seed in s["seeds"]:
                for name, row in ROWS.items():
                    # SFT needs no teacher: trained once per dataset from the plain records, shared by its teachers
                    out = work / dataset / "sft" if name == "sft" else root / "runs" / name
                    runs[name][seed] = student(row, seed, None if name == "sft" else cache, paths, s,
                                               out / f"seed{seed}", stages,
                                               f"{dataset if name == 'sft' else tag} {name} seed{seed}", args.report_only)
            if s["ablation_seeds"] and (dataset, kind) == ("dialogsum", "fine-tuned"):
                for name, row in ABLATIONS.items():
                    runs[name] = {seed: student(row, seed, cache, paths, s, root / "runs" / name.replace(" ", "_") /
                                                f"seed{seed}", stages, f"{tag} {name} seed{seed}", args.report_only)
                                  for seed in s["ablation_seeds"]}
            table = {name: rows_table(by_seed) for name, by_seed in runs.items()
                     if any(r is not None for r in by_seed.values())}
            table["teacher"] = teacher_scores(teacher, paths, s, root, stages, tag, args.report_only)
            manifest = json.loads((cache / "zarr.json").read_text())["attributes"]
            table["cot_examples"] = manifest["data"]["n_cot_examples"]
            results[f"{dataset} / {kind} teacher"] = table
    return {"device": device_label(), "date": time.strftime("%Y-%m-%d"), "smoke": args.smoke, "settings": s,
            "student": STUDENT, "teacher": TEACHER, "wall_s": round(time.perf_counter() - started, 1),
            "stage_s": round(sum(stages.times().values()), 1), "tables": results}


def rows_table(runs: dict[int, dict]) -> dict:
    """One row of a table: mean and std over seeds of each column, the per-seed CE, the steps."""
    seeds = sorted(seed for seed, r in runs.items() if r is not None)
    row = {key: _mean_std([runs[seed][key] for seed in seeds]) for key in ("ce", "bpb", "rougeL")}
    row["per_seed_ce"] = {seed: runs[seed]["ce"] for seed in seeds}
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


def markdown(summary: dict) -> str:
    lines = []
    for title, table in summary["tables"].items():
        teacher = table["teacher"]
        sft_ce = table["sft"]["ce"][0]
        said = (f"Teacher on the same test split: {teacher['ce']:.3f} nats/token (its own tokens), "
                f"{teacher['bpb']:.4f} bits/byte, greedy ROUGE-L {teacher['rougeL']:.2f}; " if teacher else
                "Teacher not yet evaluated; ")
        lines += [f"### {title}", "", said + f"{table['cot_examples']} of the training examples kept a rationale.", "",
                  "| row | held-out CE, nats/token | Δ CE vs SFT | bits/byte | greedy ROUGE-L | per-seed CE |",
                  "|---|---|---|---|---|---|"]
        for name, row in table.items():
            if name in ("teacher", "cot_examples"):
                continue
            (ce, ce_sd), (bpb, bpb_sd), (rouge, rouge_sd) = row["ce"], row["bpb"], row["rougeL"]
            per_seed = ", ".join(f"s{seed} {v:.3f}" for seed, v in row["per_seed_ce"].items())
            lines.append(f"| {name} | {ce:.3f} ± {ce_sd:.3f} | {ce - sft_ce:+.3f} | {bpb:.4f} ± {bpb_sd:.4f} | "
                         f"{rouge:.2f} ± {rouge_sd:.2f} | {per_seed} |")
        lines.append("")
    settings = summary["settings"]
    lines.append(f"Students: {summary['student']} ({len(settings['seeds'])} seeds; ablation rows "
                 f"{len(settings['ablation_seeds'])}), {settings['train']} training "
                 f"records, {settings['epochs']} epochs, batch {settings['batch_size']}, lr {settings['lr']}; test "
                 f"{settings['test']} examples. {summary['device']}, {summary['date']}, wall {summary['wall_s']:.0f} s.")
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> None:
    from cot2align.plotting import pyplot

    plt = pyplot()
    if plt is None:
        return
    tables = summary["tables"]
    fig, axes = plt.subplots(1, len(tables), figsize=(6 * len(tables), 4.5), squeeze=False)
    for ax, (title, table) in zip(axes[0], tables.items()):
        names = [n for n in table if n not in ("teacher", "cot_examples")]
        means = [table[n]["ce"][0] for n in names]
        stds = [table[n]["ce"][1] for n in names]
        colors = ["tab:gray" if n == "sft" else "tab:orange" if "cot2align" in n else "tab:blue" for n in names]
        ax.bar(range(len(names)), means, yerr=stds, capsize=3, color=colors)
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
    args = parser.parse_args()
    summary = run(args)
    work = Path(args.work)
    (work / "transfer.json").write_text(json.dumps(summary, indent=1))
    text = markdown(summary)
    (work / "transfer.md").write_text(text)
    plot(summary, work / "transfer.png")
    print(text)
    print(json.dumps({"device": summary["device"], "wall_s": summary["wall_s"], "out": str(work / "transfer.md")}))


if __name__ == "__main__":
    main()
