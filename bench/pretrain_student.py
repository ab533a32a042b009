"""The pretrained-student regime of bench/transfer.py: a GPT-2 student pretrained once as a plain causal LM.

The papers distil into pretrained students; a random-initialised student must learn the language and the task at
once. This pretrains `random:gpt2-transfer` on instruction data that shares nothing with DialogSum — the local
splits of Alpaca, Dolly and S-NI (read with the package's own readers; the hub is never asked) as plain text:
instruction, input and response joined by blank lines, no prompt template, each document ended by EOS — packed
into fixed-length sequences (no padding is trained), for a few epochs (a new packing order each epoch).

Nothing of DialogSum goes in, and that is checked, not assumed: a record that shares any 13-word sequence with any
DialogSum text (every local split, the original test release, and the DialogSum records of the package's own
`sample`) is dropped — DialogSum was built from DailyDialog, DREAM and MuTual, which some S-NI tasks also draw
on — and the corpus is then asserted disjoint from DialogSum before a step is taken.

Resumable: a checkpoint (weights, AdamW state, the dropout RNG, the step) every `save_every` steps; a killed run
resumes from it, bit for bit (the packing of each epoch is a function of the seed and the epoch). The finished
model is written to a temporary directory and renamed into place (safetensors, its tokenizer and pretrain.json),
so a model directory exists only when it is complete; `cot2align distill --student DIR` starts from it.
"""

from __future__ import annotations

import json
import math
import random
import re
import shutil
import time
from pathlib import Path

import torch

STUDENT = "random:gpt2-transfer"
SOURCES = ("alpaca", "dolly", "sni")
SHINGLE = 13                 # words: the usual contamination-check length (a shared 13-word run is not chance)
_WORD = re.compile(r"[a-z0-9]+")
_SPEAKER = re.compile(r"^person\d+$")      # DialogSum's #Person1# tags, spelled differently elsewhere


def plain_text(record: dict) -> str:
    """A record as pretraining text: instruction, input and response, no template."""
    return "\n\n".join(part.strip() for part in (record["instruction"], record.get("input", ""), record["output"])
                       if part and part.strip())


def _words(text: str) -> list[str]:
    return [w for w in _WORD.findall(text.lower()) if not _SPEAKER.match(w)]


def shingles(text: str) -> set[int]:
    """Hashes of the text's 13-word runs (lower case, punctuation and speaker tags dropped); a text shorter than
    13 words is its one run."""
    words = _words(text)
    if len(words) < SHINGLE:
        return {hash(tuple(words))} if words else set()
    return {hash(tuple(words[i:i + SHINGLE])) for i in range(len(words) - SHINGLE + 1)}


def corpus_records(data_root: str | None) -> tuple[list[dict], list[dict]]:
    """The records of every local split of Alpaca, Dolly and S-NI (a split with no local file is skipped, never
    fetched), duplicates removed, and where each came from."""
    from cot2align.data import load_records
    from cot2align.data.readers import SPLITS, resolve_data_file

    records, sources, seen = [], [], set()
    for alias in SOURCES:
        for split in SPLITS:
            path = resolve_data_file(alias, split, data_root)
            if path is None:
                continue
            rows, _ = load_records(alias, split, data_root)
            fresh = [r for r in rows if plain_text(r) not in seen]
            seen.update(plain_text(r) for r in fresh)
            records += [{**r, "id": f"{alias}/{split}/{r['id']}"} for r in fresh]
            sources.append({"dataset": alias, "split": split, "path": str(path), "records": len(fresh)})
    if not records:
        raise SystemExit(f"pretraining corpus: no local split of {', '.join(SOURCES)} under the data root "
                         f"{data_root or '$COT2ALIGN_DATA_ROOT'}")
    return records, sources


