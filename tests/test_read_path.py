"""The read path: the reader's decoded chunks (cache/decoded.py) give the arrays a plain Zarr read gives, and the
chunk-ordered sampler (train/sampling.py) visits every example once per epoch, reproducibly, in stretches of
cache neighbours that share chunks, and resumes a run mid-epoch to the same weights."""

import random

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors import SafetensorError
from safetensors.torch import load_file

import cot2align.cache.format as cache_format
from conftest import write_cot_records
from cot2align.cache import open_cache
from cot2align.cache.decoded import DecodedChunks, decoded_memory
from cot2align.cli import main
from cot2align.config import DistillConfig, field_kind
from cot2align.errors import ConfigError
from cot2align.modeling import load_tokenizer
from cot2align.train import checkpoint
from cot2align.train.batches import cache_dataloader
from cot2align.train.data import LengthBucketSampler
from cot2align.train.sampling import STRETCH_BATCHES, ChunkOrderedSampler

CHUNK_ROWS = 64        # rows per chunk of every per-row array of the test cache: 2-3 examples a chunk, many across a border
CACHE_FLAGS = ["--model", "tiny-llama", "--topk", "4", "--block-examples", "5", "--max-length", "128",
               "--max-prompt-length", "64"]


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def small_chunks(tmp_path_factory):
    """A 24-example cache whose per-row arrays hold 64 rows a chunk (the real 512-65536 would put it in one)."""
    root = tmp_path_factory.mktemp("read_path")
    data = write_cot_records(root / "data.jsonl", n=24, cot_every=2)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cache_format, "hidden_chunk_rows", lambda hidden_size: CHUNK_ROWS)
        patch.setattr(cache_format, "ROW_CHUNK_1D", CHUNK_ROWS)
        result = cli("cache-teacher", *CACHE_FLAGS, "--data", data, "--out", root / "cache")
    assert result.exit_code == 0, result.output
    return root / "cache"


def plain_reader(path, monkeypatch):
    monkeypatch.setenv("COT2ALIGN_DECODED_MEMORY_MB", "0")
    cache = open_cache(path)
    monkeypatch.delenv("COT2ALIGN_DECODED_MEMORY_MB")
    assert cache.decoded.capacity == 0
    return cache


@pytest.mark.parametrize("capacity", [0.01, 256])       # MiB: a few chunks (evictions on every read), or all
def test_decoded_chunks_give_the_arrays_a_plain_read_gives(small_chunks, monkeypatch, capacity):
    plain = plain_reader(small_chunks, monkeypatch)
    monkeypatch.setenv("COT2ALIGN_DECODED_MEMORY_MB", str(capacity))
    cache = open_cache(small_chunks)
    assert cache.group["parts/0/std/hidden"].chunks[0] == CHUNK_ROWS
    order = [i for _ in range(2) for i in range(len(cache))]
    random.Random(0).shuffle(order)
    straddling = 0
    for i in order:
        for view in ("std", "cot"):
            got, want = cache.view(i, view), plain.view(i, view)
            assert got.keys() == want.keys()
            for name, value in want.items():
                if isinstance(value, np.ndarray):
                    assert got[name].dtype == value.dtype and np.array_equal(got[name], value), (i, view, name)
                else:
                    assert got[name] == value
            a, b = cache.offsets(view)[i], cache.offsets(view)[i + 1]
            straddling += b > a and a // CHUNK_ROWS != (b - 1) // CHUNK_ROWS
            for name, tensor in cache.teacher_rows(i, view).items():
                assert torch.equal(tensor, plain.teacher_rows(i, view)[name]), (i, view, name)
    assert straddling > 5                     # rows across a chunk border were read (pieces concatenated)
    assert cache.decoded.size <= cache.decoded.capacity
    assert (cache.decoded.hits > cache.decoded.misses) == (capacity == 256)


