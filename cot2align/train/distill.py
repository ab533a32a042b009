"""`cot2align distill`: train a student from the teacher cache (README 'Distillation'). The recipe, top to bottom:

    cfg = resolve_distill_config(cfg)      flags + YAML + paper defaults + device, dtype, resume state (train/resolve.py)
    run = setup(cfg)                       models, heads, projectors, loader, optimiser, resume (train/setup.py)
    for each epoch:
        train_epoch(run)                   per batch: the student's forward on each view, the cached teacher
                                           rows, the objective (losses/objective.py), backward; AdamW step
                                           with clipping every grad_accum batches; metrics; checkpoints
        end_of_epoch(run)                  validation (held-out CE, greedy ROUGE-L), keep the best weights,
                                           checkpoint (atomic safetensors: --resume continues bit for bit)
    finalise(run)                          the best model, projectors, summary, plot, card (train/outputs.py)

The teacher model is never loaded: its rows come from the cache, its logits are recomputed from the cached
hidden states and LM head when the method needs them.
"""

from __future__ import annotations

import math
import os
from contextlib import ExitStack
import time

import numpy as np
import torch

from cot2align.cache import open_cache
from cot2align.config import DistillConfig
from cot2align.faults import fault_point
from cot2align.hub import push_to_hub, warn_if_no_token
from cot2align.logs import reporter, silent
from cot2align.losses.objective import distillation_loss
from cot2align.train import TrainingError
from cot2align.train.batches import views as batch_views
from cot2align.train.checkpoint import save_checkpoint
from cot2align.train.fsdp import average_gradients, clip_grad_norm
from cot2align.train.metrics import append as append_metrics
from cot2align.train.outputs import call_trackers, has_saved_model, progress_bar, save_best, write_outputs
from cot2align.train.resolve import resolve_distill_config
from cot2align.train.setup import Run, finished_summary, setup, trainable_state, whole_model
from cot2align.train.validation import is_better, validate
from cot2align.write_errors import reported

# a rerun with --resume from the last checkpoint trains what is missing and writes the outputs again
FINAL_RECOVERY = "the checkpoints are intact; free space (or make --out writable) and rerun with --resume"


def distill(cfg: DistillConfig, log=None, progress: bool = True, cache=None) -> dict:
    """Train one student; `cache` may be an already opened TeacherCache (sweep opens it once). Messages go to
    the `cot2align.train` logger, or to `log` when given; `progress`: the step bar (on a terminal)."""
    if cache is None and cfg.cache:
        cache = open_cache(cfg.cache)       # once, for the resolution, this check and the run
    say = reporter(log, "cot2align.train") if int(os.environ.get("RANK", "0")) == 0 else silent
    cfg = resolve_distill_config(cfg, cache, say)     # the one config the run reads and records from here on
    finished = finished_summary(cfg, cache)
    if finished is not None:
        say(f"--resume {finished['out']}: the run finished earlier ({finished['steps']} steps); nothing to do"
            + ("; to upload it: cot2align push" if cfg.push_to_hub else ""))
        return finished
    with ExitStack() as held:      # the writer lock of --out, until the outputs are written or an error stops the run
        run = setup(cfg, log, cache, held)
        if cfg.push_to_hub and run.is_main:
            warn_if_no_token(run.say)
        for epoch in range(run.state["epoch"], cfg.epochs):
            if run.stopped:
                break
            batch_no = train_epoch(run, epoch, progress)
            end_of_epoch(run, epoch, batch_no)
        return finalise(run)


