"""The student trainer: `distill`, `sweep`, and their data, checkpoint and online-teacher helpers."""


class TrainingError(RuntimeError):
    """A run that cannot go on (e.g. a non-finite loss); what was already written stays intact."""
