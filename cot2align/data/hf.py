"""Records through Hugging Face `datasets`: hub ids, `save_to_disk` directories, Parquet/CSV files (and globs of
data files), and `datasets.Dataset` / `DatasetDict` objects passed to the Python API.

Every row goes through the same normalisation as a JSONL line (`records.normalise_record`: field map, the Dolly
and DialogSum schemas, CoT fields, one-line `DataError` naming the source, the row and the field), so the
records carry the same fields whatever the source.

Provenance: the source dict names the kind of source (`path` + `format`, `hub` + `data_config`, or `dataset`),
the split of the dataset that was read (`data_split`), and `sha256` — for every source read through `datasets`
the sha256 of the normalised records (canonical JSON), so the same rows give the same fingerprint whatever the
file layout, shard count or cache directory `datasets` used; a JSON/JSONL file read by cot2align's own reader
keeps the sha256 of the file's bytes.
"""

from __future__ import annotations

import csv
import glob as globlib
import hashlib
import json
import os
from pathlib import Path

from cot2align.data.records import check_field_map, checked_records, normalise_record
from cot2align.errors import DataError

# Which split of a dataset `--split` reads when `--data-split` does not name one.
SPLIT_NAMES = {"train": ("train",), "dev": ("validation", "dev", "valid", "val"), "test": ("test",)}
# Files read through `datasets.load_dataset(<format>, data_files=...)`.
FORMATS = {".parquet": "parquet", ".csv": "csv", ".json": "json", ".jsonl": "json", ".arrow": "arrow"}
_HUB_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


def is_dataset_object(obj) -> bool:
    """A `datasets.Dataset` / `DatasetDict` (or their iterable kinds), without importing `datasets`."""
    return type(obj).__module__.split(".")[0] == "datasets" and hasattr(obj, "column_names")


def is_hub_id(name: str) -> bool:
    """`owner/name` as the hub spells dataset ids: one '/', no path-like start, no data-file suffix, and an owner
    that is not a local directory (then the name is a mistyped path)."""
    owner, _, repo = name.partition("/")
    return (bool(owner) and bool(repo) and "/" not in repo and set(name) - {"/"} <= _HUB_CHARS
            and not name.startswith((".", "-")) and not name.lower().endswith(tuple(FORMATS) + (".gz",))
            and not Path(owner).is_dir())


def is_glob(name: str) -> bool:
    return any(c in name for c in "*?[")


def records_sha256(records: list[dict]) -> str:
    return hashlib.sha256(json.dumps(records, sort_keys=True).encode()).hexdigest()


def describe(obj) -> str:
    """A `datasets` object in a config or a manifest: its kind, rows and a hash of its content."""
    splits = {name: obj[name] for name in obj} if hasattr(obj, "keys") else {"": obj}
    h = hashlib.sha256()
    rows = 0
    for name, part in splits.items():
        h.update(name.encode())
        for row in part:
            h.update(json.dumps(row, sort_keys=True, default=str).encode())
            rows += 1
    return f"datasets.{type(obj).__name__}(rows={rows}, sha256={h.hexdigest()[:16]})"


def _datasets():
    import datasets  # lazy: a base dependency, but heavy to import

    return datasets


def _cause(error: BaseException, innermost: bool = True) -> str:
    """An error's message in one line: by default its innermost cause's (`datasets` wraps a reader's error in
    DatasetGenerationError)."""
    while innermost and (error.__cause__ is not None or error.__context__ is not None):
        error = error.__cause__ or error.__context__
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200] if text else ''}"


def pick_split(loaded, split: str, data_split: str | None, where: str):
    """(dataset, split name) of a DatasetDict: --data-split when given, else the split that --split means
    (train; dev -> validation, dev, valid, val; test). A single Dataset is read whole, like a file."""
    if not hasattr(loaded, "keys"):
        return loaded, data_split
    names = list(loaded.keys())
    wanted = (data_split,) if data_split is not None else SPLIT_NAMES[split]
    for name in wanted:
        if name in loaded:
            return loaded[name], name
    hint = "" if data_split is not None else "; name one with --data-split"
    raise DataError(f"{where}: no split {' or '.join(map(repr, wanted))} (splits: {', '.join(names) or 'none'}){hint}")


def dataset_records(ds, where: str, stem: str, field_map: dict | None = None) -> list[dict]:
    """Normalise every row of a Dataset; errors name `where`, the row (1-based) and the field."""
    field_map = check_field_map(field_map)
    records = [normalise_record(dict(row), f"{where}: row {i}", f"{stem}-{i}", field_map)
               for i, row in enumerate(ds, start=1)]
    return checked_records(records, where)


def object_records(obj, split: str, data_split: str | None, field_map: dict | None):
    """A Dataset / DatasetDict passed to the API."""
    label = f"<{type(obj).__name__}>"
    ds, chosen = pick_split(obj, split, data_split, label)
    name = getattr(getattr(ds, "info", None), "dataset_name", None) or "dataset"
    records = dataset_records(ds, label, name, field_map)
    source = {"name": name, "split": split, "dataset": describe(ds), "data_split": chosen,
              "sha256": records_sha256(records)}
    return records, source


