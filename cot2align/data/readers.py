"""Dataset readers: Dolly, Alpaca, S-NI, DialogSum, the shipped sample, and any JSON/JSONL file.

Every reader returns a list of plain dict records

    {"id", "instruction", "input", "output"}            (+ "rationale", "cot_output" after augment-cot)
                                                         (+ "references" when a test set has several)

A local file always wins over the hub: `--data dolly` looks for the split under the data root
(`--data-root`, `$COT2ALIGN_DATA_ROOT`, or ./data) in the layout of the authors' processed files,
then falls back to the hub id. Bad input raises `DataError` with one line naming the file, the line
and the field.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
from importlib import resources
from pathlib import Path

from cot2align.data.templates import cot_output as make_cot_output

DIALOGSUM_INSTRUCTION = "Generate a summary of the dialogue, focusing specifically on the provided topic: {topic}."


class DataError(ValueError):
    """A one-line, user-facing problem with the input data."""


# --------------------------------------------------------------------------------------------
# Dataset aliases: where each split lives locally (relative to the data root) and on the hub.
# --------------------------------------------------------------------------------------------

DATASETS: dict[str, dict] = {
    "dolly": {
        "hub": "databricks/databricks-dolly-15k",
        "local": {
            "train": ["dolly/cot2align/train.jsonl", "dolly/train.jsonl"],
            "dev": ["dolly/cot2align/dev.jsonl", "dolly/dev.jsonl"],
            "test": ["dolly/cot2align/valid.jsonl", "dolly/test.jsonl"],
        },
    },
    "alpaca": {
        "hub": "tatsu-lab/alpaca",
        "local": {
            "train": ["alpaca/cot2align/train.jsonl", "alpaca/train.jsonl"],
            "dev": ["alpaca/cot2align/dev.jsonl", "alpaca/dev.jsonl"],
            "test": ["alpaca/cot2align/test.jsonl", "alpaca/test.jsonl"],
        },
    },
    "sni": {
        "hub": "yizhongw/self_instruct:super_natural_instructions",
        "local": {
            "train": ["super-natural-instructions/cot2align/train.jsonl", "sni/train.jsonl"],
            "dev": ["super-natural-instructions/cot2align/dev.jsonl", "sni/dev.jsonl"],
            "test": ["super-natural-instructions/cot2align/test.jsonl", "sni/test.jsonl"],
        },
    },
    "dialogsum": {
        "hub": "knkarthick/dialogsum",
        "local": {
            "train": [
                "dialogsum/cot2align/train.jsonl",
                "dialogsum/dialogsum.train.jsonl",
                "dialogsum/dialogsum.train.from_zip_2021-05-26.jsonl",
            ],
            "dev": ["dialogsum/cot2align/dev.jsonl", "dialogsum/dialogsum.dev.jsonl"],
            "test": ["dialogsum/cot2align/test.jsonl", "dialogsum/dialogsum.test.jsonl"],
        },
    },
}

# Table 5 of the paper: (train, dev, test) sizes, used when a split is carved from one source.
PAPER_SPLITS = {
    "dolly": (11435, 1000, 500),
    "alpaca": (10396, 500, 500),
    "sni": (10414, 500, 1902),
    "dialogsum": (12460, 500, 1500),
}
SPLIT_SEED = 42
SPLITS = ("train", "dev", "test")


def default_data_root() -> Path:
    return Path(os.environ.get("COT2ALIGN_DATA_ROOT", "data"))


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def _open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return path.open("r", encoding="utf-8")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_json_records(path: str | Path) -> list[tuple[int, dict]]:
    """Read a .jsonl / .jsonl.gz / .json (array) file as [(line_number, object)]."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    rows: list[tuple[int, dict]] = []
    with _open_text(path) as f:
        if name.endswith(".json"):
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
            if not isinstance(data, list):
                raise DataError(f"{path}: expected a JSON array of records, got {type(data).__name__}")
            return [(i + 1, obj) for i, obj in enumerate(data)]
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON line ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            rows.append((lineno, obj))
    return rows


