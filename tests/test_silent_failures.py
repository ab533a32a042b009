"""Every case of the adversarial review that once gave a silent wrong result or a traceback, reproduced with tiny
models in seconds: each must now be refused in one line (rc 2; `cache verify`: rc 1) or give the correct result.

README "What it promises" maps each promise to the tests here (and to the older reliability modules:
test_reliability.py, test_hostile_input.py, test_random_kills_*.py, test_disk_faults.py, test_locks.py).
Each section below imports what it needs inside its tests, so sections stay independent of one another.
"""


# ==================================================================================================================
# 1. Damaged caches: a missing chunk, a chunk in the wrong place, a verify that agrees with open_cache
# ==================================================================================================================


def _s1_cache(tmp_path, monkeypatch, name="cache", zero_hidden=False):
    """A tiny cache (tiny-llama, 12 examples, 3 blocks) whose arrays are cut into small chunks (16 rows of hidden
    state, 64 of ids, 4 examples of texts), so that each array has several chunks to delete or swap."""
    from conftest import write_cot_records

    import cot2align.cache.format as cache_format
    import cot2align.cache.writer as cache_writer
    import cot2align.teacher.cache_pass as cache_pass
    from cot2align.config import CacheTeacherConfig, build_config

    monkeypatch.setattr(cache_format, "ROW_CHUNK_1D", 64)
    monkeypatch.setattr(cache_format, "hidden_chunk_rows", lambda hidden_size: 16)
    monkeypatch.setattr(cache_writer, "EXAMPLE_CHUNK", 4)
    if zero_hidden:      # a teacher whose last hidden states are all zero: legitimately all-zero chunks
        import torch

        real_batch = cache_pass.teacher_batch

        def zero_batch(*args, **kwargs):
            result = real_batch(*args, **kwargs)
            result["hidden"] = torch.zeros_like(result["hidden"])
            return result

        monkeypatch.setattr(cache_pass, "teacher_batch", zero_batch)
    data = write_cot_records(tmp_path / "data.jsonl", n=12)
    out = tmp_path / name
    cache_pass.cache_teacher(build_config(CacheTeacherConfig, model="tiny-llama", data=str(data), out=str(out), topk=8,
                                          block_examples=4, batch_tokens=2048), log=lambda m: None)
    monkeypatch.undo()
    return out


def _s1_cli(*args):
    from click.testing import CliRunner

    from cot2align.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def _s1_example_in(cache, view: str, rows: tuple[int, int]) -> int:
    """An example of the (single-part) cache whose rows of `view` intersect [rows[0], rows[1])."""
    import numpy as np

    offsets = cache.offsets(view)
    return int(np.searchsorted(offsets, rows[0], side="right")) - 1


def test_s1_a_deleted_chunk_is_refused_by_the_reader_and_by_verify(tmp_path, monkeypatch):
    import pytest

    from cot2align.cache import CacheError, open_cache
    from cot2align.cache.inspect import verify_cache

    path = _s1_cache(tmp_path, monkeypatch)
    assert verify_cache(path) == []
    cache = open_cache(path)
    assert cache.group["parts/0/std/hidden"].nchunks > 2 and cache.group["examples/response_std"].nchunks == 3
    victim = _s1_example_in(cache, "std", (16, 32))
    hidden = path / "parts" / "0" / "std" / "hidden" / "c" / "1" / "0"
    kept = hidden.read_bytes()
    hidden.unlink()
    with pytest.raises(CacheError, match=r"parts/0/std/hidden/c/1/0: missing chunk .*\(rows 16\.\.31, examples "
                                         rf"{victim}\.\..*cache verify"):
        open_cache(path)[victim]
    problems = verify_cache(path)
    assert len(problems) == 1 and problems[0].startswith(f"{path}/parts/0/std/hidden/c/1/0: missing chunk")
    assert "rows 16..31" in problems[0] and f"examples {victim}.." in problems[0]
    result = _s1_cli("cache", "verify", path)
    assert result.exit_code == 1 and "parts/0/std/hidden/c/1/0: missing chunk" in result.stderr
    hidden.write_bytes(kept)

    texts = path / "examples" / "response_std" / "c" / "1"        # examples 4..7
    kept = texts.read_bytes()
    texts.unlink()
    with pytest.raises(CacheError, match=r"examples/response_std/c/1: missing chunk .*examples 4\.\.7"):
        open_cache(path)[5]
    result = _s1_cli("cache", "verify", path)
    assert result.exit_code == 1 and "examples/response_std/c/1: missing chunk (rows 4..7, examples 4..7)" in result.stderr
    texts.write_bytes(kept)
    assert verify_cache(path) == []

    (path / "parts" / "0" / "chunk_index" / "1.json").unlink()   # the chunk index of a committed block
    problems = verify_cache(path)
    assert f"{path}/parts/0/chunk_index/1.json: missing (its block is committed)" in problems
    with pytest.raises(CacheError, match=r"chunk_index/1\.json: missing"):
        cache = open_cache(path)
        for i in range(len(cache)):
            cache[i]


def test_s1_a_chunk_copied_over_another_position_is_refused(tmp_path, monkeypatch):
    import shutil

    import pytest

    from cot2align.cache import CacheError, open_cache
    from cot2align.cache.inspect import verify_cache

    path = _s1_cache(tmp_path, monkeypatch)
    victim = _s1_example_in(open_cache(path), "std", (16, 32))
    chunks = path / "parts" / "0" / "std" / "hidden" / "c"
    shutil.copyfile(chunks / "0" / "0", chunks / "1" / "0")      # every crc32c still matches
    with pytest.raises(CacheError, match=r"parts/0/std/hidden/c/1/0: chunk in the wrong place .*rows 16\.\.31"):
        open_cache(path)[victim]
    problems = verify_cache(path)
    assert len(problems) == 1 and "parts/0/std/hidden/c/1/0: chunk in the wrong place" in problems[0]
    result = _s1_cli("cache", "verify", path)
    assert result.exit_code == 1 and "chunk in the wrong place" in result.stderr
    assert open_cache(path)[11]["std"]["n_rows"] > 0           # the chunks left in place still read

    ids = path / "examples" / "id" / "c"
    shutil.copyfile(ids / "0", ids / "2")
    with pytest.raises(CacheError, match=r"examples/id/c/2: chunk in the wrong place"):
        open_cache(path).texts()
    assert any("examples/id/c/2: chunk in the wrong place" in p for p in verify_cache(path))
    shutil.copyfile(chunks / "2" / "0", chunks / "1" / "0")
    assert any("parts/0/std/hidden/c/1/0: chunk in the wrong place" in p for p in verify_cache(path))
    damaged = bytearray((chunks / "3" / "0").read_bytes())     # a flipped bit in a chunk's own crc32c: corrupted,
    damaged[-1] ^= 0x10                                       # not another position's chunk
    (chunks / "3" / "0").write_bytes(bytes(damaged))
    assert any(p.startswith(f"{path}/parts/0/std/hidden/c/3/0: unreadable chunk (rows 48..63") for p in verify_cache(path))


