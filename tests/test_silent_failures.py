"""Every case of the adversarial review that once gave a silent wrong result or a traceback, reproduced with tiny
models in seconds: each must now be refused in one line (rc 2; `cache verify`: rc 1) or give the correct result.

README "What it promises" maps each promise to the tests here (and to the older reliability modules:
test_reliability.py, test_hostile_input.py, test_random_kills_*.py, test_disk_faults.py, test_locks.py).
Each section below imports what it needs inside its tests, so sections stay independent of one another.
"""


# ==================================================================================================================
# 1. Damaged caches: a missing chunk, a chunk in the wrong place, a verify that agrees with open_cache
# ==================================================================================================================


# (end of section 1)


# ==================================================================================================================
# 2. Stale derived data: the students' memo of a rebuilt cache
# ==================================================================================================================


def test_a_rebuilt_cache_does_not_reuse_the_students_memo_of_the_old_build(tmp_path):
    """Build a cache, tokenise it for a MinED student (memoised in <cache>.students/), rebuild the cache at the same
    path with another teacher on the same data: the student's ids and MinED rows must equal those of a fresh copy
    of the rebuilt cache (no memo), not the old build's."""
    import shutil
    from pathlib import Path

    import numpy as np

    from conftest import write_cot_records
    from cot2align.align.vocab import vocab_map
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
        teacher_tok = cache.tokenizer()
        return tokenize_cache(cache, student, tokenizer_hash(student), 512, vocab_map(teacher_tok, student), teacher_tok)

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

# (end of section 2)


# ==================================================================================================================
# 3. Resume: the resolved configuration, identity fields compared
# ==================================================================================================================


# (end of section 3)


# ==================================================================================================================
# 4. Outputs: evaluate's results.json, symlinked outputs, no writable home, exit codes
# ==================================================================================================================


# (end of section 4)


# ==================================================================================================================
# 5. Crashes that are one-line errors: positions, a head smaller than the tokenizer, exact logits out of memory
# ==================================================================================================================


# (end of section 5)
