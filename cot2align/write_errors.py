"""Failed writes — disk full (ENOSPC), quota (EDQUOT), read-only storage (EROFS), permissions — as the one-line
user errors the CLI prints, saying what is intact and how to continue, instead of a traceback.

A failed write reaches us as an OSError (Python's own file writes, Zarr's stores, shutil), or from safetensors as
a SafetensorError whose text holds "I/O error: <reason> (os error N)".
"""

from __future__ import annotations

import re
from contextlib import contextmanager

_SAFETENSORS_IO = re.compile(r"I/O error: (.*?)(?: at path .*)?$")


def io_failure(error: BaseException, said: str = "") -> str | None:
    """A short reason when `error` is a failed read or write of storage (naming the file unless `said` does),
    else None."""
    if isinstance(error, OSError):
        reason = error.strerror or str(error) or type(error).__name__
        return f"{reason}: {error.filename}" if error.filename and str(error.filename) not in said else reason
    if type(error).__name__ == "SafetensorError":
        match = _SAFETENSORS_IO.search(str(error))
        if match:
            return match.group(1)
    return None


@contextmanager
def reported(error, what: str, recovery: str):
    """Turn a storage failure inside the block into `error` ("<what> (<reason>); <recovery>")."""
    try:
        yield
    except Exception as e:
        reason = io_failure(e, what)
        if reason is None:
            raise
        raise error(f"{what} ({reason}); {recovery}") from None
