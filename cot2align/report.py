"""`cot2align report RUNS_DIR`: a Table-1-style comparison from the `evaluate` outputs under RUNS_DIR.

Each `results.json` found (written by `cot2align evaluate`) gives one cell: the method of its run (from the
run's `run.json`: method, + CoT2Align when on; else the run directory's name) × the dataset, as mean ± std;
greedy evaluations get a column of their own ("<dataset> (greedy)").
Rows whose method includes CoT2Align also show the improvement over the best baseline (the best row without
CoT2Align) on each dataset. Writes RUNS_DIR/report.md and RUNS_DIR/report.png (grouped bars).
"""

from __future__ import annotations

import json
from pathlib import Path


def _method_of(results_file: Path) -> str:
    for parent in results_file.parents:
        marker = parent / "run.json"
        if marker.exists():
            cfg = json.loads(marker.read_text())["config"]
            return f"{cfg['method'].upper() if cfg['method'] != 'sft' else 'SFT'}{' + CoT2Align' if cfg.get('cot2align') else ''}"
    return results_file.parents[2].name if len(results_file.parents) > 2 else results_file.parent.name


def collect(runs_dir: Path) -> dict[str, dict[str, dict]]:
    table: dict[str, dict[str, dict]] = {}
    for results_file in sorted(runs_dir.rglob("results.json")):
        result = json.loads(results_file.read_text())
        if "mean" not in result:
            continue
        dataset = Path(str(result["data"])).name.split(".")[0]
        if result.get("decoding") == "greedy":     # its own column: never mixed with the sampled protocol
            dataset += " (greedy)"
        table.setdefault(_method_of(results_file), {})[dataset] = result
    return table


def report(runs_dir: str, log=print) -> str:
    root = Path(runs_dir)
    table = collect(root)
    if not table:
        from cot2align.config import ConfigError

        raise ConfigError(f"report {runs_dir}: no evaluate results (results.json) found under it")
    datasets = sorted({d for cells in table.values() for d in cells})
    baselines = {m for m in table if "CoT2Align" not in m}
    best = {d: max((table[m][d]["mean"] for m in baselines if d in table[m]), default=None) for d in datasets}
    lines = ["| method | " + " | ".join(datasets) + " |", "|---|" + "---|" * len(datasets)]
    for method in sorted(table, key=lambda m: ("CoT2Align" in m, m)):
        cells = []
        for d in datasets:
            cell = table[method].get(d)
            if cell is None:
                cells.append("—")
                continue
            text = f"{cell['mean']:.2f} ± {cell['std']:.2f}"
            if "CoT2Align" in method and best[d] is not None:
                text += f" ({cell['mean'] - best[d]:+.2f})"
            cells.append(text)
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    note = ("\nROUGE-L (× 100), mean ± std over the evaluated seeds; in parentheses: difference from the best "
            "baseline (a method without CoT2Align) on that dataset.\n")
    markdown = "\n".join(lines) + "\n" + note
    (root / "report.md").write_text(markdown)
    _plot(table, datasets, root / "report.png")
    log(markdown)
    return markdown


def _plot(table: dict, datasets: list[str], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return
    methods = sorted(table, key=lambda m: ("CoT2Align" in m, m))
    width = 0.8 / max(len(methods), 1)
    fig, ax = plt.subplots(figsize=(max(5, 2 * len(datasets)), 4))
    for k, method in enumerate(methods):
        xs = [i + k * width for i in range(len(datasets))]
        means = [table[method].get(d, {}).get("mean", 0.0) for d in datasets]
        stds = [table[method].get(d, {}).get("std", 0.0) for d in datasets]
        ax.bar(xs, means, width, yerr=stds, label=method, capsize=3)
    ax.set_xticks([i + width * (len(methods) - 1) / 2 for i in range(len(datasets))])
    ax.set_xticklabels(datasets)
    ax.set_ylabel("ROUGE-L")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
