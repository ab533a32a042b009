"""Logging and progress bars: one `cot2align` logger tree, configured by the CLI, left alone for library users.

Library code writes through `reporter(log, __name__)`: the `log=` callback a caller passed (kept for
compatibility: tests and scripts collect messages with `log=messages.append`), else the module's logger
(`cot2align.<module>`), INFO for progress messages and WARNING for problems. The CLI calls `configure()`:
messages go to stderr as plain lines (warnings prefixed "warning:"), INFO hidden under `--quiet` — which also
quiets the libraries underneath (transformers, datasets, huggingface_hub, peft): their progress bars ("Loading
weights", "Writing model shards", "Map"), their log messages below errors and their Python warnings.

Progress bars (tqdm, with rate and ETA) are shown on a terminal only, and never when the `cot2align` logger
is set above INFO (`--quiet`, or a library user's `logging.getLogger("cot2align").setLevel(logging.WARNING)`).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from contextlib import contextmanager

ROOT = "cot2align"


class _StderrHandler(logging.StreamHandler):
    """A handler that writes to whatever sys.stderr is at the time of the record (click's test runner and
    pytest swap it), never to the stream that was current when logging was configured."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        return message if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {message}"


def configure(quiet: bool = False) -> None:
    """The command line's logging: cot2align's messages on stderr, INFO and up (WARNING and up when quiet, and the
    libraries' bars, messages and warnings silenced)."""
    _quiet_libraries(quiet)
    logger = logging.getLogger(ROOT)
    for handler in [h for h in logger.handlers if isinstance(h, _StderrHandler)]:
        logger.removeHandler(handler)
    handler = _StderrHandler()
    handler.setFormatter(_Formatter())
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    logger.propagate = False


# The libraries' own switches. The environment variables reach a library not imported yet (the command line
# imports them lazily, after -q is read); one already imported is told through its API. huggingface_hub is cheap
# to import and its switch is the one transformers reads for its bars when it is imported.
_LIBRARY_ENVIRON = {"TRANSFORMERS_VERBOSITY": "error", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
                    "DATASETS_VERBOSITY": "error", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
_LIBRARY_MODULES = r"(transformers|datasets|huggingface_hub|peft|accelerate|tokenizers)(\..*)?$"
_before_quiet: tuple[dict, list] | None = None     # the environment and warning filters -q replaced, to put back


def _quiet_libraries(quiet: bool) -> None:
    """Silence (or give back) the libraries' progress bars, messages below errors and Python warnings. Only a
    change of state touches them: a command without -q leaves a library user's own settings alone."""
    global _before_quiet
    if quiet == (_before_quiet is not None):
        return
    if quiet:
        _before_quiet = ({k: os.environ.get(k) for k in _LIBRARY_ENVIRON}, list(warnings.filters))
        os.environ.update(_LIBRARY_ENVIRON)
        warnings.filterwarnings("ignore", module=_LIBRARY_MODULES)
    else:
        environ, filters = _before_quiet
        for key, value in environ.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        warnings.filters[:] = filters
        warnings._filters_mutated()       # the list was replaced in place: let warnings re-read it
        _before_quiet = None
    _tell_libraries(quiet)


def _tell_libraries(quiet: bool) -> None:
    level = logging.ERROR if quiet else logging.WARNING
    from huggingface_hub import utils as hub_utils

    hub_utils.logging.set_verbosity(level)
    (hub_utils.disable_progress_bars if quiet else hub_utils.enable_progress_bars)()
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity(level)
        (transformers_logging.disable_progress_bar if quiet else transformers_logging.enable_progress_bar)()
    if "datasets" in sys.modules:
        import datasets

        datasets.utils.logging.set_verbosity(level)
        if quiet:
            datasets.disable_progress_bars()
        elif datasets.config.HF_DATASETS_DISABLE_PROGRESS_BARS is not True:     # imported under -q: the variable
            datasets.enable_progress_bars()                                     # holds, and enabling would warn


def reporter(log=None, name: str = ROOT):
    """`say(message, level=logging.INFO)`: to the caller's `log` callback when one was given (a warning's text
    prefixed "warning: "), else to the logger `name`."""
    if getattr(log, "is_reporter", False):
        return log
    logger = logging.getLogger(name)

    def say(message: str, level: int = logging.INFO) -> None:
        if log is None:
            logger.log(level, message)
        else:
            log(message if level < logging.WARNING else f"{logging.getLevelName(level).lower()}: {message}")
    say.is_reporter = True
    return say


def silent(message: str, level: int = logging.INFO) -> None:
    """A reporter that drops everything (ranks other than 0)."""


silent.is_reporter = True


def progress_disabled(enabled: bool = True) -> bool | None:
    """tqdm's `disable`: True when the caller or the log level turns bars off, else None (shown on a TTY only)."""
    logger = logging.getLogger(ROOT)
    if not enabled or (logger.level != logging.NOTSET and logger.level > logging.INFO):
        return True
    return None


def progress_bar(total: int | None = None, desc: str = "", unit: str = "it", enabled: bool = True, **kwargs):
    """A tqdm bar on stderr with rate and ETA, shown on a terminal unless quiet."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=progress_disabled(enabled), dynamic_ncols=True, **kwargs)


@contextmanager
def quiet_libraries():
    """The libraries' own progress bars, notices and warnings silenced for a block (as under -q), then put back: for
    a walkthrough such as the quickstart, whose stages show cot2align's bars, one per long stage."""
    was_quiet = _before_quiet is not None
    _quiet_libraries(True)
    try:
        yield
    finally:
        _quiet_libraries(was_quiet)
