"""cot2align: cross-tokenizer distillation with Cross-CoT optimal-transport alignment.

One offline pass runs the teacher and stores what the losses need in a Zarr cache
(`cot2align.cache`); the losses are pure tensor functions (`cot2align.losses`).
"""

__version__ = "0.1.0"
