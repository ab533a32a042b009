"""The student's side of the data: tokenising the cached texts once, streaming teacher rows, batching.

Row alignment (README 'The cache format'): for a view with prompt text p and response text r, the student sequence is

    tokens_s(p, with the student's own BOS if it adds one) + tokens_s(r) + [EOS]

exactly as the teacher's was built from the same (already truncated) texts, and the student's response
positions are P_s − 1 … L_s − 2 — the positions whose next token is a response token, EOS included.
If the teacher's response was cut (no EOS in the cache), the student gets no EOS either.

Under --prompt-format chat, p is the cached conversation (its turns, as the teacher saw them) rendered in the
student's own chat template, and EOS is the student's end-of-turn token (data/chat.py): the response rows still
pair the same response text, end-of-turn to end-of-turn.

Tokenisation runs once per (cache, student tokenizer, max_length) and is memoised next to the cache in
`<cache>.students/` (the cache directory itself is never written), together with the token alignment the
method needs (methods.py `Method.alignment`): MinED's teacher row per student row ("mined"), or the aligned
chunks of ALM and GOLD ("chunks": a chunk id per student row and per teacher row).
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import zipfile
from pathlib import Path

import numpy as np
import torch

from cot2align.align.chunks import VERSION as CHUNKS_VERSION
from cot2align.align.mined import VERSION as MINED_VERSION
from cot2align.align.mined import aligned_teacher_rows
from cot2align.align.vocab import token_strings, vocab_map
from cot2align.cache import open_cache
from cot2align.cache.reader import OpenedCache
from cot2align.cache.format import VIEWS, CacheError
from cot2align.data.chat import render_prompt, template_sha256
from cot2align.logs import reporter

MEMO_VERSION = 3     # 2: keyed by the cache's whole manifest (build_id); 3: alignments by name (mined, chunks)
# Aligned arrays with one entry per teacher response row (the others have one per student response row).
PER_TEACHER_ROW = ("teacher_chunks",)
MAX_UNKNOWN_SHARE = 0.05     # above this share of unknown-token response tokens, the student cannot learn the data


def student_view_ids(tokenizer, prompt: str, response: str, with_eos: bool, max_length: int) -> tuple[list[int], int]:
    """(ids, prompt_len) of one view for the student; an over-long response keeps its beginning."""
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + ([tokenizer.eos_token_id] if with_eos else [])
    if len(prompt_ids) >= max_length:
        raise ValueError(f"the prompt alone is {len(prompt_ids)} student tokens, max_length is {max_length} (raise --max-length)")
    return prompt_ids + response_ids[:max_length - len(prompt_ids)], len(prompt_ids)


def memo_paths(cache, tokenizer_hash: str, max_length: int, alignment: str | None,
               prompt_key: str = "") -> list[Path]:
    """Where the memo may be, in order: beside a local cache (<cache>.students/), then in the local directory keyed
    by the cache's identity ($COT2ALIGN_HOME/students/<identity>/) — where it goes for a cache on an object store
    or on storage that refuses the write (read-only, full, not ours): the cache itself is never written."""
    # an alignment's algorithm version is part of the key: a changed aligner never reuses another's chunk ids
    version = {"mined": MINED_VERSION, "chunks": CHUNKS_VERSION}.get(alignment, 0)
    # prompt_key: "" for the paper's prompts (the key memos always had), the template's hash for chat prompts
    key = hashlib.sha256(f"{tokenizer_hash}|{max_length}|{alignment}.{version}|{MEMO_VERSION}{prompt_key}"
                         .encode()).hexdigest()[:16]
    places = dict.fromkeys([cache.local_dir("students"), cache.home_dir("students")])
    return [place / f"{key}.npz" for place in places]


def _read_memo(paths: list[Path], manifest_key: np.ndarray, log) -> dict[str, np.ndarray] | None:
    """The memo of this cache build, if one of `paths` holds it; a damaged one (truncated by a full disk, edited)
    is said once and recomputed — it is derived data, rewritten by this run."""
    for path in paths:
        if path.exists():
            try:
                with np.load(path) as stored:
                    if np.array_equal(stored["manifest_key"], manifest_key):
                        return dict(stored)
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
                log(f"{path}: unreadable students' memo ({type(e).__name__}); recomputing it", logging.WARNING)
    return None


def _write_memo(paths: list[Path], arrays: dict[str, np.ndarray], log) -> None:
    """Into the first place that takes it (written aside and renamed: readers never see half a memo); `log` is a
    logs.reporter."""
    for number, path in enumerate(paths):
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.npz")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez(tmp, **arrays)
            os.replace(tmp, path)
            return
        except OSError as e:
            if tmp.exists():
                tmp.unlink()
            if number + 1 < len(paths):
                log(f"{path.parent}: cannot write the students' memo ({e.strerror}); keeping it in "
                    f"{paths[number + 1].parent} instead")
            else:
                log(f"cannot keep the students' memo anywhere ({e.strerror}); it is recomputed next time", logging.WARNING)


def aligner(alignment: str | None, cache, tokenizer):
    """The per-example token alignment a method needs (methods.py `Method.alignment`), or None: a function of one
    view's rows — the student's input and target ids at its response positions, the teacher's, the response text —
    returning the
    aligned arrays by name (one entry per student row, or per teacher row for the names in PER_TEACHER_ROW)."""
    if alignment is None:
        return None
    teacher_tokenizer = cache.tokenizer()
    if alignment == "mined":
        strings = (token_strings(tokenizer), token_strings(teacher_tokenizer),
                   vocab_map(teacher_tokenizer, tokenizer).tea2stu)
        return lambda s_inputs, s_targets, t_inputs, t_targets, text: {
            "mined_rows": aligned_teacher_rows(s_inputs, t_inputs, *strings)}
    if alignment == "chunks":
        from cot2align.align.chunks import chunk_alignment

        align = chunk_alignment(tokenizer, teacher_tokenizer)

        def chunks(s_inputs, s_targets, t_inputs, t_targets, text):
            student_chunks, teacher_chunks = align(s_targets, t_targets, text)
            return {"student_chunks": student_chunks, "teacher_chunks": teacher_chunks}
        return chunks
    raise ValueError(f"alignment: expected one of mined, chunks, got {alignment!r}")


def student_prompts(cache, view: str, tokenizer, prompt_format: str = "paper") -> list[str]:
    """The student's prompt of every example's view: the cached text (paper format), or the cached turns rendered
    in the student's chat template ("" where the view is empty)."""
    if prompt_format != "chat":
        return cache.texts()[f"prompt_{view}"]
    return [render_prompt(tokenizer, turns) if turns else "" for turns in cache.messages(view)]


