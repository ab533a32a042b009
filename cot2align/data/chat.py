"""Prompts in a model's own chat template (`--prompt-format chat`; README 'Chat models and `messages` data').

    prompt_messages(record)            the prompt turns of a record: its conversation, or one user turn made of an
                                       instruction record's instruction (and input)
    cot_messages(messages)             the CoT view's turns: the last user turn asks to think step by step
    use_chat_template(tokenizer, ...)  check (or set, from a Jinja file) the template; EOS becomes its end-of-turn
    render_prompt(tokenizer, messages) apply_chat_template(messages, add_generation_prompt=True) as text

A sequence in chat format is the rendered prompt + the response + the model's end-of-turn token (`<|im_end|>` for
ChatML templates such as Qwen2.5's and SmolLM2's), exactly the tokens the template gives an assistant turn. Every
place that builds or scores a sequence already writes `tokenizer(prompt, add_special_tokens=True) + response +
[tokenizer.eos_token_id]`; so that the same code serves both formats, `use_chat_template` makes the tokenizer's
EOS the template's end-of-turn token, and `render_prompt` leaves out a BOS that the template writes when the
tokenizer adds it itself — the ids are then those of `apply_chat_template(..., tokenize=True)`. Generation stops
at that EOS: the end of the assistant's turn.

The format is chosen once per command (`resolve_prompt_format`): `paper` (the paper's Alpaca-style templates,
data/templates.py) or `chat`; by default chat for conversational data and paper for instruction data, so the
paper's settings reproduce unchanged.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from cot2align.errors import ConfigError, DataError

PROMPT_FORMATS = ("paper", "chat")
# The CoT view's request, after the last user turn (the chat counterpart of the paper's "Let's think step by step.")
COT_REQUEST = "\n\nLet's think step by step."
_SENTINEL = "\x00cot2align-turn-end\x00"


def prompt_messages(record: dict) -> list[dict]:
    """The prompt turns of a record (a conversation's, or one user turn of instruction + input)."""
    if record.get("messages"):
        return [dict(t) for t in record["messages"]]
    text = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
    return [{"role": "user", "content": text}]


def cot_messages(messages: list[dict]) -> list[dict]:
    """The CoT view's prompt: the same turns, the last user turn ending in COT_REQUEST."""
    turns = [dict(t) for t in messages]
    last = max(i for i, t in enumerate(turns) if t["role"] == "user")
    turns[last]["content"] += COT_REQUEST
    return turns


def is_conversational(records: list[dict]) -> bool:
    return any(r.get("messages") for r in records)


def resolve_prompt_format(asked: str | None, records: list[dict]) -> str:
    """--prompt-format, or its default: chat for conversational data, paper for instruction data."""
    if asked is not None:
        check_prompt_format(asked)
        return asked
    return "chat" if is_conversational(records) else "paper"


def check_prompt_format(value: str | None) -> None:
    if value is not None and value not in PROMPT_FORMATS:
        raise ConfigError(f"prompt_format: expected one of {', '.join(PROMPT_FORMATS)}, got {value!r}")


def template_sha256(tokenizer) -> str:
    return hashlib.sha256((tokenizer.chat_template or "").encode()).hexdigest()


def end_of_turn(tokenizer) -> str:
    """The token the template writes after an assistant's words: the first special token that follows them in a
    rendered two-turn conversation (`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`, `</s>`); the tokenizer's EOS
    when the template writes none that is one token of the vocabulary (a ChatML file given to GPT-2, whose
    vocabulary spells "<|im_end|>" in pieces: its responses end in "<|endoftext|>")."""
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _SENTINEL}]
    text = tokenizer.apply_chat_template(turns, tokenize=False)
    after = text.split(_SENTINEL, 1)[1] if _SENTINEL in text else ""
    special = set(tokenizer.all_special_tokens) | {t.content if hasattr(t, "content") else str(t) for t in
                                                   getattr(tokenizer, "added_tokens_decoder", {}).values()
                                                   if getattr(t, "special", False)}
    for token_id in tokenizer(after, add_special_tokens=False)["input_ids"]:
        token = tokenizer.convert_ids_to_tokens(token_id)
        if token in special:
            return token
    return tokenizer.eos_token


def use_chat_template(tokenizer, template_file: str | None, model: str):
    """The tokenizer ready for chat prompts: its template (or the Jinja file `template_file`, which replaces it), and
    its EOS set to the template's end-of-turn token (what ends a response and stops generation). A model without a
    template and no file is a one-line ConfigError naming `model`."""
    if template_file is not None:
        path = Path(template_file)
        try:
            tokenizer.chat_template = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"--chat-template {path}: cannot be read ({getattr(e, 'strerror', None) or e})") from None
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"--prompt-format chat: {model} has no chat template; pass --chat-template FILE (a Jinja "
                          "template) or --prompt-format paper")
    try:
        eot = end_of_turn(tokenizer)
    except Exception as e:      # noqa: BLE001 — a template that does not render is the user's file: one line
        where = f"--chat-template {template_file}" if template_file else f"{model}'s chat template"
        raise ConfigError(f"{where}: does not render a user and an assistant turn ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:160] if str(e) else ''})") from None
    if eot != tokenizer.eos_token:
        tokenizer.eos_token = eot
    return tokenizer


def render_prompt(tokenizer, messages: list[dict]) -> str:
    """The prompt turns in the tokenizer's template, ending with the assistant's generation prompt; a leading BOS
    the tokenizer adds itself on encoding is left out of the text (so it is not there twice)."""
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:      # noqa: BLE001 — a template that refuses these turns (roles, order): one line
        roles = ", ".join(t["role"] for t in messages)
        why = str(e).splitlines()[0][:160] if str(e) else ""
        raise DataError(f"the chat template of {getattr(tokenizer, 'name_or_path', None) or 'the model'} cannot "
                        f"render turns of roles {roles} ({type(e).__name__}: {why})") from None
    bos = tokenizer.bos_token
    if bos and text.startswith(bos):
        probe = tokenizer("x", add_special_tokens=True)["input_ids"]
        if probe and probe[0] == tokenizer.bos_token_id:
            text = text[len(bos):]
    return text


def view_prompt(tokenizer, record: dict, view: str, prompt_format: str) -> str:
    """The prompt of one view ("std" or "cot") of a record in a format (paper templates, or the tokenizer's)."""
    if prompt_format == "chat":
        messages = prompt_messages(record)
        return render_prompt(tokenizer, cot_messages(messages) if view == "cot" else messages)
    from cot2align.data.templates import cot_prompt, standard_prompt

    make = cot_prompt if view == "cot" else standard_prompt
    return make(record["instruction"], record.get("input", ""))
