"""`cot2align report RUNS_DIR`: a Table-1-style comparison from the `evaluate` outputs under RUNS_DIR.

Each `results.json` found (written by `cot2align evaluate`) is one model's evaluation on one dataset. Its row is
the method of its run (from the run's `run.json`: method, + CoT2Align when on; else the run directory's name).

* ROUGE-L: one column per dataset, greedy evaluations in a column of their own ("<dataset> (greedy)"). A cell
  is mean ± std over the evaluated seeds; when several runs share a method (e.g. training seeds), mean ± std
  over the runs' means, and the run count in brackets. Rows whose method includes CoT2Align also show the
  improvement over the best baseline (the best row without CoT2Align).
* Held-out cross-entropy (`evaluate --metric ce`): nats per token of the model's own tokenisation and bits
  per byte (comparable across tokenizers), mean ± std over runs sharing a method.

Writes RUNS_DIR/report.md and RUNS_DIR/report.png (grouped bars).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from cot2align.config import ConfigError
from cot2align.logs import reporter
from cot2align.plotting import pyplot


def _method_of(results_file: Path) -> str:
    """The row label: the method of the run the result belongs to (its run.json), else a directory's name.
    Labels only ever go into the table; no path is built from them."""
    for parent in results_file.parents:
        marker = parent / "run.json"
        if marker.exists():
            try:
                cfg = json.loads(marker.read_text(encoding="utf-8"))["config"]
                method = cfg["method"]
                if not isinstance(method, str):
                    raise TypeError("method is not a string")
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise ConfigError(f"{marker}: not a readable run marker ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:120] if str(e) else ''})") from None
            return f"{method.upper() if method != 'sft' else 'SFT'}{' + CoT2Align' if cfg.get('cot2align') else ''}"
    return results_file.parents[2].name if len(results_file.parents) > 2 else results_file.parent.name


def _read(results_file: Path) -> dict | None:
    try:
        result = json.loads(results_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{results_file}: not a readable evaluate result ({str(e).splitlines()[0]})") from None
    if not isinstance(result, dict) or "data" not in result:
        raise ConfigError(f"{results_file}: not an evaluate result (no 'data' field)")
    numbers = [("mean", result.get("mean")), ("std", result.get("std", 0.0))] if "mean" in result else []
    if "ce" in result:
        ce = result["ce"] if isinstance(result["ce"], dict) else {}
        numbers += [(f"ce.{k}", ce.get(k)) for k in ("nats_per_token", "bits_per_byte")]
    for name, value in numbers:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ConfigError(f"{results_file}: field '{name}' must be a number, got {type(value).__name__}")
    return result


def _summary(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def collect(runs_dir: Path) -> tuple[dict, dict]:
    """({method: {column: (mean, std, n_runs)}} for ROUGE-L, {method: {dataset: {nats, bpb: (mean, std), n}}} for CE)."""
    rouge: dict[str, dict[str, list[dict]]] = {}
    ce: dict[str, dict[str, list[dict]]] = {}
    for results_file in sorted(runs_dir.rglob("results.json")):
        result = _read(results_file)
        dataset = Path(str(result["data"])).name.split(".")[0]
        method = _method_of(results_file)
        if "mean" in result:
            column = dataset + (" (greedy)" if result.get("decoding") == "greedy" else "")   # never mixed with sampling
            rouge.setdefault(method, {}).setdefault(column, []).append(result)
        if "ce" in result:
            ce.setdefault(method, {}).setdefault(dataset, []).append(result["ce"])
    rouge_cells = {m: {c: ((rs[0]["mean"], rs[0]["std"], 1) if len(rs) == 1 else (*_summary([r["mean"] for r in rs]), len(rs)))
                       for c, rs in cols.items()} for m, cols in rouge.items()}
    ce_cells = {m: {d: {"nats": _summary([c["nats_per_token"] for c in cs]), "bpb": _summary([c["bits_per_byte"] for c in cs]),
                        "n": len(cs)} for d, cs in cols.items()} for m, cols in ce.items()}
    return rouge_cells, ce_cells


def _order(methods) -> list[str]:
    return sorted(methods, key=lambda m: ("CoT2Align" in m, m))


def rouge_table(table: dict) -> list[str]:
    columns = sorted({c for cells in table.values() for c in cells})
    baselines = {m for m in table if "CoT2Align" not in m}
    best = {c: max((table[m][c][0] for m in baselines if c in table[m]), default=None) for c in columns}
    lines = ["| method | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for method in _order(table):
        cells = []
        for c in columns:
            if c not in table[method]:
                cells.append("—")
                continue
            mean, std, runs = table[method][c]
            text = f"{mean:.2f} ± {std:.2f}" + (f" [{runs} runs]" if runs > 1 else "")
            if "CoT2Align" in method and best[c] is not None:
                text += f" ({mean - best[c]:+.2f})"
            cells.append(text)
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += ["", "ROUGE-L (× 100), mean ± std over the evaluated seeds (over runs when a method has several); in "
              "parentheses: difference from the best baseline (a method without CoT2Align) on that column."]
    return lines


def ce_table(table: dict) -> list[str]:
    datasets = sorted({d for cells in table.values() for d in cells})
    header = " | ".join(f"{d} nats/token | {d} bits/byte" for d in datasets)
    lines = [f"| method | {header} |", "|---|" + "---|---|" * len(datasets)]
    for method in _order(table):
        cells = []
        for d in datasets:
            cell = table[method].get(d)
            if cell is None:
                cells += ["—", "—"]
                continue
            runs = f" [{cell['n']} runs]" if cell["n"] > 1 else ""
            cells += [f"{cell['nats'][0]:.3f} ± {cell['nats'][1]:.3f}{runs}", f"{cell['bpb'][0]:.4f} ± {cell['bpb'][1]:.4f}"]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += ["", "Held-out cross-entropy of the reference responses (teacher-forced; lower is better): nats per "
              "token of each model's own tokenisation, and bits per UTF-8 byte (comparable across tokenizers); ± "
              "over runs sharing a method."]
    return lines


def report(runs_dir: str, log=None) -> str:
    """report.md and report.png under `runs_dir`; the Markdown is returned and logged (or passed to `log`)."""
    root = Path(runs_dir)
    rouge, ce = collect(root)
    if not rouge and not ce:
        raise ConfigError(f"report {runs_dir}: no evaluate results (results.json) found under it")
    lines: list[str] = []
    if rouge:
        lines += rouge_table(rouge)
    if ce:
        lines += ([""] if lines else []) + ce_table(ce)
    markdown = "\n".join(lines) + "\n"
    (root / "report.md").write_text(markdown)
    _plot(rouge, ce, root / "report.png")
    reporter(log, __name__)(markdown)
    return markdown


def _plot(rouge: dict, ce: dict, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    panels = [(name, table, key) for name, table, key in (("ROUGE-L", rouge, None), ("bits/byte (lower is better)", ce, "bpb"))
              if table]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, (label, table, key) in zip(axes[0], panels):
        columns = sorted({c for cells in table.values() for c in cells})
        methods = _order(table)
        width = 0.8 / max(len(methods), 1)
        for k, method in enumerate(methods):
            xs = [i + k * width for i in range(len(columns))]
            cells = [table[method].get(c) for c in columns]
            means = [(cell[key][0] if key else cell[0]) if cell else 0.0 for cell in cells]
            stds = [(cell[key][1] if key else cell[1]) if cell else 0.0 for cell in cells]
            # scores are >= 0: an error bar stops at 0 rather than drawing below the axis
            below = [min(std, mean) for mean, std in zip(means, stds)]
            ax.bar(xs, means, width, yerr=[below, stds], label=method, capsize=3)
        ax.set_xticks([i + width * (len(methods) - 1) / 2 for i in range(len(columns))])
        ax.set_xticklabels(columns, fontsize=8)
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
    # one legend for all panels, beside them, never over the bars
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
