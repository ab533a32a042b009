"""The teacher cache format: names, dtypes, chunking, codecs, and the commit protocol.

This code writes format version 4 and reads versions 1 to 4. Version 4 adds the chunk index (chunk_index.py):
the crc32c of every chunk recorded under its position, so that a missing chunk, or a valid chunk copied or moved
to another position, is refused by the reader and by `cache verify` (in versions 1-3 both read as data: a
missing chunk as zeros or empty texts). Versions 1-3 are still read, without that check.

    <cache>/zarr.json         group attributes = the manifest (store.parts: which examples, blocks and rows each
                              part holds; status creating -> writing -> complete)
    <cache>/chunk_index.json  (v4) crc32c of each chunk of the arrays written at creation, by position; its sha256
                              is the manifest's store.chunk_index_sha256
    <cache>/teacher/          tokenizer files, config.json, head.safetensors (embed_tokens, lm_head[, lm_head_bias])
    <cache>/examples/         id, prompt_std, response_std, prompt_cot, response_cot   (str [n])
                              + messages_std, messages_cot (str [n], JSON: each view's prompt turns) in a cache
                              of --prompt-format chat (manifest data.prompt_format), so that a student renders the
                              same conversation in its own chat template; a cache without them is paper format
    <cache>/std/, <cache>/cot/
        offsets       int64  [n+1]   global rows of example i are offsets[i]:offsets[i+1]
        prompt_len    int32  [n]     teacher tokens in the prompt
    <cache>/parts/<p>/        one part per writer (rank) of the teacher pass: a contiguous range of examples,
                              whose rows are rows[view][0]:rows[view][1] of the global row axis
        zarr.json             the part's progress: blocks_done (its own, written by its own writer only)
        chunk_index/<b>.json  (v4) crc32c of each chunk block b wrote, by position (written before blocks_done)
        std/, cot/            the per-row arrays of the part's rows (T_p = its row count):
            input_ids     int32  [T_p]     teacher token at stored position t
            target_ids    int32  [T_p]     teacher token at t+1
            hidden        uint16 [T_p, D]  last hidden state (post final norm), bf16 bits
                          (int8 [T_p, D] + hidden_scale float16 [T_p] when --hidden-dtype int8)
            embeds        uint16 [T_p, D]  embedding-layer feature, only when embed_kind == "stored" (GPT-2)
            topk_ids      uint16|int32 [T_p, k]
            topk_logprobs float16 [T_p, k] log-softmax at temperature 1, descending
            tail_logprob  float32 [T_p]    log(1 - sum of top-k probs)
            target_logprob float32 [T_p]   the exact log-softmax (τ = 1) of target_ids, from the full logits: the
                          teacher's log-probability of the realised token, which ALM sums over chunks; caches
                          written before it was added lack it (their readers fall back to hidden · lm_headᵀ)

Version 1 (still read) kept the per-row arrays in <cache>/std|cot/ beside the offsets: one part, no parts/.

Commit protocol — the same on a local disk and on an object store (which has no rename and no atomic
directory): (1) the manifest is written first with status "creating", then everything that does not depend on
the teacher's outputs (texts, offsets, prompt lengths, array metadata, teacher files), then the manifest with
status "writing"; an interrupted creation is redone in place by the next run of the same inputs. (2) Each
writer fills its part block by block; every chunk is one whole-object write (a local file written aside and
renamed, an object PUT), and the part's progress moves only after all of a block's chunks and (v4) its chunk
index file are written. A reader refuses anything but "complete", and never reads rows past a part's committed
blocks. (3) When every part is complete, the manifest's status becomes "complete" (one last write). Every chunk
carries a crc32c checksum, so `cache verify` detects a corrupted chunk.

Version 3 adds integrity for what the chunks' crc32c does not cover: `manifest.checksum` (sha256 of the
manifest's canonical JSON without that field, renewed on every manifest write) and `teacher.files_sha256`
(sha256 of each file under teacher/: head.safetensors, the tokenizer files, config.json). `open_cache` checks
the manifest and the tokenizer files on open and head.safetensors when it is read; `cache verify` checks all.
A hand-edited manifest value (say `eos_id`) or one flipped byte in the head is refused, naming the file.

An array added within a version is optional to its readers: `target_logprob` joined format 4 without a version
change (a cache may or may not hold it: the manifest's store.dtypes says which; `has_array` reads that), and a
reader that does not know it reads the rest unchanged.

Store profiles (`cache-teacher --store`, the manifest's store.profile; a cache without the field is `full`):
`full` stores every array above; `logits` stores what the methods that read only the teacher's distribution need
— input_ids, target_ids, topk_ids, topk_logprobs, tail_logprob, target_logprob — and no hidden, hidden_scale or
embeds (about 1/10 of a full row at D = 4096, k = 64). The profile is part of the cache's identity; which runs a
cache can serve is decided from the arrays it stores (cache/profiles.py).

Version 4 adds the chunk index above, and writes every chunk (Zarr would leave out a chunk that holds only the
fill value, so an all-zero chunk and a deleted one looked alike): a chunk is trusted when it exists, ends in the
crc32c the index recorded for its position, and decodes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from zarr.codecs import BloscCodec, BloscShuffle, Crc32cCodec

from cot2align.errors import CacheError  # noqa: F401  (re-exported: raised here)
from cot2align.methods import STORE_PROFILES

FORMAT = "cot2align-cache"
FORMAT_VERSION = 4
READABLE_VERSIONS = (1, 2, 3, 4)
CHUNK_INDEX_SINCE = 4
VIEWS = ("std", "cot")
TEXT_FIELDS = ("id", "prompt_std", "response_std", "prompt_cot", "response_cot")
# The prompt turns of each view (JSON text; "" where a view is empty), in a cache of chat prompts only. Added within
# version 4 like target_logprob: a cache without them (paper format, or written before) reads unchanged.
MESSAGE_FIELDS = ("messages_std", "messages_cot")


def prompt_format(manifest: dict) -> str:
    """paper | chat: the format of the cached prompts (caches written before chat prompts existed: paper)."""
    return manifest.get("data", {}).get("prompt_format", "paper")


def text_fields(manifest: dict) -> tuple[str, ...]:
    """The text arrays under examples/ of a cache: the messages too for chat prompts."""
    return TEXT_FIELDS + (MESSAGE_FIELDS if prompt_format(manifest) == "chat" else ())


def read_manifest(location) -> dict | None:
    """The manifest of the cache at `location` (a storage.Location), or None when there is no zarr group there."""
    text = location.read_text("zarr.json")
    if text is None:
        return None
    try:
        return json.loads(text).get("attributes", {})
    except json.JSONDecodeError as e:
        raise CacheError(f"{location}/zarr.json: unreadable group metadata ({e.msg})") from None


def check_format(manifest: dict, path: Path) -> None:
    """Refuse what is not a cot2align cache of a format version this code reads, a manifest that does not match
    its checksum, and one that lacks a field the readers use."""
    if manifest.get("format") != FORMAT:
        raise CacheError(f"{path}: not a cot2align cache (zarr.json has no format '{FORMAT}')")
    if type(manifest.get("format_version")) is not int or manifest["format_version"] not in READABLE_VERSIONS:
        raise CacheError(f"{path}: cache format_version {manifest.get('format_version')} is not supported "
                         f"(this cot2align reads versions {', '.join(map(str, READABLE_VERSIONS))})")
    check_manifest_integrity(manifest, path)
    check_fields(manifest, path)


# The manifest fields the readers index into, with their JSON types: a manifest that lacks one or holds another type
# (edited by hand, written by a foreign tool) is refused with the field's name rather than a KeyError later.
_INT, _STR, _LIST, _DICT = (int,), (str,), (list,), (dict,)
REQUIRED_FIELDS = {
    "status": _STR, "data": _DICT, "data.n_examples": _INT, "teacher": _DICT, "teacher.name_or_path": _STR,
    "teacher.hidden_size": _INT, "teacher.vocab_size": _INT, "teacher.embed_kind": _STR, "tokenizer": _DICT,
    "tokenizer.name_or_path": _STR, "tokenizer.vocab_hash": _STR, "tokenizer.eos_id": _INT, "store": _DICT,
    "store.topk": _INT, "store.dtypes.topk_ids": _STR, "settings": _DICT,
    "settings.batch_tokens": _INT, "progress": _DICT,
}
REQUIRED_SINCE_V2 = {"progress.blocks": _LIST, "store.parts": _LIST}
REQUIRED_WITH_HIDDEN = {"store.dtypes.hidden": _STR}     # every profile but `logits`

# The per-row arrays each store profile of `cache-teacher --store` (methods.STORE_PROFILES) leaves out.
HIDDEN_ARRAYS = ("hidden", "hidden_scale", "embeds")
PROFILE_LEAVES_OUT = {"full": (), "logits": HIDDEN_ARRAYS}


def store_profile(manifest: dict) -> str:
    """The cache's store profile; caches written before profiles existed stored everything: `full`."""
    return manifest.get("store", {}).get("profile", "full")


