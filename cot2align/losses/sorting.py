"""Sorting distributions along the vocabulary axis, fast on the CPU.

ULD (Boizard et al. 2024) compares the student's and the teacher's distributions rank by rank, so every paired
response position sorts a whole vocabulary (50k–150k entries) on each side. On the CPU torch.sort is a
generic comparison sort; NumPy's sort of float32 rows is vectorised (x86-simd-sort, AVX2 / AVX-512) and
much faster at this width (bench/sort.py measures both). So CPU float tensors are sorted with NumPy, split
into row blocks over torch's intra-op threads (NumPy releases the GIL while it sorts); other devices and
dtypes keep torch.sort. The sorted values are the same either way; only the order of tied entries may
differ, which changes neither a sorted vector nor a loss of it.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

_NUMPY_DTYPES = (torch.float32, torch.float64)
_MIN_ROWS_PER_THREAD = 16


def _by_row_blocks(function, array: np.ndarray, dtype) -> np.ndarray:
    """function(rows) for the rows of `array` (its last axis), in row blocks on torch's intra-op threads."""
    rows = array.reshape(-1, array.shape[-1])
    threads = min(torch.get_num_threads(), len(rows) // _MIN_ROWS_PER_THREAD)
    if threads <= 1:
        return function(rows).reshape(array.shape)
    blocks = np.array_split(np.arange(len(rows)), threads)
    out = np.empty(rows.shape, dtype=dtype)

    def work(block):
        out[block[0]:block[-1] + 1] = function(rows[block[0]:block[-1] + 1])

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(work, blocks))
    return out.reshape(array.shape)


def _sort_descending(rows: np.ndarray) -> np.ndarray:
    return np.sort(rows, axis=-1)[..., ::-1]


def _argsort_descending(rows: np.ndarray) -> np.ndarray:
    return np.argsort(rows, axis=-1)[..., ::-1]


def sort_descending(values: torch.Tensor) -> torch.Tensor:
    """`values` sorted along the last axis, largest first (as `values.sort(dim=-1, descending=True).values`).

    Differentiable: with a gradient the values are gathered through the sorting permutation, so each entry
    receives the gradient of the rank it landed on."""
    if values.device.type != "cpu" or values.dtype not in _NUMPY_DTYPES or values.dim() == 0 or values.numel() == 0:
        return values.sort(dim=-1, descending=True).values
    array = values.detach().numpy()
    if not values.requires_grad:
        return torch.from_numpy(np.ascontiguousarray(_by_row_blocks(_sort_descending, array, array.dtype)))
    order = torch.from_numpy(np.ascontiguousarray(_by_row_blocks(_argsort_descending, array, np.int64)))
    return values.gather(-1, order)
