"""Process-group setup: torchrun, ``python -m torch.distributed.launch``, SLURM's ``srun`` or plain ``python``.

torchrun and modern ``torch.distributed.launch`` export RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR; the latter also
passes ``--local-rank=N`` (older versions ``--local_rank N``). ``srun python ...`` (one task per GPU, no torchrun)
is recognised by SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID inside a job step; MASTER_ADDR then defaults to the
first node of the step and MASTER_PORT to 20000 + (SLURM_JOB_ID mod 10000). A plain ``python`` run is one process
without a process group; a launcher's single process (``torchrun --nproc_per_node 1``) gets one, so that it runs
the code of the multi-process case. NCCL on CUDA, gloo on CPU. Each process uses GPU ``local_rank % visible GPUs``, so one
visible GPU per task (per-task CUDA_VISIBLE_DEVICES) works as well as all GPUs of the node.
"""
import datetime
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, List, Mapping, Optional, Tuple

import torch
import torch.distributed as dist

from common.errors import SegCLIPError
from common.ranks import rank_and_world


class DistributedSetupError(SegCLIPError, RuntimeError):
    """The launch environment does not describe a usable process layout or device."""


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


def resolve_local_rank(local_rank_arg: Optional[int] = None) -> int:
    """The local rank from the flag, else the LOCAL_RANK variable, else 0."""
    if local_rank_arg is not None and local_rank_arg >= 0:
        return int(local_rank_arg)
    return int(os.environ.get("LOCAL_RANK", 0))


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list: 'gpu[003-005,9],cpu1' -> 'gpu003'."""
    m = re.match(r"([^,\[]+)(?:\[([^\]\-,]+))?", nodelist.strip())
    if not m:
        raise DistributedSetupError(f"cannot read the SLURM node list {nodelist!r}; set MASTER_ADDR")
    return m.group(1) + (m.group(2) or "")


def slurm_layout(environ: Mapping[str, str]) -> Optional[Tuple[int, int, int, dict]]:
    """(rank, world size, local rank, rendezvous defaults) of an ``srun`` task, None outside a SLURM job step
    or under a launcher that sets RANK / WORLD_SIZE itself (torchrun inside srun)."""
    if "RANK" in environ or "WORLD_SIZE" in environ:
        return None
    if not all(k in environ for k in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")):
        return None
    if "SLURM_STEP_ID" not in environ and "SLURM_STEPID" not in environ:
        return None                      # the batch script itself, not a task started by srun
    world = int(environ.get("SLURM_STEP_NUM_TASKS", environ["SLURM_NTASKS"]))
    defaults = {}
    if "MASTER_ADDR" not in environ:
        nodes = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
        if not nodes:
            raise DistributedSetupError("SLURM task without SLURM_STEP_NODELIST / SLURM_JOB_NODELIST: set MASTER_ADDR")
        defaults["MASTER_ADDR"] = first_slurm_host(nodes)
    if "MASTER_PORT" not in environ:
        defaults["MASTER_PORT"] = str(20000 + int(environ.get("SLURM_JOB_ID", "0")) % 10000)
    return int(environ["SLURM_PROCID"]), world, int(environ["SLURM_LOCALID"]), defaults


def select_device(device: Optional[str], local_rank: int) -> torch.device:
    """cuda:(local_rank % visible GPUs) when CUDA is used (requested, or available and nothing requested)."""
    use_cuda = torch.cuda.is_available() if device is None else str(device).startswith("cuda")
    if not use_cuda:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DistributedSetupError("--device cuda requested but CUDA is not available; use --device cpu")
    count = torch.cuda.device_count()
    dev = torch.device("cuda", local_rank % count)   # per-task CUDA_VISIBLE_DEVICES: one GPU, index 0
    torch.cuda.set_device(dev)
    return dev


def init_distributed(local_rank: Optional[int] = None, device: Optional[str] = None,
                     backend: Optional[str] = None, timeout_minutes: float = 60.0) -> DistEnv:
    """Initialise the default process group when launched with more than one process (env:// rendezvous).

    Returns the rank layout and the device this process computes on.
    """
    slurm = slurm_layout(os.environ)
    if slurm is not None:
        rank, world_size, slurm_local, defaults = slurm
        for k, v in dict(defaults, RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(slurm_local)).items():
            os.environ.setdefault(k, v)      # env:// rendezvous, resolve_local_rank and the data code read these
    local_rank = resolve_local_rank(local_rank)
    rank, world_size = rank_and_world()
    dev = select_device(device, local_rank)
    use_cuda = dev.type == "cuda"
    # A launcher's single process (torchrun --nproc_per_node 1) gets a process group too: the multi-GPU code path.
    launched = "RANK" in os.environ and "MASTER_ADDR" in os.environ
    if world_size <= 1 and not launched:
        return DistEnv(rank=0, world_size=1, local_rank=local_rank, device=dev, backend=None)
    if "MASTER_ADDR" not in os.environ:
        raise DistributedSetupError("WORLD_SIZE > 1 but MASTER_ADDR is not set: launch with torchrun, "
                                    "python -m torch.distributed.launch or srun")
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


def on_main_process(env: DistEnv, fn: Callable[[], Any]) -> None:
    """Run ``fn`` on rank 0 while the others wait; a user error there (e.g. no space left while saving) is raised
    on every rank, instead of leaving the others blocked in their next collective."""
    error = None
    if env.is_main:
        try:
            fn()
        except SegCLIPError as e:
            if not env.is_distributed:
                raise
            error = e
    if env.is_distributed:
        message = broadcast_object(env, None if error is None else str(error))
        if error is not None:
            raise error
        if message is not None:
            raise SegCLIPError(f"rank 0: {message}")


def cleanup(env: DistEnv) -> None:
    if env.is_distributed and dist.is_initialized():
        dist.destroy_process_group()
