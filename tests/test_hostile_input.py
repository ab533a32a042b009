"""Hostile and malformed input: every bad file, record or path gives a record or a one-line user error naming the
file, line and field — never a traceback, a hang, a hub retry or a changed user file."""

import gzip
import hashlib
import json
import time

import pytest
from click.testing import CliRunner

from cot2align.cli import main
from cot2align.config import ConfigError
from cot2align.data import DataError, load_records, read_file
from cot2align.data.augment import finished_ids
from cot2align.data.templates import cot_prompt, standard_prompt

GOOD = {"instruction": "Say hi.", "output": "Hi."}


def _jsonl(tmp_path, *lines, name="bad.jsonl") -> str:
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


def _one_line_error(call, match, error=DataError):
    with pytest.raises(error, match=match) as err:
        call()
    assert "\n" not in str(err.value), str(err.value)
    return str(err.value)


# ----------------------------------------------------------------------------- records: each case one bad line


BAD_RECORDS = [
    # (second line of the file, expected message after "bad.jsonl:2: ")
    ('{"instruction": "a", "output": ', r"malformed JSON line \(Expecting value at column"),
    ('{"instruction": "a"}', r"record has no 'output' field \(fields: 'instruction'\)"),
    ('{"output": "a"}', r"record has no 'instruction' field"),
    ('{"instruction": "a", "output": 3}', r"field 'output' must be a string, got int"),
    ('{"instruction": "a", "output": ["b", "c"]}', r"field 'output' must be a string, got list"),
    ('{"instruction": {"x": 1}, "output": "b"}', r"field 'instruction' must be a string, got dict"),
    ('{"instruction": "a", "input": false, "output": "b"}', r"field 'input' must be a string, got bool"),
    ('{"instruction": "a", "output": NaN}', r"field 'output' must be a string, got float"),
    ('{"instruction": "a", "output": ""}', r"field 'output' is empty"),
    ('{"instruction": "a", "output": " \\n\\t "}', r"field 'output' is empty"),
    ('{"instruction": "   ", "output": "b"}', r"field 'instruction' is empty"),
    ('{"id": ["x"], "instruction": "a", "output": "b"}', r"field 'id' \(the record id\) must be a string or an integer"),
    ('{"instruction": "a", "output": "b", "references": "c"}', r"field 'references' must be a list of strings"),
    ('{"instruction": "a", "output": "b", "references": ["c", 4]}', r"field 'references' must be a string, got int"),
    ('{"instruction": "a", "output": "b", "rationale": 7}', r"field 'rationale' must be a string, got int"),
    ('{"instruction": "a", "output": "b", "rationale": "r", "cot_output": 1}', r"field 'cot_output' must be a string"),
    ('{"instruction": "a", "output": "\\ud800"}', r"field 'output' holds an unpaired surrogate \(\\ud800 at character 0\)"),
    ('{"dialogue": "#P1#: hi", "summary": 5}', r"field 'summary' must be a string, got int"),
    ('{"dialogue": "#P1#: hi", "summary": "s", "topic": ["t"]}', r"field 'topic' must be a string, got list"),
    ('{"response": 1, "instruction": "a"}', r"field 'response' must be a string, got int"),
    ('["instruction", "output"]', r"expected a JSON object, got list"),
    ('"just a string"', r"expected a JSON object, got str"),
    ("[" * 100_000 + "]" * 100_000, r"malformed JSON line \(nested too deeply\)"),     # RecursionError in json
    ('{"instruction": "a", "output": "b", "n": ' + "1" * 5000 + "}", r"malformed JSON line \(Exceeds the limit"),
    ('{"instruction\\n": "a"}', r"record has no 'instruction' field \(fields: 'instruction\\n'\)"),  # escaped key
]


@pytest.mark.parametrize("line, message", BAD_RECORDS, ids=range(len(BAD_RECORDS)))
def test_a_bad_record_is_one_line_naming_file_line_and_field(tmp_path, line, message):
    path = _jsonl(tmp_path, json.dumps(GOOD), line)
    _one_line_error(lambda: read_file(path), r"bad\.jsonl:2: " + message)


def test_odd_but_valid_records_are_read(tmp_path):
    """Control characters, NUL, braces and template placeholders are text; an integer id is its digits; an
    empty or whitespace rationale is no rationale (augment-cot writes degenerate ones as null: no CoT view)."""
    odd = "a\x00b\x01c\x1f\u2028{input}{instruction}\\1 😀"
    path = _jsonl(tmp_path, json.dumps({"id": 7, "instruction": odd, "input": odd, "output": odd}),
                  json.dumps({"instruction": "a", "output": "b", "rationale": "  "}),
                  json.dumps({"instruction": "a", "output": "b", "rationale": None, "cot_output": None}),
                  json.dumps({"id": None, "instruction": "a", "output": "b", "rationale": "why", "cot_output": ""}))
    first, blank, null, derived = read_file(path)
    assert first["id"] == "7" and first["output"] == odd
    assert "cot_output" not in blank and "rationale" not in blank and "cot_output" not in null
    assert derived["id"] == "bad-4" and derived["cot_output"] == "why\nTherefore, the answer is: b"
    # the placeholders inside the instruction are not filled: the template is filled in one pass
    prompt = standard_prompt(first["instruction"], first["input"])
    assert prompt.count(odd) == 2 and prompt.count("{input}") == 2
    assert cot_prompt(first["instruction"], "").count(odd) == 1


