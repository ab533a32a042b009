"""The distillation methods: one record each, the one place a method is registered.

A method is its loss file in `cot2align/losses/` (a pure tensor function, and `kd_term`, which applies it to the
views of a batch) plus one `Method` entry in `METHODS` below. The entry says what the method reads and needs, so
that the rest of the package asks the registry instead of naming methods:

  * the command line's `--method` choices and one flag per hyperparameter (`settings`);
  * the run's config: each setting is a `DistillConfig` field (config.py), checked once when the config is built;
  * the loader: which cached teacher arrays to decode (`teacher_arrays()`), and which token alignment the
    student's tokenisation of the cache computes once and memoises (`alignment`);
  * setup: the student's hidden states, MinED's vocabulary map, the trainable projectors.

Adding a method (a newcomer's checklist): write `losses/<name>.py` with the loss and
`kd_term(student, teacher, views, heads, projectors, cfg) -> (L_KD, parts)` (see losses/kl.py), then add one
`Method(...)` line to `METHODS`; a method that needs its own vocabulary table adds the function that builds it
(`vocab_tables`, e.g. align/exact_tokens.py). Two things are not yet one line: a new kind of token alignment
(train/data.py `aligner` knows "mined" and "chunks") and a new cached teacher array (the cache pass, and
`TeacherView`, which carries the arrays by name).

This module imports no torch: the command line reads it to build its help in a fraction of a second.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import lru_cache

# The KL family of losses/kl.py (and DSKD's t2s term): written here once, read by the flag, the config check and
# the loss.
KL_VARIANTS = ("forward", "reverse", "skewed_forward", "skewed_reverse", "js", "adaptive")
TEACHER_DISTS = ("exact", "topk")          # hidden · lm_headᵀ recomputed from the cache | the stored top-k + tail
STORE_PROFILES = ("full", "logits")        # what cache-teacher --store keeps: every array | no hidden states
                                           # (cache/format.py lays them out; cache/profiles.py: what each serves)
ALIGNMENTS = ("mined", "chunks")           # align/mined.py's teacher row per student row | align/chunks.py's spans
# CoT2Align's OT term (losses/ot.py), shared by every method
OT_GRADS = ("envelope", "unrolled")            # the OT plan's gradient: envelope theorem (ours) | through Sinkhorn
OT_EPSILON_SCALES = ("absolute", "relative")   # Sinkhorn's ε as given (the paper) | times each plan's cost std
GOLD_SCOPES = ("one_token", "all")             # where GOLD compares exact-match tokens (losses/gold.py)


@dataclass(frozen=True)
class Setting:
    """One hyperparameter of a method: a DistillConfig field, a `--flag` and a YAML key of the same name.

    `check`: "positive_float", "positive_int", "non_negative_float", "unit_interval", or a tuple of the choices.
    `default` None means "filled from the paper's setting of the teacher" (config.PAPER_SETTINGS), as kl_variant is."""

    name: str
    default: object
    check: str | tuple
    help: str
    kind: str = "identity"        # config.py's field kinds: identity (changes the result) | runtime


@dataclass(frozen=True)
class Method:
    """What one `--method` is and what it reads (see the module docstring)."""

    name: str
    summary: str                            # one line for --help and the docs: what it is, its paper
    kd: str | None                          # "module:function" of its L_KD term (None: sft, CE alone)
    teacher_dist: bool = False              # reads the teacher's distribution: exact, or top-k + tail (--teacher-dist)
    teacher_arrays: tuple[str, ...] = ()    # further cached per-row arrays it reads (e.g. hidden, embeds)
    student_hidden: bool = False            # needs the student's hidden states, not only its logits
    alignment: str | None = None            # a token alignment computed once per (cache, student tokenizer)
    vocab_map: bool = False                 # needs MinED's vocabulary map (heads.stu2tea / tea2stu)
    vocab_tables: str | None = None         # "module:function(teacher_tokenizer, student_tokenizer)" building the
                                            # vocabulary tables it reads as heads.tables[name] (once per run)
    same_tokenizer: bool = False            # only for a student with the teacher's own tokenizer
    projectors: str | None = None           # "module:factory(student_dim, teacher_dim)" of its trained projectors
    whole_teacher_logits: bool = False      # holds the exact teacher logits [rows, V_t] whole (a memory check first)
    settings: tuple[Setting, ...] = ()      # its hyperparameters

    def kd_term(self):
        """The L_KD function (imported now: the registry itself stays torch-free)."""
        return _load(self.kd)

    def build_vocab_tables(self, teacher_tokenizer, student_tokenizer) -> dict:
        return _load(self.vocab_tables)(teacher_tokenizer, student_tokenizer) if self.vocab_tables else {}

    def build_projectors(self, student_dim: int, teacher_dim: int):
        return _load(self.projectors)(student_dim, teacher_dim) if self.projectors else None


@lru_cache(maxsize=None)     # kd_term() is asked for at every step: import and look it up once
def _load(path: str):
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


# Settings shared by several methods: declared once, listed by each method that reads them.
KD_TEMPERATURE = Setting("kd_temperature", 2.0, "positive_float",
                         "τ of the teacher and student distributions (kl, mined, dskd); no τ² factor")
KL_VARIANT = Setting("kl_variant", None, KL_VARIANTS,
                     "The KL family member (kl, and DSKD's teacher-to-student term)")
SKEW_LAMBDA = Setting("skew_lambda", 0.1, "unit_interval", "λ of the skewed KL variants (DistiLLM)")
ADAPTIVE_ALPHA = Setting("adaptive_alpha", 0.5, "unit_interval", "The head/tail split of the adaptive KL (AKL)")
VOCAB_CHUNK = Setting("vocab_chunk", 32768, "positive_int",
                      "Vocabulary columns per chunk of the exact teacher distribution (memory, not the result)",
                      kind="runtime")

METHODS: dict[str, Method] = {m.name: m for m in (
    Method("sft", "Plain supervised fine-tuning: the student's cross-entropy alone (with CoT2Align: its CoT view "
                  "and the OT term)", kd=None),
    Method("kl", "KL divergence to the teacher's distribution; the student must share the teacher's tokenizer",
           kd="cot2align.losses.kl:kd_term", teacher_dist=True, same_tokenizer=True, whole_teacher_logits=True,
           settings=(KL_VARIANT, KD_TEMPERATURE, SKEW_LAMBDA, ADAPTIVE_ALPHA)),
    Method("uld", "Universal Logit Distillation: L1 between sorted probabilities (Boizard et al. 2024)",
           kd="cot2align.losses.uld:kd_term", teacher_dist=True, whole_teacher_logits=True,
           settings=(Setting("uld_temperature", 1.0, "positive_float", "ULD's temperature"),)),
    Method("mined", "MinED: KL after mapping vocabularies by minimum edit distance (Wan et al. 2024)",
           kd="cot2align.losses.mined:kd_term", teacher_dist=True, alignment="mined", vocab_map=True,
           whole_teacher_logits=True, settings=(KD_TEMPERATURE,)),
    Method("dskd", "Dual-Space KD with cross-model attention (Zhang et al. 2024)",
           kd="cot2align.losses.dskd:kd_term", teacher_dist=True, teacher_arrays=("hidden",), student_hidden=True,
           projectors="cot2align.losses.dskd:DSKDProjectors",
           settings=(KL_VARIANT, KD_TEMPERATURE, SKEW_LAMBDA, ADAPTIVE_ALPHA, VOCAB_CHUNK)),
    Method("alm", "ALM: approximate likelihood matching over aligned chunks (Minixhofer et al. 2025)",
           kd="cot2align.losses.alm:kd_term", teacher_arrays=("target_logprob",), alignment="chunks",
           settings=(Setting("alm_temperature", 1.0, "positive_float",
                             "ALM's τ: chunk likelihoods compared as p^(1/τ) (tokenkit trains at 100, with ALM alone)"),)),
    Method("gold", "GOLD: exact-match tokens by generalised JSD, ULD on the rest, over byte-aligned chunks merged by "
                   "the chain rule (TRL's cross-tokenizer trainer, off-policy)",
           kd="cot2align.losses.gold:kd_term", teacher_dist=True, teacher_arrays=("target_logprob",),
           alignment="chunks", vocab_tables="cot2align.align.exact_tokens:gold_tables", whole_teacher_logits=True,
           settings=(
               Setting("gold_temperature", 1.0, "positive_float", "GOLD's temperature, both sides (TRL's default 1)"),
               Setting("gold_beta", 0.5, "unit_interval", "β of the generalised JSD on exact-match tokens (TRL's "
                       "beta): 0 = KL(teacher‖student), 1 = KL(student‖teacher); 0 transfers far more in "
                       "BENCHMARKS.md's ranking, TRL's 0.5 about nothing"),
               Setting("gold_weighting", "adaptive", ("adaptive", "fixed"),
                       "The exact-match part's weight: shared tokens / teacher tokens (TRL's default) or "
                       "--gold-matched-weight; the ULD part gets 1 minus it"),
               Setting("gold_matched_weight", 0.5, "unit_interval", "The exact-match part's weight under "
                       "--gold-weighting fixed"),
               Setting("gold_scope", "one_token", GOLD_SCOPES,
                       "Where exact-match tokens are compared directly: chunks of one token on both sides, or every "
                       "chunk as TRL does (in a longer chunk a token names a different string on each side)"))),
    Method("xtoken", "X-Token projection KL: the student projected onto the teacher's vocabulary, KL over aligned "
                     "chunks (NeMo RL)", kd="cot2align.losses.xtoken:kd_term", teacher_dist=True, alignment="chunks",
           vocab_tables="cot2align.align.projection:xtoken_tables", whole_teacher_logits=True,
           settings=(Setting("xtoken_temperature", 1.0, "positive_float", "X-Token's τ (both sides; loss times τ²)"),
                     Setting("xtoken_vocab_topk", 8192, "positive_int",
                             "Teacher tokens X-Token compares per batch (by the teacher's largest logits)"))),
)}


def method(name: str) -> Method:
    """The registered method `name`, or a one-line error listing the methods."""
    if name not in METHODS:
        raise ValueError(f"method: expected one of {', '.join(METHODS)}, got {name!r}")
    return METHODS[name]


def _check(methods: dict[str, Method]) -> dict[str, Method]:
    """A typo in an entry fails at import, not hours later at data time."""
    for m in methods.values():
        if m.alignment is not None and m.alignment not in ALIGNMENTS:
            raise ValueError(f"method {m.name}: alignment expected one of {', '.join(ALIGNMENTS)}, got {m.alignment!r}")
    return methods


METHODS = _check(METHODS)


def all_settings() -> dict[str, Setting]:
    """Every method's settings by name, each once (a shared setting is one field, one flag)."""
    out: dict[str, Setting] = {}
    for m in METHODS.values():
        for s in m.settings:
            if s.name in out and out[s.name] != s:
                raise ValueError(f"setting {s.name}: declared differently by two methods; declare it once and share it")
            out[s.name] = s
    return out


