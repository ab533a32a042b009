"""The paper's prompt templates (Figure 3), loaded from assets/templates.yaml.

The templates are data: the YAML file is the single source of truth and every cache manifest
stores them verbatim, so a cache built with other templates is never mistaken for this one.
"""

from __future__ import annotations

import functools
import re
from importlib import resources

import yaml


@functools.lru_cache(maxsize=1)
def load_templates() -> dict:
    """Return {"standard": {...}, "cot": {...}, "cot_answer_separator": str}."""
    text = resources.files("cot2align").joinpath("assets/templates.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text)


# The template's own placeholders. One pass over the template, not str.format (instructions and code inputs
# contain braces) and not one str.replace per field (an instruction holding the text "{input}" would then
# have the input pasted into it).
_PLACEHOLDER = re.compile(r"\{(instruction|input)\}")


def fill(template: str, instruction: str, input_text: str = "") -> str:
    values = {"instruction": instruction, "input": input_text}
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def standard_prompt(instruction: str, input_text: str = "") -> str:
    """The standard (Alpaca-style) prompt; the `### Input:` block only when there is an input."""
    t = load_templates()["standard"]
    return fill(t["with_input"] if input_text else t["no_input"], instruction, input_text)


def cot_prompt(instruction: str, input_text: str = "") -> str:
    """The zero-shot chain-of-thought prompt ending in "Let's think step by step.\\n"."""
    t = load_templates()["cot"]
    return fill(t["with_input"] if input_text else t["no_input"], instruction, input_text)


def cot_output(rationale: str, output: str) -> str:
    """The CoT target of the paper: rationale + "\\nTherefore, the answer is: " + gold output."""
    return rationale + load_templates()["cot_answer_separator"] + output
