"""The paper setting is found however the teacher is named, and the README's "pipeline with real models" runs as
printed, with tiny stand-ins of the real models.

The stand-ins: a Hugging Face hub cache (offline) holding, under the real repository ids
(mistralai/Mistral-7B-v0.1, TinyLlama/...), tiny random models of the same architecture with the real tokenizers;
and the Dolly split files under ./data. The README's commands then run unchanged, with only CPU limits added
(--limit, --max-steps, fewer new tokens)."""

import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
from conftest import run_cli_commands

from cot2align.config import MODEL_ALIASES, DistillConfig, build_config
from cot2align.errors import ConfigError
from cot2align.families import architecture_family, base_model_of, family_of, teacher_family, teacher_family_source

README = Path(__file__).resolve().parents[1] / "README.md"
MISTRAL_HUB = MODEL_ALIASES["mistral-7b"]["hub"]
QWEN_HUB = MODEL_ALIASES["qwen2.5-7b-instruct"]["hub"]


# ------------------------------------------------------------------------------------- the ways of naming a teacher

def _adapter(path: Path, base: str) -> Path:
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": base}))
    return path


def _full_model(path: Path, **config) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_alias_hub_id_and_presets():
    assert family_of("mistral-7b") == "mistral" and family_of(MISTRAL_HUB) == "mistral"
    assert family_of(QWEN_HUB) == "qwen2.5" and family_of(QWEN_HUB.lower()) == "qwen2.5"
    assert family_of("Qwen/Qwen1.5-1.8B") == "qwen1.5" and family_of("meta-llama/Llama-2-7b-hf") == "llama2"
    assert family_of("tiny-qwen2") == "tiny-qwen2"
    # models that are no paper teacher: the students, a preset without a setting, an unknown hub id
    for name in ("tinyllama-1.1b", "gpt2-120m", "tiny-llama", "Qwen/Qwen2.5-0.5B", "someone/model", "", None):
        assert family_of(name) is None


def test_adapter_directory_names_its_base(tmp_path):
    assert family_of(str(_adapter(tmp_path / "teacher_mistral", MISTRAL_HUB))) == "mistral"
    assert family_of(str(_adapter(tmp_path / "by_alias", "qwen2.5-7b-instruct"))) == "qwen2.5"
    # an adapter trained on a fine-tuned directory, itself naming its base in its model card
    finetuned = _full_model(tmp_path / "finetuned", model_type="llama", hidden_size=64, num_hidden_layers=2)
    (finetuned / "README.md").write_text(f"---\nbase_model: {QWEN_HUB}\nlibrary_name: transformers\n---\n\n# card\n")
    assert family_of(str(_adapter(tmp_path / "on_finetuned", str(finetuned)))) == "qwen2.5"
    assert base_model_of(str(tmp_path / "on_finetuned")) == QWEN_HUB
    # an adapter of a model that is no paper teacher; a loop of adapters ends
    assert family_of(str(_adapter(tmp_path / "other", "someone/model"))) is None
    _adapter(tmp_path / "loop", str(tmp_path / "loop"))
    assert family_of(str(tmp_path / "loop")) is None


def test_full_model_directory_by_card_or_architecture(tmp_path):
    carded = _full_model(tmp_path / "carded", model_type="mistral", hidden_size=64, num_hidden_layers=2)
    (carded / "README.md").write_text(f"---\nbase_model:\n- {MISTRAL_HUB}\n---\n")
    assert family_of(str(carded)) == "mistral" and base_model_of(str(carded)) == MISTRAL_HUB
    # no card: the architecture of the paper teacher's config.json
    qwen = _full_model(tmp_path / "qwen_ft", model_type="qwen2", hidden_size=3584, num_hidden_layers=28,
                       vocab_size=152064)
    mistral = _full_model(tmp_path / "mistral_ft", model_type="mistral", hidden_size=4096, num_hidden_layers=32,
                          vocab_size=32000)
    llama = _full_model(tmp_path / "llama_ft", model_type="llama", hidden_size=4096, num_hidden_layers=32,
                        vocab_size=32000)
    qwen15 = _full_model(tmp_path / "q15", model_type="qwen2", hidden_size=2048, num_hidden_layers=24,
                         vocab_size=151936)
    assert [family_of(str(p)) for p in (qwen, mistral, llama, qwen15)] == ["qwen2.5", "mistral", "llama2", "qwen1.5"]
    assert base_model_of(str(qwen)) is None
    # another size of the same architecture is not the paper teacher
    assert family_of(str(_full_model(tmp_path / "qwen_small", model_type="qwen2", hidden_size=896,
                                     num_hidden_layers=24, vocab_size=151936))) is None
    assert family_of(str(tmp_path / "empty_dir_missing")) is None


def test_cache_teacher_section_falls_back_on_recorded_base_and_architecture(tmp_path):
    gone = str(tmp_path / "moved_away")
    assert teacher_family({"name_or_path": gone, "base_model": MISTRAL_HUB}) == "mistral"
    assert teacher_family({"name_or_path": gone, "base_model": None, "model_type": "qwen2", "hidden_size": 3584,
                           "num_layers": 28, "vocab_size": 152064}) == "qwen2.5"
    assert teacher_family({"name_or_path": gone, "model_type": "llama", "hidden_size": 64, "num_layers": 2,
                           "vocab_size": 32000}) is None
    assert architecture_family({"model_type": "qwen2", "hidden_size": 64, "num_layers": 2, "vocab_size": 151665}) \
        == "tiny-qwen2"