def tokenize_cache(cache, tokenizer, tokenizer_hash: str, max_length: int, alignment: str | None = None,
                   log=None, prompt_format: str = "paper") -> dict[str, np.ndarray]:
    """Student ids of every cached view (memoised): per view `ids`, `offsets` [n+1], `prompt_len` [n], and with an
    `alignment` its arrays with their offsets (e.g. MinED's `mined_rows`: teacher row per student response row,
    −1 = one-hot). `prompt_format` chat: the tokenizer is prepared by data/chat.use_chat_template."""
    prompt_key = f"|chat:{template_sha256(tokenizer)}" if prompt_format == "chat" else ""
    paths = memo_paths(cache, tokenizer_hash, max_length, alignment, prompt_key)
    # the build this memo belongs to: a cache rebuilt at the same path (another teacher, same data) gets a new memo
    manifest_key = np.frombuffer(bytes.fromhex(cache.build_id), dtype=np.uint8)
    stored = _read_memo(paths, manifest_key, reporter(log, __name__))
    if stored is not None:
        return stored
    align = aligner(alignment, cache, tokenizer)
    out: dict[str, np.ndarray] = {"manifest_key": manifest_key}
    counts = np.zeros(3, dtype=np.int64)     # responses with an unknown token, unknown tokens, response tokens
    for view in VIEWS:
        arrays, view_counts = _tokenize_view(cache, view, tokenizer, max_length, align,
                                             student_prompts(cache, view, tokenizer, prompt_format))
        out.update({f"{view}_{name}": array for name, array in arrays.items()})
        counts += view_counts
    unencodable, unknown_tokens, response_tokens = (int(c) for c in counts)
    if unknown_tokens > MAX_UNKNOWN_SHARE * max(response_tokens, 1):
        raise CacheError(f"{cache.url}: the student tokenizer cannot spell the cached text: {unknown_tokens} of "
                         f"{response_tokens} response tokens are its unknown token (id {tokenizer.unk_token_id}); "
                         "expected a tokenizer that covers the data (byte-level or with byte fallback)")
    if unencodable:
        reporter(log, __name__)(f"the student tokenizer maps part of {unencodable} cached responses to its unknown "
                                f"token (id {tokenizer.unk_token_id}); those characters cannot be learned", logging.WARNING)
    _write_memo(paths, out, reporter(log, __name__))
    return out


