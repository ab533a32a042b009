"""bench/store_profiles.py --smoke: both parts end to end at tiny sizes (tiny teachers, the package's sample
records). Asserts that every row is produced and what must hold whatever the sizes — a logits row is its full
twin without the hidden-state arrays, byte for byte — never a quality claim (BENCHMARKS.md's, from the full run)."""

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


@pytest.mark.slow
def test_store_profiles_smoke(tmp_path):
    import store_profiles

    sizes = store_profiles.main(["sizes", "--work", str(tmp_path), "--smoke"])
    assert len(sizes) == 4                            # 2 teachers x 1 k x 2 profiles
    for key, row in sizes.items():
        if row["store"] != "logits":
            continue
        full = sizes[key.replace(" logits", " full")]
        assert set(full["arrays"]) - set(row["arrays"]) == {"hidden"}
        assert all(row["arrays"][name] == full["arrays"][name] for name in row["arrays"])
        assert row["bytes_per_row"] < full["bytes_per_row"]
    assert (tmp_path / "sizes.md").read_text().count("\n") == 2 + len(sizes)

    ce = store_profiles.main(["ce", "--work", str(tmp_path), "--smoke"])
    assert set(ce) == set(store_profiles.ROWS)
    assert all(math.isfinite(row["mean"]) for row in ce.values())
