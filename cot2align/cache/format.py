"""The teacher cache format, version 1 (DESIGN §4): names, dtypes, chunking and codecs.

    <cache>/zarr.json         group attributes = the manifest
    <cache>/teacher/          tokenizer files, config.json, head.safetensors (embed_tokens, lm_head[, lm_head_bias])
    <cache>/examples/         id, prompt_std, response_std, prompt_cot, response_cot   (str [n])
    <cache>/std/, <cache>/cot/
        offsets       int64  [n+1]   rows of example i are offsets[i]:offsets[i+1]
        prompt_len    int32  [n]     teacher tokens in the prompt
        input_ids     int32  [T]     teacher token at stored position t
        target_ids    int32  [T]     teacher token at t+1
        hidden        uint16 [T, D]  last hidden state (post final norm), bf16 bits
                      (int8 [T, D] + hidden_scale float16 [T] when --hidden-dtype int8)
        embeds        uint16 [T, D]  embedding-layer feature, only when embed_kind == "stored" (GPT-2)
        topk_ids      uint16|int32 [T, k]
        topk_logprobs float16 [T, k] log-softmax at temperature 1, descending
        tail_logprob  float32 [T]    log(1 - sum of top-k probs)

Every chunk carries a crc32c checksum (codec), so `cache verify` detects a corrupted chunk.
Chunks are one file each (no sharding): the writer commits whole chunk files atomically
(write-then-rename), which is what makes a crash at any moment safe.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from zarr.codecs import BloscCodec, BloscShuffle, Crc32cCodec

FORMAT = "cot2align-cache"
FORMAT_VERSION = 1
VIEWS = ("std", "cot")
TEXT_FIELDS = ("id", "prompt_std", "response_std", "prompt_cot", "response_cot")



class CacheError(ValueError):
    """A one-line, user-facing problem with a cache."""


def read_manifest(path: str | Path) -> dict | None:
    """The manifest of a cache at `path`, or None when there is no zarr group there."""
    meta = Path(path) / "zarr.json"
    if not meta.exists():
        return None
    try:
        return json.loads(meta.read_text()).get("attributes", {})
    except json.JSONDecodeError as e:
        raise CacheError(f"{meta}: unreadable group metadata ({e.msg})") from None


def check_format(manifest: dict, path: Path) -> None:
    """Refuse what is not a cot2align cache of a format version this code reads."""
    if manifest.get("format") != FORMAT:
        raise CacheError(f"{path}: not a cot2align cache (zarr.json has no format '{FORMAT}')")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CacheError(f"{path}: cache format_version {manifest.get('format_version')} is not supported "
                         f"(this cot2align reads version {FORMAT_VERSION})")


# Rows per chunk for 1-D per-row arrays (ids, tail) and per-example arrays.
ROW_CHUNK_1D = 65536
EXAMPLE_CHUNK = 16384


def hidden_chunk_rows(hidden_size: int) -> int:
    """512-1024 rows per chunk, about 4 MiB of bf16 hidden state (DESIGN §4)."""
    rows = (4 << 20) // (2 * hidden_size)
    return int(min(1024, max(512, 1 << (rows.bit_length() - 1))))


def topk_id_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.int32)


def checksum_codecs(kind: str) -> list:
    """bytes->bytes codecs of an array, always ending in crc32c.

    kind: "raw" (checksum only), "zstd" (Blosc zstd level 1, byte shuffle: the bf16 exponent
    bytes compress, the mantissas do not), "lz4" (Blosc lz4 level 5, byte shuffle), "topk"
    (Blosc zstd level 3, byte shuffle: sorted log-probs and ids compress 2-3.5x).
    """
    if kind == "raw":
        return [Crc32cCodec()]
    if kind == "zstd":
        return [BloscCodec(cname="zstd", clevel=1, shuffle=BloscShuffle.shuffle), Crc32cCodec()]
    if kind == "lz4":
        return [BloscCodec(cname="lz4", clevel=5, shuffle=BloscShuffle.shuffle), Crc32cCodec()]
    if kind == "topk":
        return [BloscCodec(cname="zstd", clevel=3, shuffle=BloscShuffle.shuffle), Crc32cCodec()]
    raise ValueError(f"unknown codec kind {kind!r}")


def to_storage(array: np.ndarray, dtype) -> np.ndarray:
    """Host rows in their storage dtype: bf16 bits (int16 from torch) are viewed as uint16, ids narrowed.
    (The reader's `decode_rows` is the inverse.)"""
    dtype = np.dtype(dtype)
    if array.dtype == dtype:
        return array
    if array.dtype == np.int16 and dtype == np.uint16:
        return array.view(np.uint16)
    return array.astype(dtype)


def view_array_specs(hidden_size: int, topk: int, vocab_size: int, hidden_dtype: str, store_embeds: bool,
                     hidden_codec: str) -> dict[str, dict]:
    """name -> {dtype, trailing shape, chunk rows, codec kind} of the per-row arrays of a view."""
    rows = hidden_chunk_rows(hidden_size)
    specs = {
        "input_ids": dict(dtype=np.int32, trailing=(), chunk=ROW_CHUNK_1D, codec="topk"),
        "target_ids": dict(dtype=np.int32, trailing=(), chunk=ROW_CHUNK_1D, codec="topk"),
        "hidden": dict(dtype=np.uint16 if hidden_dtype == "bf16" else np.int8, trailing=(hidden_size,),
                       chunk=rows, codec=hidden_codec),
        "topk_ids": dict(dtype=topk_id_dtype(vocab_size), trailing=(topk,), chunk=rows, codec="topk"),
        "topk_logprobs": dict(dtype=np.float16, trailing=(topk,), chunk=rows, codec="topk"),
        "tail_logprob": dict(dtype=np.float32, trailing=(), chunk=ROW_CHUNK_1D, codec="topk"),
    }
    if hidden_dtype == "int8":
        specs["hidden_scale"] = dict(dtype=np.float16, trailing=(), chunk=ROW_CHUNK_1D, codec="topk")
    if store_embeds:
        specs["embeds"] = dict(dtype=np.uint16, trailing=(hidden_size,), chunk=rows, codec=hidden_codec)
    return specs
