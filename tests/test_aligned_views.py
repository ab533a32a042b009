"""A cache where no example kept a rationale (its CoT view has no rows anywhere) still trains an aligned method
with CoT2Align on: the alignment's arrays exist only for the standard view, and the dataset reads the CoT view's
as empty, and ALM's chunk sums of that view are empty, not an index error (the transfer benchmark's smoke run hit
both: a KeyError on cot_mined_rows_offsets, then "index 0 is out of bounds for dimension 1 with size 0")."""

import json

from conftest import write_cot_records

from cot2align.config import CacheTeacherConfig, DistillConfig, build_config
from cot2align.teacher.cache_pass import cache_teacher
from cot2align.train.distill import distill


def test_aligned_methods_with_cot2align_train_when_no_example_has_a_rationale(tmp_path):
    data = write_cot_records(tmp_path / "data.jsonl", n=6, cot_every=10 ** 6)
    records = [json.loads(line) for line in data.read_text().splitlines()]
    for record in records:
        record.pop("rationale", None)
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    cache_teacher(build_config(CacheTeacherConfig, model="tiny-llama", data=str(data), out=str(tmp_path / "cache"),
                               topk=8, batch_tokens=4096), log=lambda m: None)
    for method in ("mined", "alm"):     # a teacher-row alignment, and a chunk alignment (whose loss met an empty view)
        summary = distill(build_config(DistillConfig, cache=str(tmp_path / "cache"), student="tiny-mistral",
                                       method=method, cot2align=True, out=str(tmp_path / method), max_steps=1,
                                       batch_size=2, val_examples=1, val_max_new_tokens=2), log=lambda m: None,
                          progress=False)
        assert summary["steps"] == 1, method
