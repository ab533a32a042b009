"""Blocks of examples and length-sorted, token-budgeted batches of teacher sequences.

The plan is a pure function of the sequence lengths and the settings, so a resumed pass
recomputes exactly the batches the interrupted one would have run (bit-identical outputs).
"""

from __future__ import annotations

import numpy as np


def plan_blocks(rows_per_example: np.ndarray, block_examples: int, block_max_rows: int) -> list[int]:
    """Start indices of consecutive example blocks (plus n at the end).

    A block closes when it holds `block_examples` examples or `block_max_rows` stored rows
    (both views together), whichever comes first; it always holds at least one example.
    """
    n = len(rows_per_example)
    starts = [0]
    count = rows = 0
    for i in range(n):
        if count and (count >= block_examples or rows + rows_per_example[i] > block_max_rows):
            starts.append(i)
            count = rows = 0
        count += 1
        rows += int(rows_per_example[i])
    if starts[-1] != n:
        starts.append(n)
    return starts


def plan_batches(items: list[tuple], lengths: list[int], batch_tokens: int) -> list[list[tuple]]:
    """Group items into batches of at most `batch_tokens` padded tokens (B x longest length).

    Items are sorted longest first (ties keep their order), so padding is small and an
    out-of-memory batch shows up at the start rather than hours in.
    """
    order = sorted(range(len(items)), key=lambda j: -lengths[j])
    batches: list[list[tuple]] = []
    current: list[tuple] = []
    longest = 0
    for j in order:
        longest_if_added = max(longest, lengths[j])
        if current and longest_if_added * (len(current) + 1) > batch_tokens:
            batches.append(current)
            current, longest_if_added = [], lengths[j]
        current.append(items[j])
        longest = longest_if_added
    if current:
        batches.append(current)
    return batches
