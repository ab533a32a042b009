"""Alignment diagnostics: `cot2align cache align-stats` and the figures a cross-tokenizer run logs at its start, on
real tokenizers (a Qwen2.5 teacher cache; GPT-2, Qwen2.5 and a byte-per-token student)."""

import json

import pytest
from click.testing import CliRunner

from conftest import write_cot_records


@pytest.fixture(scope="module")
def qwen_cache(tmp_path_factory):
    from cot2align.config import CacheTeacherConfig, build_config
    from cot2align.teacher.cache_pass import cache_teacher

    root = tmp_path_factory.mktemp("align_stats")
    data = write_cot_records(root / "data.jsonl", n=8, cot_every=1)
    cache_teacher(build_config(CacheTeacherConfig, model="tiny-qwen2", data=str(data), out=str(root / "cache"), topk=4,
                               batch_tokens=4096), log=lambda m: None)
    return root / "cache"


def _byte_per_token_tokenizer():
    """A byte-level tokenizer without merges: every byte its own token (a degenerate student for these figures)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from cot2align.align.vocab import _byte_level_decoder

    vocab = {char: byte for char, byte in _byte_level_decoder().items()}
    vocab["<eos>"] = 256
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def test_the_same_tokenizer_aligns_perfectly_and_another_family_is_measured(qwen_cache):
    from cot2align.align.stats import alignment_stats
    from cot2align.cache import open_cache
    from cot2align.modeling import load_tokenizer

    cache = open_cache(qwen_cache)
    same = alignment_stats(cache, load_tokenizer("tiny-qwen2"))
    for name in ("chunk_bytes_share", "one_to_one_bytes_share", "exact_token_share", "first_token_share",
                 "mined_coverage", "mined_exact_share", "vocab_exact_share"):
        assert same[name] == 1.0, name
    assert same["warnings"] == []
    gpt2 = alignment_stats(cache, load_tokenizer("tiny-gpt2"))
    assert gpt2["chunk_bytes_share"] == 1.0                 # both spell every response byte
    assert 0.5 < gpt2["exact_token_share"] < 1.0            # mostly the same words, not everywhere
    assert gpt2["digits_one_to_one_share"] < 1.0            # Qwen2.5 splits numbers into digits, GPT-2 does not
    assert gpt2["student_tokens_per_chunk"] >= 1.0 and gpt2["teacher_tokens_per_chunk"] >= 1.0


def test_a_degenerate_alignment_is_warned_about(qwen_cache):
    from cot2align.align.stats import alignment_stats
    from cot2align.cache import open_cache

    stats = alignment_stats(open_cache(qwen_cache), _byte_per_token_tokenizer(), with_mined=False)
    assert stats["chunk_bytes_share"] == 1.0                 # every byte still lies in a chunk...
    assert stats["exact_token_share"] < 0.2                  # ...but almost no token is the teacher's
    assert any(w.startswith("exact_token_share") for w in stats["warnings"])
    assert "mined_coverage" not in stats


def test_the_command_prints_the_figures(qwen_cache):
    from cot2align.cli import main

    result = CliRunner().invoke(main, ["cache", "align-stats", str(qwen_cache), "--student", "tiny-gpt2", "--json"])
    assert result.exit_code == 0, result.output
    stats = json.loads(result.output)
    assert stats["examples"] == 8 and stats["chunk_bytes_share"] == 1.0
    text = CliRunner().invoke(main, ["cache", "align-stats", str(qwen_cache), "--student", "tiny-gpt2", "--limit", "2"])
    assert text.exit_code == 0 and "exact_token_share" in text.output and "examples                   2" in text.output
    bad = CliRunner().invoke(main, ["cache", "align-stats", str(qwen_cache), "--student", "tiny-gpt2", "--limit", "0"])
    assert bad.exit_code == 2 and "--limit" in bad.output
    pinned = CliRunner().invoke(main, ["cache", "align-stats", str(qwen_cache), "--student", "tiny-gpt2",
                                       "--revision", "v1"])
    assert pinned.exit_code != 0 and "revision" in pinned.output      # a preset has no revisions: said, not ignored


def test_a_cross_tokenizer_run_logs_the_alignment_at_its_start(qwen_cache, tmp_path):
    from cot2align.config import DistillConfig, build_config
    from cot2align.train.distill import distill

    out = tmp_path / "run"
    distill(build_config(DistillConfig, cache=str(qwen_cache), student="tiny-gpt2", method="uld", cot2align=False,
                         alpha=0.5, max_steps=1, batch_size=4, lr=1e-3, val_examples=0, out=str(out),
                         report_to="none"), log=lambda m: None, progress=False)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first = records[0]
    assert "alignment" in first and first["alignment"]["chunk_bytes_share"] == 1.0
    assert "mined_coverage" not in first["alignment"]          # ULD needs no vocabulary map: none built for this
    assert sum("alignment" in r for r in records) == 1
