"""Logging and progress bars: one `cot2align` logger tree, configured by the CLI, left alone for library users.

Library code writes through `reporter(log, __name__)`: the `log=` callback a caller passed (kept for
compatibility: tests and scripts collect messages with `log=messages.append`), else the module's logger
(`cot2align.<module>`), INFO for progress messages and WARNING for problems. The CLI calls `configure()`:
messages go to stderr as plain lines (warnings prefixed "warning:"), INFO hidden under `--quiet`.

Progress bars (tqdm, with rate and ETA) are shown on a terminal only, and never when the `cot2align` logger
is set above INFO (`--quiet`, or a library user's `logging.getLogger("cot2align").setLevel(logging.WARNING)`).
"""

from __future__ import annotations

import logging
import sys

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
    """The command line's logging: cot2align's messages on stderr, INFO and up (WARNING and up when quiet)."""
    logger = logging.getLogger(ROOT)
    for handler in [h for h in logger.handlers if isinstance(h, _StderrHandler)]:
        logger.removeHandler(handler)
    handler = _StderrHandler()
    handler.setFormatter(_Formatter())
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    logger.propagate = False


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