def is_saved_dataset(path: Path) -> bool:
    """A directory written by Dataset.save_to_disk or DatasetDict.save_to_disk."""
    return (path / "dataset_dict.json").is_file() or ((path / "state.json").is_file()
                                                      and (path / "dataset_info.json").is_file())


def has_data_files(path: Path) -> bool:
    return any(p.suffix in FORMATS for p in path.rglob("*") if p.is_file())


def directory_records(path: Path, split: str, data_config: str | None, data_split: str | None,
                      field_map: dict | None):
    """A save_to_disk directory (load_from_disk), or a directory of data files such as a local clone of a hub
    dataset repository (load_dataset(DIR), its splits from the file names)."""
    datasets = _datasets()
    saved = is_saved_dataset(path)
    try:
        loaded = datasets.load_from_disk(str(path)) if saved else datasets.load_dataset(str(path), data_config)
    except Exception as e:  # noqa: BLE001 — any reader failure is the user's data: one line
        raise DataError(f"{path}: not a readable {'save_to_disk' if saved else 'dataset'} directory ({_cause(e)})") from None
    if saved and data_split is not None and not hasattr(loaded, "keys"):
        raise DataError(f"{path}: holds one Dataset (no splits); drop --data-split {data_split}")
    ds, chosen = pick_split(loaded, split, data_split, str(path))
    where = str(path) + (f"[{chosen}]" if chosen else "")
    records = dataset_records(ds, where, path.name, field_map)
    source = {"name": path.name, "split": split, "path": str(path), "format": "save_to_disk" if saved else "directory",
              "data_split": chosen, "sha256": records_sha256(records)}
    return records, source


def _csv_features(first_file: str):
    """Every CSV column as text: the file is text, and pandas would read '42' as a number and 'NA' as missing."""
    datasets = _datasets()
    try:
        with open(first_file, newline="", encoding="utf-8") as f:
            header = next(csv.reader(f), [])
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{first_file}: not a readable CSV file ({type(e).__name__}: {e})") from None
    if not header:
        raise DataError(f"{first_file}: no header line (the first line names the columns)")
    return datasets.Features({name: datasets.Value("string") for name in header})


def file_records(data: str, split: str, data_split: str | None, field_map: dict | None):
    """Parquet / CSV files, or a glob of data files of one format: load_dataset(<format>, data_files=...)."""
    files = sorted(globlib.glob(data)) if is_glob(data) else [data]
    if not files:
        raise DataError(f"--data {data}: no file matches")
    formats = {FORMATS.get(os.path.splitext(f)[1].lower()) for f in files}
    if len(formats) != 1 or None in formats:
        raise DataError(f"--data {data}: expected files of one format ({', '.join(sorted(FORMATS))}), got "
                        f"{', '.join(sorted(os.path.basename(f) for f in files[:5]))}")
    fmt = formats.pop()
    kwargs = {"features": _csv_features(files[0]), "keep_default_na": False} if fmt == "csv" else {}
    try:
        ds = _datasets().load_dataset(fmt, data_files=files, split=data_split or "train", **kwargs)
    except Exception as e:  # noqa: BLE001 — any reader failure is the user's data: one line
        raise DataError(f"{data}: not a readable {fmt} file ({_cause(e)})") from None
    stem = Path(files[0]).name.split(".")[0] if len(files) == 1 else "data"
    records = dataset_records(ds, data, stem, field_map)
    source = {"name": stem, "split": split, "path": data, "format": fmt, "data_split": data_split,
              "sha256": records_sha256(records)}
    return records, source


def hub_records(repo: str, split: str, data_config: str | None, data_split: str | None, field_map: dict | None):
    """A dataset id on the Hugging Face hub (`owner/name`), with its configuration and split."""
    datasets = _datasets()
    try:
        loaded = datasets.load_dataset(repo, data_config, split=data_split)
    except (ConnectionError, FileNotFoundError) as e:      # offline, unreachable, no such dataset (or gated)
        offline = " — HF_HUB_OFFLINE is set" if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") else ""
        raise DataError(f"--data {repo}: not a local path (file not found), and the hub dataset '{repo}' could not "
                        f"be loaded ({_cause(e, innermost=False)}){offline}") from None
    except Exception as e:  # noqa: BLE001 — a bad config or split name: one line
        raise DataError(f"--data {repo}: the hub dataset could not be loaded ({_cause(e, innermost=False)})") from None
    ds, chosen = pick_split(loaded, split, data_split, f"--data {repo}")
    records = dataset_records(ds, f"{repo}[{chosen}]", repo.split("/")[-1], field_map)
    source = {"name": repo, "split": split, "hub": repo, "data_config": data_config, "data_split": chosen,
              "sha256": records_sha256(records)}
    return records, source
