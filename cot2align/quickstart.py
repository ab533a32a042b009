"""`cot2align quickstart --tiny`: the 2-minute connectivity check — the whole pipeline on the shipped sample, with a
teacher and a student that use different real tokenizers (default: tiny-qwen2 teacher, Qwen2.5 tokenizer; tiny-gpt2
student, GPT-2 tokenizer; both random-initialised, so the scores only show that the pipeline runs; the default
`cot2align quickstart`, quickstart_distil.py, shows a real teacher's gain). Each stage prints the command that does
the same thing, so a user can rerun any stage on their own models:

    sft (teacher) -> augment-cot -> cache-teacher -> distill (sft, dskd, dskd + cot2align) -> evaluate -> report

Sizes are cut to run in a few minutes on 2 CPU cores: `limit` training records, 1 epoch, short generations,
2 evaluation seeds on 20 test examples.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from cot2align.config import CacheTeacherConfig, DistillConfig, build_config, sft_defaults
from cot2align.data.augment import AugmentConfig, augment_cot
from cot2align.eval import evaluate_model, report
from cot2align.logs import reporter
from cot2align.teacher.cache_pass import cache_teacher
from cot2align.train.distill import distill


def command_line(command: str, settings: dict, rename: dict | None = None) -> str:
    """The `cot2align <command>` line that builds the same config as `settings` (each setting as its flag)."""
    parts = [f"cot2align {command}"]
    for name, value in settings.items():
        flag = "--" + (rename or {}).get(name, name).replace("_", "-")
        if isinstance(value, bool):
            parts.append(flag if value else ("--no-" + flag[2:] if name == "cot2align" else ""))
        elif value is not None:
            parts.append(f"{flag} {value}")
    return " ".join(p for p in parts if p)


def stage_settings(out: str, teacher: str, student: str, limit: int) -> dict[str, tuple[str, dict]]:
    """Each stage's (command, settings): what the quickstart runs, and, as flags, the command it prints."""
    root = Path(out)
    teacher_dir, cot_file, cache_dir, runs = root / "teacher", root / "data" / "cot.jsonl", root / "cache", root / "runs"
    train = dict(epochs=1, batch_size=4, val_examples=4, val_max_new_tokens=16, overwrite=True)
    teacher_lr = 1e-3 if teacher.startswith("tiny-") else 2e-5       # a real pretrained teacher gets a gentle lr
    stages = {
        "sft teacher": ("sft", dict(model=teacher, data="sample", limit=limit, lr=teacher_lr, lora_rank=0,
                                    out=str(teacher_dir), **train)),
        "augment-cot": ("augment-cot", dict(model=str(teacher_dir), data="sample", limit=limit, max_new_tokens=48,
                                            batch_size=32, out=str(cot_file))),
        "cache-teacher": ("cache-teacher", dict(model=str(teacher_dir), data=str(cot_file), topk=16,
                                                out=str(cache_dir))),
    }
    variants = {"sft": dict(method="sft", cot2align=False), "dskd": dict(method="dskd", cot2align=False),
                "dskd_cot2align": dict(method="dskd", cot2align=True)}
    for name, variant in variants.items():
        stages[f"distill {name}"] = ("distill", dict(cache=str(cache_dir), student=student, **variant, alpha=0.5,
                                                     lr=1e-3, out=str(runs / name), **train))
    for name in variants:
        stages[f"evaluate {name}"] = ("evaluate", dict(model=str(runs / name), data="sample", split="test", limit=20,
                                                       seeds="10,20", max_new_tokens=32))
    return stages


def check_model_names(teacher: str, student: str) -> None:
    """Both models' tokenizers load, before the first stage: a misspelt --student would otherwise fail only after
    minutes of caching, its message naming the stage's own option (--model) rather than the one the user typed."""
    from cot2align.modeling import load_tokenizer

    load_tokenizer(teacher, flag="--teacher")
    load_tokenizer(student, flag="--student")


def run_quickstart(out: str, teacher: str = "tiny-qwen2", student: str = "tiny-gpt2", limit: int = 100, log=None) -> str:
    log = reporter(log, __name__)
    check_model_names(teacher, student)
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    quiet = lambda message: None  # noqa: E731  (stages' own chatter stays out of the walkthrough)
    stages = stage_settings(out, teacher, student, limit)

    def stage(name: str, fn):
        command, settings = stages[name]
        log(f"$ {command_line(command, settings)}")
        started = time.perf_counter()
        result = fn(settings)
        timings[name] = time.perf_counter() - started
        log(f"  ({timings[name]:.1f} s)")
        return result

    stage("sft teacher", lambda s: distill(build_config(DistillConfig, **_sft(s)), log=quiet, progress=False))
    kept = stage("augment-cot", lambda s: augment_cot(build_config(AugmentConfig, **s), log=quiet))
    log(f"  {kept.get('kept', 0)} rationales kept, degenerate: {kept.get('degenerate') or 'none'}")
    if not kept.get("kept"):
        log("every rationale was dropped, so the CoT view is empty and the CoT2Align run below trains on "
            "the standard view alone (expected from a random tiny teacher; `cot2align quickstart` without --tiny "
            "distils the real SmolLM2 teacher)",
            logging.WARNING)
    stage("cache-teacher", lambda s: cache_teacher(build_config(CacheTeacherConfig, **s), log=quiet))
    runs = root / "runs"
    for name in ("sft", "dskd", "dskd_cot2align"):
        stage(f"distill {name}", lambda s: distill(build_config(DistillConfig, **s), log=quiet, progress=False))
    for name in ("sft", "dskd", "dskd_cot2align"):
        stage(f"evaluate {name}", lambda s: evaluate_model(s["model"], s["data"], s["split"],
                                                           [int(seed) for seed in s["seeds"].split(",")],
                                                           limit=s["limit"], max_new_tokens=s["max_new_tokens"], log=quiet))
    log(f"$ cot2align report {runs}")
    table = report(str(runs), log=quiet)
    log("")
    log(table)
    log("stage times: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()) +
        f"; total {sum(timings.values()):.1f} s")
    (root / "timings.json").write_text(json.dumps(timings, indent=1))
    return table


def _sft(settings: dict) -> dict:
    """`cot2align sft` settings as the DistillConfig the command builds (its defaults, then the flags)."""
    flags = {("student" if k == "model" else k): v for k, v in settings.items()}
    return dict(method="sft", cot2align=False, **sft_defaults(flags["student"], flags))
