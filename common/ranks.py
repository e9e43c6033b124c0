"""Which process this is: rank and world size, the same answer for the data, the losses, the evaluation, the
training engine and the one-line error printer."""
import os
import sys
from typing import Tuple


def rank_and_world(use_env: bool = True) -> Tuple[int, int]:
    """(rank, world size): the initialised process group's; else, with ``use_env``, the launcher's RANK /
    WORLD_SIZE (torchrun sets them before any group exists); else (0, 1).

    torch is not imported here: a process that has not imported ``torch.distributed`` has no process group."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if use_env:
        return int(os.environ.get("RANK") or 0), int(os.environ.get("WORLD_SIZE") or 1)
    return 0, 1


def is_rank_zero() -> bool:
    return rank_and_world()[0] == 0
