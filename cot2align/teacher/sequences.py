"""Turn records into the teacher's token sequences for the two views, truncating *text* once.

A view of an example is (prompt text, response text). The teacher sequence is

    tokens(prompt, with the tokenizer's own BOS if it adds one) + tokens(response) + [EOS]

with prompt and response tokenised separately, as the reference code (DSKD, CoT2Align) does.
Length limits are in teacher tokens (README 'The cache format'): an over-long prompt has its `input` shortened from
the end (then, if needed, its instruction) until it fits `max_prompt_length`; an over-long response
keeps its beginning and loses its EOS. The shortened texts are what the cache stores, so every
student later sees exactly the same text as the teacher did.

Under --prompt-format chat (data/chat.py) the prompt is the record's turns in the teacher's chat template (the
tokenizer's EOS is then its end-of-turn token, which ends the response): an over-long conversation loses its oldest
turns (never a system turn or the last user turn), then the end of its last user turn. The shortened turns are
stored too, so a student renders the same conversation in its own template.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cot2align.data.chat import cot_messages, prompt_messages, render_prompt
from cot2align.data.templates import cot_prompt, standard_prompt
from cot2align.errors import DataError

VIEWS = ("std", "cot")


@dataclass
class ViewSequence:
    prompt: str = ""
    response: str = ""
    input_ids: list[int] = field(default_factory=list)   # the whole teacher sequence
    prompt_len: int = 0                                    # teacher tokens in the prompt
    messages: list | None = None                           # chat format: the prompt's turns (as shortened)

    @property
    def n_rows(self) -> int:
        """Stored rows = positions P-1 .. L-2, i.e. one per response token (EOS included)."""
        return len(self.input_ids) - self.prompt_len if self.input_ids else 0


@dataclass
class ExampleSequences:
    id: str
    views: dict[str, ViewSequence]


@dataclass
class TruncationStats:
    prompt_truncated: dict[str, int] = field(default_factory=lambda: {v: 0 for v in VIEWS})
    response_truncated: dict[str, int] = field(default_factory=lambda: {v: 0 for v in VIEWS})


def _encode(tokenizer, text: str, special: bool) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def _cut_to_tokens(tokenizer, text: str, n_tokens: int) -> str:
    """The longest prefix of `text` that is the first `n_tokens` tokens of it (by offsets)."""
    if n_tokens <= 0:
        return ""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    if n_tokens >= len(offsets):
        return text
    return text[: offsets[n_tokens - 1][1]]


def _fit_prompt(tokenizer, make_prompt, instruction: str, input_text: str, max_prompt_length: int):
    """(prompt, ids, truncated?) with the input (then the instruction) shortened from its end."""
    prompt = make_prompt(instruction, input_text)
    ids = _encode(tokenizer, prompt, True)
    if len(ids) <= max_prompt_length:
        return prompt, ids, False
    for field_name in ("input", "instruction"):
        text = input_text if field_name == "input" else instruction
        if not text:
            continue
        n_text = len(_encode(tokenizer, text, False))
        lo, hi = 0, n_text  # largest k in [0, n_text] whose prompt fits
        best = None
        while lo <= hi:
            mid = (lo + hi) // 2
            cut = _cut_to_tokens(tokenizer, text, mid)
            cand = make_prompt(cut, input_text) if field_name == "instruction" else make_prompt(instruction, cut)
            cand_ids = _encode(tokenizer, cand, True)
            if len(cand_ids) <= max_prompt_length:
                best, lo = (cut, cand, cand_ids), mid + 1
            else:
                hi = mid - 1
        if best is not None:
            return best[1], best[2], True
        if field_name == "input":
            input_text = ""
    raise ValueError(f"the prompt template alone is longer than max_prompt_length={max_prompt_length} tokens")


def _fit_response(tokenizer, response: str, budget: int, eos_id: int):
    """(response text, ids incl. EOS when it fits, truncated?) within `budget` tokens."""
    ids = _encode(tokenizer, response, False)
    if len(ids) + 1 <= budget:
        return response, ids + [eos_id], False
    keep = budget
    while keep > 0:
        cut = _cut_to_tokens(tokenizer, response, keep)
        cut_ids = _encode(tokenizer, cut, False)
        if len(cut_ids) <= budget:
            return cut, cut_ids, True
        keep -= 1
    raise ValueError("no room left for the response")


def build_view(tokenizer, make_prompt, instruction: str, input_text: str, response: str,
               max_length: int, max_prompt_length: int) -> tuple[ViewSequence, bool, bool]:
    prompt, prompt_ids, p_trunc = _fit_prompt(tokenizer, make_prompt, instruction, input_text, max_prompt_length)
    response_text, response_ids, r_trunc = _fit_response(
        tokenizer, response, max_length - len(prompt_ids), tokenizer.eos_token_id)
    view = ViewSequence(prompt=prompt, response=response_text, input_ids=prompt_ids + response_ids,
                        prompt_len=len(prompt_ids))
    return view, p_trunc, r_trunc


def _drop_oldest_turn(turns: list[dict]) -> list[dict] | None:
    """The conversation without its oldest context turn (with the non-user turns that then lead it, so a template
    that wants a user turn first still renders it); None when only system turns and the last user turn are left."""
    last_user = max(i for i, t in enumerate(turns) if t["role"] == "user")
    first = next((i for i, t in enumerate(turns) if t["role"] != "system"), last_user)
    if first >= last_user:
        return None
    end = first + 1
    while end < last_user and turns[end]["role"] != "user":
        end += 1
    return turns[:first] + turns[end:]


def _fit_chat_prompt(tokenizer, turns: list[dict], view_turns, max_prompt_length: int):
    """(view turns, prompt, ids, truncated?) of a conversation in the tokenizer's template: the oldest turns go,
    then the last user turn is shortened from its end, until the prompt fits `max_prompt_length`."""
    def render(base):
        shown = view_turns(base)
        prompt = render_prompt(tokenizer, shown)
        return shown, prompt, _encode(tokenizer, prompt, True)

    shown, prompt, ids = render(turns)
    truncated = False
    while len(ids) > max_prompt_length:
        fewer = _drop_oldest_turn(turns)
        if fewer is None:
            break
        turns, truncated = fewer, True
        shown, prompt, ids = render(turns)
    if len(ids) <= max_prompt_length:
        return shown, prompt, ids, truncated
    last = max(i for i, t in enumerate(turns) if t["role"] == "user")
    text = turns[last]["content"]
    lo, hi, best = 0, len(_encode(tokenizer, text, False)), None
    while lo <= hi:      # the largest prefix of the last user turn (in tokens) whose prompt fits
        mid = (lo + hi) // 2
        cut = turns[:last] + [dict(turns[last], content=_cut_to_tokens(tokenizer, text, mid))] + turns[last + 1:]
        candidate = render(cut)
        if len(candidate[2]) <= max_prompt_length:
            best, lo = candidate, mid + 1
        else:
            hi = mid - 1
    if best is None:
        raise ValueError(f"the chat template's turns alone are longer than max_prompt_length={max_prompt_length} "
                         "tokens")
    return (*best, True)


def build_chat_view(tokenizer, turns: list[dict], view_turns, response: str, max_length: int,
                    max_prompt_length: int) -> tuple[ViewSequence, bool, bool]:
    """One view in chat format: the template's prompt + response + end-of-turn (the tokenizer's EOS)."""
    shown, prompt, prompt_ids, p_trunc = _fit_chat_prompt(tokenizer, turns, view_turns, max_prompt_length)
    response_text, response_ids, r_trunc = _fit_response(
        tokenizer, response, max_length - len(prompt_ids), tokenizer.eos_token_id)
    view = ViewSequence(prompt=prompt, response=response_text, input_ids=prompt_ids + response_ids,
                        prompt_len=len(prompt_ids), messages=shown)
    return view, p_trunc, r_trunc


def _build_record_view(tokenizer, rec: dict, view_name: str, response: str, max_length: int, max_prompt_length: int,
                       prompt_format: str):
    if prompt_format == "chat":
        view_turns = cot_messages if view_name == "cot" else (lambda turns: turns)
        return build_chat_view(tokenizer, prompt_messages(rec), view_turns, response, max_length, max_prompt_length)
    make_prompt = cot_prompt if view_name == "cot" else standard_prompt
    return build_view(tokenizer, make_prompt, rec["instruction"], rec.get("input", ""), response, max_length,
                      max_prompt_length)


def build_sequences(records: list[dict], tokenizer, max_length: int = 512, max_prompt_length: int = 256,
                    where: str = "data", prompt_format: str = "paper"
                    ) -> tuple[list[ExampleSequences], TruncationStats]:
    """Both views of every record. The CoT view is empty for a record without `cot_output`. `prompt_format`:
    paper (the paper's templates) or chat (the tokenizer's template, prepared by data/chat.use_chat_template)."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the teacher tokenizer has no EOS token")
    stats = TruncationStats()
    out = []
    for i, rec in enumerate(records):
        views = {}
        for view_name, response in (("std", rec["output"]), ("cot", rec.get("cot_output") or "")):
            if view_name == "cot" and not response:
                views[view_name] = ViewSequence()
                continue
            try:
                view, p_trunc, r_trunc = _build_record_view(tokenizer, rec, view_name, response, max_length,
                                                            max_prompt_length, prompt_format)
            except (ValueError, DataError) as e:     # DataError: a chat template that refuses the record's turns
                raise type(e)(f"{where}: record {i + 1} (id {rec['id']!r}), {view_name} view: {e}") from None
            stats.prompt_truncated[view_name] += p_trunc
            stats.response_truncated[view_name] += r_trunc
            views[view_name] = view
        out.append(ExampleSequences(id=rec["id"], views=views))
    return out, stats