def _as_text(value, where: str, field: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{field}' must be a string, got {type(value).__name__}")
    return value


def _dialogsum_record(raw: dict, where: str, default_id: str) -> tuple[dict, list[str] | None]:
    """DialogSum's own release: topic (test: topic1) in the instruction, the dialogue as input, up to three
    summaries (the first is the output; all are references)."""
    topic = raw.get("topic") or raw.get("topic1") or ""
    summaries = [raw[k] for k in ("summary", "summary1", "summary2", "summary3") if raw.get(k)]
    if not summaries:
        raise DataError(f"{where}: DialogSum record has no 'summary' field")
    record = {"id": str(raw.get("fname") or raw.get("id") or default_id),
              "instruction": DIALOGSUM_INSTRUCTION.format(topic=topic),
              "input": _as_text(raw["dialogue"], where, "dialogue"), "output": summaries[0]}
    return record, (summaries if len(summaries) > 1 else None)


def _generic_record(raw: dict, where: str, default_id: str, field_map: dict | None) -> tuple[dict, list[str] | None]:
    """instruction / input / output (names mapped by field_map), optional references."""
    fm = {"id": "id", "instruction": "instruction", "input": "input", "output": "output", **(field_map or {})}
    for ours in ("instruction", "output"):
        if fm[ours] not in raw:
            raise DataError(f"{where}: record has no '{fm[ours]}' field (fields: {', '.join(sorted(raw))})")
    record = {"id": str(raw.get(fm["id"], raw.get("fname", default_id))),
              "instruction": _as_text(raw[fm["instruction"]], where, fm["instruction"]),
              "input": _as_text(raw.get(fm["input"]), where, fm["input"]),
              "output": _as_text(raw[fm["output"]], where, fm["output"])}
    references = [str(r) for r in raw["references"]] if isinstance(raw.get("references"), list) else None
    return record, references


def normalise_record(raw: dict, where: str, default_id: str, field_map: dict | None = None) -> dict:
    """Map one raw object (authors' jsonl, DialogSum, Dolly hub, generic) to a record dict.

    `where` is "file:line" for error messages; `field_map` maps our field names to the file's
    (e.g. {"output": "answer"}).
    """
    references = None
    if field_map is None and "dialogue" in raw:  # DialogSum original release
        record, references = _dialogsum_record(raw, where, default_id)
    elif field_map is None and "response" in raw and "output" not in raw:  # Dolly hub schema
        record = {
            "id": str(raw.get("id", default_id)),
            "instruction": _as_text(raw.get("instruction"), where, "instruction"),
            "input": _as_text(raw.get("context"), where, "context"),
            "output": _as_text(raw["response"], where, "response"),
        }
    else:
        record, references = _generic_record(raw, where, default_id, field_map)
    if not record["output"].strip():
        raise DataError(f"{where}: field 'output' is empty (a response is needed for every record)")
    if not record["instruction"].strip():
        raise DataError(f"{where}: field 'instruction' is empty")
    rationale = raw.get("rationale")
    if rationale is not None:
        record["rationale"] = _as_text(rationale, where, "rationale")
        record["cot_output"] = raw.get("cot_output") or make_cot_output(record["rationale"], record["output"])
    elif raw.get("cot_output"):
        record["cot_output"] = _as_text(raw["cot_output"], where, "cot_output")
    if references:
        record["references"] = references
    return record


def read_file(path: str | Path, field_map: dict | None = None) -> list[dict]:
    """Read any supported file into records; ids default to `<file stem>-<line>`."""
    path = Path(path)
    stem = path.name.split(".")[0]
    records = []
    for lineno, raw in read_json_records(path):
        records.append(normalise_record(raw, f"{path}:{lineno}", f"{stem}-{lineno}", field_map))
    if not records:
        raise DataError(f"{path}: no records")
    seen: dict[str, int] = {}
    for i, r in enumerate(records):
        if r["id"] in seen:
            raise DataError(f"{path}: duplicate record id {r['id']!r} (records {seen[r['id']] + 1} and {i + 1})")
        seen[r["id"]] = i
    return records


# --------------------------------------------------------------------------------------------
# Paper filters and splits
# --------------------------------------------------------------------------------------------


def paper_filter(name: str, split: str, records: list[dict]) -> list[dict]:
    """The paper's response-length filters: Alpaca >= 11 words; S-NI train >= 6, test >= 11."""
    min_words = {("alpaca", "train"): 11, ("alpaca", "dev"): 11, ("alpaca", "test"): 11,
                 ("sni", "train"): 6, ("sni", "test"): 11}.get((name, split), 0)
    return [r for r in records if len(r["output"].split()) >= min_words]


def carve_split(name: str, records: list[dict], split: str, seed: int = SPLIT_SEED) -> list[dict]:
    """Carve one split of Table 5 out of a single pool: shuffle with `seed`, then test, dev, train."""
    n_train, n_dev, n_test = PAPER_SPLITS[name]
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    test, dev, train = order[:n_test], order[n_test:n_test + n_dev], order[n_test + n_dev:n_test + n_dev + n_train]
    return [records[i] for i in {"train": train, "dev": dev, "test": test}[split]]


def _hub_records(name: str, split: str) -> list[dict]:
    hub = DATASETS[name]["hub"]
    repo, _, config = hub.partition(":")
    import datasets  # lazy: only when a hub load is really attempted

    ds = datasets.load_dataset(repo, config or None)
    if name == "dialogsum":
        hub_split = {"train": "train", "dev": "validation", "test": "test"}[split]
        rows = ds[hub_split]
        return [normalise_record(dict(r), f"{hub}[{hub_split}]:{i + 1}", f"{name}-{split}-{i}") for i, r in enumerate(rows)]
    pool_split = "train" if "train" in ds else next(iter(ds))
    rows = ds[pool_split]
    recs = []
    for i, r in enumerate(rows):
        r = dict(r)
        if name == "sni":  # prompt/completion schema
            r = {"instruction": r.get("prompt", ""), "input": "", "output": r.get("completion", "")}
        r.setdefault("id", f"{name}-{i}")
        recs.append(normalise_record(r, f"{hub}:{i + 1}", f"{name}-{i}"))
    recs = paper_filter(name, split, recs)
    return carve_split(name, recs, split)


def sample_dir() -> Path:
    return Path(str(resources.files("cot2align").joinpath("assets/sample")))


def resolve_data_file(data: str, split: str, data_root: str | Path | None = None) -> Path | None:
    """The local file that holds `split` of alias `data`, or None."""
    if data == "sample":
        return sample_dir() / f"{split}.jsonl"
    root = Path(data_root) if data_root is not None else default_data_root()
    for rel in DATASETS[data]["local"][split]:
        for candidate in (root / rel, root / (rel + ".gz")):
            if candidate.exists():
                return candidate
    return None


def load_records(data: str, split: str = "train", data_root: str | Path | None = None,
                 field_map: dict | None = None, apply_filters: bool = True) -> tuple[list[dict], dict]:
    """Load records of `data` (alias, 'sample', or a file path) and its provenance.

    Returns (records, source) where source = {"name", "split", "path" or "hub", "sha256"}.
    """
    if split not in SPLITS:
        raise DataError(f"--split: expected one of {', '.join(SPLITS)}, got {split!r}")
    if data in DATASETS or data == "sample":
        path = resolve_data_file(data, split, data_root)
        if path is not None:
            records = read_file(path)
            if apply_filters and data != "sample":
                records = paper_filter(data, split, records)
            return records, {"name": data, "split": split, "path": str(path), "sha256": file_sha256(path)}
        try:
            records = _hub_records(data, split)
        except Exception as e:  # offline, missing package, unknown split...
            root = Path(data_root) if data_root is not None else default_data_root()
            looked = ", ".join(str(root / rel) for rel in DATASETS[data]["local"][split])
            raise DataError(
                f"--data {data}: split '{split}' not found locally (looked at {looked}) and the hub "
                f"dataset {DATASETS[data]['hub']} could not be loaded ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
            ) from None
        blob = json.dumps(records, sort_keys=True).encode()
        return records, {"name": data, "split": split, "hub": DATASETS[data]["hub"], "sha256": hashlib.sha256(blob).hexdigest()}
    path = Path(data)
    if not path.exists():
        known = ", ".join(sorted(DATASETS) + ["sample"])
        raise DataError(f"--data {data}: no such file, and not a known dataset alias ({known})")
    records = read_file(path, field_map)
    return records, {"name": path.name.split(".")[0], "split": split, "path": str(path), "sha256": file_sha256(path)}


def group_references(records: list[dict]) -> list[dict]:
    """Merge records that share (instruction, input) into one with all outputs as `references`.

    The authors' DialogSum test file flattens 500 dialogues x 3 summaries into 1,500 records;
    evaluation takes the max ROUGE-L over the references of each dialogue.
    """
    grouped: dict[tuple[str, str], dict] = {}
    for r in records:
        key = (r["instruction"], r["input"])
        refs = r.get("references") or [r["output"]]
        if key in grouped:
            grouped[key]["references"].extend(x for x in refs if x not in grouped[key]["references"])
        else:
            grouped[key] = {**r, "references": list(refs)}
    return list(grouped.values())
