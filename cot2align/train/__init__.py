"""The student trainer.

    distill.py     the recipe `cot2align distill` runs: setup -> train_epoch / end_of_epoch -> finalise
    setup.py       everything prepared before the first step, one concern per function, in a `Run`
    batches.py     the public batch API: cache_dataloader, load_heads, views (the trainer's own path)
    data.py        the student's tokenisation of the cache (memoised), the dataset, collate, length buckets
    validation.py  validation records, held-out CE and greedy ROUGE-L, the best-epoch rule
    checkpoint.py  atomic safetensors checkpoints (bit-identical --resume)
    outputs.py     the saved model, projectors, summary, plot and card
    fsdp.py        FSDP2 sharding helpers; online.py: the teacher run online (tests, benchmarks); sweep.py
"""

from cot2align.errors import TrainingError  # noqa: F401  (re-exported: raised here)