def dialogsum_texts(data_root: str | None) -> list[str]:
    """Every DialogSum text this benchmark could meet: dialogues, summaries and references of each local split
    (and the original test release), and the DialogSum records of the package's `sample`."""
    from cot2align.data import load_records
    from cot2align.data.readers import SPLITS, default_data_root, read_file, resolve_data_file, sample_dir
    from cot2align.data.records import DIALOGSUM_INSTRUCTION

    records = []
    for split in SPLITS:
        if resolve_data_file("dialogsum", split, data_root) is not None:
            records += load_records("dialogsum", split, data_root, apply_filters=False)[0]
    release = Path(data_root or default_data_root()) / "dialogsum" / "dialogsum.test.jsonl"
    if release.exists():
        records += read_file(release)
    for split in SPLITS:
        records += [r for r in read_file(sample_dir() / f"{split}.jsonl")
                    if r["instruction"].startswith(DIALOGSUM_INSTRUCTION.split(":")[0])]
    texts = []
    for r in records:
        texts += [r.get("input", ""), r["output"], *(r.get("references") or [])]
    return [t for t in texts if t]


def without_dialogsum(records: list[dict], data_root: str | None) -> tuple[list[dict], int]:
    """The records that share no 13-word run with DialogSum, and how many were dropped; then asserted."""
    banned: set[int] = set()
    for text in dialogsum_texts(data_root):
        banned |= shingles(text)
    if not banned:
        raise SystemExit("pretraining corpus: no DialogSum text found to check against (the data root must hold "
                         "DialogSum: the check is what makes the regime clean)")
    kept = [r for r in records if not (shingles(plain_text(r)) & banned)]
    # the promise of this regime, stated once more on what will actually train
    overlap = [r["id"] for r in kept if shingles(plain_text(r)) & banned]
    assert not overlap, f"pretraining corpus overlaps DialogSum: {overlap[:5]}"
    return kept, len(records) - len(kept)


def pack(documents: list[list[int]], seq_len: int, seed: int, epoch: int) -> torch.Tensor:
    """[n, seq_len] blocks of the documents (each ending in EOS) concatenated in an order fixed by (seed, epoch);
    the tail that does not fill a block is left out (another order next epoch)."""
    order = list(range(len(documents)))
    random.Random(seed * 1000 + epoch).shuffle(order)
    stream = [t for i in order for t in documents[i]]
    n = len(stream) // seq_len
    return torch.tensor(stream[:n * seq_len], dtype=torch.long).view(n, seq_len)


