"""The teacher cache against an independent fresh forward pass, crash/resume, and bad inputs."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cache_arrays

from cot2align.cache import CacheError, open_cache
from cot2align.cache.inspect import cache_info, verify_cache
from cot2align.config import CacheTeacherConfig, ConfigError, build_config
from cot2align.modeling import load_model, load_tokenizer
from cot2align.teacher.cache_pass import cache_teacher


def build(tmp_path, model, data, name="cache", **kw):
    cfg = build_config(CacheTeacherConfig, model=model, data=str(data), out=str(tmp_path / name), topk=8,
                       batch_tokens=kw.pop("batch_tokens", 2048), **kw)
    cache_teacher(cfg, log=lambda m: None)
    return tmp_path / name


def bf16(x):
    return x.to(torch.bfloat16).float()


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-gpt2"])
def test_cached_rows_equal_a_fresh_single_example_forward(tmp_path, cot_jsonl, preset):
    path = build(tmp_path, preset, cot_jsonl, max_length=1024, max_prompt_length=512)
    cache = open_cache(path)
    assert len(cache) == 10 and cache.manifest["data"]["n_cot_examples"] == 5
    tok = load_tokenizer(preset)
    model = load_model(preset)  # the same seed-0 weights, loaded independently
    head = cache.head()
    records = [json.loads(x) for x in cot_jsonl.read_text().splitlines()]
    assert torch.equal(head["embed_tokens"], model.get_input_embeddings().weight)
    assert torch.equal(head["lm_head"], model.get_output_embeddings().weight)
    checked_cot = 0
    for i in (0, 1, 4, 7):
        ex = cache[i]
        for view in ("std", "cot"):
            v = ex[view]
            if view == "cot" and "rationale" not in records[i]:
                assert v["n_rows"] == 0 and v["prompt"] == "" and v["response"] == ""
                continue
            checked_cot += view == "cot"
            # independent tokenisation of the cached texts, as README 'The cache format' describes
            prompt_ids = tok(v["prompt"])["input_ids"]
            ids = prompt_ids + tok(v["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            P, L = len(prompt_ids), len(ids)
            assert v["prompt_len"] == P and v["n_rows"] == L - P
            assert np.array_equal(v["input_ids"], ids[P - 1:L - 1]) and np.array_equal(v["target_ids"], ids[P:L])
            if view == "std":
                assert v["response"] == records[i]["output"]
            with torch.no_grad():
                out = model(torch.tensor([ids]), output_hidden_states=True)
            rows = slice(P - 1, L - 1)
            hidden_ref = out.hidden_states[-1][0, rows]
            hidden = cache.hidden_tensor(v, torch.float32)
            torch.testing.assert_close(hidden, bf16(hidden_ref), rtol=1.6e-2, atol=1e-5)
            logp_ref = torch.log_softmax(out.logits[0, rows].float(), -1)
            ids_k = torch.from_numpy(v["topk_ids"].astype(np.int64))
            lp = torch.from_numpy(v["topk_logprobs"].astype(np.float32))
            torch.testing.assert_close(lp, logp_ref.gather(-1, ids_k), rtol=2e-3, atol=2e-3)
            torch.testing.assert_close(lp[:, 0], logp_ref.max(-1).values, rtol=2e-3, atol=2e-3)
            tail_ref = logp_ref.scatter(-1, ids_k, float("-inf")).logsumexp(-1)
            torch.testing.assert_close(torch.from_numpy(v["tail_logprob"]), tail_ref, rtol=1e-4, atol=1e-4)
            # hidden . lm_head^T reproduces the model's logits (exactly from the fp32 state)
            torch.testing.assert_close(hidden_ref @ head["lm_head"].T, out.logits[0, rows], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(hidden @ head["lm_head"].T, out.logits[0, rows], rtol=0.05, atol=0.05)
            # the embedding-layer feature: a lookup, or GPT-2's wte + wpe stored per row
            emb = cache.embedding_features(v, head).float()
            if cache.embed_kind == "lookup":
                assert torch.equal(emb, model.get_input_embeddings()(torch.tensor(v["input_ids"], dtype=torch.long)))
            else:
                torch.testing.assert_close(emb, bf16(out.hidden_states[0][0, rows]), rtol=1.6e-2, atol=1e-5)
            assert torch.equal(cache.embedding_features(v, head, which="target"),
                               model.get_input_embeddings()(torch.tensor(v["target_ids"], dtype=torch.long)))
    assert checked_cot >= 2
    assert cache.manifest["teacher"]["embed_kind"] == ("stored" if preset == "tiny-gpt2" else "lookup")
    assert verify_cache(path) == []


def test_truncation_is_on_text_counted_and_shared(tmp_path, cot_jsonl):
    path = build(tmp_path, "tiny-llama", cot_jsonl, max_length=96, max_prompt_length=64)
    cache = open_cache(path)
    trunc = cache.manifest["data"]["truncated"]
    assert trunc["prompt"]["std"] > 0 and trunc["response"]["std"] + trunc["response"]["cot"] > 0
    tok = load_tokenizer("tiny-llama")
    for i in range(len(cache)):
        for view in ("std", "cot"):
            v = cache.view(i, view)
            if v["n_rows"]:
                assert v["prompt_len"] <= 64 and v["prompt_len"] + v["n_rows"] <= 96
                assert len(tok(v["prompt"])["input_ids"]) == v["prompt_len"]
                assert v["prompt"].endswith("### Response:\n") or v["prompt"].endswith("step by step.\n")


def _run_cli(args, env_extra=None):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "cot2align.cli", *args], env=env, capture_output=True, text=True)


@pytest.mark.slow
def test_sigkill_at_several_points_then_resume_gives_identical_arrays(tmp_path):
    from conftest import write_cot_records

    data = write_cot_records(tmp_path / "d.jsonl", n=40, cot_every=3)
    common = ["cache-teacher", "--model", "tiny-llama", "--data", str(data), "--topk", "8", "--block-examples", "8",
              "--batch-tokens", "2048", "--max-length", "256", "--max-prompt-length", "128"]
    reference = build(tmp_path, "tiny-llama", data, name="reference", block_examples=8, max_length=256,
                      max_prompt_length=128)
    expected = cache_arrays(reference)
    for fault in ("commit:0", "write:2:std", "write:3:cot", "commit:4"):
        out = tmp_path / f"killed-{fault.replace(':', '_')}"
        killed = _run_cli(common + ["--out", str(out)], {"COT2ALIGN_FAULT": fault})
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
        manifest = json.loads((out / "zarr.json").read_text())["attributes"]
        assert manifest["status"] == "writing"
        with pytest.raises(CacheError, match="not complete"):
            open_cache(out)
        partial = open_cache(out, allow_incomplete=True)  # readers see committed examples only
        part = json.loads((out / "parts" / "0" / "zarr.json").read_text())["attributes"]
        assert len(partial) == manifest["progress"]["blocks"][part["blocks_done"]] < 40
        resumed = _run_cli(common + ["--out", str(out), "--resume"])
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        assert "resuming" in resumed.stderr
        got = cache_arrays(out)
        assert got.keys() == expected.keys()
        for key in expected:
            assert np.array_equal(got[key], expected[key]), f"{fault}: {key} differs after resume"
    # a real external SIGKILL at an arbitrary moment, then a plain re-run of the same command
    out = tmp_path / "killed-external"
    proc = subprocess.Popen([sys.executable, "-m", "cot2align.cli", *common, "--out", str(out), "--block-examples", "2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        meta = out / "parts" / "0" / "zarr.json"     # the part's progress (one process: one part)
        if meta.exists() and json.loads(meta.read_text())["attributes"].get("blocks_done", 0) >= 2:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    rerun = _run_cli(common + ["--out", str(out), "--block-examples", "2"])
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    reference2 = build(tmp_path, "tiny-llama", data, name="reference2", block_examples=2, max_length=256,
                       max_prompt_length=128)
    expected2, got = cache_arrays(reference2), cache_arrays(out)
    for key in expected2:
        assert np.array_equal(got[key], expected2[key]), key
    again = _run_cli(common + ["--out", str(out), "--block-examples", "2"])
    assert again.returncode == 0 and "already complete" in again.stderr


def test_refuses_cache_of_other_inputs_and_keeps_it(tmp_path, cot_jsonl):
    path = build(tmp_path, "tiny-llama", cot_jsonl)
    before = {p: p.read_bytes() for p in path.rglob("*") if p.is_file()}
    with pytest.raises(CacheError, match=r"holds a cache of other inputs \(data\.sha256"):
        build(tmp_path, "tiny-llama", "sample", name="cache")
    with pytest.raises(CacheError, match=r"other inputs \(settings\.topk"):
        cache_teacher(build_config(CacheTeacherConfig, model="tiny-llama", data=str(cot_jsonl), out=str(path), topk=4),
                      log=lambda m: None)
    after = {p: p.read_bytes() for p in path.rglob("*") if p.is_file()}
    assert before == after
    other = tmp_path / "not_a_cache"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(CacheError, match="not a cot2align cache"):
        build(tmp_path, "tiny-llama", cot_jsonl, name="not_a_cache")
    assert (other / "notes.txt").read_text() == "mine"


@pytest.mark.slow
def test_corrupted_chunk_is_named_by_verify(tmp_path, cot_jsonl):
    path = build(tmp_path, "tiny-llama", cot_jsonl)
    assert verify_cache(path) == []
    chunk = path / "parts" / "0" / "std" / "hidden" / "c" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    problems = verify_cache(path)
    assert len(problems) == 1 and problems[0].startswith(f"{path}/parts/0/std/hidden/c/0/0: unreadable chunk")
    assert "examples 0.." in problems[0]
    result = _run_cli(["cache", "verify", str(path)])
    assert result.returncode == 1 and "parts/0/std/hidden/c/0/0: unreadable chunk" in result.stderr


def test_reader_refuses_unknown_format_version_and_bad_tokenizer(tmp_path, cot_jsonl):
    path = build(tmp_path, "tiny-llama", cot_jsonl)
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"]["format_version"] = 99
    (path / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(CacheError, match="format_version 99 is not supported"):
        open_cache(path)
    meta["attributes"]["format_version"] = 1
    meta["attributes"]["tokenizer"]["vocab_hash"] = "0" * 64
    (path / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(CacheError, match="tokenizer files do not match"):
        open_cache(path)


@pytest.mark.slow
def test_unknown_alias_and_bad_settings_are_one_line_errors(tmp_path, cot_jsonl):
    result = _run_cli(["cache-teacher", "--model", "mistral-8b", "--data", str(cot_jsonl), "--out", str(tmp_path / "x")])
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "--model mistral-8b: not a local path" in result.stderr
    assert not (tmp_path / "x").exists()
    with pytest.raises(ConfigError, match="max_prompt_length"):
        build_config(CacheTeacherConfig, max_length=128, max_prompt_length=128)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n')
    result = _run_cli(["cache-teacher", "--model", "tiny-llama", "--data", str(bad), "--out", str(tmp_path / "y")])
    assert result.returncode == 2 and "bad.jsonl:2: record has no 'output' field" in result.stderr
    assert not (tmp_path / "y").exists()


@pytest.mark.slow
def test_info_reports_sizes_and_throughput(tmp_path, cot_jsonl):
    path = build(tmp_path, "tiny-qwen2", cot_jsonl)
    info = cache_info(path)
    assert info["rows"]["std"] > 0 and info["rows"]["cot"] > 0 and info["status"] == "complete"
    assert info["arrays"]["hidden"]["raw_bytes"] == (info["rows"]["std"] + info["rows"]["cot"]) * 64 * 2
    assert info["arrays"]["topk_ids"]["raw_bytes"] == (info["rows"]["std"] + info["rows"]["cot"]) * 8 * 4  # V > 65536
    assert info["pass"]["tokens_per_s"] > 0
    result = _run_cli(["cache", "info", str(path)])
    assert result.returncode == 0 and "bytes/row" in result.stdout and "teacher tokens/s" in result.stdout


def test_default_out_is_family_and_data(tmp_path, monkeypatch):
    from cot2align.teacher.cache_pass import default_out

    assert default_out(build_config(CacheTeacherConfig, model="mistral-7b", data="dolly")) == Path("cache/mistral_dolly")
    assert default_out(build_config(CacheTeacherConfig, model="tiny-qwen2", data="data/x_cot.jsonl")) == Path(
        "cache/tiny-qwen2_x_cot")


def test_yaml_config_with_flag_overrides(tmp_path):
    root = Path(__file__).parent.parent / "cot2align" / "configs"
    cfg = build_config(CacheTeacherConfig, root / "cache_tiny.yaml", topk=4)
    assert cfg.model == "tiny-qwen2" and cfg.topk == 4 and cfg.max_length == 512
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: tiny-llama\ntop_kk: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown setting 'top_kk'"):
        build_config(CacheTeacherConfig, bad)


def test_format_version_1_caches_are_still_read(tmp_path, cot_jsonl):
    """A version-1 cache (before parts: per-row arrays beside the offsets, progress in the root manifest) reads
    as the same examples as the version-2 cache it is rearranged from."""
    import shutil

    v2 = build(tmp_path, "tiny-llama", cot_jsonl, name="v2")
    v1 = tmp_path / "v1"
    shutil.copytree(v2, v1)
    for view in ("std", "cot"):
        for array in (v1 / "parts" / "0" / view).iterdir():
            if array.is_dir():
                shutil.move(str(array), str(v1 / view / array.name))
    shutil.rmtree(v1 / "parts")
    meta = json.loads((v1 / "zarr.json").read_text())
    attrs = meta["attributes"]
    attrs["format_version"] = 1
    del attrs["store"]["parts"]
    attrs["progress"].update(blocks_done=len(attrs["progress"]["blocks"]) - 1, examples_done=attrs["data"]["n_examples"])
    (v1 / "zarr.json").write_text(json.dumps(meta))
    old, new = open_cache(v1), open_cache(v2)
    assert len(old) == len(new) and len(old.parts) == 1
    for i in range(len(new)):
        for view in ("std", "cot"):
            a, b = old.view(i, view), new.view(i, view)
            for name, value in b.items():
                assert np.array_equal(np.asarray(a[name]), np.asarray(value)), (i, view, name)
    assert verify_cache(v1) == []
    assert cache_info(v1)["parts"] == 1


def test_an_unknown_model_name_is_refused_naming_the_option_it_came_from(tmp_path):
    """`gpt2` (a hub id without its owner) is refused in one line that names the option the user typed it in:
    distill's and align-stats' --student, not a --model they never passed."""
    from cot2align.config import DistillConfig
    from cot2align.modeling import load_tokenizer
    from cot2align.train.setup import _setup_student

    with pytest.raises(ConfigError, match=r"^--model gpt2: not a local path, hub id with its owner"):
        load_tokenizer("gpt2")
    cfg = build_config(DistillConfig, student="gpt2", data=str(tmp_path / "train.jsonl"), out=str(tmp_path / "run"),
                       method="sft", cot2align=False)
    with pytest.raises(ConfigError, match=r"^--student gpt2: .*openai-community/gpt2"):
        _setup_student(cfg, None, None, "cpu")
