"""sort_descending (losses/sorting.py): NumPy's sort on CPU float tensors must give exactly torch.sort's values
and, through the permutation, the same gradient — in one block and split over threads."""

import numpy as np
import pytest
import torch

from cot2align.losses.sorting import sort_descending


def _distinct_rows(shape, dtype=torch.float32) -> torch.Tensor:
    """Rows without ties (a random permutation of 0..V-1, scaled): the sorting permutation is unique, so the
    gradients of two sorts must agree exactly."""
    return (torch.rand(shape).argsort(dim=-1).to(dtype) + 1) / shape[-1]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", [(7,), (3, 11), (2, 40, 300), (64, 5000)])
def test_values_and_gradient_equal_torch_sort(shape, threads):
    torch.manual_seed(0)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        values = _distinct_rows(shape)
        assert torch.equal(sort_descending(values), values.sort(dim=-1, descending=True).values)
        weights = torch.randn(shape)
        ours, theirs = values.clone().requires_grad_(True), values.clone().requires_grad_(True)
        (sort_descending(ours) * weights).sum().backward()
        (theirs.sort(dim=-1, descending=True).values * weights).sum().backward()
        assert torch.equal(ours.grad, theirs.grad)
    finally:
        torch.set_num_threads(before)


def test_ties_nan_and_softmax_rows_give_torch_values():
    """With ties the permutation is not unique, but the sorted values are; NaN sorts first, as in torch."""
    torch.manual_seed(1)
    logits = torch.randn(40, 50257)
    logits[:, :500] = logits[:, 500:1000]                          # ties, as untrained tokens' equal logits give
    probs = torch.softmax(logits, dim=-1)
    assert torch.equal(sort_descending(probs), probs.sort(dim=-1, descending=True).values)
    tied = torch.tensor([[0.2, 0.5, 0.2, 0.1, 0.5], [1.0, float("nan"), 0.0, 2.0, -1.0]])
    expected = tied.sort(dim=-1, descending=True).values
    got = sort_descending(tied)
    assert torch.equal(torch.isnan(got), torch.isnan(expected))
    assert torch.equal(got[~torch.isnan(got)], expected[~torch.isnan(expected)])


def test_views_and_other_dtypes():
    torch.manual_seed(2)
    base = _distinct_rows((30, 50), dtype=torch.float64)
    transposed = base.T                                            # not contiguous
    assert torch.equal(sort_descending(transposed), transposed.sort(dim=-1, descending=True).values)
    assert sort_descending(base).dtype == torch.float64
    half = base.to(torch.bfloat16)                                 # no NumPy dtype: torch.sort
    assert torch.equal(sort_descending(half), half.sort(dim=-1, descending=True).values)
    assert sort_descending(torch.empty(0, 5)).shape == (0, 5)
    assert np.array_equal(sort_descending(torch.tensor([3.0, 1.0, 2.0])).numpy(), [3.0, 2.0, 1.0])