def test_each_chunk_is_decoded_once_in_cache_order_and_kept_rows_are_read_only(small_chunks, monkeypatch):
    monkeypatch.setenv("COT2ALIGN_DECODED_MEMORY_MB", "256")
    cache = open_cache(small_chunks)
    for i in range(len(cache)):
        cache.view(i, "std", names=("hidden",))
    assert cache.decoded.misses == -(-cache.rows("std") // CHUNK_ROWS)
    rows = cache.view(1, "std", names=("hidden",))["hidden"]
    if not rows.flags.owndata:                 # a slice of a kept chunk: writing it would change later reads
        with pytest.raises(ValueError):
            rows[0, 0] = 1


def test_decoded_chunks_stay_within_their_bytes_and_refuse_a_bad_setting(monkeypatch):
    kept = DecodedChunks(capacity=100)
    for c in range(5):
        kept.put(("a", c), np.zeros(40, dtype=np.uint8))
    assert kept.size == 80 and list(kept.kept) == [("a", 3), ("a", 4)]
    assert kept.get(("a", 3)) is not None and kept.get(("a", 0)) is None
    kept.put(("big", 0), np.zeros(101, dtype=np.uint8))           # larger than the whole: handed out, not kept
    assert ("big", 0) not in kept.kept
    monkeypatch.setenv("COT2ALIGN_DECODED_MEMORY_MB", "lots")
    with pytest.raises(ConfigError, match="COT2ALIGN_DECODED_MEMORY_MB: expected a number of MiB >= 0"):
        decoded_memory()


# ---------------------------------------------------------------------------------------------------- the sampler


def sampler(n=203, batch_size=4, seed=3, rank=0, world=1, shift=0):
    rng = random.Random(7)
    lengths = [rng.randrange(5, 300) for _ in range(n)]
    cache_index = [shift + k for k in range(n)]
    rng.shuffle(cache_index)             # dataset positions need not be in cache order
    return ChunkOrderedSampler(lengths, cache_index, batch_size, seed, rank, world), lengths, cache_index


def test_chunk_order_visits_every_example_once_per_epoch_on_one_and_several_ranks():
    for epoch in range(3):
        one, _, _ = sampler()
        batches = one.batches(epoch)
        assert sorted(k for b in batches for k in b) == list(range(203))
        assert sum(len(b) < 4 for b in batches) == 1               # only the last stretch's last batch is short
        ranks = [sampler(rank=r, world=3)[0].batches(epoch) for r in range(3)]
        assert len({len(r) for r in ranks}) == 1                  # every rank runs the same number of steps
        seen = [k for r in ranks for b in r for k in b]
        assert len(seen) == len(set(seen)) and len(seen) >= 203 - 3 * 4


def test_chunk_order_is_reproducible_from_the_seed_and_differs_by_seed_and_epoch():
    a, b, c = sampler()[0], sampler()[0], sampler(seed=4)[0]
    assert a.batches(0) == b.batches(0) and a.batches(1) == b.batches(1)
    assert a.batches(0) != a.batches(1) and a.batches(0) != c.batches(0)
    a.epoch, a.skip = 1, 5                    # what distill sets on resume: the same epoch, its first batches done
    assert list(a) == a.batches(1)[5:] and len(a) == len(a.batches(1)) - 5


def test_chunk_order_draws_each_batch_from_one_stretch_of_neighbours_and_buckets_lengths():
    s, lengths, cache_index = sampler()
    span = 4 * STRETCH_BATCHES
    batches = s.batches(0)
    for batch in batches:                     # chunk-mates: a batch's examples lie in one stretch of the cache
        stretches = {cache_index[k] // span for k in batch}
        assert len(stretches) == 1, batch
    # consecutive batches come from one stretch at a time: the stretch changes once per stretch, not per batch
    changes = sum(cache_index[x[0]] // span != cache_index[y[0]] // span for x, y in zip(batches, batches[1:]))
    assert changes == -(-203 // span) - 1
    shuffled = LengthBucketSampler(lengths, 4, 3).batches(0)
    assert sum(cache_index[x[0]] // span != cache_index[y[0]] // span for x, y in zip(shuffled, shuffled[1:])) > 30

    def spread(bs):                           # mean length range within a batch: the bucketing of lengths
        return np.mean([max(lengths[k] for k in b) - min(lengths[k] for k in b) for b in bs])
    assert spread(batches) < 0.25 * np.mean(lengths)


def test_chunk_order_decodes_fewer_chunks_than_the_shuffled_order(small_chunks, monkeypatch):
    """Through the trainer's loader, with room for 40% of the chunks an epoch reads: the shuffled order decodes
    a chunk again each time one of its examples comes after it was dropped, the chunk order about once."""
    def epoch(order):
        loader = cache_dataloader(open_cache(small_chunks), load_tokenizer("tiny-gpt2"), method="dskd",
                                  batch_size=1, sample_order=order, log=lambda m: None)
        assert sorted(i for batch in loader for i in batch["index"].tolist()) == list(range(24))
        return loader.dataset._cache.decoded

    everything = epoch("chunks")
    assert everything.hits > 0 and everything.size < everything.capacity
    monkeypatch.setenv("COT2ALIGN_DECODED_MEMORY_MB", str(0.4 * everything.size / (1 << 20)))
    misses = {order: epoch(order).misses for order in ("chunks", "shuffled")}
    assert misses["chunks"] < 1.2 * everything.misses < 1.2 * misses["shuffled"], misses


def test_sample_order_is_an_identity_field_with_a_checked_choice():
    from cot2align.config import build_config

    assert field_kind(DistillConfig, "sample_order") == "identity"
    with pytest.raises(ConfigError, match="sample_order: expected one of chunks, shuffled, got 'random'"):
        build_config(DistillConfig, cache="x", sample_order="random")


@pytest.mark.slow
def test_a_chunk_ordered_run_resumed_mid_epoch_ends_bit_identical(small_chunks, tmp_path, monkeypatch):
    """As the resume tests of test_disk_faults: a run stopped at its step-10 checkpoint (mid-epoch, a stretch half
    read), resumed, ends with the weights of the uninterrupted run."""
    flags = ["--cache", small_chunks, "--student", "tiny-gpt2", "--method", "dskd", "--no-cot2align", "--epochs", "2",
             "--batch-size", "1", "--val-examples", "1", "--val-max-new-tokens", "1", "--save-every", "5",
             "--lr", "3e-3", "--sample-order", "chunks"]
    reference = tmp_path / "reference"
    assert cli("distill", *flags, "--out", reference).exit_code == 0
    real = checkpoint.save_file

    def save_file(tensors, path):
        if ".step-00000010." in str(path):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(tensors, path)

    monkeypatch.setattr(checkpoint, "save_file", save_file)
    out = tmp_path / "run"
    assert cli("distill", *flags, "--out", out).exit_code == 2
    monkeypatch.undo()
    result = cli("distill", *flags, "--out", out, "--resume")
    assert result.exit_code == 0 and "resumed from" in result.stderr, result.output
    got, want = load_file(str(out / "model.safetensors")), load_file(str(reference / "model.safetensors"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    other = cli("distill", *flags[:-1], "shuffled", "--out", out, "--resume")
    assert other.exit_code == 2 and "sample_order='chunks'" in other.stderr


def test_a_run_recorded_before_sample_order_existed_resumes_only_in_the_shuffled_order(tmp_path):
    """Runs before the field read in the shuffled order: resuming one under the new default (chunks) would read
    other batches, so it is refused naming the order it used; with --sample-order shuffled it is the same run."""
    import json

    from cot2align.config import build_config, config_to_dict
    from cot2align.train.setup import check_same_run

    cfg = build_config(DistillConfig, cache="cache", method="dskd", alpha=0.5)
    assert cfg.sample_order == "chunks"
    recorded = config_to_dict(cfg)
    del recorded["sample_order"]                       # as written by an older cot2align
    marker = tmp_path / "run.json"
    marker.write_text(json.dumps({"config": recorded}))
    with pytest.raises(ConfigError, match="started with sample_order='shuffled'; this command has sample_order='chunks'"):
        check_same_run(marker, cfg, None)
    assert check_same_run(marker, build_config(DistillConfig, cache="cache", method="dskd", alpha=0.5,
                                               sample_order="shuffled"), None)["sample_order"] == "shuffled"


def test_a_worker_opens_the_cache_from_what_the_trainer_read_and_still_checks_each_chunk(small_chunks, tmp_path):
    """The trainer's open records what it read (TeacherCache.opened()); a DataLoader worker opens the cache from
    those bytes, making no request for them (over S3, ~60 sequential ones per worker): here they are deleted from
    the cache after the trainer's open, and the worker still reads every example as the trainer does. Each chunk
    it reads is still checked against the chunk index."""
    import pickle
    import shutil

    from cot2align.cache import CacheError
    from cot2align.cache.chunk_index import ROOT_INDEX

    copy = tmp_path / "cache"
    shutil.copytree(small_chunks, copy)
    trainer = open_cache(copy)
    opened = pickle.loads(pickle.dumps(trainer.opened()))        # a spawned worker gets it pickled
    assert "files/zarr.json" in opened.objects and f"files/{ROOT_INDEX}" in opened.objects
    assert any(key.endswith("/offsets/zarr.json") for key in opened.objects)
    assert not any(key.startswith("store/examples/") and "/c/" in key for key in opened.objects)    # texts: lazy
    recorded = {copy / key.split("/", 1)[1] for key, data in opened.objects.items() if data is not None}
    assert any("/offsets/c/" in path.as_posix() for path in recorded)
    for path in recorded:
        path.unlink()
    worker = open_cache(opened)
    assert len(worker) == len(trainer) == 24
    names = ("target_ids", "topk_ids", "topk_logprobs", "tail_logprob", "hidden")
    for i in range(len(worker)):
        for view in ("std", "cot"):
            got, want = worker.teacher_rows(i, view, names), trainer.teacher_rows(i, view, names)
            assert got.keys() == want.keys()
            assert all(torch.equal(got[k], want[k]) for k in got), (i, view)
    assert worker._texts is None                                    # a worker never loads the texts
    # a flipped byte in a chunk the worker has not read yet is named, as in a worker that opened from the store
    fresh = open_cache(opened)
    chunk = sorted((copy / "parts" / "0" / "std" / "hidden" / "c").rglob("*"))[-1]
    blob = bytearray(chunk.read_bytes())
    blob[len(blob) // 2] ^= 0x40
    chunk.write_bytes(bytes(blob))
    with pytest.raises(CacheError, match="parts/0/std/hidden: unreadable chunk holding example"):
        for i in range(len(fresh)):                 # its chunks and the ids' chunks beside them read together
            fresh.teacher_rows(i, "std", ("target_ids", "hidden"))