class LinearCrossEntropy(torch.autograd.Function):
    """mean_i CE(softmax(h_i W^T), y_i) and its gradients in one pass over row chunks, never holding the full
    [N, V] logits: for a chunk, p = softmax(h W^T) and dL/dlogits = (p - onehot(y)) / N, so dL/dh = that @ W and
    dL/dW = that^T @ h. With V = 50257 and 4096 tokens a step, the logits are 0.8 GB; the chunks keep the step's
    memory traffic to a fraction of it (the GPT-2 student's step time is its vocabulary's, not its 2 layers')."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        n = hidden.shape[0]
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight)
        total = hidden.new_zeros((), dtype=torch.float64)
        for start in range(0, n, chunk):
            h, y = hidden[start:start + chunk], targets[start:start + chunk]
            logits = h @ weight.T
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, y[:, None]).squeeze(1)).sum(dtype=torch.float64)
            probs = logits.sub_(lse[:, None]).exp_()                    # in place: logits are not needed again
            probs[torch.arange(len(y)), y] -= 1.0
            probs.div_(n)
            grad_hidden[start:start + chunk] = probs @ weight
            grad_weight.addmm_(probs.T, h)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return (total / n).to(hidden.dtype)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_output, grad_weight * grad_output, None, None


def causal_lm_loss(model, blocks: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """The next-token cross-entropy of packed blocks (every position is a real token: nothing to mask)."""
    hidden = model.transformer(input_ids=blocks).last_hidden_state[:, :-1]
    targets = blocks[:, 1:]
    return LinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), model.lm_head.weight,
                                    targets.reshape(-1), chunk)


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _save_checkpoint(path: Path, model, optimizer, step: int, settings: dict, losses: list[float]) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"},
              str(tmp / "model.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "rng": torch.get_rng_state()}, tmp / "state.pt")
    (tmp / "progress.json").write_text(json.dumps({"step": step, "settings": settings, "losses": losses}))
    shutil.rmtree(path, ignore_errors=True)
    tmp.replace(path)


def _load_checkpoint(path: Path, model, optimizer, settings: dict) -> tuple[int, list[float]]:
    """The step to continue from (0: start over, also when the checkpoint was made with other settings)."""
    from safetensors.torch import load_file

    progress_file = path / "progress.json"
    if not progress_file.exists():
        return 0, []
    progress = json.loads(progress_file.read_text())
    if progress["settings"] != settings:
        print(f"  pretraining checkpoint {path} was made with other settings: starting over", flush=True)
        return 0, []
    model.load_state_dict(load_file(str(path / "model.safetensors")), strict=False)
    model.tie_weights()
    state = torch.load(path / "state.pt", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    return progress["step"], progress["losses"]


def pretrain(out: Path, data_root: str | None, *, seq_len: int, batch: int, epochs: int, lr: float,
             max_records: int | None = None, seed: int = 0, save_every: int = 50, log=print) -> dict:
    """Pretrain the student and write it to `out` (a model directory); returns what pretrain.json records."""
    from cot2align.modeling import build_random_model, load_tokenizer

    started = time.perf_counter()
    records, sources = corpus_records(data_root)
    records, dropped = without_dialogsum(records, data_root)
    records = records[:max_records] if max_records else records
    tokenizer = load_tokenizer(STUDENT)
    documents = [tokenizer(plain_text(r))["input_ids"] + [tokenizer.eos_token_id] for r in records]
    tokens = sum(len(d) for d in documents)
    steps_per_epoch = len(pack(documents, seq_len, seed, 0)) // batch
    if steps_per_epoch == 0:
        raise SystemExit(f"pretraining corpus: {tokens} tokens fill no batch of {batch} x {seq_len}")
    total = steps_per_epoch * epochs
    settings = dict(seq_len=seq_len, batch=batch, epochs=epochs, lr=lr, seed=seed, records=len(records),
                    tokens=tokens)
    log(f"  pretraining corpus: {len(records)} records ({dropped} dropped for sharing text with DialogSum), "
        f"{tokens} GPT-2 tokens; {epochs} epochs = {total} steps of {batch} x {seq_len} tokens")

    model = build_random_model(STUDENT, seed, torch.float32).train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=lr, betas=(0.9, 0.95))
    checkpoint = out.with_name(out.name + ".checkpoint")
    step, losses = _load_checkpoint(checkpoint, model, optimizer, settings)
    if step:
        log(f"  resumed pretraining at step {step} of {total}")
    if not step:
        torch.manual_seed(seed)          # dropout's stream (a resumed run restored it from the checkpoint)
    warmup = max(1, total // 20)
    packed: dict[int, torch.Tensor] = {}
    while step < total:
        epoch, index = divmod(step, steps_per_epoch)
        if epoch not in packed:
            packed = {epoch: pack(documents, seq_len, seed, epoch)}
        blocks = packed[epoch][index * batch:(index + 1) * batch]
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, total, lr, warmup)
        loss = causal_lm_loss(model, blocks)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(round(loss.item(), 4))
        step += 1
        if step % save_every == 0 or step == total:
            _save_checkpoint(checkpoint, model, optimizer, step, settings, losses)
            log(f"  pretraining step {step}/{total}: loss {statistics_mean(losses[-save_every:]):.3f}")
    summary = {**settings, "steps": total, "dropped_dialogsum_overlap": dropped, "sources": sources,
               "first_loss": losses[0], "final_loss": statistics_mean(losses[-max(1, steps_per_epoch // 4):]),
               "wall_s": round(time.perf_counter() - started, 1)}
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.eval().save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "pretrain.json").write_text(json.dumps(summary, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    shutil.rmtree(checkpoint, ignore_errors=True)
    return summary


def statistics_mean(values: list[float]) -> float:
    return sum(values) / len(values)