def test_s1_an_all_zero_chunk_is_written_and_reads_back(tmp_path, monkeypatch):
    import numpy as np

    from cot2align.cache import open_cache
    from cot2align.cache.inspect import verify_cache

    path = _s1_cache(tmp_path, monkeypatch, zero_hidden=True)
    cache = open_cache(path)
    for view in ("std", "cot"):
        arr = cache.group[f"parts/0/{view}/hidden"]
        assert arr.nchunks > 2 and arr.nchunks_initialized == arr.nchunks     # every chunk is a file
        for i in range(len(cache)):
            rows = cache.view(i, view)
            assert rows["hidden"].shape == (rows["n_rows"], 64) and not rows["hidden"].any()
            assert rows["input_ids"].shape == (rows["n_rows"],) and np.isfinite(rows["topk_logprobs"]).all()
    assert verify_cache(path) == []


def test_s1_verify_runs_the_checks_of_open_cache_and_info_says_it_would_be_refused(tmp_path, monkeypatch):
    import json

    import pytest

    from cot2align.cache import CacheError, open_cache
    from cot2align.cache.format import with_checksum
    from cot2align.cache.inspect import cache_info, verify_cache

    path = _s1_cache(tmp_path, monkeypatch)
    assert cache_info(path)["refused"] is None
    assert "REFUSED" not in _s1_cli("cache", "info", path).output
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"]["tokenizer"]["vocab_hash"] = "0" * 64   # a manifest consistent with itself, not with teacher/
    meta["attributes"] = with_checksum(meta["attributes"])
    (path / "zarr.json").write_text(json.dumps(meta))
    message = "tokenizer files do not match the manifest's vocab_hash"
    with pytest.raises(CacheError, match=message):
        open_cache(path)
    problems = verify_cache(path)
    assert problems == [f"{path}/teacher: {message}"]
    result = _s1_cli("cache", "verify", path)
    assert result.exit_code == 1 and message in result.stderr and "OK" not in result.output
    assert message in cache_info(path)["refused"]
    info = _s1_cli("cache", "info", path)
    assert info.exit_code == 0
    refused = [line for line in info.output.splitlines() if line.startswith("REFUSED")]
    assert len(refused) == 1 and message in refused[0]


def test_s1_a_format_3_cache_without_a_chunk_index_still_opens(tmp_path, monkeypatch):
    """A version-3 cache (no chunk index: the format before it) reads as the same examples as the version-4 cache
    it is rearranged from, and verify says once that missing or misplaced chunks cannot be detected in it."""
    import json
    import shutil

    import numpy as np

    from cot2align.cache import open_cache
    from cot2align.cache.format import with_checksum
    from cot2align.cache.inspect import verify_cache

    v4 = _s1_cache(tmp_path, monkeypatch, name="v4")
    v3 = tmp_path / "v3"
    shutil.copytree(v4, v3)
    (v3 / "chunk_index.json").unlink()
    shutil.rmtree(v3 / "parts" / "0" / "chunk_index")
    meta = json.loads((v3 / "zarr.json").read_text())
    attrs = meta["attributes"]
    attrs["format_version"] = 3
    del attrs["store"]["chunk_index_sha256"]
    meta["attributes"] = with_checksum(attrs)
    (v3 / "zarr.json").write_text(json.dumps(meta))
    old, new = open_cache(v3), open_cache(v4)
    assert old.index is None and new.index is not None and len(old) == len(new) == 12
    for i in range(len(new)):
        a, b = old[i], new[i]
        for view in ("std", "cot"):
            for name, value in b[view].items():
                assert np.array_equal(np.asarray(a[view][name]), np.asarray(value)), (i, view, name)
    said = []
    assert verify_cache(v3, log=said.append) == []
    assert len(said) == 1 and "format version 3 has no chunk index" in said[0]
    said.clear()
    assert verify_cache(v4, log=said.append) == [] and said == []


# (end of section 1)


# ==================================================================================================================
# 2. Stale derived data: the students' memo of a rebuilt cache
# ==================================================================================================================


def test_s2_a_rebuilt_cache_does_not_reuse_the_students_memo_of_the_old_build(tmp_path):
    """Build a cache, tokenise it for a MinED student (memoised in <cache>.students/), rebuild the cache at the same
    path with another teacher on the same data: the student's ids and MinED rows must equal those of a fresh copy
    of the rebuilt cache (no memo), not the old build's."""
    import shutil
    from pathlib import Path

    import numpy as np

    from conftest import write_cot_records
    from cot2align.cache import open_cache
    from cot2align.config import CacheTeacherConfig, build_config
    from cot2align.modeling import load_tokenizer, tokenizer_hash
    from cot2align.teacher.cache_pass import cache_teacher
    from cot2align.train.data import tokenize_cache

    data = write_cot_records(tmp_path / "data.jsonl", n=4, cot_every=1)
    student = load_tokenizer("tiny-gpt2")

    def build(teacher: str, out: Path) -> None:
        cache_teacher(build_config(CacheTeacherConfig, model=teacher, data=str(data), out=str(out), topk=4,
                                   max_length=1024, max_prompt_length=768, batch_tokens=4096), log=lambda m: None)

    def student_ids(where: Path) -> dict:
        cache = open_cache(where)
        return tokenize_cache(cache, student, tokenizer_hash(student), 512, "mined")

    out = tmp_path / "cache"
    build("tiny-qwen2", out)
    old = student_ids(out)
    assert any(p.suffix == ".npz" for p in (tmp_path / "cache.students").iterdir())       # the memo is there
    shutil.rmtree(out)
    build("tiny-llama", out)                                 # another teacher (and tokenizer), same data, same path
    shutil.copytree(out, tmp_path / "fresh")
    rebuilt, fresh = student_ids(out), student_ids(tmp_path / "fresh")
    # the case that slipped through: both builds' data sections are equal (same records, nothing truncated)
    assert open_cache(out).manifest["data"]["truncated"]["prompt"] == {"std": 0, "cot": 0}
    assert not np.array_equal(old["std_mined_rows"], fresh["std_mined_rows"])      # the builds really differ
    for name in fresh:
        if name != "manifest_key":
            assert np.array_equal(rebuilt[name], fresh[name]), name


