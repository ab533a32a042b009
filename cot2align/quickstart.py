"""`cot2align quickstart`: the whole pipeline on the shipped sample, with a teacher and a student that use
different real tokenizers (default: tiny-qwen2 teacher, Qwen2.5 tokenizer; tiny-gpt2 student, GPT-2
tokenizer; both random-initialised, so the scores only show that the pipeline runs). Each stage prints the
command that does the same thing, so a user can rerun any stage on their own models:

    sft (teacher) -> augment-cot -> cache-teacher -> distill (sft, dskd, dskd + cot2align) -> evaluate -> report

Sizes are cut to run in a few minutes on 2 CPU cores: `limit` training records, 1 epoch, short generations,
2 evaluation seeds on 20 test examples.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from cot2align.config import CacheTeacherConfig, DistillConfig, build_config
from cot2align.data.augment import AugmentConfig, augment_cot
from cot2align.eval import evaluate_model, report
from cot2align.logs import reporter
from cot2align.teacher.cache_pass import cache_teacher
from cot2align.train.distill import distill


def run_quickstart(out: str, teacher: str = "tiny-qwen2", student: str = "tiny-gpt2", limit: int = 100, log=None) -> str:
    log = reporter(log, __name__)

    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    quiet = lambda message: None  # noqa: E731  (stages' own chatter stays out of the walkthrough)

    def stage(name: str, command: str, fn):
        log(f"$ {command}")
        started = time.perf_counter()
        result = fn()
        timings[name] = time.perf_counter() - started
        log(f"  ({timings[name]:.1f} s)")
        return result

    teacher_dir, cot_file, cache_dir, runs = root / "teacher", root / "data" / "cot.jsonl", root / "cache", root / "runs"
    common_train = dict(epochs=1, batch_size=4, val_examples=4, val_max_new_tokens=16, overwrite=True)
    teacher_lr = 1e-3 if teacher.startswith("tiny-") else 2e-5       # a real pretrained teacher gets a gentle lr
    stage("sft teacher", f"cot2align sft --model {teacher} --data sample --limit {limit} --epochs 1 --lr {teacher_lr} "
                         f"--out {teacher_dir}",
          lambda: distill(build_config(DistillConfig, student=teacher, method="sft", cot2align=False, data="sample",
                                       limit=limit, lr=teacher_lr, alpha=0.0, out=str(teacher_dir), **common_train),
                          log=quiet, progress=False))
    kept = stage("augment-cot", f"cot2align augment-cot --model {teacher_dir} --data sample --limit {limit} "
                                f"--max-new-tokens 48 --out {cot_file}",
                 lambda: augment_cot(AugmentConfig(model=str(teacher_dir), data="sample", limit=limit, max_new_tokens=48,
                                                   out=str(cot_file), batch_size=32), log=quiet))
    log(f"  {kept.get('kept', 0)} rationales kept, degenerate: {kept.get('degenerate') or 'none'}")
    stage("cache-teacher", f"cot2align cache-teacher --model {teacher_dir} --data {cot_file} --out {cache_dir}",
          lambda: cache_teacher(build_config(CacheTeacherConfig, model=str(teacher_dir), data=str(cot_file),
                                             out=str(cache_dir), topk=16), log=quiet))
    variants = {"sft": dict(method="sft", cot2align=False), "dskd": dict(method="dskd", cot2align=False),
                "dskd_cot2align": dict(method="dskd", cot2align=True)}
    for name, variant in variants.items():
        flag = "--cot2align" if variant["cot2align"] else "--no-cot2align"
        stage(f"distill {name}", f"cot2align distill --cache {cache_dir} --student {student} --method {variant['method']} "
                                 f"{flag} --alpha 0.5 --epochs 1 --out {runs / name}",
              lambda variant=variant, name=name: distill(build_config(
                  DistillConfig, cache=str(cache_dir), student=student, alpha=0.5, out=str(runs / name), lr=1e-3,
                  **variant, **common_train), log=quiet, progress=False))
    for name in variants:
        stage(f"evaluate {name}", f"cot2align evaluate --model {runs / name} --data sample --split test --limit 20 "
                                  "--seeds 10,20 --max-new-tokens 32",
              lambda name=name: evaluate_model(str(runs / name), "sample", "test", [10, 20], limit=20, max_new_tokens=32,
                                               log=quiet))
    table = stage("report", f"cot2align report {runs}", lambda: report(str(runs), log=quiet))
    log("")
    log(table)
    log("stage times: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()) +
        f"; total {sum(timings.values()):.1f} s")
    (root / "timings.json").write_text(json.dumps(timings, indent=1))
    return table
