"""`cot2align evaluate`'s output directory: one results.json for one evaluation, to which metrics may be added.

results.json describes one model on one set of examples: `model`, `data`, `split`, `n_examples` and `source`
(the data source with its sha256, data/readers.py), plus `model_fingerprint` (of a local model's weight files)
and `examples_sha256` (of the evaluated examples themselves, so a --field-map or a filter that picks other
references from the same file is told apart). `evaluate --metric ce` after `--metric rougeL` adds the CE to the
same file — but only when all of that is the same; results.json naming data B beside a ROUGE-L computed on data
A would be a silent wrong result. Anything else is refused in one line (another --out, or --overwrite).

Every file is written aside (`.<name>.<pid>.tmp`) and renamed into place, under the --out's writer lock
(locks.py), so a kill leaves the previous results.json whole, and the next run removes a dead writer's temporaries.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from cot2align.config import ConfigError
from cot2align.leftovers import remove_dead_temporaries

RESULTS = "results.json"

# a write killed between writing aside and renaming into place (group 1: the writer's pid)
GENERATIONS = re.compile(r"greedy|seed--?\d+")      # the names of the generations files evaluate writes
TEMPORARY = re.compile(r"\.(?:results\.json|(?:greedy|seed--?\d+)\.jsonl)\.(\d+)\.tmp")


def examples_sha256(examples: list[dict]) -> str:
    """The digest of the evaluated examples (ids, prompts' fields, references), as canonical JSON."""
    return hashlib.sha256(json.dumps(examples, sort_keys=True, default=str).encode()).hexdigest()


def write_atomically(path: Path, text: str) -> None:
    """`text` into `path`: whole or not at all, never half a file where a reader looks."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def remove_leftovers(out_dir: Path) -> list[Path]:
    """The write-aside copies of a killed evaluate (call it under the --out's lock)."""
    return remove_dead_temporaries(out_dir, TEMPORARY)


def _short(digest) -> str:
    return f"sha256 {str(digest)[:12]}" if digest else "no digest"


def _differences(earlier: dict, current: dict) -> list[str]:
    """What makes `earlier` (a results.json) another evaluation than `current`: one 'what: stored X, now Y' each."""
    differ = []
    fingerprints = earlier.get("model_fingerprint"), current.get("model_fingerprint")
    if (fingerprints[0] != fingerprints[1]) if all(fingerprints) else (earlier.get("model") != current["model"]):
        differ.append(f"model: stored {earlier.get('model')} ({_short(fingerprints[0])}), now {current['model']} "
                      f"({_short(fingerprints[1])})")
    stored_source = earlier.get("source") if isinstance(earlier.get("source"), dict) else {}
    if stored_source.get("sha256") != current["source"].get("sha256"):
        differ.append(f"data: stored {earlier.get('data')} ({_short(stored_source.get('sha256'))}), now "
                      f"{current['data']} ({_short(current['source'].get('sha256'))})")
    if earlier.get("revision") != current.get("revision"):        # a hub model's commit, branch or tag
        differ.append(f"revision: stored {earlier.get('revision')}, now {current.get('revision')}")
    if earlier.get("prompt_format", "paper") != current.get("prompt_format", "paper"):     # the prompts scored
        differ.append(f"prompt format: stored {earlier.get('prompt_format', 'paper')}, now "
                      f"{current.get('prompt_format', 'paper')}")
    if earlier.get("split") != current["split"]:
        differ.append(f"split: stored {earlier.get('split')}, now {current['split']}")
    if earlier.get("n_examples") != current["n_examples"]:
        differ.append(f"examples (--limit): stored {earlier.get('n_examples')}, now {current['n_examples']}")
    if not differ and "examples_sha256" in earlier and earlier["examples_sha256"] != current["examples_sha256"]:
        differ.append(f"examples: the same data read into other records (another --field-map?): stored "
                      f"{_short(earlier['examples_sha256'])}, now {_short(current['examples_sha256'])}")
    return differ


def read_earlier(out_dir: Path) -> dict | None:
    """The results.json an earlier evaluate left in `out_dir`; None when there is none or it is not one."""
    try:
        earlier = json.loads((out_dir / RESULTS).read_text(encoding="utf-8"))
    except (OSError, ValueError):       # missing, unreadable, not UTF-8, not JSON
        return None
    return earlier if isinstance(earlier, dict) else None


def results_to_extend(out_dir: Path, current: dict, overwrite: bool) -> dict:
    """The earlier results this evaluation adds its metrics to: those in `out_dir`'s results.json when they are
    of the same model, data, split and examples as `current` (the identity fields about to be written); {} when
    there are none, or with `overwrite`. Otherwise a one-line ConfigError naming each difference."""
    path = out_dir / RESULTS
    if overwrite or not path.exists():
        return {}
    earlier = read_earlier(out_dir)
    if earlier is None:
        raise ConfigError(f"--out {out_dir}: {RESULTS} there is not a results file of evaluate (unreadable or not "
                          "a JSON object); use another --out, or --overwrite to replace it")
    differ = _differences(earlier, current)
    if differ:
        raise ConfigError(f"--out {out_dir}: its {RESULTS} is of another evaluation ({'; '.join(differ)}); a metric "
                          "is added only for the same model, data, split and limit: use another --out, or --overwrite "
                          "to replace it")
    return earlier


def remove_stale_generations(out_dir: Path, earlier: dict | None, summary: dict) -> None:
    """The generations file of each decoding run results.json named before and does not name now (a rougeL run
    with other seeds, or one replaced with --overwrite): no file in --out describes results it no longer holds."""
    before = earlier.get("per_run") if earlier and isinstance(earlier.get("per_run"), dict) else {}
    for name in set(before) - set(summary.get("per_run", {})):
        if GENERATIONS.fullmatch(str(name)):       # only names evaluate writes: never a path from the file
            (out_dir / f"{name}.jsonl").unlink(missing_ok=True)
