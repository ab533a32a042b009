#!/bin/bash
# The teacher and the KD students (the SFT student runs beside them since call 1), then one summary of all rows.
export PYTHONPATH=/tmp/code:/tmp/site COT2ALIGN_HOME=/tmp/c2ahome HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
cd /tmp/code
python3 bench/pipeline.py --anchors --work /tmp/gpuwork --methods uld,mined,dskd,dskd_cot2align > /tmp/gpuwork/logs/main.log 2>&1
echo "main exit $?"
while kill -0 "$(cat /tmp/gpuwork/sft.pid)" 2>/dev/null; do sleep 5; done
python3 bench/pipeline.py --anchors --work /tmp/gpuwork > /tmp/gpuwork/logs/final.log 2>&1
echo "final exit $?"
touch /tmp/gpuwork/ALLDONE
