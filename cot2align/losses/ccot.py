"""Cross-CoT alignment (CoT2Align §3.3, Eq. 13-15).

With y, y_cot the student's and Y, Y_cot the teacher's response features of the standard and CoT
views, each OT term summed over the embedding layer and the last hidden layer:

    L_CST  = OT(y_cot, Y_cot) + OT(y, Y)          same format
    L_CRC  = OT(y, Y_cot)     + OT(y_cot, Y)      cross format
    L_CCoT = (L_CST + L_CRC) / 4                  per example

One projector P (teacher D -> student d) is shared by both layers and all four pairs. All eight OT
problems of a batch are solved in one batched Sinkhorn call. An example without a CoT view has empty
CoT masks: its three CoT terms are exactly 0 and it keeps OT(y, Y)/4.

Deliberate difference from the authors' code: their teacher standard-view mask is empty by a bug, so
OT(y_cot, Y) is always 0 there; we implement the paper's four terms.
"""

from __future__ import annotations

import torch

from cot2align.losses.ot import attention_cost, plan_entropy, sinkhorn

LAYERS = ("embed", "last")
PAIRS = {  # name -> (student view, teacher view)
    "cst_cot": ("cot", "cot"), "cst_std": ("std", "std"),
    "crc_std_cot": ("std", "cot"), "crc_cot_std": ("cot", "std"),
}


def _pad_to(x: torch.Tensor, length: int, dim: int = 1) -> torch.Tensor:
    if x.shape[dim] == length:
        return x
    pad_shape = list(x.shape)
    pad_shape[dim] = length - x.shape[dim]
    return torch.cat([x, x.new_zeros(pad_shape)], dim=dim)


def ccot_loss(student: dict, teacher: dict, projector: torch.nn.Module, epsilon: float = 10.0, n_iters: int = 100,
              grad: str = "envelope", compile: bool = False, epsilon_scale: str = "absolute") -> tuple[torch.Tensor, dict]:
    """Per-example L_CCoT [B] and a dict of per-term values for logging.

    student[view] = {"embed": [B,N_v,d], "last": [B,N_v,d], "mask": [B,N_v] bool}
    teacher[view] = {"embed": [B,M_v,D], "last": [B,M_v,D], "mask": [B,M_v] bool}     view in {"std", "cot"}
    epsilon_scale: "absolute" (the paper's ε) or "relative" (ε times each plan's cost spread; losses/ot.py).

    The returned dict holds, per pair and layer, the mean OT value and `OT - mean(C)` (distance of the
    plan from the uniform coupling), each a detached scalar; and "ot/plan_entropy", the plans' H(P) / H(uniform)
    averaged over the non-empty plans (1 = uniform; see ot.plan_entropy).
    """
    costs, s_masks, t_masks, keys = [], [], [], []
    projected = {view: {layer: projector(teacher[view][layer]) for layer in LAYERS} for view in ("std", "cot")}
    for name, (s_view, t_view) in PAIRS.items():
        for layer in LAYERS:
            cost = attention_cost(student[s_view][layer], projected[t_view][layer], teacher[t_view]["mask"])
            costs.append(cost)
            s_masks.append(student[s_view]["mask"].bool())
            t_masks.append(teacher[t_view]["mask"].bool())
            keys.append((name, layer))
    n_max = max(c.shape[1] for c in costs)
    m_max = max(c.shape[2] for c in costs)
    cost = torch.cat([_pad_to(_pad_to(c, n_max, 1), m_max, 2) for c in costs])          # [8B, N, M]
    row_mask = torch.cat([_pad_to(m, n_max) for m in s_masks])
    col_mask = torch.cat([_pad_to(m, m_max) for m in t_masks])
    plan, value = sinkhorn(cost, row_mask, col_mask, epsilon, n_iters, grad, compile, epsilon_scale)
    batch = student["std"]["mask"].shape[0]
    values = value.view(len(keys), batch)                                                 # [8, B]
    total = values.sum(0) / 4.0
    pair = row_mask[:, :, None] & col_mask[:, None, :]
    mean_cost = ((cost.detach() * pair).sum((1, 2)) / pair.sum((1, 2)).clamp_min(1)).view(len(keys), batch)
    present = (pair.sum((1, 2)) > 0).view(len(keys), batch).float()
    entropy = plan_entropy(plan, pair).view(len(keys), batch)
    details = {"ot/plan_entropy": (entropy * present).sum() / present.sum().clamp_min(1)}
    for k, (name, layer) in enumerate(keys):
        n_present = present[k].sum().clamp_min(1)
        details[f"ot/{name}/{layer}"] = (values[k].detach() * present[k]).sum() / n_present
        details[f"ot_gap/{name}/{layer}"] = ((values[k].detach() - mean_cost[k]) * present[k]).sum() / n_present
    return total, details
