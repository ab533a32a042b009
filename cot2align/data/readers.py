"""Where records come from: the dataset aliases (Dolly, Alpaca, S-NI, DialogSum, the shipped sample), any
JSON/JSONL file, and — through cot2align.data.hf — Parquet, CSV, save_to_disk directories, hub ids and `datasets`
objects (`load_records` dispatches on the source). What a raw row becomes is data/records.py's.

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
import zlib
from importlib import resources
from pathlib import Path

from cot2align.data import hf       # `datasets` itself is imported there only when a source needs it
from cot2align.data.records import check_field_map, checked_records, normalise_record
from cot2align.errors import DataError  # noqa: F401  (re-exported: raised here)


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


# Decompression failures of a truncated or damaged .gz (BadGzipFile is an OSError: caught first).
_GZIP_ERRORS = (EOFError, gzip.BadGzipFile, zlib.error)
_UTF8_BOM = b"\xef\xbb\xbf"
# What makes `--data` a file path rather than a dataset alias (the readers never send a path to the hub).
DATA_SUFFIXES = (".json", ".jsonl", ".gz", ".parquet", ".csv")


def looks_like_path(name: str, suffixes: tuple[str, ...] = DATA_SUFFIXES) -> bool:
    """A name the user meant as a local path: it has a path separator or a file suffix."""
    return "/" in name or os.sep in name or name.lower().endswith(suffixes)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_readable_file(path: Path) -> None:
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if path.is_dir():
        raise DataError(f"{path}: is a directory; expected a .json, .jsonl, .jsonl.gz, .parquet or .csv file, or a "
                        "directory written by Dataset.save_to_disk")


def _binary_lines(path: Path):
    """(line number, byte offset of the line, raw bytes) of a file, decompressed when it is a .gz.

    A truncated or damaged .gz raises DataError naming the last good line (gzip itself raises EOFError or
    zlib.error, which would otherwise end the CLI with a bare traceback or click's 'Aborted!')."""
    opener = gzip.open if path.suffix == ".gz" else open
    lineno, offset = 0, 0
    try:
        with opener(path, "rb") as f:
            for raw in f:
                lineno += 1
                yield lineno, offset, raw
                offset += len(raw)
    except _GZIP_ERRORS as e:
        raise DataError(f"{path}: truncated or corrupt gzip data after line {lineno} ({e})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror or e})") from None


def _decode(raw: bytes, path: Path, lineno: int, offset: int) -> str:
    """UTF-8 text of one line (a leading byte-order mark dropped); bad bytes name the line and byte offset."""
    if lineno == 1 and raw.startswith(_UTF8_BOM):
        raw, offset = raw[len(_UTF8_BOM):], offset + len(_UTF8_BOM)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        compressed = " of the uncompressed data" if path.suffix == ".gz" else ""
        raise DataError(f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[e.start]:02x} at byte offset "
                        f"{offset + e.start}{compressed})") from None