def test_s2_a_damaged_students_memo_is_recomputed_with_one_warning(tmp_path):
    """A memo truncated by a full disk (or edited) is derived data: said once and recomputed, never a traceback."""
    import numpy as np

    from cot2align.cache import open_cache
    from cot2align.config import CacheTeacherConfig, build_config
    from cot2align.modeling import load_tokenizer, tokenizer_hash
    from cot2align.teacher.cache_pass import cache_teacher
    from cot2align.train.data import tokenize_cache

    out = tmp_path / "cache"
    cache_teacher(build_config(CacheTeacherConfig, model="tiny-qwen2", data="sample", limit=3, out=str(out), topk=4),
                  log=lambda m: None)
    student = load_tokenizer("tiny-gpt2")
    first = tokenize_cache(open_cache(out), student, tokenizer_hash(student), 512)
    [memo] = (tmp_path / "cache.students").glob("*.npz")
    memo.write_bytes(memo.read_bytes()[:300])
    said = []
    again = tokenize_cache(open_cache(out), student, tokenizer_hash(student), 512, log=said.append)
    assert len(said) == 1 and "unreadable students' memo" in said[0], said
    assert all(np.array_equal(first[k], again[k]) for k in first)
    assert np.load(memo)["manifest_key"].shape == first["manifest_key"].shape      # rewritten whole

# (end of section 2)


# ==================================================================================================================
# 3. Resume: the resolved configuration, identity fields compared
# ==================================================================================================================


import pytest as _s3_pytest  # noqa: E402  (this section's fixture; sections import what they need themselves)

_S3_TEACHER, _S3_STUDENT = "tiny-qwen2", "tiny-gpt2"


def _s3_config_classes() -> list:
    """Every config dataclass of the package, found in its source (`@dataclass` + `class <Name>Config`), so that a
    config added later is checked without being listed here."""
    import importlib
    import re
    from pathlib import Path

    import cot2align

    root = Path(cot2align.__file__).parent
    found = []
    for path in sorted(root.rglob("*.py")):
        source = path.read_text()
        names = re.findall(r"^@dataclass[^\n]*\nclass (\w+Config)\b", source, re.M)
        names += re.findall(r"^(\w+Config) = dataclasses\.make_dataclass\(", source, re.M)   # DistillConfig
        for name in names:
            module = ".".join(("cot2align",) + path.relative_to(root).with_suffix("").parts)
            found.append(getattr(importlib.import_module(module), name))
    return found


def test_s3_every_field_of_every_config_has_a_kind():
    import dataclasses

    from cot2align.config import KINDS, DistillConfig, fields_of_kind
    from cot2align.data.augment import AugmentConfig

    classes = _s3_config_classes()
    assert {c.__name__ for c in classes} >= {"CacheTeacherConfig", "DistillConfig", "EvaluateConfig",
                                              AugmentConfig.__name__}
    unclassified = [f"{c.__name__}.{f.name}" for c in classes for f in dataclasses.fields(c)
                    if f.metadata.get("kind") not in KINDS]
    assert unclassified == [], f"fields without a kind (identity, runtime or output): {unclassified}"
    identity = set(fields_of_kind(DistillConfig, "identity"))
    assert {"method", "alpha", "lr", "warmup_ratio", "epochs", "max_steps", "batch_size", "grad_accum", "seed",
            "kd_temperature", "kl_variant", "ot_epsilon", "ot_iters", "ot_grad", "teacher_dist", "student", "lora_rank",
            "data", "split", "field_map", "limit", "cache", "max_length", "dtype"} <= identity
    assert {"device", "num_workers", "report_to", "save_every", "data_root", "out", "resume", "overwrite"} <= set(
        fields_of_kind(DistillConfig, "runtime"))
    assert {"push_to_hub", "hub_model_id", "select_by"} <= set(fields_of_kind(DistillConfig, "output"))


@_s3_pytest.fixture(scope="module")
def s3_world(tmp_path_factory):
    """A tiny cache and a run of 2 steps trained on it (finished, with a checkpoint at each step)."""
    from conftest import write_cot_records
    from cot2align.config import CacheTeacherConfig, DistillConfig, build_config
    from cot2align.teacher.cache_pass import cache_teacher
    from cot2align.train.distill import distill

    root = tmp_path_factory.mktemp("s3_resume")
    data = write_cot_records(root / "data.jsonl", n=8, cot_every=1)
    cache_teacher(build_config(CacheTeacherConfig, model=_S3_TEACHER, data=str(data), out=str(root / "cache"), topk=8,
                               batch_tokens=2048), log=lambda m: None)
    distill(build_config(DistillConfig, cache=str(root / "cache"), student=_S3_STUDENT, method="dskd", alpha=0.5,
                         lr=1e-3, max_steps=2, batch_size=4, val_examples=0, save_every=1, report_to="none",
                         out=str(root / "run")), log=lambda m: None, progress=False)
    return root


def _s3_flags(world, out, *extra: str) -> list[str]:
    """The flags the run in s3_world was started with, then `extra` (click keeps the last of a repeated option)."""
    return ["distill", "--cache", str(world / "cache"), "--student", _S3_STUDENT, "--method", "dskd", "--alpha", "0.5",
            "--lr", "0.001", "--max-steps", "2", "--batch-size", "4", "--val-examples", "0", "--save-every", "1",
            "--report-to", "none", "--out", str(out), *extra]


def _s3_stopped_run(world, tmp_path):
    """A copy of the run, stopped before its end (no summary.json): --resume would train on."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(world / "run", run)
    (run / "summary.json").unlink()
    return run


def _s3_files(root) -> dict:
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _s3_refused(result) -> str:
    """The one `error:` line of a refused command (rc 2, no traceback)."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.stderr, result.exception)
    assert "Traceback" not in result.output + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and result.stderr.strip().endswith(errors[0]), result.stderr
    return errors[0]


def test_s3_the_resolved_config_is_a_new_frozen_object_resolved_again_unchanged(tmp_path):
    import dataclasses

    from cot2align.config import DistillConfig, build_config
    from cot2align.train.resolve import resolve_distill_config

    request = build_config(DistillConfig, method="sft", data="sample", student=_S3_STUDENT, out=str(tmp_path / "r"))
    resolved = resolve_distill_config(request, None)
    assert request.dtype is None and request.cot2align is None and request.num_workers is None   # left as given
    assert resolved.cot2align is False and resolved.dtype in ("fp32", "bf16") and resolved.num_workers is not None
    assert (resolved.epochs, resolved.lr, resolved.alpha) == (3, 1e-4, 0.5)          # the general defaults
    assert resolve_distill_config(resolved, None) == resolved
    with _s3_pytest.raises(dataclasses.FrozenInstanceError):
        resolved.alpha = 0.9                 # nothing writes to a resolved config afterwards