def _tokenize_view(cache, view: str, tokenizer, max_length: int, align,
                   prompts: list[str]) -> tuple[dict[str, np.ndarray], tuple]:
    """One view of every example: the student's ids, offsets, prompt lengths (and the aligned arrays with their
    offsets, given an `aligner`); and (responses that hit the student's unknown token, unknown response tokens,
    response tokens)."""
    texts = cache.texts()
    eos_teacher = cache.manifest["tokenizer"]["eos_id"]
    teacher_offsets = cache.offsets(view)
    teacher_targets = cache.column(view, "target_ids")          # one read per view, not a chunk per example
    teacher_inputs = cache.column(view, "input_ids") if align is not None else None
    unk = getattr(tokenizer, "unk_token_id", None)
    ids_all, offsets, prompt_lens = [], [0], []
    aligned: list[dict | None] = []        # per example: the aligner's arrays by name (None: no rows in this view)
    unencodable, unknown_tokens, response_tokens = 0, 0, 0
    for i in range(len(cache)):
        a, b = int(teacher_offsets[i]), int(teacher_offsets[i + 1])
        ids, prompt_len = [], 0
        if b > a:      # an example without this view (no rationale) has no rows
            # the teacher's response kept its EOS unless the text was cut; the student's then does too
            with_eos = int(teacher_targets[b - 1]) == eos_teacher
            try:
                ids, prompt_len = student_view_ids(tokenizer, prompts[i], texts[f"response_{view}"][i],
                                                   with_eos, max_length)
            except ValueError as e:
                raise CacheError(f"{cache.url}: example {i} ({texts['id'][i]!r}), {view} view: {e}") from None
            if unk is not None and unk != tokenizer.eos_token_id:
                unknown_here = ids[prompt_len:].count(unk)
                unencodable += unknown_here > 0
                unknown_tokens += unknown_here
            response_tokens += len(ids) - prompt_len
        if align is not None:
            aligned.append(align(np.asarray(ids[prompt_len - 1:len(ids) - 1]), np.asarray(ids[prompt_len:]),
                                 teacher_inputs[a:b], teacher_targets[a:b], texts[f"response_{view}"][i])
                           if b > a else None)
        ids_all.extend(ids)
        offsets.append(len(ids_all))
        prompt_lens.append(prompt_len)
    arrays = {"ids": np.asarray(ids_all, dtype=np.int32), "offsets": np.asarray(offsets, dtype=np.int64),
              "prompt_len": np.asarray(prompt_lens, dtype=np.int32)}
    names = dict.fromkeys(name for found in aligned if found for name in found)
    for name in names:     # each aligned array concatenated over the examples, with its offsets [n+1]
        parts = [np.asarray(found[name], dtype=np.int32) if found else np.zeros(0, dtype=np.int32) for found in aligned]
        arrays[name] = np.concatenate(parts)
        arrays[f"{name}_offsets"] = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64)
    return arrays, (unencodable, unknown_tokens, response_tokens)


