"""Sharded data parallelism (FSDP2, `torch.distributed.fsdp.fully_shard`) for students too large to
replicate on every GPU (`cot2align distill --fsdp` under torchrun / accelerate launch).

DDP keeps a full copy of the student, its gradients and its AdamW state on every rank: 16 bytes per
parameter in float32, 24 GB for GPT2-1.5B before any activation. FSDP splits each transformer block's
parameters, gradients and optimiser state into `world` shards (rank r holds rows r/world of every
tensor); a block's full weights exist only while it runs forward or backward, gathered on the fly, and
its gradients are reduce-scattered (averaged) back to the shards.

What is not sharded: the student's input embedding and output head. The losses read those weights
directly, outside the model's forward (DSKD's teacher-to-student logits are `projector(teacher_hidden)`
through the student's lm_head), which a sharded weight cannot serve. They stay whole on every rank and
their gradients are averaged by hand, like the projectors' — a small share of a large student
(GPT2-1.5B: 80M of 1.5B parameters).

Everything else in the trainer is unchanged, with three collective steps written out here: gradient
clipping over sharded and whole gradients, gathering full tensors for checkpoints and saved models, and
putting a checkpoint's full tensors back into shards.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, distribute_tensor


def shard_student(model, device: torch.device) -> list[torch.nn.Parameter]:
    """Shard `model` in place (every block, then the rest); return its trainable parameters that stay whole."""
    # lazy: only under --fsdp (FSDP2's fully_shard is public from torch 2.6)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    block_names = set(getattr(base, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in block_names]
    if not blocks:
        raise ValueError(f"--fsdp: cannot find the transformer blocks of {type(base).__name__} "
                         "(its _no_split_modules is empty); use DDP (drop --fsdp)")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    whole = {base.get_input_embeddings().weight, base.get_output_embeddings().weight}
    bias = getattr(base.get_output_embeddings(), "bias", None)
    if bias is not None:
        whole.add(bias)
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh, ignored_params=whole)
    return [p for p in whole if p.requires_grad]


def average_gradients(params) -> None:
    """All-reduce and average the gradients of parameters every rank holds whole (projectors, heads)."""
    world = dist.get_world_size()
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world


def clip_grad_norm(params, max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ over a mix of sharded (DTensor) and whole gradients: the global L2 norm
    is sqrt(sum over ranks of each shard's squared norm + the whole gradients' squared norm), and every
    gradient is scaled by min(1, max_norm / (norm + 1e-6))."""
    grads = [p.grad for p in params if p.grad is not None]
    sharded = [g.to_local() for g in grads if isinstance(g, DTensor)]
    whole = [g for g in grads if not isinstance(g, DTensor)]
    device = (sharded or whole)[0].device
    squared = torch.zeros((), dtype=torch.float32, device=device)
    for g in sharded:
        squared += g.float().pow(2).sum()
    dist.all_reduce(squared)
    for g in whole:
        squared += g.float().pow(2).sum()
    norm = squared.sqrt()
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for g in sharded + whole:    # to_local() is a view of the shard: scaling it scales the gradient in place
        g.mul_(scale.to(g.dtype))
    return norm


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor (a collective for a sharded one: every rank must call it)."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def shard_like(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`value` (a whole tensor present on every rank) laid out like `like` (this rank's shard if sharded)."""
    if not isinstance(like, DTensor):
        return value
    return distribute_tensor(value.to(like.device), like.device_mesh, like.placements, src_data_rank=None)


def is_sharded(model) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())