def test_s3_print_config_is_the_resolved_config_the_run_records(s3_world, tmp_path):
    """--print-config shows dtype (fp32 on CPU), the paper's setting for the cache's teacher and the resume state
    filled in, and it is what the run then records in config.yaml."""
    import torch
    import yaml
    from click.testing import CliRunner

    from cot2align.cli import main

    out = tmp_path / "run"
    flags = ["distill", "--cache", str(s3_world / "cache"), "--max-steps", "1", "--val-examples", "0",
             "--report-to", "none", "--out", str(out)]
    printed = CliRunner().invoke(main, [*flags, "--print-config"])
    assert printed.exit_code == 0, printed.output + printed.stderr
    shown = yaml.safe_load(printed.output)
    assert shown["dtype"] == ("bf16" if torch.cuda.is_available() else "fp32")
    # the paper's setting for a tiny-qwen2 teacher (config.PAPER_SETTINGS): student, lr, epochs, alpha, variant
    assert (shown["student"], shown["lr"], shown["epochs"], shown["alpha"], shown["kl_variant"]) == (
        "tiny-gpt2", 1e-3, 2, 0.5, "forward")
    assert shown["cot2align"] is True and shown["resume"] is False and shown["num_workers"] is not None
    assert shown["out"] == str(out) and not out.exists()          # printing creates nothing
    trained = CliRunner().invoke(main, flags)
    assert trained.exit_code == 0, trained.output + trained.stderr
    assert yaml.safe_load((out / "config.yaml").read_text()) == shown


def test_s3_resume_with_changed_alpha_and_lr_is_refused_naming_both(s3_world, tmp_path):
    from click.testing import CliRunner

    from cot2align.cli import main

    run = _s3_stopped_run(s3_world, tmp_path)
    before = _s3_files(run)
    result = CliRunner().invoke(main, _s3_flags(s3_world, run, "--alpha", "0.9", "--lr", "0.0005", "--resume"))
    line = _s3_refused(result)
    assert f"--resume {run}: the run was started with alpha=0.5, lr=0.001; this command has alpha=0.9, lr=0.0005" \
           in line, line
    assert "another --out" in line
    assert _s3_files(run) == before                  # config.yaml, run.json, checkpoints: all as they were
    for flag, value, was in (("--grad-accum", "2", "grad_accum=1"), ("--seed", "11", "seed=10"),
                             ("--kd-temperature", "1.0", "kd_temperature=2.0"), ("--dtype", "fp16", "dtype=")):
        line = _s3_refused(CliRunner().invoke(main, _s3_flags(s3_world, run, flag, value, "--resume")))
        assert was in line and f"{flag[2:].replace('-', '_')}=" in line.split("this command has")[1], line
    assert _s3_files(run) == before


def test_s3_resume_with_changed_runtime_fields_and_a_moved_cache_continues(s3_world, tmp_path):
    """Workers, trackers, checkpoint cadence and the cache's path may change: the cache is compared by content."""
    import shutil

    import yaml
    from click.testing import CliRunner

    from cot2align.cli import main

    run = _s3_stopped_run(s3_world, tmp_path)
    moved = tmp_path / "moved_cache"
    shutil.copytree(s3_world / "cache", moved)
    flags = _s3_flags(s3_world, run, "--num-workers", "1", "--report-to", "tensorboard", "--save-every", "0",
                      "--cache", str(moved), "--resume")
    result = CliRunner().invoke(main, flags)
    assert result.exit_code == 0, result.output + result.stderr
    recorded = yaml.safe_load((run / "config.yaml").read_text())
    assert (recorded["num_workers"], recorded["report_to"], recorded["cache"]) == (1, "tensorboard", str(moved))
    assert (run / "summary.json").is_file()


def test_s3_a_finished_run_resumed_with_another_identity_field_is_refused(s3_world, tmp_path):
    """The same flags: nothing to do. A longer schedule or another alpha: another run, refused in one line."""
    import shutil

    from click.testing import CliRunner

    from cot2align.cli import main

    run = tmp_path / "run"
    shutil.copytree(s3_world / "run", run)
    before = _s3_files(run)
    same = CliRunner().invoke(main, _s3_flags(s3_world, run, "--resume"))
    assert same.exit_code == 0 and "finished earlier (2 steps); nothing to do" in same.stderr, same.stderr
    line = _s3_refused(CliRunner().invoke(main, _s3_flags(s3_world, run, "--max-steps", "4", "--resume")))
    assert "started with max_steps=2; this command has max_steps=4" in line, line
    line = _s3_refused(CliRunner().invoke(main, _s3_flags(s3_world, run, "--alpha", "0.7", "--resume")))
    assert "started with alpha=0.5; this command has alpha=0.7" in line, line
    assert _s3_files(run) == before


def test_s3_a_run_recorded_before_a_field_existed_is_compared_with_its_default(s3_world, tmp_path):
    """A field added later (ot_weight, a method's new knob) defaults to what the code did before it existed: a run
    recorded without it resumes under that default, and is refused under any other value."""
    import json

    from cot2align.cache import open_cache
    from cot2align.config import ConfigError, DistillConfig, build_config
    from cot2align.train.resolve import resolve_distill_config
    from cot2align.train.setup import check_same_run

    run = _s3_stopped_run(s3_world, tmp_path)
    marker = run / "run.json"
    recorded = json.loads(marker.read_text())
    for name in ("ot_weight", "uld_temperature", "skew_lambda"):       # as if written by an older cot2align
        del recorded["config"][name]
    marker.write_text(json.dumps(recorded))
    cache = open_cache(s3_world / "cache")
    cfg = dict(cache=str(s3_world / "cache"), student=_S3_STUDENT, method="dskd", alpha=0.5, lr=1e-3, max_steps=2,
               batch_size=4, val_examples=0, save_every=1, report_to="none", out=str(run), resume=True)
    same = resolve_distill_config(build_config(DistillConfig, **cfg), cache)
    assert check_same_run(marker, same, cache)["alpha"] == 0.5           # the defaults are what it ran with
    with _s3_pytest.raises(ConfigError, match=r"started with ot_weight=1.0; this command has ot_weight=0.0 "):
        check_same_run(marker, resolve_distill_config(build_config(DistillConfig, **dict(cfg, ot_weight=0.0)), cache),
                       cache)
    with _s3_pytest.raises(ConfigError, match=r"started with alpha=0.5; this command has alpha=0.9 "):
        check_same_run(marker, resolve_distill_config(build_config(DistillConfig, **dict(cfg, alpha=0.9)), cache),
                       cache)


# (end of section 3)


