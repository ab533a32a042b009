"""Evaluation (README 'Evaluation protocol'): generation, ROUGE-L and held-out cross-entropy, `evaluate`, and `report`."""

from cot2align.eval.evaluate import evaluate_model
from cot2align.eval.generation import generate
from cot2align.eval.metrics import reference_cross_entropy, rouge_l
from cot2align.eval.report import report

__all__ = ["evaluate_model", "generate", "reference_cross_entropy", "report", "rouge_l"]
