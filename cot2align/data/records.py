"""One raw row (a JSONL line, a `datasets` row, a hub row) to a record — the same normalisation whatever the source:

    normalise_record(raw, where, default_id, field_map)   {"id", "instruction", "input", "output"}
                                                          (+ "messages", "rationale", "cot_output", "references")
    checked_records(records, where)                       at least one record, no id twice
    check_field_map(field_map)                            {ours: theirs} names

The schemas of the authors' JSONL files, DialogSum's and Dolly's releases, any instruction/input/output data
(names mapped by --field-map), and conversational data (README 'Chat models and `messages` data'): a `messages`
list of {role, content} turns, or TRL's prompt/completion form with strings or message lists. A conversation's
LAST assistant turn is the response (`output`); the turns before it are the prompt (`messages`, system turns
kept); earlier assistant turns are context of that prompt, never trained. Its `instruction` is the last user
turn's text (what the paper's templates show under --prompt-format paper). A bad row is a one-line DataError
naming the source, the row and the field. The sources themselves (files, aliases, the hub, `datasets`) are
data/readers.py's and data/hf.py's.
"""

from __future__ import annotations

import json

from cot2align.data.templates import cot_output as make_cot_output
from cot2align.errors import DataError

DIALOGSUM_INSTRUCTION = "Generate a summary of the dialogue, focusing specifically on the provided topic: {topic}."


def _show(name) -> str:
    """A field name or id as it can appear in a one-line message: quoted, escaped (repr), shortened."""
    text = repr(str(name))
    return text if len(text) <= 60 else text[:56] + "...'"


def _as_text(value, where: str, field: str) -> str:
    """A text field: a string (None reads as empty); anything else, or text Python cannot encode as UTF-8
    (an unpaired surrogate from a \\ud800 escape), is a DataError naming the field."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: field {_show(field)} must be a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(f"{where}: field {_show(field)} holds an unpaired surrogate (\\u{ord(value[e.start]):04x} "
                        f"at character {e.start}), not valid Unicode text") from None
    return value


def _as_id(value, where: str, field: str) -> str:
    """A record id: a string or an integer (kept as its decimal text)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise DataError(f"{where}: field {_show(field)} (the record id) must be a string or an integer, "
                        f"got {type(value).__name__}")
    return _as_text(value, where, field)


def _record_id(raw: dict, keys: tuple[str, ...], where: str, default_id: str) -> str:
    """The first of `keys` the record gives a value (not null or empty), else `default_id`."""
    for key in keys:
        if raw.get(key) not in (None, ""):
            return _as_id(raw[key], where, key)
    return default_id


def _references(raw: dict, where: str) -> list[str] | None:
    """The optional `references` field: a list of strings (several gold outputs of a test record)."""
    value = raw.get("references")
    if value is None:
        return None
    if not isinstance(value, list):
        raise DataError(f"{where}: field 'references' must be a list of strings, got {type(value).__name__}")
    return [_as_text(r, where, "references") for r in value]


def _dialogsum_record(raw: dict, where: str, default_id: str) -> tuple[dict, list[str] | None]:
    """DialogSum's own release: topic (test: topic1) in the instruction, the dialogue as input, up to three
    summaries (the first is the output; all are references)."""
    topic = _as_text(raw.get("topic") or raw.get("topic1"), where, "topic")
    summaries = [_as_text(raw[k], where, k) for k in ("summary", "summary1", "summary2", "summary3") if raw.get(k)]
    if not summaries:
        raise DataError(f"{where}: DialogSum record has no 'summary' field")
    record = {"id": _record_id(raw, ("fname", "id"), where, default_id),
              "instruction": DIALOGSUM_INSTRUCTION.format(topic=topic),
              "input": _as_text(raw["dialogue"], where, "dialogue"), "output": summaries[0]}
    return record, (summaries if len(summaries) > 1 else None)


# What --field-map can name: ours -> the dataset's column.
FIELD_MAP_KEYS = ("id", "instruction", "input", "output", "messages", "prompt", "completion")


