"""`cache merge`: caches of the same teacher built by separate jobs over halves of a dataset merge into one cache
equal to the one-pass cache of the whole (every array of every example id, and the distillation loss of a batch),
which verifies; what cannot merge is refused in one line, and nothing is left behind by a failed merge."""

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_cli_commands, write_cot_records
from cot2align.cache import CacheError, open_cache
from cot2align.cache.inspect import verify_cache
from cot2align.cache.merge import merge_caches
from cot2align.cache.storage import Location
from cot2align.config import CacheTeacherConfig, build_config
from cot2align.teacher.cache_pass import cache_teacher

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from s3server import seaweedfs  # noqa: E402

N = 16                # 4 blocks of 4 examples: each half is 2 whole blocks, batched as in the one-pass cache


def _build(data: Path, out: Path, **overrides) -> Path:
    settings = dict(model="tiny-llama", topk=8, block_examples=4, batch_tokens=2048, max_length=256,
                    max_prompt_length=128)
    cache_teacher(build_config(CacheTeacherConfig, data=str(data), out=str(out), **{**settings, **overrides}),
                  log=lambda message: None)
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The one-pass cache of examples 0..N-1 and the caches of each half, built separately."""
    root = tmp_path_factory.mktemp("merge")
    lines = write_cot_records(root / "all.jsonl", n=N).read_text().splitlines(keepends=True)
    (root / "first.jsonl").write_text("".join(lines[:N // 2]))
    (root / "second.jsonl").write_text("".join(lines[N // 2:]))
    return {name: _build(root / f"{name}.jsonl", root / name) for name in ("all", "first", "second")}


def _by_id(path) -> dict:
    """{example id: (its texts, every array of both views)} of a cache."""
    cache = open_cache(path)
    texts = cache.texts()
    return {texts["id"][i]: (cache.texts(i), {view: cache.view(i, view) for view in ("std", "cot")})
            for i in range(len(cache))}


def _assert_same_examples(a, b) -> None:
    a, b = _by_id(a), _by_id(b)
    assert a.keys() == b.keys()
    for example_id, (texts, views) in a.items():
        assert texts == b[example_id][0]
        for view, rows in views.items():
            other = b[example_id][1][view]
            assert rows.keys() == other.keys()
            for name, value in rows.items():
                if isinstance(value, np.ndarray):
                    assert np.array_equal(value, other[name]), f"{example_id} {view}/{name} differs"
                else:
                    assert value == other[name], f"{example_id} {view}/{name} differs"


def _batch_loss(path) -> tuple[list, torch.Tensor]:
    """The DSKD + CoT2Align loss of the first batch read from the cache at `path` (README's batch API), the
    student and projectors seeded alike."""
    from cot2align.losses.objective import build_projectors, distillation_loss
    from cot2align.modeling import load_model, load_tokenizer
    from cot2align.train.batches import cache_dataloader, load_heads, views

    torch.manual_seed(0)
    cache = open_cache(path)
    student, tokenizer = load_model("tiny-gpt2"), load_tokenizer("tiny-gpt2")
    student.eval()
    heads = load_heads(cache, student)
    batch = next(iter(cache_dataloader(cache, tokenizer, method="dskd", cot2align=True, batch_size=4, seed=0)))
    projectors = build_projectors("dskd", True, student.config.hidden_size, cache.hidden_size)
    with torch.no_grad():
        students, teachers = views(batch, student, heads)
        loss, _ = distillation_loss("dskd", 0.5, students, teachers, heads, projectors, cot2align=True)
    return [cache.texts(int(i))["id"] for i in batch["index"]], loss


def test_two_halves_merge_into_the_one_pass_cache(built, tmp_path):
    out = tmp_path / "merged"
    summary = merge_caches([str(built["first"]), str(built["second"])], str(out))
    assert summary == {"out": str(out), "n_examples": N, "parts": 2, "transfer": "hard links"}
    assert verify_cache(out) == []
    _assert_same_examples(out, built["all"])
    merged, single = open_cache(out), open_cache(built["all"])
    assert merged.texts()["id"] == single.texts()["id"]                       # the first half's, then the second's
    for view in ("std", "cot"):
        assert np.array_equal(merged.offsets(view), single.offsets(view))
    ids, loss = _batch_loss(out)
    single_ids, single_loss = _batch_loss(built["all"])
    assert ids == single_ids and torch.equal(loss, single_loss) and torch.isfinite(loss)
    manifest = merged.manifest
    assert manifest["progress"]["blocks"] == single.manifest["progress"]["blocks"] == [0, 4, 8, 12, 16]
    assert [p["examples"] for p in manifest["store"]["parts"]] == [[0, 8], [8, 16]]
    assert [i["url"] for i in manifest["merge"]["inputs"]] == [str(built["first"]), str(built["second"])]
    # the chunks were linked, not re-encoded: the merged part 1 is the second cache's part 0, file for file
    chunk = "std/hidden/c/0/0"
    assert os.path.samefile(out / "parts/1" / chunk, built["second"] / "parts/0" / chunk)
    assert verify_cache(built["first"]) == [] and verify_cache(built["second"]) == []


def test_order_is_the_order_given_and_copy_copies(built, tmp_path):
    out = tmp_path / "reversed"
    summary = merge_caches([str(built["second"]), str(built["first"])], str(out), copy_files=True)
    assert summary["transfer"] == "copies"
    ids = open_cache(built["all"]).texts()["id"]
    assert open_cache(out).texts()["id"] == ids[N // 2:] + ids[:N // 2]
    chunk = "std/hidden/c/0/0"
    assert not os.path.samefile(out / "parts/0" / chunk, built["second"] / "parts/0" / chunk)
    assert (out / "parts/0" / chunk).read_bytes() == (built["second"] / "parts/0" / chunk).read_bytes()
    assert verify_cache(out) == []
    _assert_same_examples(out, built["all"])


@pytest.mark.slow
def test_a_merged_cache_merges_again_part_by_part(built, tmp_path):
    """A merged cache (two parts) merged with a third cache: three parts, blocks renumbered, every array intact."""
    renamed = tmp_path / "renamed.jsonl"        # the second half again, under other ids
    records = [json.loads(line) for line in (built["second"].parent / "second.jsonl").read_text().splitlines()]
    renamed.write_text("".join(json.dumps(dict(r, id=f"again-{r['id']}")) + "\n" for r in records))
    third = _build(renamed, tmp_path / "third")
    once = tmp_path / "once"
    merge_caches([str(built["first"]), str(built["second"])], str(once))
    twice = tmp_path / "twice"
    merge_caches([str(once), str(third)], str(twice))
    assert verify_cache(twice) == []
    manifest = open_cache(twice).manifest
    assert [p["blocks"] for p in manifest["store"]["parts"]] == [[0, 2], [2, 4], [4, 6]]
    assert sorted(p.name for p in (twice / "parts/2/chunk_index").iterdir()) == ["4.json", "5.json"]
    merged, second = _by_id(twice), _by_id(built["second"])
    for example_id, (_, views) in second.items():
        for view, rows in views.items():
            again = merged[f"again-{example_id}"][1][view]
            assert all(np.array_equal(v, again[k]) for k, v in rows.items() if isinstance(v, np.ndarray))
    _assert_same_examples(once, built["all"])


def test_refusals_name_what_differs_in_one_line(built, tmp_path):
    def refused(inputs, out=tmp_path / "refused") -> str:
        with pytest.raises(CacheError) as e:
            merge_caches([str(i) for i in inputs], str(out))
        assert "\n" not in str(e.value) and not Path(out).exists()
        return str(e.value)

    first_id = open_cache(built["first"]).texts()["id"][0]
    assert f"example id {first_id!r} is in {built['first']} (example 0) and in {built['all']}" in refused(
        [built["first"], built["all"]])
    other = _build(built["second"].parent / "second.jsonl", tmp_path / "topk4", topk=4, limit=4)
    assert f"{other} differs from {built['first']} in store.topk (4 vs 8)" in refused([built["first"], other])
    longer = _build(built["second"].parent / "second.jsonl", tmp_path / "longer", max_length=200, limit=4)
    assert "in settings.max_length (200 vs 256)" in refused([built["first"], longer])
    assert "at least two caches" in refused([built["first"]])
    assert "inside the cache" in refused([built["first"], built["second"]], built["second"] / "sub")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("")
    with pytest.raises(CacheError, match="taken: exists; cache merge writes a new cache"):
        merge_caches([str(built["first"]), str(built["second"])], str(tmp_path / "taken"))
    # through the CLI: exit 2, one line
    done = run_cli_commands(tmp_path, [["cache", "merge", str(built["first"]), str(built["first"]), "--out", "x"]])
    lines = [line for line in done.stderr.splitlines() if line.strip() and not line.startswith("RUNNING")]
    assert done.returncode == 2 and len(lines) == 1 and "is in" in lines[0] and not (tmp_path / "x").exists()


def test_a_damaged_input_fails_the_merged_verify_and_nothing_is_kept(built, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(built["second"], damaged)
    chunk = damaged / "parts/0/cot/hidden/c/0/0"
    blob = bytearray(chunk.read_bytes())
    blob[len(blob) // 2] ^= 0x40
    chunk.write_bytes(bytes(blob))
    before = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*"))
    with pytest.raises(CacheError, match=r"does not verify \(.*parts/1/cot/hidden/c/0/0: unreadable chunk"):
        merge_caches([str(built["first"]), str(damaged)], str(tmp_path / "merged"))
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == before     # nothing left
    assert verify_cache(built["first"]) == []


@pytest.mark.slow
def test_merge_on_s3_copies_objects(built, tmp_path):
    with seaweedfs(tmp_path / "seaweed") as s3:
        urls = []
        for name in ("first", "second"):
            s3["fs"].put(str(built[name]), f"{s3['bucket'].removeprefix('s3://')}/{name}", recursive=True)
            urls.append(f"{s3['bucket']}/{name}")
        out = f"{s3['bucket']}/merged"
        summary = merge_caches(urls, out)
        assert summary["transfer"] == "server-side copies" and verify_cache(out) == []
        _assert_same_examples(out, built["all"])
        assert json.loads(s3["fs"].cat_file(f"{out.removeprefix('s3://')}/zarr.json"))["attributes"]["status"] == "complete"
        with pytest.raises(CacheError, match="all be local paths, or all on one object store"):
            merge_caches([urls[0], str(built["second"])], str(tmp_path / "mixed"))
        # a damaged chunk in an input: the merged cache does not verify, and nothing is left at --out
        chunk = f"{urls[1].removeprefix('s3://')}/parts/0/std/hidden/c/0/0"
        blob = bytearray(s3["fs"].cat_file(chunk))
        blob[len(blob) // 2] ^= 0x40
        s3["fs"].pipe_file(chunk, bytes(blob))
        with pytest.raises(CacheError, match="does not verify"):
            merge_caches(urls, f"{s3['bucket']}/failed")
        failed = Location(f"{s3['bucket']}/failed")
        failed.fs.invalidate_cache()
        left = [name for name in failed.fs.find(failed.root) if name.rstrip("/") != failed.root]   # (the prefix itself:
        assert left == [] and failed.is_empty()       # SeaweedFS keeps emptied directories) — a rerun may write there
