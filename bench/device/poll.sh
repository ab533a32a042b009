#!/bin/bash
# Wait up to $1 seconds (less when the whole run is done), then show progress and pack the small results into $OUT.
end=$((SECONDS + $1))
while [ $SECONDS -lt $end ] && [ ! -f /tmp/gpuwork/ALLDONE ]; do sleep 5; done
cd /tmp/gpuwork
ls; cat logs/all.log; for f in logs/*.log; do echo "== $f"; tail -n 6 "$f" | cut -c1-400; done
cat timings.json
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv
tar czf $OUT/results.tgz --exclude='*.safetensors' --exclude=checkpoints --exclude=best --exclude=best.tmp \
  --exclude=tensorboard --exclude=tokenizer.json --exclude='*.students' logs timings.json summary.json runs \
  teacher/metrics.jsonl teacher/eval teacher/summary.json cot.jsonl cache/zarr.json 2>/dev/null
ls -la $OUT
