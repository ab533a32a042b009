"""Property: any file of records a user can write — random Unicode (control characters and NUL included), huge
and empty fields, wrong types, non-objects, garbage lines, as JSONL, a JSON array or gzipped JSONL — reads back
as valid records that render through the templates, or fails with one DataError line. Never another exception."""

import gzip
import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from cot2align.data import DataError, read_file
from cot2align.data.templates import cot_prompt, standard_prompt

FIELDS = ["id", "instruction", "input", "output", "rationale", "cot_output", "references", "response", "context",
          "dialogue", "summary", "topic", "fname"]

# Text without surrogates (a file in UTF-8 cannot hold them), control characters and NUL included.
text = st.one_of(
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=40),
    st.sampled_from(["", " ", "\n\t ", "\x00", "{input}", "{instruction}", "\\u0000", "\u2028", "😀" * 3]),
    st.sampled_from([1, 1000, 200_000]).map(lambda n: "w" * n),      # huge fields
)
scalar = st.one_of(text, st.integers(-10**30, 10**30), st.floats(allow_nan=True), st.booleans(), st.none())
value = st.recursive(scalar, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                    st.dictionaries(text, inner, max_size=3)), max_leaves=6)
# Records of the right shape with random text: most files of them read, so the templates get exercised.
filled = st.one_of(text, text.map(lambda t: "Q" + t), text.map(lambda t: t + " A"))    # mostly not blank
plausible = st.fixed_dictionaries({"instruction": filled, "output": filled},
                                  optional={"id": st.one_of(text, st.integers()), "input": text, "rationale": text,
                                            "cot_output": st.one_of(text, st.none()),
                                            "references": st.lists(text, max_size=3)})
record = st.one_of(
    plausible,
    st.dictionaries(st.one_of(st.sampled_from(FIELDS), text), value, max_size=8),   # any fields, any types
    value,                                                                           # not an object at all
)


def as_line(records):
    return st.tuples(records, st.booleans()).map(lambda r: json.dumps(r[0], ensure_ascii=r[1]))


garbage_line = st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)     # not JSON (or blank)
lines = st.one_of(st.lists(as_line(plausible), min_size=1, max_size=6),
                  st.lists(st.one_of(as_line(record), garbage_line), max_size=6))
raw_bytes = st.binary(max_size=30)


def _write(directory: Path, fmt: str, lines: list[str], garbage: bytes | None) -> Path:
    if fmt == "json":
        body = ("[" + ",\n".join(lines) + "]").encode("utf-8")
    else:
        body = "".join(x.replace("\n", " ") + "\n" for x in lines).encode("utf-8")
    if garbage is not None:
        body += garbage
    path = directory / {"jsonl": "d.jsonl", "json": "d.json", "gz": "d.jsonl.gz"}[fmt]
    path.write_bytes(gzip.compress(body) if fmt == "gz" else body)
    return path


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(fmt=st.sampled_from(["jsonl", "jsonl", "json", "gz"]), lines=lines,
       garbage=st.one_of(st.none(), st.none(), st.none(), raw_bytes))
def test_records_or_one_data_error(fmt, lines, garbage):
    with tempfile.TemporaryDirectory() as tmp:
        path = _write(Path(tmp), fmt, lines, garbage)
        try:
            records = read_file(path)
        except DataError as e:
            assert str(e) and "\n" not in str(e), repr(str(e))
            event("DataError")
            return
    event("records")
    assert records and len({r["id"] for r in records}) == len(records)
    for r in records:
        assert all(isinstance(r[k], str) for k in ("id", "instruction", "input", "output"))
        assert r["output"].strip() and r["instruction"].strip()
        for prompt in (standard_prompt(r["instruction"], r["input"]), cot_prompt(r["instruction"], r["input"])):
            assert r["instruction"] in prompt and r["input"] in prompt
            prompt.encode("utf-8")                                   # the tokenizer gets valid Unicode
        if "cot_output" in r:
            assert isinstance(r["cot_output"], str) and r["cot_output"].strip()
        assert all(isinstance(x, str) for x in r.get("references", []))