# ==================================================================================================================
# 4. Outputs: evaluate's results.json, symlinked outputs, no writable home, exit codes
# ==================================================================================================================


def _s4_cli(args: list[str]):
    """Run a command in this process (click's runner: its exit code and stderr, as a user's shell sees them)."""
    from click.testing import CliRunner

    from cot2align.cli import main

    return CliRunner().invoke(main, [*args, "-q"])


def _s4_refused(result, *words: str) -> str:
    """The command ended with exit code 2 and one `error:` line (no traceback) holding `words`; returns the line."""
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), (result.exit_code, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    assert all(w in lines[0] for w in words), lines[0]
    return lines[0]


def _s4_evaluate(out, data="sample", **kwargs) -> dict:
    from cot2align.eval import evaluate_model

    kwargs = {"limit": 2, "max_new_tokens": 2, "metric": "ce", **kwargs}
    return evaluate_model("tiny-gpt2", data, "test", out=str(out), log=lambda m: None, **kwargs)


def _s4_other_data(tmp_path):
    """Data B: other records of the sample's test split, in a file of their own."""
    import json

    from cot2align.data import load_records

    records, _ = load_records("sample", "test")
    path = tmp_path / "b.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records[5:10]))
    return path


def test_s4_evaluate_adds_a_metric_only_to_the_same_model_data_split_and_limit(tmp_path):
    import json

    import pytest

    from cot2align.errors import ConfigError

    out = tmp_path / "eval"
    rouge = _s4_evaluate(out, metric="rougeL", seeds=[10])
    before = (out / "results.json").read_bytes()
    other = _s4_other_data(tmp_path)
    # --metric ce on data B into A's results: refused before any work, naming the data; nothing changed
    with pytest.raises(ConfigError, match=r"--out .*another evaluation \(data: stored sample .* now .*b\.jsonl") as e:
        _s4_evaluate(out, data=str(other))
    assert "--overwrite" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"examples \(--limit\): stored 2, now 3"):
        _s4_evaluate(out, limit=3)
    with pytest.raises(ConfigError, match="split: stored test, now dev"):
        from cot2align.eval import evaluate_model

        evaluate_model("tiny-gpt2", "sample", "dev", limit=2, metric="ce", out=str(out), log=lambda m: None)
    with pytest.raises(ConfigError, match="model: stored tiny-gpt2"):
        from cot2align.eval import evaluate_model

        evaluate_model("tiny-llama", "sample", "test", limit=2, metric="ce", out=str(out), log=lambda m: None)
    assert (out / "results.json").read_bytes() == before
    # the same file read into other records (another field as the reference) is other data too
    renamed = tmp_path / "renamed.jsonl"
    renamed.write_text("".join(json.dumps({**json.loads(line), "summary": "x"}) + "\n"
                               for line in other.read_text().splitlines()))
    _s4_evaluate(tmp_path / "eval_b", data=str(renamed))
    with pytest.raises(ConfigError, match="another --field-map"):
        _s4_evaluate(tmp_path / "eval_b", data=str(renamed), field_map={"output": "summary"})

    # the same evaluation: the CE joins the ROUGE-L, which is kept as it was
    merged = _s4_evaluate(out)
    stored = json.loads((out / "results.json").read_text())
    assert stored == merged and stored["per_run"] == rouge["per_run"] and stored["mean"] == rouge["mean"]
    assert stored["ce"]["n_pairs"] > 0 and (out / "seed-10.jsonl").exists()
    # --overwrite replaces the whole evaluation: B's CE alone, A's ROUGE-L and its generations gone
    replaced = _s4_evaluate(out, data=str(other), overwrite=True)
    stored = json.loads((out / "results.json").read_text())
    assert stored == replaced and stored["data"] == str(other) and "mean" not in stored and "per_run" not in stored
    assert not (out / "seed-10.jsonl").exists()
    assert sorted(p.name for p in tmp_path.glob("eval*")) == ["eval", "eval_b"]      # no lock or temporary left
    assert sorted(p.name for p in out.iterdir()) == ["results.json"]


def test_s4_evaluate_cli_refuses_other_data_in_one_line_and_overwrite_replaces(tmp_path):
    import json

    out = tmp_path / "eval"
    common = ["evaluate", "--model", "tiny-gpt2", "--limit", "2", "--metric", "ce", "--out", str(out)]
    assert _s4_cli([*common, "--data", "sample"]).exit_code == 0
    other = _s4_other_data(tmp_path)
    _s4_refused(_s4_cli([*common, "--data", str(other)]), "another evaluation", "data:", "--overwrite")
    assert json.loads((out / "results.json").read_text())["data"] == "sample"
    done = _s4_cli([*common, "--data", str(other), "--overwrite"])
    assert done.exit_code == 0, done.stderr
    assert json.loads((out / "results.json").read_text())["data"] == str(other)


def test_s4_evaluate_leaves_results_whole_and_removes_a_killed_runs_temporaries(tmp_path):
    import json
    import subprocess
    import sys

    out = tmp_path / "eval"
    _s4_evaluate(out)
    # a dead writer's write-aside copies (a pid that has exited), and an unrelated user file
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    (out / f".results.json.{pid}.tmp").write_text('{"half": ')
    (out / f".seed-10.jsonl.{pid}.tmp").write_text('{"id"')
    (out / "notes.txt").write_text("mine")
    _s4_evaluate(out, metric="rougeL", seeds=[10])
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "results.json", "seed-10.jsonl"]
    stored = json.loads((out / "results.json").read_text())
    assert "ce" in stored and "mean" in stored


def test_s4_a_symlink_and_its_target_share_one_lock(tmp_path):
    from cot2align.locks import lock_path

    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "c").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "real" / "c")
    (tmp_path / "ahead").symlink_to(tmp_path / "real" / "not-yet")     # a target that does not exist yet
    assert lock_path(tmp_path / "alias") == lock_path(tmp_path / "real" / "c") == tmp_path / "real" / "c.lock"
    assert lock_path(tmp_path / "alias", rank=1) == tmp_path / "real" / "c.rank1.lock"
    assert lock_path(tmp_path / "ahead") == tmp_path / "real" / "not-yet.lock"
    (tmp_path / "linked-dir").symlink_to(tmp_path / "real")              # a symlink above the output
    assert lock_path(tmp_path / "linked-dir" / "c") == tmp_path / "real" / "c.lock"