def test_a_match_by_architecture_alone_is_said_to_be_one():
    """Qwen2-7B has Qwen2.5-7B's shape: it gets Qwen2.5's setting, and the run is told the match was a guess."""
    qwen2_7b = {"name_or_path": "Qwen/Qwen2-7B", "model_type": "qwen2", "hidden_size": 3584, "num_layers": 28,
                "vocab_size": 152064}
    assert teacher_family_source(qwen2_7b) == ("qwen2.5", "architecture")
    assert teacher_family_source({"name_or_path": MISTRAL_HUB}) == ("mistral", "name")
    assert teacher_family_source({"name_or_path": "Qwen/Qwen2-7B"}) == (None, None)


def test_no_setting_says_which_exist_in_one_line():
    cfg = build_config(DistillConfig, cache="c")
    with pytest.raises(ConfigError) as error:
        cfg.with_defaults(None, "runs/teacher_x")
    message = str(error.value)
    assert "\n" not in message and "'runs/teacher_x'" in message and "--student" in message
    assert "TinyLLaMA-1.1B <- Mistral-7B" in message and "GPT2-1.5B <- Qwen2.5-7B-Instruct" in message
    assert cfg.with_defaults("mistral").student == "tinyllama-1.1b"


# ------------------------------------------------------------------------------------- the README's pipeline

# what each README command adds to fit on a CPU in seconds: fewer records, steps and generated tokens
CPU_LIMITS = {
    "sft": "--limit 4 --max-steps 1 --val-examples 0",
    "augment-cot": "--limit 4 --max-new-tokens 8 --batch-size 4",
    "cache-teacher": "--limit 4",
    "distill": "--limit 4 --max-steps 1 --val-examples 0",
    "evaluate": "--limit 2 --max-new-tokens 4",
    "report": "",
}


def readme_pipeline() -> list[list[str]]:
    """The commands of the README's "pipeline with real models" block, as printed (comments and the optional
    `[--backend vllm]` dropped), each with its CPU limits appended."""
    text = README.read_text(encoding="utf-8")
    block = re.search(r"## The pipeline with real models.*?```bash\n(.*?)```", text, re.S).group(1)
    commands = []
    for line in block.splitlines():
        line = re.sub(r"\s+#.*$", "", re.sub(r"\[[^\]]*\]", "", line)).strip()
        if line:
            args = shlex.split(line)
            assert args[0] == "cot2align", line
            commands.append(args[1:] + shlex.split(CPU_LIMITS[args[1]]))
    return commands


def _snapshot(hub_cache: Path, repo_id: str, preset: str) -> None:
    """A tiny random model of `preset` (same architecture and tokenizer as the real model) stored in an offline hub
    cache under the real `repo_id`, as `huggingface_hub` lays out a download."""
    from cot2align.modeling import build_tiny_model, load_tokenizer

    commit = "0" * 40
    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    build_tiny_model(preset).save_pretrained(str(snapshot))
    load_tokenizer(preset).save_pretrained(str(snapshot))


def _dolly_files(data_root: Path) -> None:
    from cot2align.data import load_records

    records, _ = load_records("sample", "train")
    dolly = [r for r in records if r.get("source") == "dolly"] or records
    (data_root / "dolly").mkdir(parents=True)
    for split, rows in (("train", dolly[:6]), ("test", dolly[6:9])):
        with (data_root / "dolly" / f"{split}.jsonl").open("w") as f:
            for r in rows:
                f.write(json.dumps({k: r[k] for k in ("id", "instruction", "input", "output")}) + "\n")


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    root = tmp_path_factory.mktemp("paper_pipeline")
    _snapshot(root / "hub", MISTRAL_HUB, "tiny-mistral")
    _snapshot(root / "hub", MODEL_ALIASES["tinyllama-1.1b"]["hub"], "tiny-llama")
    _dolly_files(root / "data")
    return root


def run_commands(root: Path, commands: list[list[str]]) -> subprocess.CompletedProcess:
    """The commands one after another in one Python process (one import of torch), in `root`, offline, with the
    stand-ins' hub cache."""
    env = dict(os.environ, HF_HUB_CACHE=str(root / "hub"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("COT2ALIGN_DATA_ROOT", None)
    return run_cli_commands(root, commands, env, timeout=900)


def test_readme_pipeline_runs_as_printed(stand_ins):
    commands = readme_pipeline()
    assert [c[0] for c in commands] == ["sft", "augment-cot", "cache-teacher", "distill", "evaluate", "report"]
    assert commands[2][:3] == ["cache-teacher", "--model", "runs/teacher_mistral"]
    assert commands[3][:3] == ["distill", "--cache", "cache/mistral_dolly"]      # no --student: the paper's setting
    result = run_commands(stand_ins, commands)
    assert result.returncode == 0, result.stderr[-4000:]
    root = stand_ins
    manifest = json.loads((root / "cache" / "mistral_dolly" / "zarr.json").read_text())["attributes"]
    assert manifest["teacher"]["name_or_path"] == "runs/teacher_mistral"
    assert manifest["teacher"]["base_model"] == MISTRAL_HUB          # from the fine-tuned teacher's model card
    assert "paper setting: TinyLLaMA-1.1B <- Mistral-7B" in result.stderr
    run = root / "runs" / "tinyllama_dskd_cot2align_a0.9"
    import yaml

    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert (resolved["student"], resolved["alpha"], resolved["lora_rank"], resolved["lr"]) == \
        ("tinyllama-1.1b", 0.9, 256, 1e-3)
    assert (run / "eval" / "dolly_test" / "results.json").exists()