def test_bad_bytes_name_the_file_line_and_byte_offset(tmp_path):
    path = tmp_path / "latin1.jsonl"
    first = (json.dumps(GOOD) + "\n").encode()
    data = first + b'{"instruction": "caf\xe9", "output": "b"}\n'
    path.write_bytes(data)
    _one_line_error(lambda: read_file(path), rf"latin1\.jsonl:2: not UTF-8 text \(byte 0xe9 at byte offset {data.index(0xe9)}\)")
    array = tmp_path / "latin1.json"
    data = b'[\n{"instruction": "a", "output": "b"},\n{"instruction": "\xff", "output": "b"}]'
    array.write_bytes(data)
    _one_line_error(lambda: read_file(array), rf"latin1\.json:3: not UTF-8 text \(byte 0xff at byte offset {data.index(0xff)}\)")
    bom = tmp_path / "bom.jsonl"                      # a UTF-8 byte-order mark (Windows editors) is not an error
    bom.write_bytes(b"\xef\xbb\xbf" + first)
    assert read_file(bom)[0]["output"] == "Hi."


def test_json_array_files(tmp_path):
    cases = [("[1, 2]", r"record 1 of the array is not a JSON object \(got int\)"),
             ('{"instruction": "a", "output": "b"}', r"expected a JSON array of records, got dict"),
             ('[{"instruction": "a", "output": "b"},\n{"instruction": "a", "output": }]', r"t\.json:2: malformed JSON"),
             ("", r"t\.json:1: malformed JSON \(Expecting value")]
    for text, message in cases:
        (tmp_path / "t.json").write_text(text)
        _one_line_error(lambda: read_file(tmp_path / "t.json"), message)


def test_a_10mb_line_reads_quickly_or_fails_clearly(tmp_path):
    big = "x" * (10 << 20)
    path = _jsonl(tmp_path, json.dumps({"instruction": "a", "output": big}))
    started = time.perf_counter()
    assert read_file(path)[0]["output"] == big
    broken = _jsonl(tmp_path, '{"instruction": "a", "output": "' + big, name="broken.jsonl")   # never closed
    _one_line_error(lambda: read_file(broken), r"broken\.jsonl:1: malformed JSON line \(Unterminated string")
    assert time.perf_counter() - started < 10


def test_paths_that_are_not_data_files(tmp_path):
    started = time.perf_counter()
    _one_line_error(lambda: load_records(str(tmp_path)), rf"{tmp_path}: is a directory; expected a \.json")
    for typo in (str(tmp_path / "nope.jsonl"), "data/dolly/train.jsonl", "./dolly", "dolly.json", "a/b"):
        _one_line_error(lambda: load_records(typo), r"file not found")           # a path: no hub, no alias list
    _one_line_error(lambda: load_records("dolyl"), r"--data dolyl: no such file, and not a known dataset alias "
                                                   r"\(alpaca, dialogsum, dolly, sni, sample\)")
    _one_line_error(lambda: load_records(_jsonl(tmp_path, "", "  ", name="empty.jsonl")), r"empty\.jsonl: no records")
    _one_line_error(lambda: read_file(_jsonl(tmp_path, json.dumps(GOOD)), field_map=["output"]), r"field_map: expected a mapping")
    _one_line_error(lambda: read_file(_jsonl(tmp_path, json.dumps(GOOD)), field_map={"output": 3}), r"field_map: 'output'")
    assert time.perf_counter() - started < 5