_S4_COMMANDS = {
    "cache-teacher": ["cache-teacher", "--model", "tiny-qwen2", "--data", "sample", "--limit", "2"],
    "distill": ["distill", "--method", "sft", "--data", "sample", "--student", "tiny-gpt2", "--limit", "2",
                "--max-steps", "1"],
    "sft": ["sft", "--model", "tiny-gpt2", "--data", "sample", "--limit", "2", "--max-steps", "1"],
    "augment-cot": ["augment-cot", "--model", "tiny-gpt2", "--data", "sample", "--limit", "2", "--max-new-tokens", "2"],
    "evaluate": ["evaluate", "--model", "tiny-gpt2", "--data", "sample", "--limit", "2", "--metric", "ce"],
}


def test_s4_every_command_through_a_symlink_meets_the_lock_of_its_target(tmp_path):
    """A run holds the lock of real/<out>; the same command with --out a symlink to it is refused in one line, rc 2,
    and writes nothing into the target."""
    import hashlib

    from cot2align.errors import ConfigError
    from cot2align.locks import writer_lock

    for command, args in _S4_COMMANDS.items():
        real = tmp_path / command / "real" / ("cot.jsonl" if command == "augment-cot" else "out")
        real.parent.mkdir(parents=True)
        if command == "augment-cot":
            real.write_text('{"id": "x", "rationale": "kept"}\n')
        else:
            real.mkdir()
        alias = tmp_path / command / "alias"
        alias.symlink_to(real)
        state = sorted(p.name for p in real.iterdir()) if real.is_dir() else hashlib.sha256(real.read_bytes()).digest()
        with writer_lock(real, ConfigError, "the running writer"):
            line = _s4_refused(_s4_cli([*args, "--out", str(alias)]), "in use by another run", str(real) + ".lock")
        assert (sorted(p.name for p in real.iterdir()) if real.is_dir()
                else hashlib.sha256(real.read_bytes()).digest()) == state, (command, line)
        assert sorted(p.name for p in real.parent.iterdir()) == [real.name], command     # no lock left behind