# What CoT2Align adds to any method: the CoT view, and the Cross-CoT OT term over the teacher's hidden states and
# embedding-layer features (`embeds`, stored only for teachers whose embedding is not a plain lookup).
COT2ALIGN_ARRAYS = ("hidden", "embeds")


def teacher_arrays(name: str, cot2align: bool, teacher_dist: str = "exact", transport: bool = True) -> tuple[str, ...]:
    """The cached per-row teacher arrays a run of method `name` (± CoT2Align) reads — the loader decodes nothing
    else. Row ids give the masks (and DSKD's keys, by embedding lookup); the distribution is the exact one
    recomputed from `hidden`, or the stored top-k + tail. `transport` False (--ot-weight 0): CoT2Align's CoT view
    without its OT term, which reads no hidden states or embeddings for it."""
    m = method(name)
    if m.kd is None and not cot2align:
        return ()
    names = ["input_ids", "target_ids"]
    if m.teacher_dist:
        names += ["hidden"] if teacher_dist == "exact" else ["topk_ids", "topk_logprobs", "tail_logprob"]
    names += m.teacher_arrays
    if cot2align and transport:
        names += COT2ALIGN_ARRAYS
    return tuple(dict.fromkeys(names))


def needs_student_hidden(name: str, cot2align: bool, transport: bool = True) -> bool:
    """Whether a run keeps the student's hidden states: its method reads them, or CoT2Align's OT term does."""
    return (cot2align and transport) or method(name).student_hidden


def describe() -> str:
    """`cot2align methods`: each method, what it needs, and its settings with their defaults."""
    lines = []
    for m in METHODS.values():
        needs = [what for what, used in (("the teacher's distribution", m.teacher_dist),
                                          ("the student's hidden states", m.student_hidden),
                                          (f"the {m.alignment} token alignment", m.alignment),
                                          ("the same tokenizer as the teacher", m.same_tokenizer),
                                          (f"vocabulary tables ({m.vocab_tables})", m.vocab_tables)) if used]
        needs += [f"the cached {name}" for name in m.teacher_arrays]
        lines.append(f"{m.name}: {m.summary}")
        if needs:
            lines.append(f"    needs {', '.join(needs)}")
        for s in m.settings:
            default = "the paper's setting" if s.default is None else s.default
            lines.append(f"    --{s.name.replace('_', '-')} (default {default}): {s.help}")
    return "\n".join(lines)
