"""The one crash-test hook of the package: `COT2ALIGN_FAULT=<point>` SIGKILLs the process when it reaches
that point, so the tests can check that every resumable stage survives a kill at the worst moment.

Points: `write:<block>:<view>` and `commit:<block>` (cache-teacher, after a block's arrays / before its
commit), `step:<n>` (distill, after optimiser step n), `augment-batch:<n>` (augment-cot, after batch n is on
disk). `<point>@rank<r>` fires in that rank alone (torchrun). Unset in normal use: a single environment lookup.
"""

from __future__ import annotations

import os
import signal


def fault_point(name: str) -> None:
    wanted = os.environ.get("COT2ALIGN_FAULT")
    if wanted is not None and wanted in (name, f"{name}@rank{os.environ.get('RANK', '0')}"):
        os.kill(os.getpid(), signal.SIGKILL)
