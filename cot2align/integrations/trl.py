"""cot2align inside TRL: train a student from a cot2align teacher cache with TRL's `SFTTrainer`.

    from trl import SFTConfig
    from cot2align.integrations.trl import Cot2AlignTrainer

    trainer = Cot2AlignTrainer(model=student, processing_class=tokenizer, cache="quickstart/cache",
                               method="dskd", cot2align=True, alpha=0.5, args=SFTConfig(output_dir="runs/trl"))
    trainer.train()

TRL keeps what it does (the loop, the schedule, mixed precision, accelerate/DDP, logging, checkpoints, the
hub); cot2align supplies the data and the loss through the same public functions `cot2align distill` runs, so
the same weights on the same batch give `cot2align distill`'s loss (tests/test_trl.py):

  * data: the train dataset is a column of cache example indices (with each example's student length, for
    `train_sampling_strategy="group_by_length"`); `CacheCollator` turns a list of them into the batch
    `train.batches.cache_dataloader` yields — the student's tokenisation of the cached texts (memoised beside
    the cache), only the teacher arrays the method reads (`methods.teacher_arrays`), and the token alignment it
    needs (`Method.alignment`);
  * loss: `compute_loss` runs `train.batches.views` and `losses.objective.distillation_loss` for the method
    taken from the registry (`methods.py`): the teacher's heads by `load_heads` (with MinED's vocabulary map or
    GOLD's exact-match vocabulary where the method declares it), the projectors by `build_projectors`;
  * projectors (DSKD's, CoT2Align's OT projector): trained — a parameter group of TRL's optimiser at the
    `projector_lr` setting, clipped together with the student's gradients (as `distill` clips them) and averaged
    across DDP processes; saved as projectors.safetensors beside each checkpoint and the final model, and
    restored by `train(resume_from_checkpoint=...)`.

The loss settings (`method`, `alpha`, `cot2align`, and through `settings` every other `DistillConfig` field the
loss and data read: `teacher_dist`, `max_length`, `projector_lr`, `ot_epsilon`, each method's hyperparameters)
are checked as `cot2align distill` checks its flags. The optimiser's learning rate, schedule, clipping norm and
steps are TRL's (`SFTConfig`). Supported: TRL 1.x (tested with 1.0 and 1.16, transformers 5.x; `pip install
"cot2align[trl]"`). Not supported: packing / padding-free batches (a cot2align batch has its own padded layout),
FSDP and DeepSpeed (use `cot2align distill --fsdp`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from cot2align.cache import open_cache
from cot2align.cache.profiles import default_teacher_dist
from cot2align.config import DistillConfig, build_config
from cot2align.errors import ConfigError
from cot2align.losses.objective import build_projectors, distillation_loss
from cot2align.methods import method as registered
from cot2align.methods import needs_student_hidden
from cot2align.modeling import tokenizer_hash
from cot2align.train.batches import cache_dataloader, load_heads, pad_id, views
from cot2align.train.data import collate
from cot2align.train.fsdp import average_gradients

try:
    import datasets
    from safetensors.torch import load_file, save_file
    from trl import SFTConfig, SFTTrainer
except ImportError as missing:      # the one place cot2align imports TRL
    raise ImportError(f"cot2align.integrations.trl needs TRL ({missing}); install it with: "
                      "pip install \"cot2align[trl]\"") from missing

PROJECTORS_FILE = "projectors.safetensors"      # the name `cot2align distill` gives them too


class CacheCollator:
    """A TRL/transformers data collator over a cot2align cache: features {"index": example} -> the batch that
    `cache_dataloader` yields for `method` (± CoT2Align): {"index", "std"[, "cot"]}, each view holding the
    student's padded ids and response positions and the teacher's decoded rows (train/data.collate)."""

    def __init__(self, cache, tokenizer, method: str = "dskd", cot2align: bool = True, max_length: int = 512,
                 teacher_dist: str | None = None, transport: bool = True):
        teacher_dist = teacher_dist or default_teacher_dist(cache.manifest)
        loader = cache_dataloader(cache, tokenizer, method=method, cot2align=cot2align, batch_size=1,
                                  max_length=max_length, teacher_dist=teacher_dist, transport=transport)
        self.examples = loader.dataset          # every cached example; item k is example k
        self.built_for = (method, cot2align, max_length, teacher_dist, transport)
        self.views = ("std", "cot") if cot2align else ("std",)
        self.pad = pad_id(tokenizer)

    def dataset(self, indices=None) -> datasets.Dataset:
        """The cached examples `indices` (default all) as a dataset for the trainer: their index, and their student
        tokens over the views as "length" (what `group_by_length` sorts by)."""
        indices = range(len(self.examples)) if indices is None else indices
        return datasets.Dataset.from_dict({"index": [int(i) for i in indices],
                                           "length": [self.examples.length(int(i)) for i in indices]})

    def __call__(self, features: list[dict]) -> dict:
        return collate([self.examples[int(f["index"])] for f in features], self.views, self.pad)


class Cot2AlignTrainer(SFTTrainer):
    """TRL's SFTTrainer with cot2align's data and objective (see the module docstring).

    `cache`: a cache directory/URL or an opened cache; `processing_class`: the student's tokenizer (required: the
    cache is tokenised for it); `settings`: other DistillConfig fields, e.g. {"kd_temperature": 1.0}. Without
    `train_dataset` every cached example trains; to train or evaluate on some of them, build the collator first
    and pass `data_collator=collator, train_dataset=collator.dataset(indices), eval_dataset=...`. Every other
    argument is SFTTrainer's."""

    def __init__(self, model, args: SFTConfig | None = None, *, cache, method: str = "dskd", cot2align: bool = True,
                 alpha: float = 0.5, settings: dict | None = None, processing_class=None, train_dataset=None,
                 data_collator=None, **kwargs):
        if processing_class is None:
            raise ConfigError("processing_class: pass the student's tokenizer (the cache is tokenised for it)")
        cache = open_cache(cache) if isinstance(cache, (str, Path)) else cache
        # the loss settings, checked as `cot2align distill` checks its flags; kl_variant as for a bare distill run
        self.distill_config = build_config(DistillConfig, cache=cache.url, method=method, cot2align=cot2align,
                                           alpha=alpha, **{"kl_variant": "forward",
                                                           "teacher_dist": default_teacher_dist(cache.manifest),
                                                           **(settings or {})})
        cfg, spec = self.distill_config, registered(method)
        if spec.same_tokenizer and tokenizer_hash(processing_class) != cache.manifest["tokenizer"]["vocab_hash"]:
            raise ConfigError(f"method {method}: the student's tokenizer differs from the teacher's in {cache.url}; it "
                              "needs one shared vocabulary — use a cross-tokenizer method (e.g. uld, mined, dskd)")
        args = _cache_args(args)
        wanted = (method, cot2align, cfg.max_length, cfg.teacher_dist, cfg.ot_weight > 0)
        if data_collator is not None and getattr(data_collator, "built_for", None) != wanted:
            raise ConfigError(f"data_collator: expected a CacheCollator of this cache for (method, cot2align, "
                              f"max_length, teacher_dist, transport) = {wanted}, got {getattr(data_collator, 'built_for', None)}")
        self.collator = data_collator or CacheCollator(cache, processing_class, *wanted)
        super().__init__(model=model, args=args, processing_class=processing_class, data_collator=self.collator,
                         train_dataset=self.collator.dataset() if train_dataset is None else train_dataset, **kwargs)
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        device = self.args.device
        self.teacher_dtype = torch.bfloat16 if self.args.bf16 else torch.float32    # as distill: its cached rows
        self.heads = None
        if spec.kd is not None or cot2align:
            self.heads = load_heads(cache, base, processing_class, device=device, dtype=self.teacher_dtype,
                                    method=method)
        student_dim = base.config.get_text_config().hidden_size
        self.projectors = build_projectors(method, cot2align, student_dim, cache.hidden_size,
                                           transport=cfg.ot_weight > 0).to(device)

    # ------------------------------------------------------------------ the objective

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """`cot2align distill`'s loss on this batch: the student's forward on each view, the cached teacher rows,
        (1 − α)·CE + α·(L_KD + L_CCoT). Its parts (ce, kd, ccot, ...) are logged with TRL's metrics."""
        cfg = self.distill_config
        students, teachers = views(inputs, model, self.heads, self.args.device, self.teacher_dtype,
                                   needs_student_hidden(cfg.method, cfg.cot2align, cfg.ot_weight > 0))
        loss, parts = distillation_loss(cfg.method, cfg.alpha, students, teachers, self.heads, self.projectors,
                                        cfg.cot2align, cfg)
        # ce, kd, kd/<part>, ccot (the OT plans' figures stay distill's metrics), to the host in one copy
        logged = [name for name in parts if name != "loss" and not name.startswith("ot")]
        values = torch.stack([torch.as_tensor(parts[name]).float().reshape(()) for name in logged]).tolist()
        for name, value in zip(logged, values):
            self._metrics["train" if model.training else "eval"][name].append(value)
        return (loss, students["std"].logits) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation: the same loss (no logits are gathered: a cot2align batch has no `labels`)."""
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, self._prepare_inputs(inputs))
        return loss.detach(), None, None

    # ------------------------------------------------------------------ the projectors train, save and resume

    def create_optimizer(self, model=None):
        """TRL's optimiser for the student, plus the projectors as their own group (lr: the `projector_lr` setting),
        as `cot2align distill` trains them."""
        optimizer = super().create_optimizer(model) if model is not None else super().create_optimizer()
        params = list(self.projectors.parameters())
        if params and not any(p is params[0] for group in optimizer.param_groups for p in group["params"]):
            optimizer.add_param_group({"params": params, "lr": self.distill_config.projector_lr,
                                       "weight_decay": self.args.weight_decay})
        return optimizer

    def _clip_grad_norm(self, model):
        """The student's and the projectors' gradients clipped by their joint norm (as distill does); under DDP the
        projectors (outside the wrapped model) get their gradients averaged across processes first."""
        params = list(self.projectors.parameters())
        if self.accelerator.num_processes > 1:
            average_gradients(params)
        return self.accelerator.clip_grad_norm_([*model.parameters(), *params], self.args.max_grad_norm)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        super().save_model(output_dir, _internal_call)
        if self.args.should_save and len(list(self.projectors.parameters())):
            out = Path(output_dir or self.args.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            save_file({k: v.detach().contiguous().cpu() for k, v in self.projectors.state_dict().items()},
                      str(out / PROJECTORS_FILE))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if len(list(self.projectors.parameters())):
            path = Path(resume_from_checkpoint) / PROJECTORS_FILE
            if not path.is_file():
                raise ConfigError(f"resume_from_checkpoint {resume_from_checkpoint}: no {PROJECTORS_FILE} (the "
                                  f"{self.distill_config.method} projectors); it was not written by Cot2AlignTrainer")
            self.projectors.load_state_dict(load_file(str(path), device=str(self.args.device)))


def _cache_args(args: SFTConfig | None) -> SFTConfig:
    """SFTTrainer's arguments for batches from a cache: TRL neither tokenises the dataset (the collator reads the
    cache) nor drops its columns (the "index" the collator needs); packing and padding-free batches, FSDP and
    DeepSpeed are refused in one line."""
    args = SFTConfig() if args is None else args
    if not isinstance(args, SFTConfig):
        raise ConfigError(f"args: expected a trl.SFTConfig, got {type(args).__name__} (SFTConfig takes the same "
                          "arguments as transformers' TrainingArguments)")
    for name in ("packing", "padding_free"):
        if getattr(args, name, False):
            raise ConfigError(f"SFTConfig.{name}: not supported by Cot2AlignTrainer (a cot2align batch is padded per "
                              "view, response rows aligned to the teacher's); leave it False")
    if getattr(args, "deepspeed", None) or getattr(args, "fsdp", None):
        raise ConfigError("SFTConfig: Cot2AlignTrainer does not support DeepSpeed or FSDP (its projectors live "
                          "outside the model); use `cot2align distill --fsdp`")
    args.remove_unused_columns = False
    args.dataset_kwargs = {**(args.dataset_kwargs or {}), "skip_prepare_dataset": True}
    return args
