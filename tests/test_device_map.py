"""`cache-teacher --device-map`: a teacher placed by accelerate over devices (here the CPU and the disk) writes the
same cache as the teacher in one place — alone and under torchrun — and the placement does not change the
cache's identity."""

import sys
import tempfile
from pathlib import Path

import pytest
import torch

from conftest import cache_arrays, explain, free_port, write_cot_records
from cot2align.cache import open_cache
from cot2align.config import CacheTeacherConfig, ConfigError, build_config
from cot2align.modeling import load_model, load_tokenizer
from cot2align.teacher.cache_pass import cache_teacher

PASS = dict(topk=8, batch_tokens=2048, max_length=256, max_prompt_length=128, block_examples=4)
# With this much CPU memory accelerate keeps the embedding and the first decoder layer on the CPU and offloads the
# other three layers, the final norm and the LM head to disk (checked below, so that a change in accelerate's
# placement cannot make the test pass without splitting).
SPLIT = "cpu=18MB"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One CPU thread here, as in the torchrun ranks (OMP_NUM_THREADS=1): a CPU matmul's sums are ordered by
    its thread count, and the arrays are compared bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A small Llama saved as from_pretrained reads it: 4 layers whose MLPs outweigh the rest but the vocabulary."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = load_tokenizer("tiny-llama")
    config = AutoConfig.for_model("llama", hidden_size=64, intermediate_size=1024, num_hidden_layers=4,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tokenizer),
                                  max_position_embeddings=1024, tie_word_embeddings=False,
                                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "llama4"
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_cot_records(tmp_path_factory.mktemp("dm") / "data.jsonl", n=10, cot_every=2)


@pytest.fixture(scope="module")
def unsplit(teacher, data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("unsplit") / "cache"
    cache_teacher(build_config(CacheTeacherConfig, model=str(teacher), data=str(data), out=str(out), **PASS),
                  log=lambda m: None)
    return out


def _same(a, b) -> None:
    arrays_a, arrays_b = cache_arrays(a), cache_arrays(b)
    assert arrays_a.keys() == arrays_b.keys()
    for key in arrays_a:
        assert (arrays_a[key] == arrays_b[key]).all(), f"{key} differs"


def test_the_map_puts_some_layers_on_disk(teacher):
    with tempfile.TemporaryDirectory() as folder:
        model = load_model(str(teacher), placement={"device_map": "auto", "max_memory": {"cpu": SPLIT[4:]},
                                                    "offload_folder": folder})
        placed = model.hf_device_map
    layers = {name: where for name, where in placed.items() if name.startswith("model.layers.")}
    assert set(layers.values()) == {"cpu", "disk"}, placed
    assert placed["lm_head"] == "disk"


def test_split_teacher_writes_the_unsplit_cache(teacher, data, unsplit, tmp_path):
    out = tmp_path / "split"
    cache_teacher(build_config(CacheTeacherConfig, model=str(teacher), data=str(data), out=str(out), device_map="auto",
                               max_memory=SPLIT, offload_folder=str(tmp_path / "offload"), **PASS), log=lambda m: None)
    _same(unsplit, out)
    a, b = open_cache(unsplit), open_cache(out)
    # a runtime setting: the same identity (fingerprint of the inputs and weights), the same head file
    assert a.manifest["fingerprint"] == b.manifest["fingerprint"]
    assert a.manifest["teacher"]["files_sha256"]["head.safetensors"] == b.manifest["teacher"]["files_sha256"][
        "head.safetensors"]
    # ... so that the unsplit command, rerun on it, finds the cache complete
    again = cache_teacher(build_config(CacheTeacherConfig, model=str(teacher), data=str(data), out=str(out), **PASS),
                          log=lambda m: None)
    assert again["skipped"]


def test_split_teacher_under_torchrun_writes_the_unsplit_cache(teacher, data, unsplit, tmp_path):
    import subprocess

    out = tmp_path / "ranks"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in PASS.items()]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(free_port()), "-m", "cot2align.cli", "cache-teacher", "--model", str(teacher), "--data",
                           str(data), "--out", str(out), "--device-map", "auto", "--max-memory", SPLIT, *flags],
                          capture_output=True, text=True, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, explain(done)
    assert len(open_cache(out).manifest["store"]["parts"]) == 2
    _same(unsplit, out)


@pytest.mark.parametrize("flags, expected", [
    (dict(max_memory="cpu=1GiB"), "max_memory: only with --device-map"),
    (dict(device_map="auto", max_memory="gpu0=1GiB"), "max_memory: expected DEVICE=SIZE"),
    (dict(device_map="auto", max_memory="cpu=lots"), "max_memory: cpu=lots"),
    (dict(device_map="everywhere"), "device_map: expected one of auto"),
])
def test_placement_flags_are_checked(flags, expected):
    with pytest.raises(ConfigError, match=expected):
        build_config(CacheTeacherConfig, **flags)


def test_a_preset_teacher_cannot_be_placed(tmp_path, data):
    with pytest.raises(ConfigError, match="built in memory") as refused:
        cache_teacher(build_config(CacheTeacherConfig, model="tiny-llama", data=str(data), out=str(tmp_path / "c"),
                                   device_map="auto", **PASS), log=lambda m: None)
    assert "\n" not in str(refused.value)


def test_gpus_are_shared_out_between_the_ranks_of_a_node():
    from cot2align.teacher.placement import local_gpus, max_memory_for

    assert local_gpus(0, 1, 8) == list(range(8))
    assert local_gpus(1, 2, 8) == [4, 5, 6, 7]
    with pytest.raises(ConfigError, match="cannot share its 8 GPU"):
        local_gpus(0, 3, 8)
    assert max_memory_for(None, list(range(8)), 8) is None
    assert max_memory_for({0: "70GiB", 5: "70GiB", "cpu": "100GiB"}, [4, 5, 6, 7], 8) == {5: "70GiB", "cpu": "100GiB"}