def test_s4_no_writable_home_falls_back_to_one_private_dir_under_tmp_with_one_warning(tmp_path):
    """HOME a file (no home directory can be made there, even as root), no COT2ALIGN_HOME or XDG_CACHE_HOME: a
    command that unpacks a bundled tokenizer works, says so in one warning, and its files go to TMPDIR/cot2align-<uid>
    — the same directory for every run of this user, so nothing accumulates in the temporary directory."""
    import os
    import subprocess
    import sys

    (tmp_path / "home").write_text("not a directory")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("COT2ALIGN_HOME", "XDG_CACHE_HOME")}
    env.update(HOME=str(tmp_path / "home"), TMPDIR=str(tmp))
    home = tmp / f"cot2align-{os.getuid()}"

    def entries():       # torch keeps its own per-user torchinductor_<user> there: not ours
        return sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if not p.name.startswith("torchinductor_")
                      and "torchinductor_" not in str(p))

    done = subprocess.run([sys.executable, "-m", "cot2align.cli", "evaluate", "--model", "tiny-gpt2", "--data", "sample",
                           "--limit", "1", "--metric", "ce", "--out", str(tmp_path / "eval"), "-q"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    warnings = [line for line in done.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and str(home) in warnings[0] and "COT2ALIGN_HOME" in warnings[0], done.stderr
    assert "Traceback" not in done.stderr and (tmp_path / "eval" / "results.json").exists()
    assert (home.stat().st_mode & 0o777) == 0o700
    made = entries()     # the one directory, which every later run reuses (test_s4_home_order_...), nothing else
    assert made[0] == home.name and all(e.startswith(home.name) for e in made) and not any(".tmp" in e for e in made)


def test_s4_home_order_and_a_fallback_that_is_not_ours(tmp_path, monkeypatch):
    import logging
    import os

    import pytest

    from cot2align import modeling
    from cot2align.errors import ConfigError

    said = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())
    logging.getLogger("cot2align.modeling").addHandler(handler)
    monkeypatch.setattr(modeling, "_HOMES", {})
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    (tmp_path / "file").write_text("")
    try:
        monkeypatch.setenv("HOME", str(tmp_path / "h"))
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
        monkeypatch.setenv("COT2ALIGN_HOME", str(tmp_path / "own"))
        assert modeling.cot2align_home() == tmp_path / "own"
        monkeypatch.delenv("COT2ALIGN_HOME")
        assert modeling.cot2align_home() == tmp_path / "xdg" / "cot2align"
        monkeypatch.delenv("XDG_CACHE_HOME")
        assert modeling.cot2align_home() == tmp_path / "h" / ".cache" / "cot2align"
        assert said == []
        # an unusable $COT2ALIGN_HOME: the next in order, said once however often it is asked
        monkeypatch.setenv("COT2ALIGN_HOME", str(tmp_path / "file" / "x"))
        assert modeling.cot2align_home() == modeling.cot2align_home() == tmp_path / "h" / ".cache" / "cot2align"
        assert len(said) == 1 and "$COT2ALIGN_HOME" in said[0]
        # nothing writable: the per-user directory under the temporary directory — never one that is not ours
        monkeypatch.setenv("HOME", str(tmp_path / "file"))
        fallback = tmp_path / "tmp" / f"cot2align-{os.getuid()}"
        assert modeling.cot2align_home() == fallback and len(said) == 2
        fallback.chmod(0o777)                       # opened to other users (or made by one)
        modeling._HOMES.clear()
        with pytest.raises(ConfigError, match="set COT2ALIGN_HOME .*not a private directory of this user"):
            modeling.cot2align_home()
        fallback.rmdir()
        fallback.symlink_to(tmp_path / "h")         # a symlink planted in the shared temporary directory
        modeling._HOMES.clear()
        with pytest.raises(ConfigError, match="set COT2ALIGN_HOME .*not a private directory of this user"):
            modeling.cot2align_home()
    finally:
        logging.getLogger("cot2align.modeling").removeHandler(handler)


def test_s4_failures_a_user_causes_exit_2_without_a_traceback(tmp_path):
    """Exit codes (README "Exit codes"): 0 ok, 1 `cache verify` found damage, 2 a usage or input error, 130
    interrupted. Errors that reach the command line as a bare OSError (a path that is a file) are one line too."""
    import os
    import subprocess
    import sys

    (tmp_path / "file").write_text("x")
    (tmp_path / "empty").mkdir()
    cases = [
        (["evaluate", "--model", "tiny-gpt2", "--data", "sample", "--no-such-flag"], "no-such-flag"),      # click
        (["evaluate", "--model", "tiny-gpt2", "--data", "sample", "--out", str(tmp_path / "file")], "is a file"),
        (["cache", "verify", str(tmp_path / "missing")], "no such file or directory"),          # not damage: 2
        (["cache", "info", str(tmp_path / "file")], "Not a directory"),
        (["cache-teacher", "--model", "tiny-qwen2", "--data", "sample", "--out", str(tmp_path / "file")], "file"),
        (["quickstart", "--out", str(tmp_path / "file")], "File exists"),
        (["report", str(tmp_path / "empty")], "no evaluate results"),
        # a local directory that is not a model (empty; a config.json without model_type): ValueError before
        (["evaluate", "--model", str(tmp_path / "empty"), "--data", "sample"], "not a loadable model directory"),
        (["evaluate", "--model", str(tmp_path / "no_type"), "--data", "sample"], "not a loadable model directory"),
        (["cache-teacher", "--model", str(tmp_path / "empty"), "--data", "sample", "--out", str(tmp_path / "c")],
         "not a loadable model directory"),
    ]
    (tmp_path / "no_type").mkdir()
    (tmp_path / "no_type" / "config.json").write_text('{"hidden_size": 8}')
    for args, words in cases:
        _s4_refused(_s4_cli(args), words)
    # and as a process: the shell sees 2 and one line
    done = subprocess.run([sys.executable, "-m", "cot2align.cli", "cache", "verify", str(tmp_path / "file")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and done.stderr.startswith("error: "), done.stderr
    # an object store that cannot be reached (no credentials here; a closed port as its endpoint): one line, 2
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none"),
               AWS_EC2_METADATA_DISABLED="true",
               COT2ALIGN_STORAGE_OPTIONS='{"client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}}')
    for args in (["cache", "info", "s3://nobucket/x"], ["cache", "verify", "s3://nobucket/x"],
                 ["distill", "--cache", "s3://nobucket/x", "--student", "tiny-gpt2"]):
        done = subprocess.run([sys.executable, "-m", "cot2align.cli", *args], capture_output=True, text=True,
                              timeout=300, env=env)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        assert "cannot read the object store" in done.stderr.strip().splitlines()[-1], done.stderr
    verify_found = _s4_cli(["cache", "verify", str(tmp_path / "empty")])      # something there, but not a cache
    assert verify_found.exit_code == 1 and "FAIL" in verify_found.stderr



def test_s4_a_run_inside_the_teacher_cache_is_refused(tmp_path):
    """`distill --out <cache>/run` would write into the cache (which nothing but cache-teacher writes)."""
    from cot2align.config import CacheTeacherConfig, build_config
    from cot2align.teacher.cache_pass import cache_teacher

    cache = tmp_path / "cache"
    cache_teacher(build_config(CacheTeacherConfig, model="tiny-qwen2", data="sample", limit=2, out=str(cache), topk=4),
                  log=lambda m: None)
    before = sorted(p.name for p in cache.rglob("*"))
    result = _s4_cli(["distill", "--cache", str(cache), "--student", "tiny-gpt2", "--max-steps", "1",
                      "--val-examples", "0", "--out", str(cache / "run")])
    _s4_refused(result, "inside the teacher cache")
    assert sorted(p.name for p in cache.rglob("*")) == before

# (end of section 4)


# ==================================================================================================================
# 5. Crashes that are one-line errors: positions, a head smaller than the tokenizer, exact logits out of memory
# ==================================================================================================================


def _s5_saved_gpt2(path, extra_tokens: int = 0, **config) -> str:
    """A tiny GPT-2 saved as a local model directory with the GPT-2 tokenizer (50257 tokens, plus `extra_tokens`
    added ones); `config` overrides its GPT2Config (n_positions, vocab_size: the rows of its tied head)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from cot2align.modeling import load_tokenizer

    tokenizer = load_tokenizer("tiny-gpt2")
    if extra_tokens:
        tokenizer.add_tokens([f"<s5_extra_{i}>" for i in range(extra_tokens)])
    settings = dict(vocab_size=50257, n_embd=32, n_layer=1, n_head=2, n_positions=1024, bos_token_id=50256,
                    eos_token_id=50256)
    GPT2LMHeadModel(GPT2Config(**{**settings, **config})).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _s5_refused(result, *needles) -> str:
    """The one error line of a refused command (exit code 2, no traceback), checked to hold every needle."""
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith("error: ") and "Traceback" not in result.output, result.output
    for needle in needles:
        assert needle in lines[-1], lines[-1]
    return lines[-1]


def test_s5_position_limits_of_each_family():
    """GPT-2 names its limit n_positions (max_position_embeddings is an alias), Llama, Qwen2 and Mistral
    max_position_embeddings; a model without one (BLOOM: ALiBi) is not checked."""
    import pytest
    from transformers import BloomConfig, GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

    from cot2align.config import ConfigError
    from cot2align.model_limits import check_positions, limits_of_config

    for config, field in ((GPT2Config(n_positions=64), "n_positions"), (LlamaConfig(max_position_embeddings=64),
                          "max_position_embeddings"), (Qwen2Config(max_position_embeddings=64), "max_position_embeddings"),
                          (MistralConfig(max_position_embeddings=64), "max_position_embeddings")):
        limits = limits_of_config(config)
        assert (limits.positions, limits.positions_field) == (64, field)
        check_positions(limits, 64, "the model m", ConfigError)                 # at the limit: fine
        with pytest.raises(ConfigError, match=f"--max-length 65: the model m takes at most 64 positions \\({field}"):
            check_positions(limits, 65, "the model m", ConfigError)
    assert limits_of_config(BloomConfig()).positions is None
    check_positions(limits_of_config(BloomConfig()), 10**6, "the model m", ConfigError)


def test_s5_a_teacher_with_fewer_positions_than_max_length_is_refused_before_writing(tmp_path):
    """Was: IndexError in the embedding, and a cache left in status `writing`."""
    from click.testing import CliRunner

    from cot2align.cli import main
    from cot2align.locks import lock_path

    teacher = _s5_saved_gpt2(tmp_path / "teacher", n_positions=64)
    out = tmp_path / "cache"
    args = ["cache-teacher", "--model", teacher, "--data", "sample", "--limit", "2", "--topk", "4", "--out", str(out)]
    _s5_refused(CliRunner().invoke(main, args), "--max-length 512", "at most 64 positions", "n_positions", teacher)
    assert not out.exists() and not lock_path(out).exists()          # nothing written, not even an empty store
    # at the limit it runs: the check is the model's own bound, not a stricter one
    result = CliRunner().invoke(main, args + ["--max-length", "64", "--max-prompt-length", "32"])
    assert result.exit_code == 0, result.output
    assert '"status": "complete"' in (out / "zarr.json").read_text()


def test_s5_a_student_with_fewer_positions_than_max_length_is_refused_before_out_is_touched(tmp_path):
    """distill (here --method sft from plain data, the same setup as every method): refused before --out is
    created, and before --overwrite deletes the run already there."""
    from click.testing import CliRunner

    from cot2align.cli import main

    student = _s5_saved_gpt2(tmp_path / "student", n_positions=64)
    out = tmp_path / "run"
    args = ["distill", "--method", "sft", "--data", "sample", "--limit", "2", "--student", student, "--max-steps", "1",
            "--val-examples", "0", "--out", str(out)]
    _s5_refused(CliRunner().invoke(main, args), "--max-length 512", f"the student {student}", "at most 64 positions")
    assert not out.exists()
    out.mkdir()
    (out / "run.json").write_text('{"config": {}}')
    (out / "kept.txt").write_text("an earlier run")
    _s5_refused(CliRunner().invoke(main, args + ["--overwrite"]), "--max-length 512")
    assert sorted(p.name for p in out.iterdir()) == ["kept.txt", "run.json"]


def test_s5_a_teacher_head_smaller_than_its_tokenizer_is_refused_before_writing(tmp_path):
    """Was: the cache was written, then `distill --method mined` died with IndexError in losses/teacher.py (MinED's
    map may pick any teacher id; ids past the head have no logit)."""
    from click.testing import CliRunner

    from cot2align.cli import main

    teacher = _s5_saved_gpt2(tmp_path / "teacher", extra_tokens=3)            # 50260 tokens, 50257 head rows
    out = tmp_path / "cache"
    result = CliRunner().invoke(main, ["cache-teacher", "--model", teacher, "--data", "sample", "--limit", "2",
                                       "--topk", "4", "--out", str(out)])
    _s5_refused(result, teacher, "head has 50257 rows", "tokenizer has 50260 tokens")
    assert not out.exists()


def test_s5_mined_refuses_an_older_cache_whose_head_is_smaller_than_its_tokenizer():
    """Such caches were written before cache-teacher refused them: distill --method mined names the cache at once;
    the other methods never index the head by tokenizer id and train on it as before."""
    import types

    import pytest

    from cot2align.cache import CacheError
    from cot2align.config import DistillConfig, build_config
    from cot2align.model_limits import check_student

    cache = types.SimpleNamespace(url="old_cache", manifest={"teacher": {"vocab_size": 50257},
                                                             "tokenizer": {"size": 50260}})
    with pytest.raises(CacheError, match="old_cache: --method mined needs a logit for every teacher token.* 50257 rows"):
        check_student(build_config(DistillConfig, cache="old_cache", student="tiny-gpt2", method="mined"), cache)
    check_student(build_config(DistillConfig, cache="old_cache", student="tiny-gpt2", method="uld"), cache)
    cache.manifest["tokenizer"]["size"] = 50000                   # a padded head, larger than its tokenizer: normal
    check_student(build_config(DistillConfig, cache="old_cache", student="tiny-gpt2", method="mined"), cache)


import pytest  # noqa: E402  (section 5's fixture; the sections above import inside their tests)


@pytest.fixture(scope="module")
def s5_padded_cache(tmp_path_factory):
    """A cache of a teacher whose head is padded past its tokenizer (50304 rows for 50257 tokens, as Qwen pads)."""
    from click.testing import CliRunner

    from cot2align.cli import main

    root = tmp_path_factory.mktemp("s5_padded")
    teacher = _s5_saved_gpt2(root / "teacher", vocab_size=50304)
    result = CliRunner().invoke(main, ["cache-teacher", "--model", teacher, "--data", "sample", "--limit", "4",
                                       "--topk", "4", "--out", str(root / "cache")])
    assert result.exit_code == 0, result.output
    return root / "cache"


def test_s5_a_head_larger_than_the_tokenizer_caches_and_trains_with_mined(tmp_path, s5_padded_cache):
    from click.testing import CliRunner

    from cot2align.cache import open_cache
    from cot2align.cli import main

    manifest = open_cache(str(s5_padded_cache)).manifest
    assert (manifest["teacher"]["vocab_size"], manifest["tokenizer"]["size"]) == (50304, 50257)
    result = CliRunner().invoke(main, ["distill", "--cache", str(s5_padded_cache), "--student", "tiny-gpt2", "--method",
                                       "mined", "--max-steps", "1", "--val-examples", "0", "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "summary.json").is_file()


def test_s5_exact_logits_out_of_memory_is_one_line_with_the_size_and_topk():
    """hidden · lm_headᵀ of a batch too large for memory: CUDA raises torch.OutOfMemoryError, the CPU allocator a
    RuntimeError, Python a MemoryError; each becomes a TrainingError naming the size and --teacher-dist topk.
    The matmul raises as torch would (a tensor subclass), so nothing is really exhausted."""
    import torch

    from cot2align.losses.teacher import HeadTeacher
    from cot2align.train import TrainingError

    raised = {}

    class FailingMatmul(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", None) in ("matmul", "__matmul__"):
                raise raised["error"]
            return super().__torch_function__(func, types, args, kwargs or {})

    hidden = torch.zeros(3, 1000, 8).as_subclass(FailingMatmul)            # 3000 rows
    teacher = HeadTeacher(hidden, torch.zeros(151936, 8))
    for error in (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.70 GiB"),
                  RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                               "you tried to allocate 1823232000 bytes. Error code 12 (Cannot allocate memory)"),
                  MemoryError()):
        raised["error"] = error
        with pytest.raises(TrainingError) as caught:
            teacher.logits()
        message = str(caught.value)
        assert "\n" not in message and caught.value.__cause__ is None
        assert "3000 rows x 151936 tokens x 4 bytes = 1.70 GiB" in message and "use --teacher-dist topk" in message
    raised["error"] = RuntimeError("mat1 and mat2 shapes cannot be multiplied")      # not memory: unchanged
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        teacher.logits()


def test_s5_out_of_memory_in_a_run_exits_2_naming_topk(tmp_path, s5_padded_cache, monkeypatch):
    """In a run: the loss's teacher term (here ULD, exact) runs out of memory after the matmul fitted (sorting its
    probabilities, a tensor of the same size): distill exits 2 with the one line, no traceback."""
    from click.testing import CliRunner

    from cot2align.cli import main
    from cot2align.losses import uld

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 99999999999 bytes.")

    monkeypatch.setattr(uld, "sort_descending", out_of_memory)
    result = CliRunner().invoke(main, ["distill", "--cache", str(s5_padded_cache), "--student", "tiny-gpt2", "--method",
                                       "uld", "--teacher-dist", "exact", "--max-steps", "1", "--val-examples", "0",
                                       "--out", str(tmp_path / "run")])
    _s5_refused(result, "--teacher-dist exact", "x 50304 tokens x 4 bytes", "GiB", "use --teacher-dist topk")


# (end of section 5)
