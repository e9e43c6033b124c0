"""Data order of the training loop (design.md §6): which samples form which batch, reproducibly, on any layout.

Batches are deterministic functions of (seed, epoch, position): a sampler cuts a seeded permutation into global
batches and each rank takes its slice, and every sample's augmentation is drawn from its own RNG seeded by
(seed, epoch, index). So a resumed run sees exactly the batches an uninterrupted run would have seen, with any
number of loader workers. Streaming (iterable) datasets shard themselves and cannot seek: on resume the batches
already seen in the epoch are read and dropped.
"""
import os
import random
import signal
import time
from dataclasses import dataclass
from functools import partial
from typing import Any, Dict, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from common.errors import SegCLIPError
from dataloaders.workers import init_loader_worker, start_workers

from .distributed import DistEnv
from .stopping import shared_stop_flag


class DataLayoutError(SegCLIPError, ValueError):
    """The dataset, the batch size and the number of processes do not give whole optimizer steps."""


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample's augmentation, independent of rank, worker and batch layout."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(2, np.uint32).astype(np.uint64)
               .dot(np.array([1, 1 << 32], dtype=np.uint64)) & ((1 << 63) - 1))


class SeededDataset(Dataset):
    """Wraps a map-style dataset so item ``i`` in epoch ``e`` always gets the same random augmentation.

    The CPU torch / numpy / python RNGs are seeded per item and restored afterwards, so the caller's random stream
    (Gumbel and masking noise in the main process when num_workers is 0) is left untouched. Only the CPU torch
    generator is touched: ``torch.manual_seed`` would also reseed every CUDA generator, making the GPU noise of a
    batch depend on the index of its last sample.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        s = sample_seed(self.seed, self.epoch, index)
        torch_state, np_state, py_state = torch.get_rng_state(), np.random.get_state(), random.getstate()
        torch.default_generator.manual_seed(s)
        np.random.seed(s % (1 << 32))
        random.seed(s)
        try:
            return self.dataset[index]
        finally:
            torch.set_rng_state(torch_state)
            np.random.set_state(np_state)
            random.setstate(py_state)


class GlobalBatchSampler(Sampler):
    """Indices for one rank: a (seed, epoch) permutation cut into global micro-batches of ``world * local_batch``;
    rank r takes slice r of each. The last incomplete global batch is dropped (every rank needs a full batch for
    the all-gather). ``start_batch`` skips already-consumed global batches when resuming."""

    def __init__(self, num_samples: int, local_batch: int, rank: int, world_size: int, seed: int,
                 shuffle: bool = True):
        self.num_samples, self.local_batch = num_samples, local_batch
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.epoch, self.start_batch = 0, 0

    @property
    def num_batches(self) -> int:
        return self.num_samples // (self.local_batch * self.world_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return (self.num_batches - self.start_batch) * self.local_batch

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_samples, generator=g).tolist()
        else:
            order = list(range(self.num_samples))
        gb = self.local_batch * self.world_size
        for b in range(self.start_batch, self.num_batches):
            lo = b * gb + self.rank * self.local_batch
            yield from order[lo:lo + self.local_batch]


# How long a loader worker that got SIGTERM waits for the main process to say it is stopping too (a preemption
# signals every process of the job at about the same moment) before it takes the signal as meant for itself.
WORKER_SIGTERM_GRACE_S = 2.0


def _worker_sigterm_handler(stop_flag):
    def handle(signum, frame):
        deadline = time.monotonic() + WORKER_SIGTERM_GRACE_S
        while time.monotonic() < deadline:
            if stop_flag.value:          # the main process is finishing its step: keep serving batches
                return
            time.sleep(0.05)
        # Nobody is stopping: the signal is for this worker (its DataLoader, or Python's exit, terminating it).
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
    return handle


def guard_stop_signals_in_worker(stop_flag) -> None:
    """Loader workers leave SIGINT / SIGTERM to the main process, which finishes the step, saves and then shuts
    them down (Ctrl-C and SLURM signal every process of the job; a worker dying first would fail the last step).

    SIGTERM is not simply ignored: DataLoader and multiprocessing's exit handler terminate workers with it, and
    a worker deaf to it would hang the main process's exit forever (e.g. after an exception mid-epoch). A worker
    therefore obeys SIGTERM unless the main process has flagged a stop within WORKER_SIGTERM_GRACE_S.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _worker_sigterm_handler(stop_flag))


