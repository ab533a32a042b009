"""`cot2align augment-cot`: the (fine-tuned) teacher writes a rationale for every training record (README 'The pipeline with real models').

For each record the teacher samples a continuation of the CoT prompt (Figure 3, ending in "Let's think step
by step.\\n"; temperature 1.0, top-k 0, top-p 1.0, at most 256 new tokens by default). The rationale is that
continuation, cut before any "Therefore, the answer is:" the teacher wrote itself; the CoT target is
`rationale + "\\nTherefore, the answer is: " + gold output`.

Degenerate rationales are not used: empty, caught in a repetition loop (a word 4-gram repeated 4 or more
times), or stopped by the length limit without reaching an answer. Their records are still written (with
`rationale: null` and the reason), so a resumed run does not generate them again; they get no CoT view.

The output JSONL is append-only and keyed by id: a run killed at any point resumes without repeating a
finished id (a torn last line is cut off first). A file augment-cot did not write is refused and left
untouched. Generation is batched, length-sorted and left-padded (transformers), or done by vllm with
`--backend vllm`.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from cot2align.config import ConfigError, check_attn_implementation, check_dtype, identity, runtime
from cot2align.data.readers import DataError, load_records
from cot2align.data.chat import check_prompt_format, resolve_prompt_format, use_chat_template, view_prompt
from cot2align.data.templates import cot_output
from cot2align.eval.generation import generate_batch
from cot2align.faults import fault_point
from cot2align.locks import writer_lock
from cot2align.logs import progress_bar, reporter
from cot2align.modeling import load_model, load_tokenizer, resolve_dtype
from cot2align.write_errors import reported

SEPARATOR = "Therefore, the answer is"


@dataclass
class AugmentConfig:
    """`cot2align augment-cot`. Field kinds as in config.py: identity changes the rationales written."""

    model: str | None = identity(None)           # required: the (fine-tuned) teacher
    data: str | None = identity(None)            # required: dataset alias or JSON/JSONL file
    out: str | None = runtime(None)              # required: the output JSONL
    split: str = identity("train")
    data_root: str | None = runtime(None)
    data_config: str | None = identity(None)     # a hub dataset's configuration (--data owner/name)
    data_split: str | None = identity(None)      # the dataset's split to read [default: the one --split means]
    field_map: dict = identity(factory=dict)     # OURS: THEIRS field names
    backend: str = identity("hf")                # hf | vllm: other samplers, other rationales
    max_new_tokens: int = identity(256)
    temperature: float = identity(1.0)
    seed: int = identity(0)
    batch_size: int = runtime(16)
    limit: int | None = identity(None)
    adapter: str | None = identity(None)
    device: str | None = runtime(None)
    trust_remote_code: bool = runtime(False)
    dtype: str | None = identity(None)           # the teacher's dtype: bf16 | fp16 | fp32 [default: bf16 on CUDA, fp32 on CPU]
    revision: str | None = identity(None)        # the hub teacher's commit, branch or tag [default: main]
    attn_implementation: str | None = runtime(None)   # sdpa | eager | flash_attention_2 [default: sdpa]; hf backend
    prompt_format: str | None = identity(None)   # paper | chat [default: chat for conversational data, else paper]
    chat_template: str | None = identity(None)   # a Jinja file replacing the teacher's chat template

    def validate(self) -> None:
        check_dtype(self.dtype)
        check_prompt_format(self.prompt_format)
        if self.prompt_format == "chat" and self.backend == "vllm":
            raise ConfigError("prompt_format: chat is rendered for --backend hf; with vllm use --prompt-format paper")
        check_attn_implementation(self.attn_implementation)
        if self.attn_implementation is not None and self.backend == "vllm":
            raise ConfigError("attn_implementation: applies to --backend hf; vllm chooses its own attention kernels")


def degenerate_reason(rationale: str, hit_length_limit: bool) -> str | None:
    """Why a rationale is unusable, or None."""
    if not rationale.strip():
        return "empty"
    words = rationale.split()
    grams = Counter(tuple(words[i:i + 4]) for i in range(len(words) - 3))
    if grams and grams.most_common(1)[0][1] >= 4:
        return "repetition"
    if hit_length_limit:
        return "length_limit"
    return None


def extract_rationale(generated: str) -> tuple[str, bool]:
    """(rationale, whether the teacher reached an answer marker) from the generated continuation."""
    cut = generated.find(SEPARATOR)
    if cut >= 0:
        return generated[:cut].strip(), True
    return generated.strip(), False


# Every line augment-cot writes is a JSON object with these fields (rationale and cot_output null when the
# rationale was degenerate): what tells its own output apart from any other JSONL a user points --out at.
OUTPUT_FIELDS = ("id", "rationale", "cot_output")


def _not_ours(path: Path, lineno: int, why: str) -> ConfigError:
    return ConfigError(f"--out {path}:{lineno}: {why}; this file was not written by augment-cot, and it is "
                       "appended to and repaired only if it was — choose another --out")


def _output_record(path: Path, lineno: int, line: bytes) -> dict:
    """One complete line of an augment-cot output, or ConfigError saying why it is not one."""
    try:
        row = json.loads(line)
    except (ValueError, RecursionError):    # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise _not_ours(path, lineno, "not a JSON record in UTF-8") from None
    if not isinstance(row, dict) or not all(k in row for k in OUTPUT_FIELDS) or not isinstance(row["id"], str):
        raise _not_ours(path, lineno, f"the record lacks the fields augment-cot writes ({', '.join(OUTPUT_FIELDS)})")
    return row


def finished_ids(path: Path) -> set[str]:
    """Ids already written to an augment-cot output, which a rerun then skips.

    Only a file augment-cot wrote is taken up: every complete line must be one of its records, else the file
    is refused (ConfigError) and left as it is. A crash in the middle of a write leaves a torn last line — no
    trailing newline and not valid JSON — and only that line is cut off; a last line that lacks only its
    newline is a whole record, and the newline is added."""
    if not path.exists():
        return set()
    if not path.is_file():
        raise ConfigError(f"--out {path}: not a file")
    data = path.read_bytes()
    lines = data.split(b"\n")
    tail = lines.pop()            # b"" when the file ends in a newline
    ids = set()
    for lineno, line in enumerate(lines, start=1):
        if line.strip():
            ids.add(_output_record(path, lineno, line)["id"])
    if not tail:
        return ids
    try:
        ids.add(_output_record(path, len(lines) + 1, tail)["id"])
        repair = b"\n"               # a whole record whose newline is missing
    except ConfigError:
        # torn: cut off, but only a piece of what augment-cot writes (json.dumps of a row starting with "id")
        if not tail.startswith(b'{"id": '):
            raise
        repair = None
    with path.open("r+b") as f:
        if repair is None:
            f.truncate(len(data) - len(tail))
        else:
            f.seek(0, os.SEEK_END)
            f.write(repair)
    return ids


def _generate_hf(model, tokenizer, prompts: list[str], cfg: AugmentConfig, seed: int) -> list[tuple[str, bool]]:
    """(text, stopped by the length limit) per prompt; one left-padded batch."""
    encoded = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
    torch.manual_seed(seed)
    generated = generate_batch(model, tokenizer, encoded, cfg.max_new_tokens, greedy=False, temperature=cfg.temperature)
    results = []
    for new in generated:
        ended = tokenizer.eos_token_id in new
        if ended:
            new = new[:new.index(tokenizer.eos_token_id)]
        results.append((tokenizer.decode(new, skip_special_tokens=True), not ended and len(new) >= cfg.max_new_tokens))
    return results


def _generate_vllm(cfg: AugmentConfig, prompts: list[str]) -> list[tuple[str, bool]]:
    try:
        from vllm import LLM, SamplingParams
    except ImportError:
        raise ConfigError("--backend vllm: vllm is not installed (pip install 'cot2align[vllm]')") from None
    dtype = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(cfg.dtype, "auto")
    llm = LLM(model=cfg.model, seed=cfg.seed, trust_remote_code=cfg.trust_remote_code, dtype=dtype, revision=cfg.revision)
    params = SamplingParams(temperature=cfg.temperature, top_p=1.0, top_k=-1, max_tokens=cfg.max_new_tokens, seed=cfg.seed)
    outputs = llm.generate(prompts, params)
    return [(o.outputs[0].text, o.outputs[0].finish_reason == "length") for o in outputs]


def _output_fields(record: dict) -> dict:
    """What an output line keeps of its record, read back as the same record: a conversation stays one (its prompt
    turns, then the response as the last assistant turn), an instruction record keeps its four fields."""
    if record.get("messages"):
        answer = {"role": "assistant", "content": record["output"]}
        return {"id": record["id"], "messages": [*record["messages"], answer]}
    return {k: record[k] for k in ("id", "instruction", "input", "output")}


def augment_cot(cfg: AugmentConfig, log=None) -> dict:
    """Write a rationale for every record of `cfg.data` not yet in `cfg.out` (a progress bar in records/s on a
    terminal); messages to the `cot2align.data.augment` logger, or to `log` when given."""
    say = reporter(log, __name__)
    out = Path(cfg.out)
    # one writer per output file (<out>.lock): two runs appending to one JSONL would both generate the same ids
    with writer_lock(out, ConfigError, f"--out {out}", log=say):
        return _augment(cfg, out, say)


def _augment(cfg: AugmentConfig, out: Path, say) -> dict:
    records, _ = load_records(cfg.data, cfg.split, cfg.data_root, cfg.field_map or None,
                              data_config=cfg.data_config, data_split=cfg.data_split)
    if cfg.limit is not None:
        records = records[:cfg.limit]
    with reported(DataError, f"{out}: cannot prepare", "nothing was generated yet; free space (or make it writable) and rerun"):
        out.parent.mkdir(parents=True, exist_ok=True)
        done = finished_ids(out)
    todo = [r for r in records if r["id"] not in done]
    say(f"augment-cot: {len(records)} records, {len(done)} already done, {len(todo)} to generate")
    counts = Counter()
    if not todo:
        return {"generated": 0, "already_done": len(done), "degenerate": {}}
    prompt_format = resolve_prompt_format(cfg.prompt_format, records)
    if cfg.backend == "vllm":
        prompts = {r["id"]: view_prompt(None, r, "cot", "paper") for r in todo}
        generated = dict(zip(prompts, _generate_vllm(cfg, list(prompts.values()))))
        batches = [todo]
    else:
        tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code, cfg.revision)
        if prompt_format == "chat":      # the teacher's own template; it stops at its end-of-turn token
            use_chat_template(tokenizer, cfg.chat_template, cfg.model)
        prompts = {r["id"]: view_prompt(tokenizer, r, "cot", prompt_format) for r in todo}
        device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = load_model(cfg.model, dtype=resolve_dtype(cfg.dtype, device), device=device, adapter=cfg.adapter,
                           trust_remote_code=cfg.trust_remote_code, revision=cfg.revision,
                           attn_implementation=cfg.attn_implementation)
        lengths = {rid: len(tokenizer(p)["input_ids"]) for rid, p in prompts.items()}
        ordered = sorted(todo, key=lambda r: lengths[r["id"]])
        batches = [ordered[i:i + cfg.batch_size] for i in range(0, len(ordered), cfg.batch_size)]
        generated = None
    # every finished batch is on disk (fsync) before the next: a rerun continues after the last whole line
    with reported(DataError, f"{out}: cannot append", "the records written before are kept; free space (or make it "
                  "writable) and rerun the same command to continue"), out.open("a", encoding="utf-8") as f, \
            progress_bar(len(todo), "augment-cot", unit="record") as bar:
        for number, batch in enumerate(batches):
            if generated is None:
                # the seed depends on the batch's first id, so a resumed run samples what it would have
                seed = cfg.seed * 1_000_003 + sum(map(ord, batch[0]["id"]))
                results = _generate_hf(model, tokenizer, [prompts[r["id"]] for r in batch], cfg, seed)
            else:
                results = [generated[r["id"]] for r in batch]
            for record, (text, hit_limit) in zip(batch, results):
                rationale, answered = extract_rationale(text)
                reason = degenerate_reason(rationale, hit_limit and not answered)
                row = _output_fields(record)
                if reason is None:
                    row.update(rationale=rationale, cot_output=cot_output(rationale, record["output"]))
                    counts["kept"] += 1
                else:
                    row.update(rationale=None, cot_output=None, degenerate=reason)
                    counts[reason] += 1
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
            bar.update(len(batch))
            bar.set_postfix(kept=counts["kept"], refresh=False)
            fault_point(f"augment-batch:{number + 1}")
    degenerate = {k: v for k, v in counts.items() if k != "kept"}
    say(f"augment-cot: wrote {sum(counts.values())} records to {out} ({counts['kept']} with a rationale; "
        f"dropped as degenerate: {degenerate or 'none'})")
    return {"generated": sum(counts.values()), "kept": counts["kept"], "already_done": len(done), "degenerate": degenerate}
