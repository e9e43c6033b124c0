"""CPU threads of data loading: one per loader worker, the remaining cores for the main process (docs/training.md).

Every DataLoader worker process decodes, crops and tokenizes one sample at a time; left alone, each would also start
an OpenMP pool (torch) and an OpenCV pool as wide as the machine, so W workers + the main process run W x cores
threads on the cores and spin (training 10x slower seen on a 2-core machine). ``init_loader_worker`` (pass it as
``worker_init_fn``) caps a worker at one thread; ``main_process_threads`` gives the main process what is left of
this process's share of the cores.
"""
import os
import sys
from typing import Iterator

import torch


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, e.g. a SLURM or container limit), not the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def init_loader_worker(worker_id: int) -> None:
    """``worker_init_fn`` of every loader: torch/OpenMP and OpenCV use one thread in this worker process."""
    import cv2  # only where loader workers run; the training path itself never needs OpenCV
    torch.set_num_threads(1)
    cv2.setNumThreads(1)


def main_process_threads(num_workers: int, local_world_size: int = 0) -> int:
    """Intra-op threads for the main process: its share of the cores (cores / processes on this node) minus its
    loader workers, at least 1. ``local_world_size`` 0 reads torchrun's LOCAL_WORLD_SIZE (default 1)."""
    procs = local_world_size or int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return max(1, available_cores() // max(1, procs) - max(0, num_workers))


def set_main_process_threads(num_workers: int, local_world_size: int = 0) -> int:
    """Apply ``main_process_threads`` with ``torch.set_num_threads``, unless OMP_NUM_THREADS is set (the user's
    choice wins); returns the thread count in use."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(main_process_threads(num_workers, local_world_size))
    return torch.get_num_threads()


def start_workers(loader) -> Iterator:
    """``iter(loader)``, with this process's OpenCV pool at one thread while the loader forks its workers.

    A worker forked while OpenCV's thread pool runs inherits a pool whose threads did not survive the fork, and
    ``cv2.setNumThreads`` in ``init_loader_worker`` then waits for them forever (e.g. training's second epoch after
    an in-process evaluation). With the pool stopped at fork time the workers start clean; the count is restored at
    once (the pool restarts lazily)."""
    cv2 = sys.modules.get("cv2")
    if cv2 is None or not getattr(loader, "num_workers", 0):
        return iter(loader)
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        return iter(loader)
    finally:
        cv2.setNumThreads(threads)
