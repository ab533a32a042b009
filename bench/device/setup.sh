#!/bin/bash
# Call 1 on the device: install the missing wheels, stash the first GGUF part and the data, copy the code, and
# start the SFT student's chain (it needs no teacher) in the background.
set -x
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
mkdir -p /tmp/gpuwork/logs /tmp/code /tmp/c2ahome
cp .gpu/a/gguf.part1 /tmp/gguf.part1
tar xzf .gpu/a/data.tgz -C /tmp/gpuwork
cp .gpu/a/*.sh /tmp/
tar cf - --exclude=.whl --exclude=.gpu --exclude=.git . | tar xf - -C /tmp/code
export PYTHONPATH=/tmp/code:/tmp/site COT2ALIGN_HOME=/tmp/c2ahome HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
cd /tmp/code
python3 -c "import torch, transformers, zarr, rouge_score, rapidfuzz, gguf, cot2align.cli; print('torch', torch.__version__, 'transformers', transformers.__version__, 'zarr', zarr.__version__, torch.cuda.get_device_name())" || exit 1
setsid nohup python3 bench/pipeline.py --anchors --work /tmp/gpuwork --chain sft > /tmp/gpuwork/logs/sft.log 2>&1 < /dev/null &
echo $! > /tmp/gpuwork/sft.pid
sleep 45
tail -n 20 /tmp/gpuwork/logs/sft.log
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv
