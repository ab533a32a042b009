"""How a loss receives the teacher's next-token distribution.

Three forms, all describing the same thing at a set of teacher positions [...]:

  * a plain logits tensor [..., V_t]                 (an online teacher, or tests)
  * `HeadTeacher(hidden, lm_head, bias)`             exact logits = hidden · lm_headᵀ + bias, recomputed on
                                                     demand from what the cache stores, in vocabulary
                                                     chunks where V_t is large (152k for Qwen2.5)
  * `TopKTeacher(logprobs, ids, tail, vocab_size)`   the cache's top-k log-probs at τ = 1 + the log-mass
                                                     outside the top-k (compared as one extra bucket)

`select(teacher, mask)` picks the positions where `mask` is true, giving a teacher over [P] rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from cot2align.errors import TrainingError


@dataclass
class TopKTeacher:
    """A teacher distribution as stored in the cache: top-k log-probs (τ = 1), ids and tail log-mass."""

    logprobs: torch.Tensor   # [..., k] float, descending
    ids: torch.Tensor        # [..., k] long
    tail: torch.Tensor       # [...]   log(1 − Σ top-k probs)
    vocab_size: int


@dataclass
class HeadTeacher:
    """Exact teacher logits as hidden · lm_headᵀ (+ bias): the cache stores hidden and the head once."""

    hidden: torch.Tensor                 # [..., D] last hidden state (post final norm)
    lm_head: torch.Tensor                # [V_t, D]
    bias: torch.Tensor | None = None     # [V_t]

    @property
    def vocab_size(self) -> int:
        return self.lm_head.shape[0]

    def logits(self, columns: torch.Tensor | None = None) -> torch.Tensor:
        """float32 logits [..., V_t], or only the given vocabulary columns [..., len(columns)]."""
        weight = self.lm_head if columns is None else self.lm_head[columns]
        rows = self.hidden.numel() // max(self.hidden.shape[-1], 1)
        with exact_logits_memory(weight.shape[0], self.hidden.device, rows), \
                torch.autocast(device_type=self.hidden.device.type, enabled=False):
            out = self.hidden.to(weight.dtype) @ weight.T
            if self.bias is not None:
                out = out + (self.bias if columns is None else self.bias[columns])
            return f32(out)


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` is an allocation that failed: torch.OutOfMemoryError (CUDA), the CPU allocator's
    RuntimeError ("DefaultCPUAllocator: can't allocate memory"), the MPS one, or Python's MemoryError."""
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text)


@contextmanager
def exact_logits_memory(vocab: int, device, rows: int | Callable[[], int]):
    """Running out of memory while exact teacher logits [rows, vocab] are made or used becomes one line
    (TrainingError: the command exits 2) saying how much they needed and how to need less, instead of an allocator
    traceback. `rows` may be a function, called only then (counting the rows of a mask would sync every step)."""
    try:
        yield
    except TrainingError:
        raise
    except (RuntimeError, MemoryError) as e:
        if not is_out_of_memory(e):
            raise
        rows = rows() if callable(rows) else rows
        gib = rows * vocab * 4 / 2**30           # float32 logits; the loss takes a few tensors of this size
        raise TrainingError(f"--teacher-dist exact: the teacher's exact logits for this batch ({rows} rows x {vocab} "
                            f"tokens x 4 bytes = {gib:.2f} GiB, several times over for the loss) do not fit in "
                            f"{torch.device(device).type} memory; use --teacher-dist topk (the cached top-k), or a "
                            "smaller --batch-size") from None


def f32(x: torch.Tensor) -> torch.Tensor:
    """At least float32: half precisions are upcast, float64 stays (so gradcheck can run in float64)."""
    return x if x.dtype == torch.float64 else x.float()


def tempered_buckets(teacher: TopKTeacher, temperature: float, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Teacher log-probs at τ over k + 1 buckets: its top-k tokens, then one bucket for the rest.

    The top-k are tempered exactly; the rest bucket as if its mass were spread evenly over the V − k other
    tokens, n·(mass/n)^(1/τ) (exact at τ = 1). `keep` [..., k] drops top-k entries (their mass leaves the
    distribution, which is renormalised over what is kept — MinED's restriction to mapped tokens).
    """
    k = teacher.ids.shape[-1]
    n_rest = teacher.vocab_size - k
    top = f32(teacher.logprobs) / temperature
    if keep is not None:
        top = torch.where(keep, top, float("-inf"))
    if n_rest > 0:
        rest = (f32(teacher.tail) - math.log(n_rest)) / temperature + math.log(n_rest)
    else:
        rest = torch.full_like(f32(teacher.tail), float("-inf"))
    return torch.log_softmax(torch.cat([top, rest[..., None]], dim=-1), dim=-1)


def vocab_size_of(teacher) -> int:
    return teacher.vocab_size if isinstance(teacher, (TopKTeacher, HeadTeacher)) else teacher.shape[-1]


def select(teacher, mask: torch.Tensor):
    """The teacher at the positions where `mask` [...] is true: a teacher over [P] rows."""
    mask = mask.bool()
    if isinstance(teacher, TopKTeacher):
        return TopKTeacher(teacher.logprobs[mask], teacher.ids[mask], teacher.tail[mask], teacher.vocab_size)
    if isinstance(teacher, HeadTeacher):
        return HeadTeacher(teacher.hidden[mask], teacher.lm_head, teacher.bias)
    return teacher[mask]


def index_rows(teacher, rows: torch.Tensor):
    """The teacher at flat row indices `rows` [P] of a teacher over [R] rows."""
    if isinstance(teacher, TopKTeacher):
        return TopKTeacher(teacher.logprobs[rows], teacher.ids[rows], teacher.tail[rows], teacher.vocab_size)
    if isinstance(teacher, HeadTeacher):
        return HeadTeacher(teacher.hidden[rows], teacher.lm_head, teacher.bias)
    return teacher[rows]


def flatten(teacher):
    """A teacher over [B, M] positions as one over [B*M] rows."""
    if isinstance(teacher, TopKTeacher):
        k = teacher.ids.shape[-1]
        return TopKTeacher(teacher.logprobs.reshape(-1, k), teacher.ids.reshape(-1, k), teacher.tail.reshape(-1),
                           teacher.vocab_size)
    if isinstance(teacher, HeadTeacher):
        return HeadTeacher(teacher.hidden.reshape(-1, teacher.hidden.shape[-1]), teacher.lm_head, teacher.bias)
    return teacher.reshape(-1, teacher.shape[-1])


def full_logits(teacher) -> torch.Tensor:
    """Materialise exact logits [..., V_t] (float32); only for vocabularies where that is affordable."""
    if isinstance(teacher, TopKTeacher):
        raise TypeError("full_logits: a top-k teacher has no full logits")
    return teacher.logits() if isinstance(teacher, HeadTeacher) else f32(teacher)
