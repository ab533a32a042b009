"""`cache-teacher --store logits`: a cache of the teacher's distribution without its hidden states — what it stores
and records, that it trains every method it can serve, refuses the others in one line, and what `cache info`
shows of it."""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import cache_arrays, write_cot_records
from cot2align.cache import open_cache
from cot2align.cache.format import check_fields, store_profile
from cot2align.cache.inspect import cache_info, format_info, verify_cache
from cot2align.cache.profiles import default_teacher_dist, servable
from cot2align.config import CacheTeacherConfig, ConfigError, DistillConfig, build_config
from cot2align.teacher.cache_pass import cache_teacher
from cot2align.train.distill import distill

TEACHER = "tiny-llama"      # the teacher of both caches
STUDENT = "tiny-gpt2"       # another tokenizer: the cross-tokenizer methods
PASS = dict(model=TEACHER, topk=8, batch_tokens=2048, max_length=256, max_prompt_length=128)
HIDDEN_FREE = ("input_ids", "target_ids", "topk_ids", "topk_logprobs", "tail_logprob", "target_logprob")


@pytest.fixture(scope="module")
def caches(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("store")
    data = write_cot_records(root / "data.jsonl", n=6, cot_every=2)
    out = {}
    for store in ("full", "logits"):
        out[store] = root / store
        cache_teacher(build_config(CacheTeacherConfig, data=str(data), out=str(out[store]), store=store, **PASS),
                      log=lambda m: None)
    return out


def test_a_logits_cache_stores_the_full_caches_distribution_and_no_hidden_states(caches):
    full, logits = open_cache(caches["full"]), open_cache(caches["logits"])
    assert store_profile(logits.manifest) == "logits" and store_profile(full.manifest) == "full"
    assert sorted(logits.manifest["store"]["dtypes"]) == sorted(HIDDEN_FREE)
    assert logits.manifest["store"]["hidden_dtype"] is None and logits.manifest["store"]["hidden_codec"] is None
    assert "hidden" in full.manifest["store"]["dtypes"]
    # the same teacher pass: every array the logits cache keeps is the full cache's, bit for bit
    a, b = cache_arrays(caches["full"]), cache_arrays(caches["logits"])
    assert {k for k in a if not k.endswith(("/hidden", "/embeds"))} == set(b)
    for key, value in b.items():
        assert np.array_equal(value, a[key]), key
    assert verify_cache(caches["logits"]) == []
    # the profile is part of the cache's identity
    assert logits.manifest["fingerprint"]["inputs"]["settings"]["store"] == "logits"
    assert "store" not in full.manifest["fingerprint"]["inputs"]["settings"]   # as caches written before --store


def test_a_cache_written_before_store_profiles_reads_as_full():
    manifest = {"store": {"topk": 8, "dtypes": {"hidden": "uint16", "topk_ids": "uint16"}}}
    assert store_profile(manifest) == "full" and default_teacher_dist(manifest) == "exact"
    assert default_teacher_dist({"store": {"profile": "logits", "dtypes": {"topk_ids": "uint16"}}}) == "topk"


def test_a_full_manifest_without_hidden_dtypes_is_refused_and_a_logits_one_is_not(caches):
    from cot2align.cache.format import CacheError

    manifest = json.loads(json.dumps(open_cache(caches["logits"]).manifest))
    check_fields(manifest, "logits")
    del manifest["store"]["profile"]            # now it claims to be `full`: its hidden dtype is missing
    with pytest.raises(CacheError, match="'store.dtypes.hidden' is missing"):
        check_fields(manifest, "edited")


def test_cache_info_shows_bytes_per_row_and_what_the_cache_serves(caches):
    full, logits = cache_info(caches["full"]), cache_info(caches["logits"])
    assert logits["profile"] == "logits" and set(logits["arrays"]) == set(HIDDEN_FREE)
    assert logits["bytes_per_row"] < full["bytes_per_row"] / 2
    cot_view = "+cot2align(ot-weight 0)"                          # CoT2Align without its OT term reads no hidden
    assert logits["serves"] == {"sft": ["-", "cot2align(ot-weight 0)"], "dskd": [], "alm": ["-", "cot2align(ot-weight 0)"],
                                **{m: ["topk", "topk" + cot_view] for m in ("kl", "uld", "mined", "gold", "xtoken")}}
    assert full["serves"]["dskd"] == ["exact", "topk", "exact+cot2align", "topk+cot2align"]
    assert full["serves"]["sft"] == ["-", "cot2align"]
    text = format_info(logits)
    assert "store logits" in text and "dskd           none: rebuild with cache-teacher --store full" in text
    assert "mined          topk" in text


def _distill(cache, out, **kw):
    settings = dict(cache=str(cache), student=STUDENT, out=str(out), cot2align=False, max_steps=1, batch_size=2,
                    val_examples=1, val_max_new_tokens=2)
    settings.update(kw)
    return distill(build_config(DistillConfig, **settings), log=lambda m: None, progress=False)


@pytest.mark.slow      # one short run per method (like test_train's KD short runs)
@pytest.mark.parametrize("method", ["sft", "kl", "uld", "mined", "alm", "gold", "xtoken"])
def test_a_logits_cache_trains_every_method_it_serves(caches, tmp_path, method):
    student = TEACHER if method == "kl" else STUDENT          # kl: one shared vocabulary
    _distill(caches["logits"], tmp_path / "run", method=method, student=student)
    recorded = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert recorded["teacher_dist"] == "topk"                 # resolved from the cache, recorded
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if '"lr"' in line]
    assert len(steps) == 1 and np.isfinite(steps[0]["ce"])
    if method != "sft":
        assert any(k.startswith("kd/") and np.isfinite(v) and v != 0 for k, v in steps[0].items()), steps[0]