def _turns(value, where: str, field: str) -> list[dict]:
    """A list of {role, content} turns (a CSV cell may hold it as JSON text): roles and contents strings; other
    keys of a turn (a `datasets` column fills absent ones with null) are left out."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = json.loads(value)
        except ValueError:
            raise DataError(f"{where}: field {_show(field)} is text that is not a JSON list of turns") from None
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field {_show(field)} must be a non-empty list of {{role, content}} turns, "
                        f"got {type(value).__name__ if value != [] else 'an empty list'}")
    turns = []
    for number, turn in enumerate(value, start=1):
        if not isinstance(turn, dict) or not isinstance(turn.get("role"), str) or not turn["role"]:
            raise DataError(f"{where}: field {_show(field)}, turn {number}: expected an object with a 'role' string "
                            f"and a 'content' string")
        if not isinstance(turn.get("content"), str):
            raise DataError(f"{where}: field {_show(field)}, turn {number} ({turn['role']}): 'content' must be a "
                            f"string, got {type(turn.get('content')).__name__}")
        turns.append({"role": turn["role"], "content": _as_text(turn["content"], where, field)})
    return turns


def _conversation_record(prompt: list[dict], response_turns: list[dict], where: str, field: str) -> dict:
    """{messages, instruction, input, output} of a conversation split into its prompt turns and the turns that
    hold the response: the last assistant turn of `response_turns` is the response, nothing may follow it."""
    last = max((i for i, t in enumerate(response_turns) if t["role"] == "assistant"), default=None)
    if last is None:
        raise DataError(f"{where}: field {_show(field)} has no assistant turn (the last one is the response)")
    if last != len(response_turns) - 1:
        raise DataError(f"{where}: field {_show(field)}: turn {len(prompt) + last + 2} "
                        f"({response_turns[last + 1]['role']}) follows the last assistant turn; expected the "
                        "conversation to end with the assistant's response")
    turns = prompt + response_turns[:last]
    users = [t["content"] for t in turns if t["role"] == "user"]
    if not users:
        raise DataError(f"{where}: field {_show(field)}: no user turn before the last assistant turn")
    return {"messages": turns, "instruction": users[-1], "input": "", "output": response_turns[last]["content"]}


def _chat_record(raw: dict, where: str, default_id: str, fm: dict) -> dict:
    """A `messages` conversation, or TRL's prompt/completion form (each a string or a list of turns; string
    prompt and completion are plain instruction data, without turns)."""
    if fm["messages"] in raw:
        record = _conversation_record([], _turns(raw[fm["messages"]], where, fm["messages"]), where, fm["messages"])
    else:
        prompt, completion = raw.get(fm["prompt"]), raw[fm["completion"]]
        if isinstance(prompt, str) and isinstance(completion, str):
            record = {"instruction": _as_text(prompt, where, fm["prompt"]), "input": "",
                      "output": _as_text(completion, where, fm["completion"])}
        else:
            turns = (_turns(prompt, where, fm["prompt"]) if not isinstance(prompt, str)
                     else [{"role": "user", "content": prompt}])
            answer = (_turns(completion, where, fm["completion"]) if not isinstance(completion, str)
                      else [{"role": "assistant", "content": completion}])
            record = _conversation_record(turns, answer, where, fm["completion"])
    return {"id": _record_id(raw, (fm["id"], "fname"), where, default_id), **record}


def _is_chat(raw: dict, fm: dict) -> bool:
    """A conversational row: a messages column, or prompt/completion, and no instruction of its own."""
    return fm["instruction"] not in raw and (fm["messages"] in raw or (fm["completion"] in raw and fm["prompt"] in raw))


def _generic_record(raw: dict, where: str, default_id: str, field_map: dict | None) -> tuple[dict, list[str] | None]:
    """instruction / input / output (names mapped by field_map), optional references."""
    fm = {**{name: name for name in FIELD_MAP_KEYS}, **(field_map or {})}
    if _is_chat(raw, fm):
        return _chat_record(raw, where, default_id, fm), _references(raw, where)
    for ours in ("instruction", "output"):
        if fm[ours] not in raw:
            fields = ", ".join(_show(k) for k in sorted(raw)[:20]) + (", ..." if len(raw) > 20 else "")
            raise DataError(f"{where}: record has no {_show(fm[ours])} field (fields: {fields or 'none'})")
    record = {"id": _record_id(raw, (fm["id"], "fname"), where, default_id),
              "instruction": _as_text(raw[fm["instruction"]], where, fm["instruction"]),
              "input": _as_text(raw.get(fm["input"]), where, fm["input"]),
              "output": _as_text(raw[fm["output"]], where, fm["output"])}
    return record, _references(raw, where)


def _add_cot(record: dict, raw: dict, where: str) -> None:
    """The CoT view's fields. A rationale that is null, empty or only whitespace is no rationale: augment-cot
    writes degenerate rationales (empty ones included) as null, and such a record trains without a CoT view."""
    rationale = _as_text(raw.get("rationale"), where, "rationale")
    cot = _as_text(raw.get("cot_output"), where, "cot_output")
    if rationale.strip():
        record["rationale"] = rationale
        record["cot_output"] = cot if cot.strip() else make_cot_output(rationale, record["output"])
    elif cot.strip():
        record["cot_output"] = cot


def normalise_record(raw: dict, where: str, default_id: str, field_map: dict | None = None) -> dict:
    """Map one raw object (authors' jsonl, DialogSum, Dolly hub, generic) to a record dict.

    `where` is "file:line" for error messages; `field_map` maps our field names to the file's
    (e.g. {"output": "answer"}). An empty or whitespace-only output or instruction is an error (every record
    trains on its response); an empty rationale is no rationale.
    """
    references = None
    if field_map is None and "dialogue" in raw and "messages" not in raw:  # DialogSum original release
        record, references = _dialogsum_record(raw, where, default_id)
    elif field_map is None and "response" in raw and "output" not in raw and "messages" not in raw:  # Dolly hub
        record = {
            "id": _record_id(raw, ("id",), where, default_id),
            "instruction": _as_text(raw.get("instruction"), where, "instruction"),
            "input": _as_text(raw.get("context"), where, "context"),
            "output": _as_text(raw["response"], where, "response"),
        }
    else:
        record, references = _generic_record(raw, where, default_id, field_map)
    if not record["output"].strip():
        what = "the last assistant turn" if "messages" in record else "field 'output'"
        raise DataError(f"{where}: {what} is empty (a response is needed for every record)")
    if not record["instruction"].strip():
        raise DataError(f"{where}: field 'instruction' is empty")
    _add_cot(record, raw, where)
    if references:
        record["references"] = references
    return record


def check_field_map(field_map) -> dict | None:
    """A field map is {ours: theirs} with ours among FIELD_MAP_KEYS and theirs a field name."""
    if field_map is None:
        return None
    if not isinstance(field_map, dict):
        raise DataError(f"field_map: expected a mapping of OURS: THEIRS field names, got {type(field_map).__name__}")
    for ours, theirs in field_map.items():
        if ours not in FIELD_MAP_KEYS or not isinstance(theirs, str) or not theirs:
            raise DataError(f"field_map: {_show(ours)}: expected OURS ({', '.join(FIELD_MAP_KEYS)}) mapped to "
                            "a field name")
    return field_map


def checked_records(records: list[dict], where: str) -> list[dict]:
    """At least one record, and no id twice."""
    if not records:
        raise DataError(f"{where}: no records")
    seen: dict[str, int] = {}
    for i, r in enumerate(records):
        if r["id"] in seen:
            raise DataError(f"{where}: duplicate record id {_show(r['id'])} (records {seen[r['id']] + 1} and {i + 1})")
        seen[r["id"]] = i
    return records
