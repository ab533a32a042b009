"""Sorting distributions along the vocabulary axis, fast on the CPU.

ULD (Boizard et al. 2024) compares the student's and the teacher's distributions rank by rank, so every paired
response position sorts a whole vocabulary (50k–150k entries) on each side. On the CPU torch.sort is a
generic comparison sort; NumPy's sort of float rows is vectorised (x86-simd-sort, AVX2 / AVX-512) and much
faster at this width (`bench/losses.py --part uld` measures both). So CPU float tensors are sorted with NumPy,
in blocks of rows spread over torch's intra-op threads (NumPy releases the GIL while it sorts); other
devices, dtypes and layouts keep torch.sort.

The sorted values are exactly torch.sort's. Entries that are exactly equal (a float32 softmax over 50k
tokens has about a hundred such ties per row) may land in another order than torch.sort's own — which is
itself unspecified — so with a gradient, each tied entry receives the gradient of one of the tied ranks, just
not always the same one torch would have given it. Either is a valid (sub)gradient of a loss of the sorted
values; results are deterministic run to run, but not bit-identical to a torch.sort build.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

_NUMPY_DTYPES = (torch.float32, torch.float64)
_BLOCK_ROWS = 64          # rows per unit of work: a block's temporary is small, and blocks spread over threads


def _by_row_blocks(function, array: np.ndarray, dtype) -> np.ndarray:
    """function(rows) for the rows of `array` (its last axis), written block by block into one output array."""
    rows = array.reshape(-1, array.shape[-1])
    out = np.empty(rows.shape, dtype=dtype)
    starts = range(0, len(rows), _BLOCK_ROWS)

    def work(start: int) -> None:
        out[start:start + _BLOCK_ROWS] = function(rows[start:start + _BLOCK_ROWS])

    threads = min(torch.get_num_threads(), len(starts))
    if threads <= 1:
        for start in starts:
            work(start)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(work, starts))
    return out.reshape(array.shape)


def _sort_descending(rows: np.ndarray) -> np.ndarray:
    return np.sort(rows, axis=-1)[..., ::-1]          # NaN sorts last, so first once reversed: as torch.sort


def _argsort_descending(rows: np.ndarray) -> np.ndarray:
    return np.argsort(rows, axis=-1)[..., ::-1]


def uses_numpy(values: torch.Tensor) -> bool:
    """Whether sort_descending sorts `values` with NumPy (else with torch.sort)."""
    return (values.device.type == "cpu" and values.layout == torch.strided and values.dtype in _NUMPY_DTYPES
            and values.dim() > 0 and values.numel() > 0)


def sort_descending(values: torch.Tensor) -> torch.Tensor:
    """`values` sorted along the last axis, largest first: `values.sort(dim=-1, descending=True).values`.

    Differentiable: with a gradient the values are gathered through the sorting permutation, so each entry
    receives the gradient of the rank it landed on."""
    if not uses_numpy(values):
        return values.sort(dim=-1, descending=True).values
    array = values.detach().numpy()
    if not values.requires_grad:
        return torch.from_numpy(_by_row_blocks(_sort_descending, array, array.dtype))
    order = torch.from_numpy(_by_row_blocks(_argsort_descending, array, np.int64))
    return values.gather(-1, order)