def train_epoch(run: Run, epoch: int, progress: bool) -> int:
    """One pass over the loader (resumed mid-epoch from the checkpoint's data position); returns how many
    batches of the epoch are done. The last accumulation window of an epoch is sized to what is left."""
    sampler = run.loader.batch_sampler
    sampler.epoch = epoch
    sampler.skip = run.state["batches_done"] if epoch == run.state["epoch"] else 0
    batch_no = sampler.skip
    bar = progress_bar(len(sampler), epoch, run.is_main and progress)
    window: list[dict] = []
    batches = iter(run.loader)
    with bar:       # closed on an error too: the error line then starts a line of its own
        while True:
            waited = time.perf_counter()
            batch = next(batches, None)
            run.data_wait += time.perf_counter() - waited
            if batch is None:
                break
            accumulate = run.cfg.grad_accum
            window_size = min(accumulate, (batch_no % accumulate) + run.batches_per_epoch - batch_no)
            window.append(loss_step(run, batch, epoch, window_size))
            batch_no += 1
            if len(window) < window_size:
                continue
            optimizer_step(run, window, epoch, batch_no, bar)
            window = []
            if run.stopped:
                break
    return batch_no


def loss_step(run: Run, batch: dict, epoch: int, window_size: int) -> dict[str, float]:
    """Forward both models' views, the objective, backward (scaled for accumulation); the logged parts.

    The loss and every logged part cross to the host in one copy (one sync per micro-batch); a non-finite
    value stops the run before the update, since a NaN gradient would silently destroy the weights."""
    cfg = run.cfg
    with run.autocast:
        students, teachers = batch_views(batch, run.train_model, run.heads, run.device, run.compute_dtype,
                                         run.need_hidden)
        loss, parts = distillation_loss(cfg.method, cfg.alpha, students, teachers, run.heads, run.projectors,
                                        cfg.cot2align, cfg)
    values = torch.stack([loss.detach().float().reshape(())] + [torch.as_tensor(v, device=run.device).float().reshape(())
                                                                for v in parts.values()]).tolist()
    logged = dict(zip(parts, values[1:]))
    if not all(math.isfinite(v) for v in values):
        bad = ["loss"] * (not math.isfinite(values[0])) + [k for k, v in logged.items() if not math.isfinite(v)]
        raise TrainingError(f"step {run.step + 1}, epoch {epoch + 1}: the loss is not finite (non-finite parts: "
                            f"{', '.join(sorted(set(bad)))}) on cache examples {batch['index'].tolist()}; nothing "
                            f"was updated and the last checkpoint in {run.out / 'checkpoints'} is intact")
    run.scaler.scale(loss / window_size).backward()
    run.tokens_seen += int(sum(batch[v]["attention_mask"].sum() for v in run.views))
    return logged


def optimizer_step(run: Run, window: list[dict], epoch: int, batch_no: int, bar) -> None:
    """Average gradients across ranks, clip, step AdamW and the schedule; log; checkpoint every --save-every."""
    cfg = run.cfg
    if run.world > 1:
        average_gradients(list(run.projectors.parameters()) + run.whole_params)
    run.scaler.unscale_(run.optimizer)          # --dtype fp16: true gradients before clipping; else nothing
    clip = clip_grad_norm if run.sharded else torch.nn.utils.clip_grad_norm_
    clip(run.params + list(run.projectors.parameters()), cfg.max_grad_norm)
    run.scaler.step(run.optimizer)              # fp16: skipped when a gradient overflowed; else optimizer.step()
    run.scaler.update()
    if run.scaler.is_enabled():
        run.state["grad_scaler"] = run.scaler.state_dict()     # checkpointed with the state: resume continues it
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    step = run.step + 1
    run.state.update(epoch=epoch, batches_done=batch_no, step=step)
    elapsed = max(time.perf_counter() - run.started, 1e-9)
    record = {"step": step, "epoch": epoch, "lr": run.scheduler.get_last_lr()[0],
              **{k: float(np.mean([w[k] for w in window if k in w])) for k in window[0]},
              "tokens_per_s": run.tokens_seen / elapsed, "data_wait_share": run.data_wait / elapsed,
              "data_wait_s": run.data_wait, "elapsed_s": elapsed}
    if run.is_main:
        log_metrics(run, record, "train")
        bar.update(cfg.grad_accum)
        bar.set_postfix(loss=f"{record.get('loss', record['ce']):.4f}", ce=f"{record['ce']:.3f}",
                        tok_s=f"{record['tokens_per_s']:.0f}")
    if cfg.save_every and step % cfg.save_every == 0 and (run.is_main or run.sharded):
        save_checkpoint(run.out, step, trainable_state(run.model), run.projectors, run.optimizer, run.scheduler,
                        run.state, write=run.is_main)
    fault_point(f"step:{step}")
    run.stopped = cfg.max_steps is not None and step >= cfg.max_steps


