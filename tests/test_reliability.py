"""Reliability: bad input to every command, corrupted bytes anywhere the trainer trusts, damaged checkpoints,
stale caches and mismatched resumes. Each failure must be one line naming the file, line or field and what
was expected — never a traceback — and must leave everything already written byte-identical.

The figures of the README's "Reliability" section come from here: the number of bad-input cases and of
corrupted files detected are written to $COT2ALIGN_RELIABILITY_OUT (a JSON file) when it is set.
"""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import record_figure, write_cot_records
from cot2align.cache import CacheError, open_cache
from cot2align.cache.inspect import verify_cache
from cot2align.cli import main
from cot2align.config import CacheTeacherConfig, ConfigError, DistillConfig, build_config
from cot2align.teacher.cache_pass import cache_teacher
from cot2align.train import TrainingError
from cot2align.train.distill import distill

TEACHER, STUDENT = "tiny-qwen2", "tiny-gpt2"


def tree_hash(root: Path) -> str:
    """sha256 over every file's relative path and bytes under `root` (what 'nothing changed' means)."""
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------ a world to break


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A cache, a second cache of other data, a finished run, user files and broken inputs, all under one root."""
    root = tmp_path_factory.mktemp("reliability")
    data = write_cot_records(root / "data.jsonl", n=8, cot_every=1)
    for name, limit in (("cache", None), ("cache_other", 6)):
        cache_teacher(build_config(CacheTeacherConfig, model=TEACHER, data=str(data), out=str(root / name), topk=8,
                                   batch_tokens=2048, limit=limit), log=lambda m: None)
    distill(build_config(DistillConfig, cache=str(root / "cache"), student=STUDENT, method="dskd", max_steps=2,
                         batch_size=4, val_examples=0, save_every=1, out=str(root / "run")), log=lambda m: None)
    notes = root / "notes"
    notes.mkdir()
    (notes / "thesis.txt").write_text("three years of work")
    (root / "a_file").write_text("not a directory")
    lines = (root / "data.jsonl").read_text().splitlines()
    (root / "malformed.jsonl").write_text(lines[0] + "\n{\"instruction\": \"x\", \n" + lines[1] + "\n")
    (root / "missing.jsonl").write_text(lines[0] + "\n" + json.dumps({"instruction": "no output here"}) + "\n")
    (root / "wrong_type.jsonl").write_text(json.dumps({"instruction": "a", "output": 42}) + "\n")
    (root / "latin1.jsonl").write_bytes(json.dumps({"instruction": "caf", "output": "x"}).encode()[:-2] + b"\xe9\"}\n")
    (root / "data_dir").mkdir()
    v99 = root / "cache_v99"
    shutil.copytree(root / "cache", v99)
    meta = json.loads((v99 / "zarr.json").read_text())
    meta["attributes"]["format_version"] = 99
    (v99 / "zarr.json").write_text(json.dumps(meta))
    (root / "eval_runs" / "bad").mkdir(parents=True)
    (root / "eval_runs" / "bad" / "results.json").write_text("{not json")
    yamls = {"unknown_key.yaml": "learning_rate: 0.1\n", "lr_fast.yaml": "lr: fast\n", "epochs_float.yaml": "epochs: 1.5\n",
             "not_mapping.yaml": "- lr\n- 0.1\n", "broken.yaml": "lr: [0.1\n", "alpha_big.yaml": "alpha: 2\n",
             "topk_str.yaml": "topk: many\n", "flag_str.yaml": "overwrite: maybe\n"}
    for name, text in yamls.items():
        (root / name).write_text(text)
    return root


# ------------------------------------------------------------------------------------------ 1. bad input, every command

# (name, command line with {root} for the world's directory, what the one-line error must contain)
BAD_INPUT = [
    ("malformed JSON line", "cache-teacher --model tiny-qwen2 --data {root}/malformed.jsonl --out {root}/new", "malformed.jsonl:2"),
    ("missing field", "cache-teacher --model tiny-qwen2 --data {root}/missing.jsonl --out {root}/new", "missing.jsonl:2"),
    ("wrongly-typed field", "cache-teacher --model tiny-qwen2 --data {root}/wrong_type.jsonl --out {root}/new", "wrong_type.jsonl:1"),
    ("non-UTF-8 bytes", "cache-teacher --model tiny-qwen2 --data {root}/latin1.jsonl --out {root}/new", "latin1.jsonl"),
    ("data is a directory", "cache-teacher --model tiny-qwen2 --data {root}/data_dir --out {root}/new", "data_dir"),
    ("data path does not exist", "cache-teacher --model tiny-qwen2 --data {root}/nope.jsonl --out {root}/new", "nope.jsonl"),
    ("unknown model alias", "cache-teacher --model mistral-8b --data {root}/data.jsonl --out {root}/new", "mistral-8b"),
    ("unknown dataset alias", "cache-teacher --model tiny-qwen2 --data dollyy --out {root}/new", "dollyy"),
    ("top-k zero", "cache-teacher --model tiny-qwen2 --data {root}/data.jsonl --topk 0 --out {root}/new", "--topk"),
    ("top-k above the vocabulary", "cache-teacher --model tiny-qwen2 --data {root}/data.jsonl --topk 200000 --out {root}/new", "--topk 200000"),
    ("max length too small", "cache-teacher --model tiny-qwen2 --data {root}/data.jsonl --max-length 4 --out {root}/new", "--max-length"),
    ("batch tokens negative", "cache-teacher --model tiny-qwen2 --data {root}/data.jsonl --batch-tokens -1 --out {root}/new", "--batch-tokens"),
    ("cache --out a foreign directory", "cache-teacher --model tiny-qwen2 --data {root}/data.jsonl --out {root}/notes", "not a cot2align cache"),
    ("cache --out of other inputs", "cache-teacher --model tiny-qwen2 --data {root}/data.jsonl --limit 3 --out {root}/cache", "other inputs"),
    ("YAML wrongly-typed key", "cache-teacher --config {root}/topk_str.yaml --model tiny-qwen2 --out {root}/new", "topk_str.yaml: topk: expected an integer"),
    ("distill: not a cache", "distill --cache {root}/notes --student tiny-gpt2 --out {root}/new", "no cache here"),
    ("distill: unknown format_version", "distill --cache {root}/cache_v99 --student tiny-gpt2 --out {root}/new", "format_version 99"),
    ("lr negative", "distill --cache {root}/cache --student tiny-gpt2 --lr -1 --out {root}/new", "--lr: expected a number > 0"),
    ("lr zero", "distill --cache {root}/cache --student tiny-gpt2 --lr 0 --out {root}/new", "--lr"),
    ("lr NaN", "distill --cache {root}/cache --student tiny-gpt2 --lr nan --out {root}/new", "--lr: expected a finite number"),
    ("batch size negative", "distill --cache {root}/cache --student tiny-gpt2 --batch-size -2 --out {root}/new", "--batch-size"),
    ("batch size zero", "distill --cache {root}/cache --student tiny-gpt2 --batch-size 0 --out {root}/new", "--batch-size"),
    ("grad accum zero", "distill --cache {root}/cache --student tiny-gpt2 --grad-accum 0 --out {root}/new", "--grad-accum"),
    ("epochs zero", "distill --cache {root}/cache --student tiny-gpt2 --epochs 0 --out {root}/new", "--epochs"),
    ("limit negative", "distill --cache {root}/cache --student tiny-gpt2 --limit -1 --out {root}/new", "--limit"),
    ("alpha outside [0, 1]", "distill --cache {root}/cache --student tiny-gpt2 --alpha 1.5 --out {root}/new", "--alpha"),
    ("epsilon zero", "distill --cache {root}/cache --student tiny-gpt2 --ot-epsilon 0 --out {root}/new", "--ot-epsilon"),
    ("epsilon negative", "distill --cache {root}/cache --student tiny-gpt2 --ot-epsilon -1 --out {root}/new", "--ot-epsilon"),
    ("warmup ratio above 1", "distill --cache {root}/cache --student tiny-gpt2 --warmup-ratio 1.5 --out {root}/new", "--warmup-ratio"),
    ("distill max length 4", "distill --cache {root}/cache --student tiny-gpt2 --max-length 4 --out {root}/new", "--max-length"),
    ("unknown method", "distill --cache {root}/cache --student tiny-gpt2 --method foo --out {root}/new", "--method"),
    ("distill --out a file", "distill --cache {root}/cache --student tiny-gpt2 --out {root}/a_file", "is a file"),
    ("--out a foreign non-empty directory", "distill --cache {root}/cache --student tiny-gpt2 --out {root}/notes", "not empty"),
    ("--overwrite of a foreign directory", "distill --cache {root}/cache --student tiny-gpt2 --out {root}/notes --overwrite", "--overwrite refused"),
    ("--resume with no run", "distill --cache {root}/cache --student tiny-gpt2 --out {root}/no_run --resume", "no run to resume"),
    ("--resume of a foreign directory", "distill --cache {root}/cache --student tiny-gpt2 --out {root}/notes --resume", "holds no cot2align run"),
    ("--resume with another student", "distill --cache {root}/cache --student tiny-llama --out {root}/run --resume", "student='tiny-gpt2'"),
    ("--resume with another method", "distill --cache {root}/cache --student tiny-gpt2 --method uld --out {root}/run --resume", "method='dskd'"),
    ("--resume with another cache", "distill --cache {root}/cache_other --student tiny-gpt2 --out {root}/run --resume", "another teacher cache"),
    ("YAML unknown key", "distill --config {root}/unknown_key.yaml --cache {root}/cache --out {root}/new", "unknown setting 'learning_rate'"),
    ("YAML lr: fast", "distill --config {root}/lr_fast.yaml --cache {root}/cache --out {root}/new", "lr_fast.yaml: lr: expected a number"),
    ("YAML epochs: 1.5", "distill --config {root}/epochs_float.yaml --cache {root}/cache --out {root}/new", "epochs: expected an integer"),
    ("YAML alpha: 2", "distill --config {root}/alpha_big.yaml --cache {root}/cache --out {root}/new", "alpha: expected a value in [0, 1]"),
    ("YAML not a mapping", "distill --config {root}/not_mapping.yaml --cache {root}/cache --out {root}/new", "expected a mapping"),
    ("YAML invalid", "distill --config {root}/broken.yaml --cache {root}/cache --out {root}/new", "invalid YAML"),
    ("YAML flag not a boolean", "distill --config {root}/flag_str.yaml --cache {root}/cache --out {root}/new", "overwrite: expected true or false"),
    ("config file missing", "distill --config {root}/absent.yaml --cache {root}/cache --out {root}/new", "file not found"),
    ("sweep --alpha abc", "sweep --cache {root}/cache --student tiny-gpt2 --alpha abc --out {root}/new", "--alpha: expected comma-separated numbers"),
    ("sweep --alpha 2", "sweep --cache {root}/cache --student tiny-gpt2 --alpha 0.5,2 --out {root}/new", "--alpha: expected values in [0, 1]"),
    ("sft malformed data", "sft --model tiny-gpt2 --data {root}/malformed.jsonl --out {root}/new", "malformed.jsonl:2"),
    ("sft lr negative", "sft --model tiny-gpt2 --data {root}/data.jsonl --lr -1 --out {root}/new", "--lr"),
    ("augment-cot batch size zero", "augment-cot --model tiny-qwen2 --data {root}/data.jsonl --batch-size 0 --out {root}/new.jsonl", "--batch-size"),
    ("augment-cot temperature zero", "augment-cot --model tiny-qwen2 --data {root}/data.jsonl --temperature 0 --out {root}/new.jsonl", "--temperature"),
    ("augment-cot no --out", "augment-cot --model tiny-qwen2 --data {root}/data.jsonl", "--out: required"),
    ("evaluate --seeds abc", "evaluate --model {root}/run --data {root}/data.jsonl --seeds abc", "--seeds: expected comma-separated integers"),
    ("evaluate --limit 0", "evaluate --model {root}/run --data {root}/data.jsonl --limit 0", "limit: expected a positive integer"),
    ("report: malformed results.json", "report {root}/eval_runs", "results.json: not a readable evaluate result"),
    ("cache info: not a cache", "cache info {root}/notes", "no cache here"),
    ("cache info: unknown format_version", "cache info {root}/cache_v99", "format_version 99"),
    ("unknown command", "distil --cache {root}/cache", "No such command"),
]


@pytest.mark.parametrize("name,command,expected", BAD_INPUT, ids=[case[0] for case in BAD_INPUT])
def test_bad_input_is_one_line_and_changes_nothing(world, name, command, expected):
    before = tree_hash(world)
    result = CliRunner().invoke(main, command.format(root=world).split())
    assert isinstance(result.exception, SystemExit), f"{name}: {result.exception!r}"   # not an unexpected exception
    assert result.exit_code != 0
    assert "Traceback" not in result.output + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and result.stderr.strip().endswith(errors[0]), result.stderr   # one line, the last
    assert expected in errors[0], errors[0]
    assert tree_hash(world) == before, f"{name}: something already written changed"
    shutil.rmtree(world / "new", ignore_errors=True)         # a refused run may leave only an empty new directory


def test_bad_input_table_size():
    assert len(BAD_INPUT) >= 30
    record_figure("bad_input_cases", len(BAD_INPUT))


def test_yaml_numbers_written_as_strings_train(tmp_path, world):
    (tmp_path / "c.yaml").write_text("lr: 1e-3\nepochs: 1\nmax_steps: 1\nbatch_size: 4\nval_examples: 0\n")
    cfg = build_config(DistillConfig, tmp_path / "c.yaml", cache=str(world / "cache"), student=STUDENT,
                       out=str(tmp_path / "run"))
    assert cfg.lr == 1e-3 and isinstance(cfg.lr, float)
    summary = distill(cfg, log=lambda m: None)
    assert summary["steps"] == 1


# ------------------------------------------------------------------------------------------ 2. corruption


def _flip(path: Path, at: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.slow
def test_a_flipped_byte_in_any_chunk_is_named_by_verify_and_stops_distill(tmp_path, world):
    """One bit in the first chunk of every array of the cache, one array at a time."""
    arrays = sorted(p.parent.relative_to(world / "cache") for p in (world / "cache").rglob("zarr.json")
                    if json.loads(p.read_text()).get("node_type") == "array" and (p.parent / "c").is_dir())
    detected = 0
    for array in arrays:
        cache = tmp_path / "cache"
        shutil.rmtree(cache, ignore_errors=True)
        shutil.copytree(world / "cache", cache)
        first = sorted(p for p in (cache / array / "c").rglob("*") if p.is_file())[0]
        _flip(first)
        problems = verify_cache(cache)
        relative = str(first.relative_to(cache))
        assert any(relative in p and "unreadable chunk" in p for p in problems), (relative, problems)
        detected += 1
    assert detected >= 14          # 5 text arrays, 2 x (offsets, prompt_len), 2 x >= 5 per-row arrays
    record_figure("corrupted_chunks_detected", detected)
    # distill stops with the damaged file's name instead of training on it
    cache = tmp_path / "cache"
    shutil.rmtree(cache)
    shutil.copytree(world / "cache", cache)
    _flip(sorted((cache / "parts" / "0" / "std" / "hidden" / "c").rglob("*"))[-1])
    with pytest.raises(CacheError, match=r"parts/0/std/hidden: unreadable chunk holding example"):
        distill(build_config(DistillConfig, cache=str(cache), student=STUDENT, max_steps=2, batch_size=8,
                             val_examples=0, out=str(tmp_path / "run")), log=lambda m: None)


def test_manifest_head_and_tokenizer_bytes_are_checked(tmp_path, world):
    detected = 0
    # a hand-edited manifest value: eos_id
    cache = tmp_path / "edited"
    shutil.copytree(world / "cache", cache)
    meta = json.loads((cache / "zarr.json").read_text())
    meta["attributes"]["tokenizer"]["eos_id"] = 0
    (cache / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(CacheError, match="zarr.json: the manifest does not match its checksum"):
        open_cache(cache)
    assert "does not match its checksum" in verify_cache(cache)[0]
    detected += 1
    # one flipped bit in the teacher's head and in each tokenizer file
    for name in sorted(p.name for p in (world / "cache" / "teacher").iterdir()):
        cache = tmp_path / f"flip_{name}"
        shutil.copytree(world / "cache", cache)
        _flip(cache / "teacher" / name)
        assert any(f"teacher/{name}: sha256 does not match" in p for p in verify_cache(cache)), name
        with pytest.raises(CacheError, match=f"teacher/{name}"):
            open_cache(cache).head()
        detected += 1
    record_figure("teacher_and_manifest_files_detected", detected)
    result = CliRunner().invoke(main, ["distill", "--cache", str(tmp_path / "flip_head.safetensors"), "--student",
                                       STUDENT, "--out", str(tmp_path / "run"), "--max-steps", "1"])
    assert result.exit_code == 2 and "teacher/head.safetensors: sha256 does not match" in result.stderr


# A manifest whose checksum matches (re-sealed by hand, or written by a foreign tool) but whose structure is wrong:
# (field path as a list of keys, the value put there (DELETE removes it), the message expected)
DELETE = object()
MALFORMED_MANIFESTS = [
    (["data", "n_examples"], "8", "'data.n_examples' should be an integer, found a string"),
    (["teacher", "hidden_size"], DELETE, "'teacher.hidden_size' is missing"),
    (["teacher"], [], "'teacher' should be an object, found a list"),
    (["tokenizer", "eos_id"], True, "'tokenizer.eos_id' should be an integer, found true/false"),
    (["progress", "blocks"], {"0": 0}, "'progress.blocks' should be a list, found an object"),
    (["progress", "blocks"], [0, "8"], "'progress.blocks' should be a list of integers"),
    (["store", "parts"], None, "'store.parts' should be a list, found null"),
    (["store", "parts", 0, "rows", "cot"], [0], "'store.parts[0].rows.cot' should be a pair of integers"),
    (["store", "parts", 0, "examples"], DELETE, "'store.parts[0].examples' should be a pair of integers"),
]


@pytest.mark.parametrize("keys, value, message", MALFORMED_MANIFESTS, ids=[".".join(map(str, k)) for k, _, _ in
                                                                            MALFORMED_MANIFESTS])
def test_a_malformed_manifest_is_one_line_naming_the_field(tmp_path, world, keys, value, message):
    from cot2align.cache.format import with_checksum
    from cot2align.cache.inspect import cache_info

    cache = tmp_path / "malformed"
    shutil.copytree(world / "cache", cache)
    meta = json.loads((cache / "zarr.json").read_text())
    holder = meta["attributes"]
    for key in keys[:-1]:
        holder = holder[key]
    if value is DELETE:
        del holder[keys[-1]]
    else:
        holder[keys[-1]] = value
    meta["attributes"] = with_checksum(meta["attributes"])
    (cache / "zarr.json").write_text(json.dumps(meta))
    before = {p: p.read_bytes() for p in cache.rglob("*") if p.is_file()}
    for read in (open_cache, cache_info):
        with pytest.raises(CacheError, match=f"zarr.json: manifest field {message}".replace("[", r"\[")
                           .replace("]", r"\]").replace(".", r"\.")):
            read(cache)
    assert message in verify_cache(cache)[0]
    result = CliRunner().invoke(main, ["distill", "--cache", str(cache), "--student", STUDENT, "--out",
                                       str(tmp_path / "run"), "--max-steps", "1"])
    assert result.exit_code == 2 and message in result.stderr and result.stderr.strip().count("\n") == 0
    assert {p: p.read_bytes() for p in cache.rglob("*") if p.is_file()} == before      # nothing was changed

# ------------------------------------------------------------------------------------------ 3. damaged checkpoints


@pytest.mark.slow
def test_resume_falls_back_from_a_damaged_checkpoint_and_refuses_when_none_is_intact(tmp_path, world):
    run = tmp_path / "run"
    shutil.copytree(world / "run", run)
    (run / "summary.json").unlink()          # stopped before its end (--resume of a finished run does nothing)
    checkpoints = sorted((run / "checkpoints").glob("step-*"))
    assert [c.name for c in checkpoints] == ["step-00000001", "step-00000002"]
    newest, previous = checkpoints[-1], checkpoints[0]
    trainable = newest / "trainable.safetensors"
    trainable.write_bytes(trainable.read_bytes()[:-100])                         # truncated
    logs = []
    cfg = dict(cache=str(world / "cache"), student=STUDENT, method="dskd", max_steps=2, batch_size=4, val_examples=0,
               save_every=1, out=str(run), resume=True)
    summary = distill(build_config(DistillConfig, **cfg), log=logs.append)
    assert any("skipped damaged checkpoint" in m and newest.name in m and f"using {previous}" in m for m in logs), logs
    assert summary["steps"] == 2                                                 # step 2 redone from step 1
    # both damaged: refuse, naming them
    (run / "summary.json").unlink()
    for checkpoint in sorted((run / "checkpoints").glob("step-*")):
        _flip(checkpoint / "optimizer.safetensors")
    before = tree_hash(run)
    with pytest.raises(TrainingError, match="no intact checkpoint.*optimizer.safetensors does not match"):
        distill(build_config(DistillConfig, **cfg), log=lambda m: None)
    assert tree_hash(run) == before


# ------------------------------------------------------------------------------------------ 4. a stale cache


@pytest.mark.slow
def test_a_teacher_changed_at_the_same_path_makes_the_cache_stale(tmp_path, world):
    from cot2align.modeling import load_model, load_tokenizer

    teacher = tmp_path / "teacher"
    load_model(TEACHER, seed=1).save_pretrained(teacher)
    load_tokenizer(TEACHER).save_pretrained(teacher)
    cfg = dict(model=str(teacher), data=str(world / "data.jsonl"), out=str(tmp_path / "cache"), topk=8, batch_tokens=2048,
               limit=4)
    cache_teacher(build_config(CacheTeacherConfig, **cfg), log=lambda m: None)
    messages = []
    assert cache_teacher(build_config(CacheTeacherConfig, **cfg), log=messages.append)["skipped"]
    load_model(TEACHER, seed=2).save_pretrained(teacher)                      # fine-tuned again, same path
    before = tree_hash(tmp_path / "cache")
    with pytest.raises(CacheError, match="stale — the teacher's weight files changed"):
        cache_teacher(build_config(CacheTeacherConfig, **cfg), log=lambda m: None)
    assert tree_hash(tmp_path / "cache") == before


def test_adapter_whose_base_is_itself_is_refused(tmp_path):
    from cot2align.modeling import load_model

    (tmp_path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tmp_path)}))
    with pytest.raises(ConfigError, match="names the adapter itself"):
        load_model(str(tmp_path))


def test_a_student_tokenizer_that_cannot_spell_the_cache_is_refused(tmp_path, world):
    """A word-level student vocabulary (no bytes, no fallback): nearly every response token is unknown."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel(vocab={"[UNK]": 0, "[EOS]": 1, "the": 2}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    student = tmp_path / "word_student"
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]", eos_token="[EOS]").save_pretrained(student)
    GPT2LMHeadModel(GPT2Config(vocab_size=3, n_embd=16, n_layer=1, n_head=2, eos_token_id=1,
                               bos_token_id=1)).save_pretrained(student)
    before = tree_hash(world / "cache")
    result = CliRunner().invoke(main, ["distill", "--cache", str(world / "cache"), "--student", str(student), "--out",
                                       str(tmp_path / "run"), "--max-steps", "1", "--val-examples", "0"])
    assert result.exit_code == 2, result.output
    assert "the student tokenizer cannot spell the cached text" in result.stderr.strip().splitlines()[-1]
    assert tree_hash(world / "cache") == before


def test_report_counts_every_run_that_shares_a_method(tmp_path):
    from cot2align.eval import report

    for run, score in (("seed1", 20.0), ("seed2", 24.0), ("seed3", 22.0)):
        (tmp_path / run / "eval" / "d").mkdir(parents=True)
        (tmp_path / run / "run.json").write_text(json.dumps({"config": {"method": "dskd", "cot2align": True}}))
        (tmp_path / run / "eval" / "d" / "results.json").write_text(json.dumps(
            {"data": "dialogsum", "decoding": "greedy", "per_run": {"greedy": score}, "mean": score, "std": 0.0}))
    table = report(str(tmp_path), log=lambda m: None)
    assert "| DSKD + CoT2Align | 22.00 ± 2.00 [3 runs] |" in table, table


def test_the_readme_states_this_table_size():
    """The README's Reliability figure is this table's size (add a case, update the README)."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert f"{len(BAD_INPUT)} bad-input cases" in readme