class DistillDataset(torch.utils.data.Dataset):
    """One item per example: per view the student ids and, with a cache, the teacher's rows (numpy).

    The cache is opened lazily in each DataLoader worker (zarr handles are not shared across processes), from
    what the trainer's own open read (`cache`: TeacherCache.opened()), so a worker's open makes no request.
    """

    def __init__(self, student: dict[str, np.ndarray], views: tuple[str, ...], indices: list[int],
                 cache: OpenedCache | None = None, teacher_arrays: tuple[str, ...] = ()):
        self.student, self.views, self.indices = student, views, list(indices)
        self.opened_cache, self.teacher_arrays = cache, teacher_arrays
        # the token alignment's arrays memoised with the student's ids (mined_rows, student_chunks, ...)
        self.aligned_names = sorted({key[len(f"{views[0]}_"):-len("_offsets")] for key in student
                                     if key.startswith(f"{views[0]}_") and key.endswith("_offsets")} - {""})
        self._cache = None

    def __len__(self) -> int:
        return len(self.indices)

    def length(self, k: int) -> int:
        """Student tokens of item k over its views (for length bucketing)."""
        i = self.indices[k]
        return sum(int(self.student[f"{v}_offsets"][i + 1] - self.student[f"{v}_offsets"][i]) for v in self.views)

    def _open(self):
        if self._cache is None and self.opened_cache is not None:
            self._cache = open_cache(self.opened_cache)
        return self._cache

    def __getitem__(self, k: int) -> dict:
        i = self.indices[k]
        item = {"index": i}
        cache = self._open() if self.teacher_arrays else None
        for view in self.views:
            a, b = self.student[f"{view}_offsets"][i], self.student[f"{view}_offsets"][i + 1]
            entry = {"ids": self.student[f"{view}_ids"][a:b], "prompt_len": int(self.student[f"{view}_prompt_len"][i])}
            for name in self.aligned_names:
                starts = self.student.get(f"{view}_{name}_offsets")
                # none where no example has this view (a cache without rationales has no CoT rows to align)
                entry[name] = (self.student[f"{view}_{name}"][starts[i]:starts[i + 1]] if starts is not None
                               else np.zeros(0, dtype=np.int32))
            if cache is not None:
                entry["teacher"] = cache.teacher_rows(i, view, self.teacher_arrays)
            item[view] = entry
        return item


