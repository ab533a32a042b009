"""Data through Hugging Face `datasets`: Parquet and CSV files, globs, save_to_disk directories (Dataset and
DatasetDict), Dataset objects in the API and the config path, field maps on each, hub ids with the hub
unreachable (one line naming the id), and bad rows as one-line errors naming the source, the row and the field."""

import json
import time

import datasets
import pandas as pd
import pytest
from click.testing import CliRunner

from cot2align.cli import main
from cot2align.config import CacheTeacherConfig, DistillConfig, build_config, config_to_dict, data_name
from cot2align.data import DataError, load_records
from cot2align.data.hf import is_hub_id

ROWS = [{"q": "What is 2+2?", "a": "4", "why": "Add two and two."},
        {"q": "Name a colour.", "a": "NA", "why": None},              # 'NA' is text, not a missing value
        {"q": "Say hello.", "a": "Hello.", "why": "Greet."}]
FIELDS = {"instruction": "q", "output": "a"}
EXPECTED = [{"instruction": "What is 2+2?", "input": "", "output": "4"},
            {"instruction": "Name a colour.", "input": "", "output": "NA"},
            {"instruction": "Say hello.", "input": "", "output": "Hello."}]


def _plain(records):
    return [{k: r[k] for k in ("instruction", "input", "output")} for r in records]


def _one_line(call, pattern):
    with pytest.raises(DataError, match=pattern) as err:
        call()
    assert "\n" not in str(err.value)
    return str(err.value)


def test_parquet_and_csv_with_a_field_map_give_the_same_records_and_fingerprint(tmp_path):
    frame = pd.DataFrame(ROWS)
    frame.to_parquet(tmp_path / "qa.parquet")
    frame.to_csv(tmp_path / "qa.csv", index=False)
    parquet, p_source = load_records(str(tmp_path / "qa.parquet"), field_map=FIELDS)
    csv, c_source = load_records(str(tmp_path / "qa.csv"), field_map=FIELDS)
    assert _plain(parquet) == _plain(csv) == EXPECTED
    assert [r["id"] for r in parquet] == ["qa-1", "qa-2", "qa-3"]
    assert p_source["format"] == "parquet" and c_source["format"] == "csv" and p_source["path"].endswith("qa.parquet")
    # the fingerprint is the records': the same rows in another format or a second load give the same sha256
    assert p_source["sha256"] == c_source["sha256"] == load_records(str(tmp_path / "qa.parquet"), field_map=FIELDS)[1]["sha256"]
    # a glob of shards of one format
    frame.iloc[:2].to_parquet(tmp_path / "part-0.parquet")
    frame.iloc[2:].to_parquet(tmp_path / "part-1.parquet")
    shards, _ = load_records(str(tmp_path / "part-*.parquet"), field_map=FIELDS)
    assert _plain(shards) == EXPECTED


def test_rationale_columns_give_the_cot_view(tmp_path):
    pd.DataFrame([{"instruction": "a", "output": "b", "rationale": "because"},
                  {"instruction": "c", "output": "d", "rationale": None}]).to_parquet(tmp_path / "cot.parquet")
    records, _ = load_records(str(tmp_path / "cot.parquet"))
    assert records[0]["cot_output"] == "because\nTherefore, the answer is: b" and "rationale" not in records[1]


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    train = datasets.Dataset.from_list([dict(r, id=f"t{i}") for i, r in enumerate(ROWS)])
    dev = datasets.Dataset.from_list([{"q": "Dev question?", "a": "Dev answer."}])
    train.save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict(train=train, validation=dev).save_to_disk(str(tmp_path / "dict"))

    one, source = load_records(str(tmp_path / "one"), "test", field_map=FIELDS)    # one Dataset: read whole
    assert _plain(one) == EXPECTED and [r["id"] for r in one] == ["t0", "t1", "t2"]
    assert source["format"] == "save_to_disk" and len(source["sha256"]) == 64
    records, source = load_records(str(tmp_path / "dict"), "dev", field_map=FIELDS)   # dev -> validation
    assert _plain(records) == [{"instruction": "Dev question?", "input": "", "output": "Dev answer."}]
    assert source["data_split"] == "validation"
    assert _plain(load_records(str(tmp_path / "dict"), "test", field_map=FIELDS, data_split="train")[0]) == EXPECTED
    _one_line(lambda: load_records(str(tmp_path / "dict"), "test", field_map=FIELDS),
              r"dict: no split 'test' \(splits: train, validation\); name one with --data-split")
    _one_line(lambda: load_records(str(tmp_path / "one"), data_split="validation"), r"one: holds one Dataset")


