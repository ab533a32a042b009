"""Datasets, the paper's filters and splits, prompt templates (and CoT augmentation, later)."""

from cot2align.data.readers import DataError, group_references, load_records, read_file
from cot2align.data.templates import cot_output, cot_prompt, load_templates, standard_prompt

__all__ = ["DataError", "group_references", "load_records", "read_file", "cot_output", "cot_prompt",
           "load_templates", "standard_prompt"]
