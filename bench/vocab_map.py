"""Time the MinED teacher -> student vocabulary map for real tokenizer pairs (built from scratch, no disk cache).

python bench/vocab_map.py [teacher student ...]     default: the GPT-2 <-> Qwen2.5 pair in both directions
"""

from __future__ import annotations

import json
import os
import sys
import time

from cot2align.align.vocab import _special_pairs, build_vocab_map, token_strings
from cot2align.modeling import load_tokenizer


def main():
    names = sys.argv[1:] or ["tiny-qwen2", "tiny-gpt2", "tiny-gpt2", "tiny-qwen2"]
    for teacher_name, student_name in zip(names[::2], names[1::2]):
        started = time.perf_counter()
        teacher, student = load_tokenizer(teacher_name), load_tokenizer(student_name)
        result = build_vocab_map(token_strings(teacher), token_strings(student), _special_pairs(teacher, student))
        seconds = time.perf_counter() - started
        print(json.dumps({"teacher": teacher_name, "student": student_name, "teacher_vocab": len(result.tea2stu),
                          "exact_share": round(float(result.exact.mean()), 4), "seconds": round(seconds, 1),
                          "cpu_cores": os.cpu_count()}), flush=True)


if __name__ == "__main__":
    main()
