"""sort_descending (losses/sorting.py): NumPy's sort on CPU float tensors must give exactly torch.sort's values
and, through the permutation, the same gradient — one block or many, on one thread or several."""

import pytest
import torch

import cot2align.losses.sorting as sorting
from cot2align.losses.sorting import sort_descending, uses_numpy


def _distinct_rows(shape, dtype=torch.float32) -> torch.Tensor:
    """Rows without ties (a random permutation of 1..V, scaled): the sorting permutation is unique, so the
    gradients of two sorts must agree exactly."""
    return (torch.rand(shape).argsort(dim=-1).to(dtype) + 1) / shape[-1]


def _torch_sorted(values):
    return values.sort(dim=-1, descending=True).values


def _gradients(values, weights):
    """(ours, torch's) gradient of Σ weights · sorted(values)."""
    ours, theirs = values.clone().requires_grad_(True), values.clone().requires_grad_(True)
    (sort_descending(ours) * weights).sum().backward()
    (_torch_sorted(theirs) * weights).sum().backward()
    return ours.grad, theirs.grad


@pytest.fixture
def numpy_calls(monkeypatch):
    """Counts of the NumPy sorts and of the thread pools sort_descending uses."""
    calls = {"sort": 0, "argsort": 0, "pools": 0}

    def counted(name, function):
        def wrapper(rows):
            calls[name] += 1
            return function(rows)
        return wrapper

    class CountedPool(sorting.ThreadPoolExecutor):
        def __init__(self, *args, **kwargs):
            calls["pools"] += 1
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(sorting, "_sort_descending", counted("sort", sorting._sort_descending))
    monkeypatch.setattr(sorting, "_argsort_descending", counted("argsort", sorting._argsort_descending))
    monkeypatch.setattr(sorting, "ThreadPoolExecutor", CountedPool)
    return calls


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", [(7,), (3, 11), (2, 40, 300), (130, 5000)])
def test_values_and_gradient_equal_torch_sort(shape, threads, numpy_calls):
    torch.manual_seed(0)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        values = _distinct_rows(shape)
        assert torch.equal(sort_descending(values), _torch_sorted(values))
        ours, theirs = _gradients(values, torch.randn(shape))
        assert torch.equal(ours, theirs)
    finally:
        torch.set_num_threads(before)
    rows = values.numel() // shape[-1]
    blocks = -(-rows // sorting._BLOCK_ROWS)
    assert numpy_calls["sort"] == numpy_calls["argsort"] == blocks       # NumPy sorted every block, both paths
    assert numpy_calls["pools"] == (2 if threads == 2 and blocks > 1 else 0)


def test_ties_give_torch_values_and_the_gradients_of_the_tied_ranks():
    """With ties the permutation is not unique: the values still equal torch's, and each group of tied entries
    receives the gradients of the ranks the group occupies (possibly among its members in another order)."""
    torch.manual_seed(1)
    logits = torch.randn(70, 2000)
    logits[:, :500] = logits[:, 500:1000]                          # ties, as untrained tokens' equal logits give
    probs = torch.softmax(logits, dim=-1)
    assert torch.equal(sort_descending(probs), _torch_sorted(probs))
    ours, theirs = _gradients(probs, torch.randn(probs.shape))
    assert not torch.equal(ours, theirs)       # the tie order does differ here, so the check below means something
    for row in range(len(probs)):
        for value in probs[row].unique():
            group = probs[row] == value
            assert torch.equal(ours[row][group].sort().values, theirs[row][group].sort().values)


def test_nan_inf_views_and_other_dtypes():
    torch.manual_seed(2)
    special = torch.tensor([[0.2, float("nan"), 0.5, float("inf"), -float("inf"), -1.0]])
    got = sort_descending(special)
    assert torch.isnan(got[0, 0]) and torch.equal(got[0, 1:], _torch_sorted(special)[0, 1:])
    with_grad = special.clone().requires_grad_(True)
    assert torch.isnan(sort_descending(with_grad)[0, 0])
    transposed = _distinct_rows((30, 50)).T.contiguous().T         # the same rows, not contiguous
    assert not transposed.is_contiguous()
    assert torch.equal(sort_descending(transposed), _torch_sorted(transposed))
    ours, theirs = _gradients(transposed, torch.randn(transposed.shape))
    assert torch.equal(ours, theirs)
    double = _distinct_rows((5, 9), dtype=torch.float64)
    assert uses_numpy(double) and sort_descending(double).dtype == torch.float64
    assert torch.equal(sort_descending(double), _torch_sorted(double))
    half = double.to(torch.bfloat16)                               # no NumPy dtype: torch.sort
    assert not uses_numpy(half) and torch.equal(sort_descending(half), _torch_sorted(half))
    sparse = double.to_sparse()
    assert not uses_numpy(sparse)
    assert sort_descending(torch.empty(0, 5)).shape == (0, 5)