def _field(manifest: dict, dotted: str):
    value = manifest
    for key in dotted.split("."):
        if not isinstance(value, dict) or key not in value:
            return KeyError
        value = value[key]
    return value


_JSON_TYPE_NAMES = {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number",
                    bool: "true/false", type(None): "null"}


def check_fields(manifest: dict, where) -> None:
    """Every field the readers use is present with its JSON type (bool is not taken for an integer); each part of
    a version-2+ store has its example, block and row ranges as pairs of integers."""
    required = dict(REQUIRED_FIELDS, **(REQUIRED_SINCE_V2 if manifest["format_version"] >= 2 else {}),
                    **(REQUIRED_WITH_HIDDEN if _field(manifest, "store.profile") != "logits" else {}))
    for dotted, types in required.items():
        value = _field(manifest, dotted)
        if value is KeyError:
            raise CacheError(f"{where}/zarr.json: manifest field '{dotted}' is missing")
        if not isinstance(value, types) or (types is _INT and isinstance(value, bool)):
            raise CacheError(f"{where}/zarr.json: manifest field '{dotted}' should be "
                             f"{_JSON_TYPE_NAMES[types[0]]}, found {_JSON_TYPE_NAMES.get(type(value), type(value).__name__)}")
    if manifest["format_version"] < 2:
        return

    def is_pair(value) -> bool:
        return isinstance(value, list) and len(value) == 2 and all(type(x) is int for x in value)

    if not all(type(x) is int for x in manifest["progress"]["blocks"]):
        raise CacheError(f"{where}/zarr.json: manifest field 'progress.blocks' should be a list of integers")
    for number, part in enumerate(manifest["store"]["parts"]):
        pairs = {"examples": _field(part, "examples"), "blocks": _field(part, "blocks"),
                 "rows.std": _field(part, "rows.std"), "rows.cot": _field(part, "rows.cot")}
        for name, value in pairs.items():
            if not is_pair(value):
                raise CacheError(f"{where}/zarr.json: manifest field 'store.parts[{number}].{name}' should be "
                                 "a pair of integers [first, end]")