def init_train_worker(worker_id: int, stop_flag=None) -> None:
    """``worker_init_fn`` of the training loaders: stop signals guarded, one CPU thread (dataloaders.workers)."""
    guard_stop_signals_in_worker(stop_flag if stop_flag is not None else shared_stop_flag())
    init_loader_worker(worker_id)


@dataclass
class TrainData:
    """The loader of one rank and the epoch layout: ``micro_per_epoch`` micro-batches = ``steps_per_epoch``
    optimizer steps (an incomplete accumulation group at the end of an epoch is dropped)."""
    loader: DataLoader
    dataset: Any
    sampler: Optional[GlobalBatchSampler]
    seeded: Optional[SeededDataset]
    micro_per_epoch: int
    steps_per_epoch: int

    @property
    def iterable(self) -> bool:
        return self.sampler is None

    def epoch_batches(self, epoch: int, first_micro: int = 0) -> Iterator[Dict[str, Any]]:
        """The micro-batches of ``epoch`` from position ``first_micro`` on (CPU tensors, this rank's slice)."""
        if self.sampler is not None:
            self.sampler.set_epoch(epoch, first_micro)
            self.seeded.set_epoch(epoch)
        elif hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        it = start_workers(self.loader)
        if self.iterable:                        # a stream cannot seek: consume what was already seen
            for _ in range(first_micro):
                next(it, None)
        return it


def build_train_data(dataset, local_batch: int, env: DistEnv, *, seed: int, accum: int, num_workers: int,
                     pin_memory: bool, steps_per_epoch: int = 0, global_batch: int = 0) -> TrainData:
    """DataLoader + epoch layout for a map-style dataset (seeded, sharded by GlobalBatchSampler) or an
    IterableDataset that shards itself across ranks (``len()`` = samples per rank, or ``steps_per_epoch``)."""
    loader_gen = torch.Generator().manual_seed(seed)   # keeps DataLoader from drawing on the global RNG
    common = dict(batch_size=local_batch, num_workers=num_workers, drop_last=True, generator=loader_gen,
                  pin_memory=pin_memory and env.device.type == "cuda",
                  worker_init_fn=partial(init_train_worker, stop_flag=shared_stop_flag()) if num_workers > 0 else None)
    if isinstance(dataset, IterableDataset):
        sampler, seeded = None, None
        if hasattr(dataset, "set_batch_size"):   # dataloaders.webdataset_stream: the exact count, whole batches
            micro_per_epoch = dataset.set_batch_size(local_batch)   # per worker, so no partial batch is dropped
            common["drop_last"] = False
        else:
            try:
                micro_per_epoch = len(dataset) // local_batch
            except TypeError:
                micro_per_epoch = steps_per_epoch * accum
        if micro_per_epoch <= 0:
            raise DataLayoutError("the streaming dataset has no length: set --steps_per_epoch")
        loader = DataLoader(dataset, **common)
        size = "?"
    else:
        seeded = SeededDataset(dataset, seed)
        sampler = GlobalBatchSampler(len(dataset), local_batch, env.rank, env.world_size, seed)
        micro_per_epoch = sampler.num_batches
        loader = DataLoader(seeded, sampler=sampler, persistent_workers=False, **common)
        size = len(dataset)
    steps = micro_per_epoch // accum
    if steps <= 0:
        raise DataLayoutError(f"the dataset ({size} samples) is smaller than one global batch ({global_batch}); "
                              f"lower --batch_size or add data")
    return TrainData(loader, dataset, sampler, seeded, steps * accum, steps)


def to_device(batch: Dict[str, Any], device: torch.device) -> Dict[str, Any]:
    """Tensors of a batch on ``device``; asynchronous from pinned memory (``--use_pin_memory``)."""
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
