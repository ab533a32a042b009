"""Which runs a cache can serve: the cached teacher arrays a run reads (the method registry's
`methods.teacher_arrays`) against the arrays the cache stores (its manifest's store.dtypes; what a store profile
leaves out is in format.py).

    default_teacher_dist(manifest)     --teacher-dist when not given: exact with hidden states, else topk
    plan_reads(manifest, method, ...)  (the arrays a run reads, the arrays it needs that the cache lacks)
    refusal(manifest, url, method, …)  why the cache cannot serve a run, in one line (None: it can)
    servable(manifest)                 method -> the runs of it the cache serves (`cache info`)

The refusal itself is raised in one place, train/batches.py `arrays_to_read`, before a run touches its --out.
"""

from __future__ import annotations

from cot2align.cache.format import HIDDEN_ARRAYS, has_array, store_profile
from cot2align.methods import METHODS, TEACHER_DISTS, teacher_arrays
from cot2align.methods import method as registered


def default_teacher_dist(manifest: dict | None) -> str:
    """`exact` (hidden · lm_headᵀ, the whole distribution) when the cache stores hidden states, else `topk` (the
    stored top-k + tail): the distribution a run reads when --teacher-dist is not given. Without a cache (SFT
    from plain data) nothing reads it; `exact` is recorded."""
    return "exact" if manifest is None or has_array(manifest, "hidden") else "topk"


def _required(manifest: dict, name: str) -> bool:
    """Whether a run that reads `name` needs the cache to store it: `embeds` only for a teacher whose embedding
    layer is not a plain lookup (a lookup teacher's embedding features are embed_tokens[input_ids], from the
    head file)."""
    return name != "embeds" or manifest["teacher"]["embed_kind"] == "stored"


def plan_reads(manifest: dict, method: str, cot2align: bool, teacher_dist: str,
               transport: bool = True) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(the arrays a run of `method` (± CoT2Align; `transport` False: --ot-weight 0) under `teacher_dist` reads from
    this cache, the arrays it needs that the cache does not store). A cache written before `target_logprob` existed serves it from the hidden
    states (hidden · lm_headᵀ, exact), except under --teacher-dist topk when the run reads no hidden states or
    the method's distribution is the top-k itself (GOLD: the top-k cannot stand in for a realised token outside
    it)."""
    names = teacher_arrays(method, cot2align, teacher_dist, transport)
    if "target_logprob" in names and not has_array(manifest, "target_logprob") and has_array(manifest, "hidden"):
        if not (teacher_dist == "topk" and ("hidden" not in names or registered(method).teacher_dist)):
            names = tuple(dict.fromkeys((*names, "hidden")))
            return names, tuple(n for n in names if n != "target_logprob" and _missing(manifest, n))
    return names, tuple(n for n in names if _missing(manifest, n))


def _missing(manifest: dict, name: str) -> bool:
    return _required(manifest, name) and not has_array(manifest, name)


def _run_label(method: str, cot2align: bool, teacher_dist: str, transport: bool = True) -> str:
    dist = f" --teacher-dist {teacher_dist}" if registered(method).teacher_dist else ""
    ot = " --ot-weight 0" if cot2align and not transport else ""
    return f"--method {method}{'' if cot2align else ' --no-cot2align'}{dist}{ot}"


def _readers(method: str, cot2align: bool, teacher_dist: str, missing: tuple[str, ...]) -> str:
    """Who in the run reads the missing hidden-state arrays, by the registry."""
    m, who = registered(method), []
    if set(m.teacher_arrays) & set(missing):
        who.append(f"{method}'s loss")
    if m.teacher_dist and teacher_dist == "exact":
        who.append("the exact teacher distribution (hidden · lm_headᵀ)")
    if cot2align and set(missing) & {"hidden", "embeds"}:
        who.append("CoT2Align's OT term")
    return " and ".join(who) or "this run"


def refusal(manifest: dict, url: str, method: str, cot2align: bool, teacher_dist: str,
            transport: bool = True) -> str | None:
    """Why the cache at `url` cannot serve the run, in one line naming the missing arrays and what would provide
    them, and the nearest run it can serve; None when it can."""
    _, missing = plan_reads(manifest, method, cot2align, teacher_dist, transport)
    if not missing:
        return None
    run = _run_label(method, cot2align, teacher_dist, transport)
    if "target_logprob" in missing and has_array(manifest, "hidden"):       # a cache older than the array
        return (f"{run}: the cache {url} has no per-row array target_logprob (written before it was added), which "
                "the top-k cannot stand in for; use --teacher-dist exact (recomputed from the hidden states), or "
                "rebuild the cache with cot2align cache-teacher")
    # the nearest runs first: CoT2Align's CoT view without its OT term, then without CoT2Align at all
    alternatives = ((cot2align, teacher_dist, False), (cot2align, "topk", False), (False, teacher_dist, True),
                    (cot2align, "topk", transport), (False, "topk", True))
    instead = [label for alt_cot, alt_dist, alt_ot in alternatives
               if (alt_cot, alt_dist, alt_ot or not alt_cot) != (cot2align, teacher_dist, transport or not cot2align)
               and (registered(method).teacher_dist or alt_dist == teacher_dist)
               and not plan_reads(manifest, method, alt_cot, alt_dist, alt_ot)[1]
               for label in [_run_label(method, alt_cot, alt_dist, alt_ot)]]
    hidden = [n for n in missing if n in HIDDEN_ARRAYS]
    provide = ("cot2align cache-teacher --store full" if hidden else "cot2align cache-teacher")
    return (f"{run}: the cache {url} (--store {store_profile(manifest)}) lacks the per-row array(s) "
            f"{', '.join(missing)}, which {_readers(method, cot2align and transport, teacher_dist, missing)} read(s); rebuild it "
            f"with {provide}" + (f", or run {instead[0]}" if instead else ""))


def servable(manifest: dict) -> dict[str, list[str]]:
    """method -> the runs of it this cache serves, each as "<teacher-dist>" or "<teacher-dist>+cot2align" (a method
    that reads no teacher distribution: "-" / "cot2align"); "+cot2align(ot-weight 0)": CoT2Align's CoT view
    without its OT term, where the cache lacks what the OT term reads."""
    out = {}
    for name, m in METHODS.items():
        runs = []
        for cot2align in (False, True):
            for dist in (TEACHER_DISTS if m.teacher_dist else ("exact",)):
                label = dist if m.teacher_dist else "-"
                if not cot2align:
                    if not plan_reads(manifest, name, False, dist)[1]:
                        runs.append(label)
                    continue
                with_cot = "cot2align" if label == "-" else f"{label}+cot2align"
                if not plan_reads(manifest, name, True, dist)[1]:
                    runs.append(with_cot)
                elif not plan_reads(manifest, name, True, dist, transport=False)[1]:
                    runs.append(with_cot + "(ot-weight 0)")
        out[name] = runs
    return out