def test_a_logits_cache_trains_cot2align_s_cot_view_without_its_ot_term(caches, tmp_path):
    """--ot-weight 0 reads no hidden states: MinED + CoT2Align's CoT view trains from a logits cache."""
    _distill(caches["logits"], tmp_path / "run", method="mined", cot2align=True, ot_weight=0.0)
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if '"lr"' in line]
    assert len(steps) == 1 and np.isfinite(steps[0]["ce"]) and np.isfinite(steps[0]["kd"])
    assert not any(k.startswith("ot") or k == "ccot" for k in steps[0])


def test_a_full_cache_resolves_to_the_exact_distribution(caches):
    from cot2align.cache import open_cache as opened
    from cot2align.train.resolve import resolve_distill_config

    cfg = build_config(DistillConfig, cache=str(caches["full"]), student=STUDENT, method="mined", out="unused")
    assert cfg.teacher_dist is None
    for store, expected in (("full", "exact"), ("logits", "topk")):
        resolved = resolve_distill_config(cfg, opened(caches[store]))
        assert resolved.teacher_dist == expected
        assert resolve_distill_config(resolved, opened(caches[store])) == resolved     # resolved once


@pytest.mark.parametrize("method, flags, missing, instead", [
    ("dskd", dict(), "hidden", None),
    ("dskd", dict(teacher_dist="exact", cot2align=True), "hidden", None),
    ("mined", dict(cot2align=True), "hidden", "--method mined --teacher-dist topk --ot-weight 0"),
    ("sft", dict(cot2align=True), "hidden", "--method sft --ot-weight 0"),
    ("uld", dict(teacher_dist="exact"), "hidden", "--method uld --no-cot2align --teacher-dist topk"),
    ("gold", dict(teacher_dist="exact"), "hidden", "--method gold --no-cot2align --teacher-dist topk"),
])
def test_a_run_the_logits_cache_cannot_serve_is_refused_in_one_line(caches, tmp_path, method, flags, missing,
                                                                    instead):
    out = tmp_path / "run"
    with pytest.raises(ConfigError) as refused:
        _distill(caches["logits"], out, method=method, **flags)
    message = str(refused.value)
    assert "\n" not in message and str(caches["logits"]) in message
    assert f"lacks the per-row array(s) {missing}" in message and "cache-teacher --store full" in message
    assert (instead in message) if instead else ", or run" not in message
    assert not out.exists()                                    # refused before --out is touched


def test_servable_follows_the_registry():
    """Every method the registry says reads hidden states (its own arrays, or CoT2Align's) is not served by a
    logits cache; every other is, under --teacher-dist topk."""
    from cot2align.methods import METHODS, teacher_arrays

    manifest = {"teacher": {"embed_kind": "lookup"},
                "store": {"profile": "logits", "dtypes": {name: "x" for name in HIDDEN_FREE}}}
    serves = servable(manifest)
    for name in METHODS:
        reads_hidden = "hidden" in teacher_arrays(name, False, "topk")
        assert (serves[name] == []) == reads_hidden, name
        assert not any(("cot2align" in run and "ot-weight 0" not in run) or run == "exact" for run in serves[name])
        if not reads_hidden:                                      # the CoT view without the OT term: served
            assert any(run.endswith("cot2align(ot-weight 0)") for run in serves[name]), name
