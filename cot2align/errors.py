"""The user-facing errors: each is one line naming the file, line, field or flag and what was expected.

They live here, apart from the modules that raise them, so the command line can catch them without importing
torch, transformers or zarr (`cot2align --help` stays fast). Each is re-exported where it is raised.
"""


class ConfigError(ValueError):
    """A one-line, user-facing configuration problem."""


class DataError(ValueError):
    """A one-line, user-facing problem with a dataset file or record."""


class CacheError(ValueError):
    """A one-line, user-facing problem with a cache."""


class TrainingError(RuntimeError):
    """A run that cannot go on (e.g. a non-finite loss); what was already written stays intact."""
