"""`cot2align sweep`: the cross product students × methods × α from one cache, opened once and never written.

Each run goes to DIR/<student>_<method>[_cot2align]_a<alpha>/; the results (best validation ROUGE-L, final
validation cross-entropy, steps) land in DIR/results.md and DIR/results.csv, with a plot of validation ROUGE-L
against α per method (DIR/rougeL_vs_alpha.png).
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
from pathlib import Path

from cot2align.cache import open_cache
from cot2align.config import DistillConfig, build_config, model_family
from cot2align.families import teacher_family
from cot2align.logs import reporter
from cot2align.plotting import pyplot
from cot2align.train.distill import distill


def sweep(cache_path: str, students: list[str | None], methods: list[str], alphas: list[float], out: str,
          config_file: str | None = None, log=None, **flags) -> list[dict]:
    """Every (student, method, alpha) run from one cache into out/<family>_<method>[_cot2align]_a<alpha>, then
    results.md/.csv and a plot. `resume=True` continues a sweep that was stopped: finished runs are kept as they
    are, an interrupted one continues from its last checkpoint, the rest start."""
    say = reporter(log, __name__)
    cache = open_cache(cache_path)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    resume = flags.pop("resume", None)
    rows = []
    for student, method, alpha in itertools.product(students, methods, alphas):
        request = build_config(DistillConfig, config_file, cache=cache_path, student=student, method=method,
                               alpha=alpha, **flags)
        teacher = cache.manifest["teacher"]
        named = request.with_defaults(teacher_family(teacher), teacher["name_or_path"])     # for the run's name
        run_out = str(out_dir / f"{model_family(named.student)}_{method}{'_cot2align' if named.cot2align else ''}_a{alpha}")
        # --resume (flag or YAML): runs that finished are kept, an interrupted one continues from its checkpoint,
        # the ones not yet started start
        asked = bool(resume if resume is not None else request.resume)
        cfg = dataclasses.replace(request, out=run_out, resume=asked and Path(run_out).exists())
        say(f"sweep: {named.student} {method}{' + CoT2Align' if named.cot2align else ''} alpha={alpha} -> {run_out}")
        summary = distill(cfg, log=log, cache=cache)
        final = summary["history"][-1] if summary["history"] else {}
        rows.append({"student": named.student, "method": method, "cot2align": named.cot2align, "alpha": alpha,
                     "best_val_rougeL": summary["best_val_rougeL"], "final_val_ce": final.get("val_ce"),
                     "steps": summary["steps"], "out": run_out})
    _write_tables(rows, out_dir)
    _plot(rows, out_dir)
    return rows


def _fmt(value) -> str:
    return "" if value is None else (f"{value:.4f}" if isinstance(value, float) else str(value))


def _write_tables(rows: list[dict], out_dir: Path) -> None:
    columns = list(rows[0]) if rows else []
    with (out_dir / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in columns) + " |" for r in rows]
    (out_dir / "results.md").write_text("\n".join(lines) + "\n")


def _plot(rows: list[dict], out_dir: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for (student, method), group in itertools.groupby(sorted(rows, key=lambda r: (r["student"], r["method"], r["alpha"])),
                                                      key=lambda r: (r["student"], r["method"])):
        group = [g for g in group if g["best_val_rougeL"] is not None]
        if group:
            ax.plot([g["alpha"] for g in group], [g["best_val_rougeL"] for g in group], marker="o", label=f"{student} {method}")
    ax.set_xlabel("alpha")
    ax.set_ylabel("validation ROUGE-L")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "rougeL_vs_alpha.png", dpi=100)
    plt.close(fig)