def _parse_json(text: str, path: Path, lineno: int | None = None):
    """json.loads, with every way it can fail turned into a one-line DataError: malformed text, nesting deeper
    than the interpreter's recursion limit, an integer of more digits than int() accepts. `lineno`: the line of
    a JSONL file the text is (None: the text is a whole file)."""
    where = f"{path}:{lineno}" if lineno is not None else str(path)
    what = "malformed JSON line" if lineno is not None else "malformed JSON"
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        if lineno is None:
            raise DataError(f"{path}:{e.lineno}: {what} ({e.msg} at column {e.colno})") from None
        raise DataError(f"{where}: {what} ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise DataError(f"{where}: {what} (nested too deeply)") from None
    except ValueError as e:
        raise DataError(f"{where}: {what} ({str(e).splitlines()[0][:120]})") from None


def _read_json_array(path: Path) -> list[tuple[int, dict]]:
    """A .json file holding one array of record objects: [(record number, object)]."""
    text = "".join(_decode(raw, path, lineno, offset) for lineno, offset, raw in _binary_lines(path))
    records = _parse_json(text, path)
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON array of records, got {type(records).__name__}")
    for number, obj in enumerate(records, start=1):
        if not isinstance(obj, dict):
            raise DataError(f"{path}: record {number} of the array is not a JSON object (got {type(obj).__name__})")
    return list(enumerate(records, start=1))


def read_json_records(path: str | Path) -> list[tuple[int, dict]]:
    """Read a .jsonl / .jsonl.gz / .json (array) file as [(line_number, object)] (for an array: record number).

    Blank lines are skipped; everything else must be a JSON object per line, in UTF-8."""
    path = Path(path)
    _check_readable_file(path)
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    if name.endswith(".json"):
        return _read_json_array(path)
    rows: list[tuple[int, dict]] = []
    for lineno, offset, raw in _binary_lines(path):
        line = _decode(raw, path, lineno, offset)
        if not line.strip():
            continue
        obj = _parse_json(line.rstrip("\r\n"), path, lineno)
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        rows.append((lineno, obj))
    return rows


def read_file(path: str | Path, field_map: dict | None = None) -> list[dict]:
    """Read any supported file into records; ids default to `<file stem>-<line>`."""
    path = Path(path)
    field_map = check_field_map(field_map)
    stem = path.name.split(".")[0]
    records = []
    for lineno, raw in read_json_records(path):
        records.append(normalise_record(raw, f"{path}:{lineno}", f"{stem}-{lineno}", field_map))
    return checked_records(records, str(path))


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


def load_records(data, split: str = "train", data_root: str | Path | None = None,
                 field_map: dict | None = None, apply_filters: bool = True, *, data_config: str | None = None,
                 data_split: str | None = None) -> tuple[list[dict], dict]:
    """Load records of `data` and its provenance. `data` is one of

    - an alias (dolly, alpaca, sni, dialogsum: local files under the data root, else the hub; or sample);
    - a JSON / JSONL / .jsonl.gz file (cot2align's own reader: errors name the line);
    - a Parquet or CSV file, or a glob of data files of one format (`datasets.load_dataset(<format>, data_files=...)`);
    - a directory written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`, or a directory of data files;
    - a hub dataset id `owner/name` (`data_config`: its configuration; `data_split`: its split);
    - a `datasets.Dataset` or `DatasetDict` object (Python API).

    A DatasetDict (or a hub dataset) is read at `data_split`, else at the split `split` means (train; dev:
    validation, dev, valid or val; test). Returns (records, source) where source = {"name", "split", "path" or
    "hub" or "dataset", "sha256", ...}; see cot2align.data.hf for the sha256 of each kind of source.
    """
    if split not in SPLITS:
        raise DataError(f"--split: expected one of {', '.join(SPLITS)}, got {split!r}")
    if hf.is_dataset_object(data):
        return hf.object_records(data, split, data_split, field_map)
    data = str(data)
    if data in DATASETS or data == "sample":
        return _alias_records(data, split, data_root, apply_filters)
    path = Path(data)
    if path.is_dir() and (hf.is_saved_dataset(path) or hf.has_data_files(path)):
        return hf.directory_records(path, split, data_config, data_split, field_map)
    if (hf.is_glob(data) and not path.exists()) or (path.is_file() and path.suffix.lower() in (".parquet", ".csv")):
        return hf.file_records(data, split, data_split, field_map)
    if not path.exists():
        if hf.is_hub_id(data):
            return hf.hub_records(data, split, data_config, data_split, field_map)
        if looks_like_path(data):    # a mistyped path: say so, rather than list the aliases
            raise DataError(f"--data {data}: file not found")
        known = ", ".join(sorted(DATASETS) + ["sample"])
        raise DataError(f"--data {data}: no such file, and not a known dataset alias ({known})")
    records = read_file(path, field_map)
    return records, {"name": path.name.split(".")[0], "split": split, "path": str(path), "sha256": file_sha256(path)}


def _alias_records(data: str, split: str, data_root, apply_filters: bool) -> tuple[list[dict], dict]:
    """One of the paper's datasets (or the shipped sample): the local file of the split, else the hub."""
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


def group_references(records: list[dict]) -> list[dict]:
    """Merge records that share their prompt (instruction, input, and a conversation's turns) into one with all
    outputs as `references`.

    The authors' DialogSum test file flattens 500 dialogues x 3 summaries into 1,500 records;
    evaluation takes the max ROUGE-L over the references of each dialogue.
    """
    grouped: dict[tuple[str, str, str], dict] = {}
    for r in records:
        key = (r["instruction"], r["input"], json.dumps(r.get("messages"), ensure_ascii=False))
        refs = r.get("references") or [r["output"]]
        if key in grouped:
            grouped[key]["references"].extend(x for x in refs if x not in grouped[key]["references"])
        else:
            grouped[key] = {**r, "references": list(refs)}
    return list(grouped.values())
