"""Benchmarks of the losses (issue: losses).

Part "sinkhorn" prints, measured in one run:
  * time of a per-example POT loop (ot.sinkhorn, log domain, fixed 100 iterations) / time of ours,
    eager and torch.compile'd, at B=32, N=256, M=320, float32;
  * the compiled path's effective memory bandwidth: each iteration reads the B x N x M cost twice;
  * peak extra memory and time of envelope vs unrolled gradients at 8 x 512 x 512.

Part "objective": the full DSKD + CoT2Align objective (both views, exact teacher logits recomputed from
the cached hidden states, 100 Sinkhorn iterations) for a student batch of 8 sequences x 512 tokens per
view against a Mistral-7B-sized (D 4096, V 32000) and a Qwen2.5-7B-sized (D 3584, V 152064) teacher: its
forward+backward time and peak extra memory as a fraction of a TinyLlama-1.1B student forward+backward
(bf16 autocast, full fine-tuning) on the same batch. Random-initialised real architectures.

Part "uld": the vocabulary sorts of exact ULD on the CPU (losses/sorting.py): torch.sort / sort_descending for
the teacher's sorted probabilities (no gradient) and the student's (gathered through the permutation), and a
whole uld_loss forward+backward with torch.sort / with sort_descending, at 256 paired positions x V 50257 (GPT-2
student) against V 49152 (SmolLM2 teacher) and V 151936 (Qwen2.5); on the CPU only (elsewhere torch.sort is kept).

python bench/losses.py [--part sinkhorn|objective|uld|all] [--tiny]   (GPU when available; --tiny on CPU)
"""

from __future__ import annotations

import json
import time

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


def sinkhorn_bench(device, name):
    import ot

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