def manifest_checksum(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON (sorted keys) without its own `checksum` field."""
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()).hexdigest()


def with_checksum(manifest: dict) -> dict:
    """A JSON-clean copy of the manifest carrying its checksum (what every manifest write stores)."""
    clean = json.loads(json.dumps(manifest))
    clean["checksum"] = manifest_checksum(clean)
    return clean


def check_manifest_integrity(manifest: dict, where) -> None:
    """Refuse a version-3 manifest whose checksum does not match its content (hand-edited or corrupted)."""
    if manifest.get("format_version", 0) < 3:
        return                                  # versions 1 and 2 carry no manifest checksum
    if manifest.get("checksum") != manifest_checksum(manifest):
        raise CacheError(f"{where}/zarr.json: the manifest does not match its checksum (edited by hand or corrupted); "
                         "its values cannot be trusted — rebuild the cache with cache-teacher into a new --out")


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def check_teacher_files(manifest: dict, teacher_dir: Path, where, names=None) -> None:
    """Each file under teacher/ (or just `names`) against the sha256 the manifest recorded (version 3)."""
    recorded = manifest.get("teacher", {}).get("files_sha256")
    if recorded is None:
        return                                  # versions 1 and 2 recorded none
    for name, digest in recorded.items():
        if names is not None and name not in names:
            continue
        path = Path(teacher_dir) / name
        if not path.is_file():
            raise CacheError(f"{where}/teacher/{name}: missing (the manifest lists it)")
        if file_sha256(path) != digest:
            raise CacheError(f"{where}/teacher/{name}: sha256 does not match the manifest (corrupted or replaced); "
                             "rebuild the cache with cache-teacher")


# Rows per chunk for 1-D per-row arrays (ids, tail) and per-example arrays.
ROW_CHUNK_1D = 65536
EXAMPLE_CHUNK = 16384


def hidden_chunk_rows(hidden_size: int) -> int:
    """512-1024 rows per chunk, about 4 MiB of bf16 hidden state (README 'The cache format')."""
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


def has_array(manifest: dict, name: str) -> bool:
    """Whether the cache of `manifest` stores the per-row array `name` (its store.dtypes lists every array)."""
    return name in manifest.get("store", {}).get("dtypes", {})


def view_array_specs(hidden_size: int, topk: int, vocab_size: int, hidden_dtype: str, store_embeds: bool,
                     hidden_codec: str, profile: str = "full") -> dict[str, dict]:
    """name -> {dtype, trailing shape, chunk rows, codec kind} of the per-row arrays of a view that the store
    `profile` keeps (STORE_PROFILES). The chunk rows of the top-k arrays follow the hidden state's in every
    profile, so that a `logits` cache chunks them as its `full` twin does."""
    rows = hidden_chunk_rows(hidden_size)
    specs = {
        "input_ids": dict(dtype=np.int32, trailing=(), chunk=ROW_CHUNK_1D, codec="topk"),
        "target_ids": dict(dtype=np.int32, trailing=(), chunk=ROW_CHUNK_1D, codec="topk"),
        "hidden": dict(dtype=np.uint16 if hidden_dtype == "bf16" else np.int8, trailing=(hidden_size,),
                       chunk=rows, codec=hidden_codec),
        "topk_ids": dict(dtype=topk_id_dtype(vocab_size), trailing=(topk,), chunk=rows, codec="topk"),
        "topk_logprobs": dict(dtype=np.float16, trailing=(topk,), chunk=rows, codec="topk"),
        "tail_logprob": dict(dtype=np.float32, trailing=(), chunk=ROW_CHUNK_1D, codec="topk"),
        "target_logprob": dict(dtype=np.float32, trailing=(), chunk=ROW_CHUNK_1D, codec="topk"),
    }
    if hidden_dtype == "int8":
        specs["hidden_scale"] = dict(dtype=np.float16, trailing=(), chunk=ROW_CHUNK_1D, codec="topk")
    if store_embeds:
        specs["embeds"] = dict(dtype=np.uint16, trailing=(hidden_size,), chunk=rows, codec=hidden_codec)
    if profile not in PROFILE_LEAVES_OUT:
        raise ValueError(f"store profile: expected one of {', '.join(STORE_PROFILES)}, got {profile!r}")
    return {name: spec for name, spec in specs.items() if name not in PROFILE_LEAVES_OUT[profile]}