def test_truncated_and_corrupt_gzip(tmp_path):
    whole = gzip.compress(("\n".join(json.dumps({**GOOD, "id": str(i)}) for i in range(2000)) + "\n").encode())
    (tmp_path / "cut.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    _one_line_error(lambda: read_file(tmp_path / "cut.jsonl.gz"), r"cut\.jsonl\.gz: truncated or corrupt gzip data after line \d+")
    (tmp_path / "noise.jsonl.gz").write_bytes(b"\x1f\x8b\x08\x00" + bytes(range(256)) * 4)
    _one_line_error(lambda: read_file(tmp_path / "noise.jsonl.gz"), r"noise\.jsonl\.gz: truncated or corrupt gzip data")
    (tmp_path / "plain.jsonl.gz").write_text(json.dumps(GOOD))                  # not gzip at all
    _one_line_error(lambda: read_file(tmp_path / "plain.jsonl.gz"), r"plain\.jsonl\.gz: truncated or corrupt gzip data after line 0")


def test_cli_reports_bad_data_in_one_line_not_aborted(tmp_path):
    """`Aborted!` was all a truncated .gz printed: click turns an EOFError into that."""
    whole = gzip.compress(("\n".join(json.dumps({**GOOD, "id": str(i)}) for i in range(2000)) + "\n").encode())
    (tmp_path / "cut.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    for data in (str(tmp_path / "cut.jsonl.gz"), str(tmp_path), str(tmp_path / "missing.jsonl")):
        result = CliRunner().invoke(main, ["cache-teacher", "--model", "tiny-gpt2", "--data", data,
                                           "--out", str(tmp_path / "cache")])
        assert result.exit_code == 2, result.output
        assert result.output.startswith("error: ") and result.output.count("\n") == 1 and "Aborted" not in result.output


# ----------------------------------------------------------------------------- model paths: no hub for a typo


@pytest.mark.parametrize("name", ["./runs/mdl", "../mdl", "/no/such/model", "runs/x/y", "model.safetensors",
                                  "LOCALDIR/typo"])
def test_a_mistyped_local_model_path_fails_at_once(tmp_path, monkeypatch, name):
    from cot2align.modeling import load_model, load_tokenizer

    monkeypatch.chdir(tmp_path)
    (tmp_path / "LOCALDIR").mkdir()                 # LOCALDIR/typo looks like a hub id, but LOCALDIR is right here
    started = time.perf_counter()
    for load in (load_model, load_tokenizer):
        _one_line_error(lambda: load(name), rf"model {name}: no such local path \(taken as a path, not a hub id",
                        ConfigError)
    assert time.perf_counter() - started < 2          # no network retries


def test_a_hub_id_that_cannot_load_is_one_line(tmp_path):
    from cot2align.modeling import load_tokenizer

    _one_line_error(lambda: load_tokenizer("no-such-owner-x/no-such-model"), r"not a local path, and the hub could "
                    r"not provide it", ConfigError)          # HF_HUB_OFFLINE=1 in the tests


def test_adapters_must_be_safetensors_and_their_config_readable(tmp_path):
    from cot2align.modeling import load_model, load_tokenizer

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{not json")
    _one_line_error(lambda: load_tokenizer(str(adapter)), r"adapter_config\.json: not a readable adapter config", ConfigError)
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": ["tiny-gpt2"]}))
    _one_line_error(lambda: load_model(str(adapter)), r"no base_model_name_or_path", ConfigError)
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "tiny-gpt2"}))
    (adapter / "adapter_model.bin").write_bytes(b"a pickle")
    _one_line_error(lambda: load_model(str(adapter)), r"no adapter_model\.safetensors \(only safetensors adapters",
                    ConfigError)


# ----------------------------------------------------------------------------- augment-cot --out: only its own file


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _ours(i: int) -> str:
    return json.dumps({"id": f"r{i}", "instruction": "a", "input": "", "output": "b", "rationale": "why",
                       "cot_output": "why\nTherefore, the answer is: b"})


@pytest.mark.parametrize("content", [
    (json.dumps(GOOD) + "\n") * 3,                                       # a user's dataset, newline-terminated
    (json.dumps(GOOD) + "\n") * 2 + json.dumps(GOOD),                    # ... whose last line has no newline
    _ours(1) + "\n" + json.dumps(GOOD) + "\n" + _ours(2) + "\n",       # an augment file with a foreign record
    _ours(1) + "\nnot json\n" + _ours(2) + "\n",                        # ... or a broken line inside it
    "col1,col2\n1,2",                                                     # not JSON at all
    '{"id": "x", "rationale": 1, "cot_output": 2}\n'.replace('"x"', "7"),   # an id that is not a string
])
def test_augment_refuses_a_file_it_did_not_write_and_leaves_it_unchanged(tmp_path, content):
    out = tmp_path / "mine.jsonl"
    out.write_text(content)
    before = _sha(out)
    _one_line_error(lambda: finished_ids(out), r"--out .*mine\.jsonl:\d+: .*this file was not written by augment-cot",
                    ConfigError)
    assert _sha(out) == before


def test_augment_cot_cli_refuses_a_users_jsonl_before_loading_a_model(tmp_path):
    out = tmp_path / "train.jsonl"
    out.write_text((json.dumps(GOOD) + "\n") * 2 + json.dumps(GOOD))       # the user's data, no final newline
    before = _sha(out)
    result = CliRunner().invoke(main, ["augment-cot", "--model", "tiny-gpt2", "--data", "sample", "--limit", "2",
                                       "--out", str(out)])
    assert result.exit_code == 2 and "not written by augment-cot" in result.output
    assert _sha(out) == before


def test_augment_drops_only_a_torn_line_of_its_own(tmp_path):
    out = tmp_path / "cot.jsonl"
    out.write_text(_ours(1) + "\n" + _ours(2) + "\n" + '{"id": "r3", "instru')     # torn by a crash
    assert finished_ids(out) == {"r1", "r2"}
    assert out.read_text() == _ours(1) + "\n" + _ours(2) + "\n"
    out.write_text(_ours(1) + "\n" + _ours(2))                  # whole last record, only the newline missing
    assert finished_ids(out) == {"r1", "r2"} and out.read_text() == _ours(1) + "\n" + _ours(2) + "\n"
    out.write_text(_ours(1) + "\n" + "torn garbage")            # not the start of one of its lines: refused
    before = _sha(out)
    with pytest.raises(ConfigError):
        finished_ids(out)
    assert _sha(out) == before
