"""Process-group setup for training: torchrun, ``python -m torch.distributed.launch`` or plain ``python``.

torchrun and modern ``torch.distributed.launch`` export RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR; the latter also
passes ``--local-rank=N`` (older versions ``--local_rank N``). A plain ``python`` run is one process without a
process group. NCCL on CUDA, gloo on CPU.
"""
import datetime
import os
from dataclasses import dataclass
from typing import Any, List, Optional

import torch
import torch.distributed as dist


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: Optional[str] = None     # None: no process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.backend is not None


def add_distributed_args(parser) -> None:
    """``--local_rank`` / ``--local-rank`` (both spellings of torch.distributed.launch) and ``--device``."""
    parser.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None,
                        help="set by torch.distributed.launch; LOCAL_RANK from torchrun is used when absent")
    parser.add_argument("--device", default=None,
                        help="'cuda' or 'cpu' (default: cuda when available, else cpu); each process uses "
                             "cuda:LOCAL_RANK")
    parser.add_argument("--dist_backend", default=None, choices=["nccl", "gloo"],
                        help="process-group backend (default: nccl on CUDA, gloo on CPU)")


def resolve_local_rank(local_rank_arg: Optional[int] = None) -> int:
    """The local rank from the flag, else the LOCAL_RANK variable, else 0."""
    if local_rank_arg is not None and local_rank_arg >= 0:
        return int(local_rank_arg)
    return int(os.environ.get("LOCAL_RANK", 0))


def init_distributed(local_rank: Optional[int] = None, device: Optional[str] = None,
                     backend: Optional[str] = None, timeout_minutes: float = 60.0) -> DistEnv:
    """Initialise the default process group when launched with WORLD_SIZE > 1 (env:// rendezvous).

    Returns the rank layout and the device this process computes on.
    """
    local_rank = resolve_local_rank(local_rank)
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    use_cuda = torch.cuda.is_available() if device is None else str(device).startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("--device cuda requested but CUDA is not available")
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"local rank {local_rank} has no GPU: only {torch.cuda.device_count()} visible")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size <= 1:
        return DistEnv(rank=0, world_size=1, local_rank=local_rank, device=dev, backend=None)
    if "MASTER_ADDR" not in os.environ:
        raise RuntimeError("WORLD_SIZE > 1 but MASTER_ADDR is not set: launch with torchrun or "
                           "python -m torch.distributed.launch")
    backend = backend or ("nccl" if use_cuda else "gloo")
    if not dist.is_initialized():
        kwargs = dict(backend=backend, init_method="env://", rank=rank, world_size=world_size,
                      timeout=datetime.timedelta(minutes=timeout_minutes))
        if use_cuda and backend == "nccl":
            kwargs["device_id"] = dev     # binds NCCL to this GPU (avoids a guess inside barrier())
        dist.init_process_group(**kwargs)
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=dev, backend=backend)


def barrier(env: DistEnv) -> None:
    if env.is_distributed:
        dist.barrier()


def all_gather_objects(env: DistEnv, obj: Any) -> List[Any]:
    """Every rank's ``obj`` (picklable, small), in rank order."""
    if not env.is_distributed:
        return [obj]
    out = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(env: DistEnv, obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not env.is_distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_true(env: DistEnv, flag: bool) -> bool:
    """Logical AND of a per-rank flag, so that every rank takes the same branch."""
    if not env.is_distributed:
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32,
                     device=env.device if env.backend == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def cleanup(env: DistEnv) -> None:
    if env.is_distributed and dist.is_initialized():
        dist.destroy_process_group()