def _peak(device, fn):
    """(seconds, peak extra MiB above what was allocated before) of fn, after one warm-up call."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    seconds = timed(fn, device, 3 if device.type == "cuda" else 1)
    extra = (torch.cuda.max_memory_allocated() - base) / 2**20 if device.type == "cuda" else float("nan")
    return seconds, extra


def objective_bench(device, name, tiny: bool):
    from cot2align.losses.objective import Heads, LossConfig, StudentView, TeacherView, build_projectors, distillation_loss
    from cot2align.losses.teacher import HeadTeacher
    from cot2align.modeling import build_random_model, build_tiny_model

    if tiny:
        student = build_tiny_model("tiny-llama").to(device)
        batch, length, response, teachers = 4, 128, 64, {"tiny-mistral-sized": (64, 32000), "tiny-qwen2.5-sized": (64, 152064)}
    else:
        student = build_random_model("random:tinyllama-1.1b", dtype=torch.float32, device=device)
        batch, length, response = 8, 512, 256
        teachers = {"mistral-7b-sized": (4096, 32000), "qwen2.5-7b-sized": (3584, 152064)}
    student.train()
    d_student, v_student = student.config.hidden_size, student.config.vocab_size
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    g = torch.Generator(device="cpu").manual_seed(0)
    views = ("std", "cot")
    ids = {v: torch.randint(0, v_student, (batch, length), generator=g).to(device) for v in views}
    mask = torch.zeros(batch, length, dtype=torch.bool, device=device)
    mask[:, length - response - 1:length - 1] = True

    def student_step():
        with autocast:
            loss = 0.0
            for v in views:
                logits = student(ids[v]).logits
                loss = loss + torch.nn.functional.cross_entropy(logits[:, :-1][mask[:, :-1]].float(), ids[v][:, 1:][mask[:, :-1]])
        loss.backward()
        student.zero_grad(set_to_none=True)

    t_student, m_student = _peak(device, student_step)
    print(json.dumps({"device": name, "student": "tinyllama-1.1b" if not tiny else "tiny-llama", "batch": [2, batch, length],
                      "student_fwd_bwd_s": t_student, "student_peak_extra_MiB": m_student}), flush=True)

    # student outputs as leaves, so only the objective's own work is timed
    with torch.no_grad(), autocast:
        outputs = {v: student(ids[v], output_hidden_states=True) for v in views}
    student_views = {v: StudentView(logits=outputs[v].logits.detach().requires_grad_(True),
                                    embed=outputs[v].hidden_states[0].detach(),
                                    last=outputs[v].hidden_states[-1].detach().requires_grad_(True),
                                    input_ids=ids[v], target_ids=torch.roll(ids[v], -1, 1), mask=mask) for v in views}
    del outputs
    rows = response + response // 8      # the teacher's tokenizer gives a few more tokens
    for label, (d_teacher, v_teacher) in teachers.items():
        wdtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        heads = Heads(student_embed_tokens=student.get_input_embeddings().weight.detach(),
                      student_lm_head=student.get_output_embeddings().weight.detach(),
                      teacher_embed_tokens=torch.randn(v_teacher, d_teacher, device=device, dtype=wdtype) * 0.02,
                      teacher_lm_head=torch.randn(v_teacher, d_teacher, device=device, dtype=wdtype) * 0.02)
        teacher_views = {}
        for v in views:
            hidden = torch.randn(batch, rows, d_teacher, device=device, dtype=wdtype)
            teacher_views[v] = TeacherView(
                input_ids=torch.randint(0, v_teacher, (batch, rows), device=device),
                target_ids=torch.randint(0, v_teacher, (batch, rows), device=device), hidden=hidden,
                embed=heads.teacher_embed_tokens[torch.randint(0, v_teacher, (batch, rows), device=device)],
                mask=torch.ones(batch, rows, dtype=torch.bool, device=device),
                dist=HeadTeacher(hidden, heads.teacher_lm_head))
        projectors = build_projectors("dskd", True, d_student, d_teacher).to(device)

        def objective_step(method="dskd", cot2align=True, ot_compile=False):
            with autocast:
                loss, _ = distillation_loss(method, 0.9, student_views, teacher_views, heads, projectors, cot2align=cot2align,
                                            config=LossConfig(ot_compile=ot_compile))
            loss.backward()
            for v in views:
                student_views[v].logits.grad = None
                student_views[v].last.grad = None
            projectors.zero_grad(set_to_none=True)

        variants = {"dskd+cot2align": dict(), "dskd+cot2align, compiled sinkhorn": dict(ot_compile=True),
                    "dskd only (std view)": dict(cot2align=False), "sft+cot2align (ccot only)": dict(method="sft")}
        if device.type != "cuda":
            variants.pop("dskd+cot2align, compiled sinkhorn")
        for variant, kwargs in variants.items():
            t_obj, m_obj = _peak(device, lambda: objective_step(**kwargs))
            print(json.dumps({"device": name, "teacher": label, "variant": variant, "D": d_teacher, "V": v_teacher,
                              "objective_s": t_obj, "objective_peak_extra_MiB": m_obj,
                              "time_fraction_of_student": t_obj / t_student,
                              "memory_fraction_of_student": m_obj / m_student if m_student == m_student else None}),
                  flush=True)
        del heads, teacher_views, projectors
        if device.type == "cuda":
            torch.cuda.empty_cache()


def uld_bench(name):
    """torch.sort vs sort_descending on the CPU, alone and inside uld_loss (forward + backward)."""
    import cot2align.losses.uld as uld
    from cot2align.losses.sorting import sort_descending

    def torch_sort(values):
        return values.sort(dim=-1, descending=True).values

    g = torch.Generator().manual_seed(0)
    positions = 256
    for v_s, v_t in ((50257, 49152), (50257, 151936)):
        student_logits = torch.randn(1, positions, v_s, generator=g)
        teacher_logits = torch.randn(1, positions, v_t, generator=g)
        mask = torch.ones(1, positions, dtype=torch.bool)
        teacher_probs = torch.softmax(teacher_logits[0], dim=-1)

        def loss_step():
            student = student_logits.clone().requires_grad_(True)
            uld.uld_loss(student, teacher_logits, mask, mask).backward()

        def sort_with_grad(sort):
            student = torch.softmax(student_logits[0], dim=-1).requires_grad_(True)
            return lambda: sort(student)

        times = {"teacher_sort_torch_s": timed(lambda: torch_sort(teacher_probs), torch.device("cpu"), 3),
                 "teacher_sort_ours_s": timed(lambda: sort_descending(teacher_probs), torch.device("cpu"), 3),
                 "student_sort_torch_s": timed(sort_with_grad(torch_sort), torch.device("cpu"), 3),
                 "student_sort_ours_s": timed(sort_with_grad(sort_descending), torch.device("cpu"), 3)}
        uld.sort_descending = torch_sort                  # the loss as it was: torch.sort on both sides
        try:
            times["uld_step_torch_s"] = timed(loss_step, torch.device("cpu"), 2)
        finally:
            uld.sort_descending = sort_descending
        times["uld_step_ours_s"] = timed(loss_step, torch.device("cpu"), 2)
        result = {"device": name, "positions": positions, "student_vocab": v_s, "teacher_vocab": v_t,
                  **{k: round(v, 4) for k, v in times.items()},
                  "ratio_teacher_sort": round(times["teacher_sort_torch_s"] / times["teacher_sort_ours_s"], 1),
                  "ratio_student_sort": round(times["student_sort_torch_s"] / times["student_sort_ours_s"], 1),
                  "ratio_uld_step": round(times["uld_step_torch_s"] / times["uld_step_ours_s"], 2)}
        print("uld", json.dumps(result))


def main():
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--part", choices=["sinkhorn", "objective", "uld", "all"], default="all")
    parser.add_argument("--tiny", action="store_true", help="small shapes (CPU smoke run)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    if args.part in ("sinkhorn", "all"):
        sinkhorn_bench(device, name)
    if args.part in ("objective", "all"):
        objective_bench(device, name, args.tiny)
    if args.part in ("uld", "all"):
        cpu = name if device.type == "cpu" else f"CPU ({torch.get_num_threads()} threads)"
        uld_bench(cpu)


if __name__ == "__main__":
    main()