def end_of_epoch(run: Run, epoch: int, batch_no: int) -> None:
    """Validate, keep the best weights, checkpoint. Rank 0 alone under DDP; every rank under FSDP, where a
    forward pass and gathering the weights are collectives."""
    if run.is_main or run.sharded:
        scores = validate(run.model, run.tokenizer, run.val_records, run.cfg, synced_gpus=run.sharded)
        if run.sharded:     # one decision for all ranks: rank 0's scores
            shared = [scores]
            torch.distributed.broadcast_object_list(shared, src=0)
            scores = shared[0]
        record = {"epoch": epoch, "step": run.step, **scores}
        run.state["history"].append(record)
        if run.is_main:
            log_metrics(run, record, "val")
        run.say(f"epoch {epoch + 1}/{run.cfg.epochs}: step {run.step}, " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
        rouge, ce = scores.get("val_rougeL"), scores.get("val_ce")
        if is_better(rouge, ce, run.state, run.cfg.select_by):
            run.state.update(best_rougeL=rouge, best_val_loss=ce, best_epoch=epoch)
            whole = whole_model(run.model, run.cfg, run.is_main)
            if run.is_main:
                with reported(TrainingError, f"{run.out / 'best'}: cannot save the best model", FINAL_RECOVERY):
                    save_best(whole, run.tokenizer, run.out, run.cfg)
        # a finished epoch resumes at the next one; a run stopped by max_steps resumes where it stopped
        position = dict(epoch=epoch, batches_done=batch_no) if run.stopped else dict(epoch=epoch + 1, batches_done=0)
        run.state.update(step=run.step, **position)
        save_checkpoint(run.out, run.step, trainable_state(run.model), run.projectors, run.optimizer, run.scheduler,
                        run.state, write=run.is_main)
    if run.world > 1:
        torch.distributed.barrier()


def log_metrics(run: Run, record: dict, kind: str) -> None:
    """One JSON line in metrics.jsonl (unbuffered: a crash loses nothing logged) and the --report-to trackers' scalars."""
    append_metrics(run.metrics_file, record)
    scalars = {f"{kind}/{key.removeprefix('val_')}": value for key, value in record.items() if key not in ("step", "epoch")}
    call_trackers(run.trackers, run.say, "log", scalars, run.step)


def finalise(run: Run) -> dict:
    """The outputs of the run (rank 0), then the end of the process group."""
    summary = {"steps": run.step, "best_epoch": run.state["best_epoch"], "best_val_rougeL": run.state["best_rougeL"],
               "history": run.state["history"], "out": str(run.out)}
    # Does write_outputs need the final weights (no best/ and no kept model at the top)? Rank 0 decides before it
    # moves best/ up: under FSDP the answer starts a collective gather, which all ranks must join or none.
    needs_final = [not (run.out / "best").exists() and not has_saved_model(run.out)] if run.is_main else [None]
    if run.world > 1:               # rank 0's answer, whatever the other ranks' view of the filesystem
        torch.distributed.broadcast_object_list(needs_final, src=0)
    final = whole_model(run.model, run.cfg, run.is_main) if run.sharded and needs_final[0] else run.model
    if run.is_main:
        run.metrics_file.close()
        call_trackers(run.trackers, run.say, "close")
        with reported(TrainingError, f"--out {run.out}: cannot write the final model", FINAL_RECOVERY):
            write_outputs(run.out, run.cfg, run.tokenizer, final, run.projectors, run.cache, summary)
        run.say(f"wrote {run.out} (best epoch {summary['best_epoch']}, val ROUGE-L {summary['best_val_rougeL']})")
    if run.world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    if run.is_main and run.cfg.push_to_hub:     # the outputs are on disk and the ranks done: a failed push loses nothing
        summary["hub_url"] = push_to_hub(run.out, run.cfg.hub_model_id, run.cfg.hub_private, log=run.say)
    return summary
