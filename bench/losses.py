"""Benchmark of the batched Sinkhorn (issue: losses).

Prints, measured in one run:
  * time of a per-example POT loop (ot.sinkhorn, log domain, fixed 100 iterations) / time of ours,
    eager and torch.compile'd, at B=32, N=256, M=320, float32;
  * the compiled path's effective memory bandwidth: each iteration reads the B x N x M cost twice;
  * peak extra memory and time of envelope vs unrolled gradients at 8 x 512 x 512.

python bench/losses.py            (GPU when available, else CPU with smaller repeat counts)
"""

from __future__ import annotations

import json
import time

import ot
import torch

from cot2align.losses.ot import sinkhorn


def timed(fn, device, repeat):
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeat


def main():
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    B, N, M, iters = 32, 256, 320, 100
    g = torch.Generator(device="cpu").manual_seed(0)
    cost = torch.rand(B, N, M, generator=g).to(device)
    rows, cols = torch.ones(B, N, dtype=torch.bool, device=device), torch.ones(B, M, dtype=torch.bool, device=device)
    a, b = torch.full((N,), 1.0 / N, device=device), torch.full((M,), 1.0 / M, device=device)
    repeat = 5 if device.type == "cuda" else 1

    def pot_loop():
        return [ot.sinkhorn(a, b, cost[i], 10.0, method="sinkhorn_log", numItermax=iters, stopThr=0.0) for i in range(B)]

    t_pot = timed(pot_loop, device, max(1, repeat // 2))
    t_eager = timed(lambda: sinkhorn(cost, rows, cols, 10.0, iters), device, repeat)
    t_comp = timed(lambda: sinkhorn(cost, rows, cols, 10.0, iters, compile=True), device, repeat)
    bytes_per_iter = 2 * B * N * M * 4
    result = {"device": name, "shape": [B, N, M], "iters": iters, "pot_loop_s": t_pot, "ours_eager_s": t_eager,
              "ours_compiled_s": t_comp, "ratio_pot_over_eager": t_pot / t_eager, "ratio_pot_over_compiled": t_pot / t_comp,
              "compiled_effective_GBps": bytes_per_iter * iters / t_comp / 1e9}
    plan_pot = pot_loop()[0]
    plan_ours = sinkhorn(cost, rows, cols, 10.0, iters)[0][0]
    result["max_abs_plan_diff_vs_pot"] = (plan_pot - plan_ours).abs().max().item()
    print(json.dumps(result), flush=True)

    # envelope vs unrolled: peak extra memory and time of forward+backward at 8 x 512 x 512
    B2, N2 = 8, 512
    cost2 = torch.rand(B2, N2, N2, device=device)
    rows2 = torch.ones(B2, N2, dtype=torch.bool, device=device)
    for grad in ("envelope", "unrolled"):
        c = cost2.clone().requires_grad_(True)

        def step():
            _, value = sinkhorn(c, rows2, rows2, 10.0, iters, grad=grad)
            value.sum().backward()

        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        t = timed(step, device, repeat)
        extra = (torch.cuda.max_memory_allocated() - base) / 2**20 if device.type == "cuda" else float("nan")
        print(json.dumps({"device": name, "grad": grad, "shape": [B2, N2, N2], "iters": iters, "seconds": t,
                          "peak_extra_MiB": extra}), flush=True)


if __name__ == "__main__":
    main()