def collate(items: list[dict], views: tuple[str, ...], pad_id: int) -> dict:
    """Pad each view to the batch maximum: the student's input_ids / attention_mask [B, L]; `positions` [K], the
    sequence positions that hold a response token in some example; response_mask, target_ids [B, K] at those
    positions; the teacher rows [B, M, ...]; and the token alignment's arrays, −1 where nothing is aligned:
    mined_rows [B, K] (always present, all −1 without MinED), student_chunks [B, K], teacher_chunks [B, M]."""
    batch: dict = {"index": torch.tensor([it["index"] for it in items])}
    for view in views:
        entries = [it[view] for it in items]
        length = max(max(len(e["ids"]) for e in entries), 2)
        names = [k for k in entries[0] if k not in ("ids", "prompt_len", "teacher")]
        ids = torch.full((len(items), length), pad_id, dtype=torch.long)
        attention = torch.zeros(len(items), length, dtype=torch.long)
        response = torch.zeros(len(items), length, dtype=torch.bool)
        student_rows = {name: torch.full((len(items), length), -1, dtype=torch.long)
                        for name in ["mined_rows", *names] if name not in PER_TEACHER_ROW}
        for b, e in enumerate(entries):
            n, start = len(e["ids"]), e["prompt_len"] - 1
            ids[b, :n] = torch.from_numpy(e["ids"].astype(np.int64))
            attention[b, :n] = 1
            if n:
                response[b, start:n - 1] = True
                for name, holder in student_rows.items():
                    if name in e:     # one entry per response row of the student, from its first response position
                        rows = torch.from_numpy(e[name].astype(np.int64))[: n - e["prompt_len"]]
                        holder[b, start:start + len(rows)] = rows
        # Only response positions enter any loss: `positions` are those where some example of the batch has one
        # (with length-bucketed batches, a short band at the end of the sequences). The student computes logits
        # there alone, and every per-position tensor of the view is cut to them here.
        positions = response.any(0).nonzero().squeeze(1)
        targets = torch.cat([ids[:, 1:], torch.full((len(items), 1), pad_id)], dim=1)
        out = {"input_ids": ids, "attention_mask": attention, "positions": positions,
               "response_mask": response[:, positions], "target_ids": targets[:, positions],
               **{name: holder[:, positions] for name, holder in student_rows.items()}}
        if entries and "teacher" in entries[0]:
            out["teacher"] = _pad_teacher_rows([e["teacher"] for e in entries])
        for name in (n for n in names if n in PER_TEACHER_ROW):
            width = max(max(len(e[name]) for e in entries), 1)
            holder = torch.full((len(items), width), -1, dtype=torch.long)
            for b, e in enumerate(entries):
                holder[b, :len(e[name])] = torch.from_numpy(e[name].astype(np.int64))
            out[name] = holder
        batch[view] = out
    return batch


def _pad_teacher_rows(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Each decoded teacher array padded to [B, M, ...] (M = the batch's most rows), plus the row mask [B, M]."""
    width = max(max(len(r["input_ids"]) for r in rows), 1)
    padded = {"mask": torch.zeros(len(rows), width, dtype=torch.bool)}
    for name, sample in rows[0].items():
        holder = torch.zeros((len(rows), width, *sample.shape[1:]), dtype=sample.dtype)
        for b, r in enumerate(rows):
            holder[b, :len(r[name])] = r[name]
        padded[name] = holder
    for b, r in enumerate(rows):
        padded["mask"][b, :len(r["input_ids"])] = True
    return padded


class LengthBucketSampler(torch.utils.data.Sampler):
    """Batches of similar length: shuffle (seed + epoch), sort within windows of 50 batches, shuffle the
    batches. Under several ranks each takes every world-th batch (the batch count is cut to a multiple of
    the world size so every rank runs the same number of steps)."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int, rank: int = 0, world: int = 1, window: int = 50):
        self.lengths, self.batch_size, self.seed = lengths, batch_size, seed
        self.rank, self.world, self.window = rank, world, window
        self.epoch = 0
        self.skip = 0

    def batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of `epoch`: (seed, epoch) fix them, so a resumed run reads the same ones."""
        batches = self._epoch_batches(random.Random(self.seed * 1_000_003 + epoch))
        usable = (len(batches) // self.world) * self.world if self.world > 1 else len(batches)
        return batches[:usable][self.rank::self.world]

    def _epoch_batches(self, rng: random.Random) -> list[list[int]]:
        """Every rank's batches of one epoch, in order."""
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        span = self.batch_size * self.window
        batches = []
        for start in range(0, len(order), span):
            window = sorted(order[start:start + span], key=lambda k: self.lengths[k])
            batches.extend(window[j:j + self.batch_size] for j in range(0, len(window), self.batch_size))
        rng.shuffle(batches)
        return batches

    def __iter__(self):
        yield from self.batches(self.epoch)[self.skip:]

    def __len__(self) -> int:
        return max(len(self.batches(self.epoch)) - self.skip, 0)

