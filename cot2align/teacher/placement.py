"""`cache-teacher --device-map`: a teacher larger than one GPU, placed by accelerate's big-model loading.

from_pretrained(device_map=...) puts the teacher's layers on the GPUs listed in `max_memory` in order, then on the
CPU, then in `offload_folder` on disk; a hook on each layer brings its weights to its execution device when it
runs (README "A teacher larger than one GPU"). The cache does not depend on where the layers ran: --device-map,
--max-memory and --offload-folder are runtime settings, and the arrays equal those of the unsplit pass.

Under torchrun the pass gives each rank a part of the examples (cache_pass.py). With --device-map the usual launch
is one rank per node (`--nproc_per_node 1`), whose teacher spans every GPU of its node; with several ranks on a
node, the node's GPUs are shared out in equal contiguous groups (LOCAL_RANK r of n gets GPUs r·g/n … (r+1)·g/n - 1).
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager

import torch

from cot2align.config import CacheTeacherConfig, ConfigError, parse_max_memory


def local_gpus(local_rank: int, local_world: int, gpus: int) -> list[int]:
    """The GPUs of this node that the rank `local_rank` of `local_world` places its teacher on."""
    if local_world <= 1:
        return list(range(gpus))
    if gpus % local_world:
        raise ConfigError(f"--device-map: {local_world} ranks on this node cannot share its {gpus} GPU(s) equally; "
                          "launch one rank per node (torchrun --nproc_per_node 1) or a divisor of the GPU count")
    share = gpus // local_world
    return list(range(local_rank * share, (local_rank + 1) * share))


def max_memory_for(given: dict | None, mine: list[int], gpus: int) -> dict | None:
    """accelerate's max_memory for this rank: `given` (or, when another rank shares the node, each of this rank's
    GPUs whole) without the GPUs of the node's other ranks; None: accelerate's own default (every device)."""
    if given is None and len(mine) == gpus:
        return None
    if given is None:
        given = {i: torch.cuda.get_device_properties(i).total_memory for i in mine}
    return {device: size for device, size in given.items() if not isinstance(device, int) or device in mine}


@contextmanager
def placement(cfg: CacheTeacherConfig):
    """from_pretrained's placement arguments for --device-map (None without it), with a temporary offload folder
    (removed afterwards) when --offload-folder is not given."""
    if cfg.device_map is None:
        yield None
        return
    gpus = torch.cuda.device_count()
    mine = local_gpus(int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("LOCAL_WORLD_SIZE", "1")), gpus)
    max_memory = max_memory_for(parse_max_memory(cfg.max_memory), mine, gpus)
    if cfg.offload_folder is not None:
        yield {"device_map": cfg.device_map, "max_memory": max_memory, "offload_folder": cfg.offload_folder}
        return
    with tempfile.TemporaryDirectory(prefix="cot2align-offload-") as folder:
        yield {"device_map": cfg.device_map, "max_memory": max_memory, "offload_folder": folder}
