"""Readers on slices of the real dataset files, the paper's templates, filters, splits, errors."""

import gzip
import json
from pathlib import Path

import pytest

from cot2align.data import DataError, group_references, load_records, read_file
from cot2align.data.readers import PAPER_SPLITS, carve_split, paper_filter
from cot2align.data.templates import cot_output, cot_prompt, load_templates, standard_prompt

FIXTURES = Path(__file__).parent / "fixtures" / "data"

# README 'The pipeline with real models' / paper Figure 3, written out here independently of assets/templates.yaml.
STD_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
             "Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
             "### Input:\n{input}\n\n### Response:\n")
STD_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
                "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
COT_INPUT = ("Below is an instruction that describes a task. Write a response with reasoning step by step that "
             "appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n"
             "### Response:\nLet's think step by step.\n")
COT_NO_INPUT = ("Below is an instruction that describes a task. Write a response with reasoning step by step that "
                "appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
                "### Response:\nLet's think step by step.\n")


def test_templates_are_the_papers_verbatim():
    t = load_templates()
    assert t["standard"]["with_input"] == STD_INPUT
    assert t["standard"]["no_input"] == STD_NO_INPUT
    assert t["cot"]["with_input"] == COT_INPUT
    assert t["cot"]["no_input"] == COT_NO_INPUT
    assert t["cot_answer_separator"] == "\nTherefore, the answer is: "
    assert cot_prompt("Do {x}.", "a {b}") == COT_INPUT.replace("{instruction}", "Do {x}.").replace("{input}", "a {b}")
    assert cot_output("Because.", "42") == "Because.\nTherefore, the answer is: 42"


@pytest.mark.parametrize("rel", ["dolly/cot2align/dev.jsonl", "dolly/cot2align/valid.jsonl", "alpaca/cot2align/dev.jsonl",
                                 "super-natural-instructions/cot2align/dev.jsonl", "dialogsum/cot2align/dev.jsonl"])
def test_standard_prompt_is_byte_identical_to_the_authors_files(rel):
    """The `prompt` field of the authors' processed files is the standard template applied."""
    raw = [json.loads(line) for line in (FIXTURES / rel).read_text().splitlines()]
    records = read_file(FIXTURES / rel)
    assert len(records) == len(raw)
    for r, original in zip(records, raw):
        assert standard_prompt(r["instruction"], r["input"]).encode() == original["prompt"].encode()


def test_alias_readers_on_local_files():
    root = FIXTURES
    dolly, src = load_records("dolly", "dev", data_root=root)
    assert len(dolly) == 12 and src["path"].endswith("dolly/cot2align/dev.jsonl") and len(src["sha256"]) == 64
    assert any(r["input"] == "" for r in dolly) and all(r["output"] for r in dolly)
    test, _ = load_records("dolly", "test", data_root=root)
    assert test[0]["instruction"] == json.loads((root / "dolly/cot2align/valid.jsonl").read_text().splitlines()[0])["instruction"]
    alpaca, _ = load_records("alpaca", "test", data_root=root)
    assert all(len(r["output"].split()) >= 11 for r in alpaca)
    sni_test, _ = load_records("sni", "test", data_root=root)  # .jsonl.gz
    raw_sni = [json.loads(x) for x in gzip.open(root / "super-natural-instructions/cot2align/test.jsonl.gz", "rt")]
    assert len(sni_test) == sum(len(r["output"].split()) >= 11 for r in raw_sni)
    ds_train, _ = load_records("dialogsum", "train", data_root=root)  # original release, gzipped
    assert len(ds_train) == 24 and ds_train[0]["id"] == "train_0"
    assert ds_train[0]["instruction"].startswith("Generate a summary of the dialogue, focusing specifically on the provided topic: ")
    assert ds_train[0]["input"].startswith("#Person1#:")


def test_dialogsum_original_test_has_three_references(tmp_path):
    recs = read_file(FIXTURES / "dialogsum/dialogsum.test.jsonl")
    assert all(len(r["references"]) == 3 and r["output"] == r["references"][0] for r in recs)
    flat, _ = load_records("dialogsum", "test", data_root=FIXTURES)  # authors' flattened version
    grouped = group_references(flat)
    assert len(grouped) < len(flat) and all(len(g["references"]) >= 1 for g in grouped)
    assert sum(len(g["references"]) for g in grouped) <= len(flat)


def test_sample_dataset_ships_in_the_package():
    train, src = load_records("sample", "train")
    assert len(train) == 300 and len({r["id"] for r in train}) == 300
    test, _ = load_records("sample", "test")
    assert all(len(r["references"]) == 3 for r in test)


def test_generic_jsonl_with_field_map_and_json_array(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text('{"q": "What is 2+2?", "a": "4", "rationale": "Add."}\n\n{"q": "Name a colour.", "a": "Red"}\n')
    recs = read_file(path, {"instruction": "q", "output": "a"})
    assert recs[0] == {"id": "qa-1", "instruction": "What is 2+2?", "input": "", "output": "4", "rationale": "Add.",
                       "cot_output": "Add.\nTherefore, the answer is: 4"}
    assert recs[1]["id"] == "qa-3"
    arr = tmp_path / "data.json"
    arr.write_text(json.dumps([{"instruction": "Hi", "output": "Hello"}]))
    assert read_file(arr)[0]["output"] == "Hello"


@pytest.mark.parametrize("content, message", [
    ('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": \n', r"bad\.jsonl:2: malformed JSON line"),
    ('{"instruction": "a"}\n', r"bad\.jsonl:1: record has no 'output' field"),
    ('{"instruction": "a", "output": "   "}\n', r"bad\.jsonl:1: field 'output' is empty"),
    ('{"instruction": "a", "output": 3}\n', r"bad\.jsonl:1: field 'output' must be a string"),
    ('[1, 2]\n', r"bad\.jsonl:1: expected a JSON object"),
    ('{"id": "x", "instruction": "a", "output": "b"}\n{"id": "x", "instruction": "a", "output": "b"}\n',
     r"duplicate record id 'x'"),
])
def test_bad_input_is_one_line_naming_file_and_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=message) as err:
        read_file(path)
    assert "\n" not in str(err.value)


def test_missing_file_and_unknown_alias(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: file not found"):     # a path: no list of aliases
        load_records(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match="no such file, and not a known dataset alias"):
        load_records("dolyl")
    with pytest.raises(DataError, match=r"split 'train' not found locally"):
        load_records("alpaca", "train", data_root=tmp_path)  # no local file, hub unreachable in tests
    with pytest.raises(DataError, match="--split"):
        load_records("sample", "validation")


def test_paper_filters_and_splits():
    recs = [{"id": str(i), "instruction": "x", "input": "", "output": " ".join(["w"] * (i % 15))} for i in range(5000)]
    assert all(len(r["output"].split()) >= 11 for r in paper_filter("alpaca", "train", recs))
    assert all(len(r["output"].split()) >= 6 for r in paper_filter("sni", "train", recs))
    assert len(paper_filter("dolly", "train", recs)) == 5000
    pool = [{"id": str(i)} for i in range(13000)]
    test, dev, train = (carve_split("dolly", pool, s) for s in ("test", "dev", "train"))
    assert (len(train), len(dev), len(test)) == PAPER_SPLITS["dolly"]
    ids = [r["id"] for r in test + dev + train]
    assert len(set(ids)) == len(ids)
    assert carve_split("dolly", pool, "test") == test  # fixed seed
