"""The parts of a cache's row axis: which examples, blocks and rows each writer's part holds, where its per-row
arrays live, and how much of it is committed — for every format version, read in one place (the reader,
`cache info` and `cache verify` all walk the parts through `read_parts`).

Format 1 kept one part, its arrays beside the offsets (<cache>/std|cot/), its progress in the root manifest;
format 2 and later keep each writer's part under parts/<p>/, its progress (`blocks_done`) in parts/<p>/zarr.json.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cot2align.cache.format import VIEWS, CacheError

PER_ROW = ("input_ids", "target_ids", "hidden", "hidden_scale", "embeds", "topk_ids", "topk_logprobs", "tail_logprob",
           "target_logprob")


@dataclass
class Part:
    """A contiguous range of examples whose per-row arrays one writer filled."""

    number: int
    prefix: str                               # where its view groups live: "" (format 1) or "parts/<p>/"
    examples: tuple[int, int]                 # [first, end)
    blocks: tuple[int, int]                   # the manifest's block numbers [first, end)
    row_start: dict[str, int]                 # view -> the part's first global row
    groups: dict                              # view -> its zarr group
    arrays: dict[str, dict]                   # view -> name -> zarr array over the part's rows
    blocks_done: int                          # committed blocks (all of them when the cache is complete)
    committed: int                            # examples [first, committed) are readable (all when complete)

    def examples_of(self, view: str, offsets: np.ndarray, row_a: int, row_b: int) -> tuple[int, int]:
        """The examples [first, end) whose rows intersect the part's rows [row_a, row_b) of `view`."""
        a, b = self.row_start[view] + row_a, self.row_start[view] + row_b
        return (int(np.searchsorted(offsets, a, side="right")) - 1, int(np.searchsorted(offsets, b, side="left")))


def read_parts(manifest: dict, group, where) -> list[Part]:
    """The parts of the store opened as `group` at `where` (format 1: a single part beside the offsets)."""
    n = manifest["data"]["n_examples"]
    complete = manifest.get("status") == "complete"
    block_starts = manifest.get("progress", {}).get("blocks", [0, n])
    if manifest["format_version"] == 1:
        blocks = len(block_starts) - 1
        done = blocks if complete else int(manifest.get("progress", {}).get("blocks_done", 0))
        committed = n if complete else manifest.get("progress", {}).get("examples_done", 0)
        groups = {view: _group(group, view, where) for view in VIEWS}
        return [Part(0, "", (0, n), (0, blocks), {view: 0 for view in VIEWS}, groups, _arrays(groups), done,
                     committed)]
    parts = []
    for number, spec in enumerate(manifest["store"]["parts"]):
        prefix = f"parts/{number}/"
        first_block, end_block = spec["blocks"]
        done = end_block - first_block if complete else int(_group(group, prefix, where).attrs.get("blocks_done", 0))
        if not 0 <= done <= end_block - first_block or end_block >= len(block_starts):
            raise CacheError(f"{where}/{prefix}zarr.json: blocks_done {done} or the part's blocks {spec['blocks']} do not fit "
                             f"the manifest's {len(block_starts) - 1} blocks")
        committed = spec["examples"][1] if complete else block_starts[first_block + done]
        groups = {view: _group(group, f"{prefix}{view}", where) for view in VIEWS}
        parts.append(Part(number, prefix, tuple(spec["examples"]), (first_block, end_block),
                          {view: spec["rows"][view][0] for view in VIEWS}, groups, _arrays(groups), done, committed))
    return parts


def _group(root, path: str, where):
    """A group of the store, or a CacheError naming it (a part deleted or never created)."""
    try:
        return root[path.rstrip("/")]
    except KeyError:
        raise CacheError(f"{where}/{path.rstrip('/')}: missing (the manifest lists this part)") from None


def _arrays(groups: dict) -> dict[str, dict]:
    return {view: {name: g[name] for name in PER_ROW if name in g} for view, g in groups.items()}


def readable_prefix(parts: list[Part]) -> int:
    """Examples readable from the start of an unfinished cache: committed blocks, part after complete part."""
    n = 0
    for part in parts:
        n = part.committed
        if part.committed < part.examples[1]:
            break
    return n