def test_a_dataset_object_in_the_api_and_the_config_path(tmp_path):
    ds = datasets.Dataset.from_list(ROWS)
    records, source = load_records(ds, field_map=FIELDS)
    assert _plain(records) == EXPECTED and source["dataset"].startswith("datasets.Dataset(rows=3")
    assert load_records(datasets.Dataset.from_list(ROWS), field_map=FIELDS)[1]["sha256"] == source["sha256"]
    picked, picked_source = load_records(datasets.DatasetDict(train=ds, test=ds.select([0])), "test", field_map=FIELDS)
    assert _plain(picked) == EXPECTED[:1] and picked_source["data_split"] == "test"

    cfg = build_config(DistillConfig, method="sft", cot2align=False, data=ds, field_map=FIELDS, student="tiny-gpt2")
    assert cfg.data is ds and isinstance(config_to_dict(cfg)["data"], str) and data_name(ds) == "dataset"
    cfg = build_config(CacheTeacherConfig, model="tiny-qwen2", data=ds, field_map=FIELDS, out=str(tmp_path / "c"),
                       topk=4, batch_tokens=1024)
    from cot2align.cache import open_cache
    from cot2align.teacher.cache_pass import cache_teacher

    cache_teacher(cfg, log=lambda m: None)
    manifest = open_cache(tmp_path / "c").manifest
    assert manifest["data"]["sha256"] == source["sha256"] and manifest["data"]["n_examples"] == 3
    assert manifest["data"]["dataset"] == source["dataset"]
    from cot2align.cache.inspect import cache_info, format_info

    assert source["dataset"] in format_info(cache_info(str(tmp_path / "c")))      # `cache info` names the source


def test_sft_trains_from_a_dataset_object(tmp_path):
    from cot2align.train.distill import distill

    ds = datasets.Dataset.from_list(ROWS * 2)
    ds = ds.add_column("id", [str(i) for i in range(len(ds))])
    summary = distill(build_config(DistillConfig, method="sft", data=ds, field_map=FIELDS, student="tiny-gpt2",
                                   out=str(tmp_path / "run"), max_steps=1, batch_size=2, val_examples=0),
                      log=lambda m: None, progress=False)
    assert summary["steps"] == 1
    assert "datasets.Dataset(rows=6" in (tmp_path / "run" / "config.yaml").read_text()


def test_bad_rows_are_one_line_naming_the_source_the_row_and_the_field(tmp_path):
    pd.DataFrame([{"instruction": "a", "output": 2}, {"instruction": "c", "output": 3}]).to_parquet(tmp_path / "n.parquet")
    _one_line(lambda: load_records(str(tmp_path / "n.parquet")), r"n\.parquet: row 1: field 'output' must be a string")
    (tmp_path / "e.csv").write_text("instruction,output\nok,fine\n,missing instruction\n")
    _one_line(lambda: load_records(str(tmp_path / "e.csv")), r"e\.csv: row 2: field 'instruction' is empty")
    _one_line(lambda: load_records(str(tmp_path / "e.csv"), field_map={"output": "answer"}),
              r"e\.csv: row 1: record has no 'answer' field")
    (tmp_path / "bad.parquet").write_text("not parquet")
    _one_line(lambda: load_records(str(tmp_path / "bad.parquet")), r"bad\.parquet: not a readable parquet file")
    (tmp_path / "empty.csv").write_text("")
    _one_line(lambda: load_records(str(tmp_path / "empty.csv")), r"empty\.csv: no header line")
    _one_line(lambda: load_records(str(tmp_path / "none-*.parquet")), r"no file matches")


def test_a_hub_id_with_the_hub_unreachable_is_one_line_naming_it():
    assert is_hub_id("databricks/databricks-dolly-15k") and not is_hub_id("data/dolly/train.jsonl")
    assert not is_hub_id("./dolly") and not is_hub_id("dolly.json") and not is_hub_id("dolly")
    started = time.perf_counter()
    message = _one_line(lambda: load_records("databricks/databricks-dolly-15k", data_config="default", data_split="train"),
                        r"--data databricks/databricks-dolly-15k: .*the hub dataset 'databricks/databricks-dolly-15k' "
                        r"could not be loaded")
    assert "HF_HUB_OFFLINE" in message and time.perf_counter() - started < 10     # no network retries


def test_the_cli_reads_parquet_and_names_an_unreachable_hub_id(tmp_path):
    pd.DataFrame(ROWS).to_parquet(tmp_path / "qa.parquet")
    runner = CliRunner()
    result = runner.invoke(main, ["cache-teacher", "--model", "tiny-qwen2", "--data", str(tmp_path / "qa.parquet"),
                                  "--field-map", "instruction=q", "--field-map", "output=a", "--topk", "4",
                                  "--batch-tokens", "1024", "--out", str(tmp_path / "cache")])
    assert result.exit_code == 0, result.output + result.stderr
    manifest = json.loads((tmp_path / "cache" / "zarr.json").read_text())["attributes"]
    assert manifest["data"]["format"] == "parquet" and manifest["data"]["n_examples"] == 3
    for command in (["cache-teacher", "--model", "tiny-qwen2"], ["sft", "--model", "tiny-gpt2", "--out", str(tmp_path / "r")],
                    ["augment-cot", "--model", "tiny-qwen2", "--out", str(tmp_path / "a.jsonl")],
                    ["evaluate", "--model", "tiny-gpt2"]):
        result = runner.invoke(main, [*command, "--data", "databricks/databricks-dolly-15k", "--data-split", "train"])
        errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert result.exit_code == 2 and len(errors) == 1, (command, result.stderr)
        assert "hub dataset 'databricks/databricks-dolly-15k' could not be loaded" in errors[0]
