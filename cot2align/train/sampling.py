"""The order a training epoch reads the cache in: `shuffled` (every batch drawn from the whole cache) or `chunks`
(batches drawn from one stretch of neighbouring examples at a time, so that they share the cache's chunks).

Why the order matters to reading: an example's teacher rows are a small slice of a chunk that holds its
neighbours' rows too (about 4 MiB of hidden state, 512-1024 rows, some 10-30 examples of a short-response
dataset). The reader keeps the chunks it decoded (cache/decoded.py), but in a shuffled order the next example
from the same chunk comes ~N/30 examples later, long after that chunk left a bounded memory: on a large cache
every example decodes whole chunks for a small slice. The chunk order reads a stretch's chunks while they are
kept, so each is decoded about once per DataLoader worker and epoch.

    SAMPLE_ORDERS     the choices of DistillConfig.sample_order
    ChunkOrderedSampler
        1. cut the examples, in cache order, into stretches of `window` batches (neighbours share chunks);
        2. shuffle the stretches (seed, epoch);
        3. in each stretch: shuffle, sort by length (ties keep the shuffled order), cut into batches — the length
           bucketing of the shuffled order, within a stretch — and shuffle those batches;
        4. the epoch is the stretches' batches one stretch after another.
    Every example is in exactly one batch of an epoch; (seed, epoch) fixes the order, so a resumed run (`skip`:
    the batches already done in its epoch) reads exactly the batches the interrupted one would have.

What it changes in training: consecutive steps draw from one stretch (batch_size x window neighbouring examples)
rather than from the whole data, so a data file sorted by topic or source gives correlated consecutive steps over
a stretch. The stretch order and the batches within it are random, so each epoch's gradient is still an unbiased
pass over the data; BENCHMARKS.md records the held-out CE of both orders.
"""

from __future__ import annotations

import random

from cot2align.config import SAMPLE_ORDERS  # noqa: F401  (the choices, kept where the CLI reads them torch-free)
from cot2align.train.data import LengthBucketSampler

STRETCH_BATCHES = 8      # batches per stretch: a few chunks of neighbours, small enough to stay decoded in memory


class ChunkOrderedSampler(LengthBucketSampler):
    """Batches (lists of dataset positions) of similar length, one stretch of cache neighbours at a time (above).

    `lengths[k]`: item k's tokens (for length bucketing); `cache_index[k]`: its example number in the cache (the
    neighbours in the cache are the items of nearby numbers). Under several ranks each takes every world-th batch
    of the epoch (cut to a multiple of the world size, so every rank runs the same number of steps): a stretch's
    batches are spread over the ranks, each reading the same few chunks."""

    def __init__(self, lengths: list[int], cache_index: list[int], batch_size: int, seed: int, rank: int = 0,
                 world: int = 1, window: int = STRETCH_BATCHES):
        if len(lengths) != len(cache_index):
            raise ValueError(f"ChunkOrderedSampler: {len(lengths)} lengths for {len(cache_index)} cache indices")
        super().__init__(lengths, batch_size, seed, rank, world, window)
        in_cache_order = sorted(range(len(lengths)), key=lambda k: cache_index[k])
        span = batch_size * window
        self.stretches = [in_cache_order[s:s + span] for s in range(0, len(in_cache_order), span)]

    def _epoch_batches(self, rng: random.Random) -> list[list[int]]:
        """Every rank's batches of one epoch: the stretches in a random order, each cut into length-sorted batches in
        a random order (the rank's share, `epoch` and `skip` are LengthBucketSampler's)."""
        stretches = [list(s) for s in self.stretches]
        rng.shuffle(stretches)
        batches = []
        for stretch in stretches:
            rng.shuffle(stretch)
            stretch.sort(key=lambda k: self.lengths[k])
            cut = [stretch[j:j + self.batch_size] for j in range(0, len(stretch), self.batch_size)]
            rng.shuffle(cut)
            batches.extend(cut)
        return batches
