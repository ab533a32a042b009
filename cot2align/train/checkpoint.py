"""Training checkpoints: everything needed to continue bit-for-bit, in safetensors, written atomically.

A checkpoint is a directory `checkpoints/step-<N>/` holding
  trainable.safetensors   the student's trainable parameters (all of them, or the LoRA adapter's)
  projectors.safetensors  DSKD / OT projectors
  optimizer.safetensors   AdamW state tensors; param groups and scalars in its metadata (JSON)
  state.json              scheduler state, data position (epoch, batches done), step, best metric,
                          Python/NumPy RNG states; torch RNG states are in rng.safetensors
  checksums.json          sha256 of each file above
It is written to a hidden sibling directory and renamed into place, then `checkpoints/latest` (a text
file, replaced atomically) points at it, so a crash at any moment leaves the previous checkpoint intact.
`--resume` takes the newest checkpoint whose files match their checksums: a truncated or bit-flipped one is
named and skipped for the one before it (two are kept); with none intact it refuses, naming them.

Under FSDP (train/fsdp.py) the tensors are sharded: every rank calls save_checkpoint (gathering a whole
tensor is a collective) and only rank 0 writes; on load every rank reads the whole tensors and keeps its
shard. The files are the same as a single-process run's, so a run can resume with another world size.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.distributed.tensor import DTensor

from cot2align.leftovers import remove_dead_temporaries
from cot2align.logs import reporter
from cot2align.cache.format import file_sha256
from cot2align.train import TrainingError
from cot2align.train.fsdp import full_tensor, shard_like
from cot2align.write_errors import io_failure

# a save killed between writing aside and renaming into place (group 1: the writer's pid)
CHECKPOINT_TEMPORARY = re.compile(r"\.(?:step-\d+|latest)\.(\d+)\.tmp")

CHECKSUMS = "checksums.json"


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _optimizer_tensors(optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = full_tensor(value.detach()).contiguous().cpu()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _restore_optimizer(optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        param = params[int(index)]
        # moment estimates have the parameter's shape (and, under FSDP, its sharding); `step` is a scalar
        state.setdefault(int(index), {})[key] = shard_like(value, param) if value.shape == param.shape else value
    for name, value in meta["scalars"].items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(run_dir: Path, step: int, trainable: dict[str, torch.Tensor], projectors: torch.nn.Module,
                    optimizer, scheduler, state: dict, keep: int = 2, write: bool = True) -> Path | None:
    """Write a checkpoint; `write=False` on the other ranks of a sharded run, which only help gather."""
    trainable = {k: full_tensor(v.detach()) for k, v in trainable.items()}
    tensors, meta = _optimizer_tensors(optimizer)
    if not write:
        return None
    checkpoints = run_dir / "checkpoints"
    tmp = checkpoints / f".step-{step:08d}.{os.getpid()}.tmp"
    try:
        return _write(checkpoints, tmp, step, trainable, projectors, tensors, meta, scheduler, state, keep)
    except Exception as e:
        reason = io_failure(e)
        if reason is None:
            raise
        shutil.rmtree(tmp, ignore_errors=True)     # what fitted of it; the previous checkpoint stays the latest
        last = latest_checkpoint(run_dir)
        intact = f"the last checkpoint, {last.name}, is intact" if last is not None else "there is no earlier checkpoint"
        raise TrainingError(f"{checkpoints}: cannot write checkpoint step-{step:08d} ({reason}); {intact} — free "
                            "space (or make --out writable) and rerun with --resume") from None


def _write(checkpoints: Path, tmp: Path, step: int, trainable, projectors, tensors, meta, scheduler, state,
           keep: int) -> Path:
    """Write the checkpoint aside in `tmp`, rename it into place, then point `latest` at it."""
    checkpoints.mkdir(parents=True, exist_ok=True)
    final = checkpoints / f"step-{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.contiguous().cpu() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
    save_file({k: v.detach().contiguous().cpu() for k, v in projectors.state_dict().items()} or {"_empty": torch.zeros(0)},
              str(tmp / "projectors.safetensors"))
    save_file(tensors or {"_empty": torch.zeros(0)}, str(tmp / "optimizer.safetensors"))
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"cuda{i}"] = s
    save_file(rng, str(tmp / "rng.safetensors"))
    py_state = random.getstate()
    np_state = np.random.get_state()
    full_state = dict(state, step=step, scheduler=scheduler.state_dict(), optimizer_meta=meta,
                      python_rng=[py_state[0], list(py_state[1]), py_state[2]],
                      numpy_rng=[np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])])
    (tmp / "state.json").write_text(json.dumps(full_state))
    (tmp / CHECKSUMS).write_text(json.dumps({f.name: file_sha256(f) for f in sorted(tmp.iterdir())}, indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _atomic_text(checkpoints / "latest", final.name)
    for old in sorted(checkpoints.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def remove_checkpoint_leftovers(run_dir: Path) -> list[Path]:
    """A killed save's temporaries (leftovers.py), when their writer is dead."""
    return remove_dead_temporaries(run_dir / "checkpoints", CHECKPOINT_TEMPORARY)


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint at `path` cannot be trusted (a missing, truncated or altered file), or None."""
    sums = path / CHECKSUMS
    if not sums.is_file():
        return None if (path / "state.json").is_file() else "state.json missing"   # written before checksums existed
    try:
        expected = json.loads(sums.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return f"{CHECKSUMS} unreadable"
    for name, digest in expected.items():
        if not (path / name).is_file():
            return f"{name} missing"
        if file_sha256(path / name) != digest:
            return f"{name} does not match its checksum (truncated or corrupted)"
    return None


def latest_checkpoint(run_dir: Path, log=None) -> Path | None:
    """The newest intact checkpoint: the one `latest` points at, else (named in the log) the one before it.
    None when the run has none; a TrainingError naming them when every one is damaged."""
    checkpoints = run_dir / "checkpoints"
    pointer = checkpoints / "latest"
    candidates = sorted(checkpoints.glob("step-*"), reverse=True) if checkpoints.is_dir() else []
    if pointer.exists():
        name = pointer.read_text(encoding="utf-8", errors="replace").strip()
        if not re.fullmatch(r"step-\d{8,}", name):    # a name such as ../../x must not send a resume elsewhere
            raise TrainingError(f"{pointer}: expected the name of a step-<N> checkpoint, got {name[:80]!r}")
        named = checkpoints / name
        candidates = [named] + [c for c in candidates if c != named] if named.exists() else candidates
    damaged = []
    for path in candidates:
        problem = checkpoint_problem(path)
        if problem is None:
            if damaged:
                reporter(log, __name__)(f"resume: skipped damaged checkpoint(s) {'; '.join(damaged)}; using {path}",
                                        logging.WARNING)
            return path
        damaged.append(f"{path}: {problem}")
    if damaged:
        raise TrainingError(f"cannot resume: no intact checkpoint ({'; '.join(damaged)}); "
                            "start again with --overwrite")
    return None


def load_checkpoint(path: Path, model, projectors: torch.nn.Module, optimizer, scheduler, device) -> dict:
    """Restore everything saved by save_checkpoint; returns the state dict (position, step, metrics)."""
    trainable = load_file(str(path / "trainable.safetensors"), device=str(device))
    named = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in trainable.items():
            param = named[name]
            if isinstance(param, DTensor):     # FSDP: keep this rank's shard of the whole tensor
                param.to_local().copy_(shard_like(value, param).to_local())
            else:
                param.copy_(value)
    projector_state = load_file(str(path / "projectors.safetensors"), device=str(device))
    projector_state.pop("_empty", None)
    if projector_state:
        projectors.load_state_dict(projector_state)
    state = json.loads((path / "state.json").read_text())
    tensors = load_file(str(path / "optimizer.safetensors"), device=str(device))
    tensors.pop("_empty", None)
    _restore_optimizer(optimizer, tensors, state["optimizer_meta"])
    scheduler.load_state_dict(state["scheduler"])
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available():
        cuda_states = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda"))]
        if cuda_states:
            torch.cuda.set_rng_state_all(cuda_states)
    py = state["python_rng"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npr = state["numpy_rng"]
    np.random.set_state((npr[0], np.array(npr[1], dtype=np.uint32), npr[2], npr[3], npr[4]))
    return state
