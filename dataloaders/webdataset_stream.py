"""Train straight from img2dataset webdataset shards, no LMDB: an IterableDataset with exact epochs (docs/data.md §2).

The epoch plan, the same in every rank and loader worker (``EpochPlan``):

1. The shards are permuted, seeded by (seed, epoch); in that order they form one sequence of N samples, each
   addressed by its position (shard sizes from img2dataset's ``*_stats.json``, else counted once).
2. The epoch uses S = W * floor(min(N, samples_per_epoch) / W) positions, W = world size: rank r takes the
   contiguous range of q = S / W positions starting at r * q. Every used sample is read exactly once; the
   N mod W (< W) samples that cannot be split evenly are the last of the permuted order, so a different few each
   epoch (all ranks must run batches of one size, which the loss's all-gather needs).
3. With batch size B (``set_batch_size``), a rank's q samples make T = ceil(q / B) batches, all of B samples but
   the last. Loader worker w takes a contiguous run of whole batches (T split as evenly as possible), so each
   worker's own batching gives exactly those batches and ``DataLoader(ds, batch_size=B, drop_last=False)`` yields
   T batches on every rank: ranks never disagree on the step count.

A sample that cannot be used (undecodable image, no image or no caption, a shard shorter than its stats file says)
is replaced by a random one of the last good samples of the same worker, so the batch layout stays as planned; the
replacement carries ``skipped = 1`` (see dataloaders.datasets for the item contract). Augmentation is drawn from
an RNG seeded by (seed, epoch, position): independent of world size and worker count. Images get the same
store-time resize as the LMDB path, then the train transform; superpixels (``use_seglabel``) are computed on the fly
(~50 ms per image).
"""
import collections
import logging
import math
import random
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from common.ranks import rank_and_world
from dataloaders import superpixels as sp
from dataloaders.imageio import decode_rgb, resize_short_side
from dataloaders.shards import iter_tar_samples, list_shards, sample_caption, sample_image, shard_sample_counts
from dataloaders.stores import StoreError
from dataloaders.transforms import TrainTransform
from modules.tokenization_clip import tokenize_captions

logger = logging.getLogger(__name__)

# Good raw samples a worker keeps to draw replacements for unusable ones from (~40 kB each).
REPLACEMENT_POOL = 16


def split_evenly(total: int, parts: int) -> List[int]:
    """Boundaries [b_0 = 0, ..., b_parts = total] of ``parts`` contiguous runs whose sizes differ by at most one."""
    return [p * (total // parts) + min(p, total % parts) for p in range(parts + 1)]


@dataclass(frozen=True)
class EpochPlan:
    """Which positions every (rank, worker) slot reads in one epoch (module docstring, rules 1-3)."""

    order: Tuple[int, ...]     # shard indices in this epoch's order
    counts: Tuple[int, ...]    # samples of each shard (indexed like the shard list, not like ``order``)
    per_rank: int              # q: samples of every rank
    batch_size: int            # B

    @classmethod
    def make(cls, counts: Sequence[int], samples: int, world: int, batch_size: int, seed: int, epoch: int):
        order = list(range(len(counts)))
        random.Random(f"shard-order/{seed}/{epoch}").shuffle(order)  # str seed: stable across processes
        return cls(tuple(order), tuple(counts), samples // world, batch_size)

    @property
    def batches(self) -> int:
        """T: batches of every rank."""
        return math.ceil(self.per_rank / self.batch_size)

    def slot_range(self, rank: int, worker: int, num_workers: int) -> Tuple[int, int]:
        """[lo, hi) of epoch positions read by loader worker ``worker`` of rank ``rank``: whole batches."""
        b = split_evenly(self.batches, num_workers)
        lo = rank * self.per_rank + min(b[worker] * self.batch_size, self.per_rank)
        hi = rank * self.per_rank + min(b[worker + 1] * self.batch_size, self.per_rank)
        return lo, hi

    def pieces(self, lo: int, hi: int) -> Iterator[Tuple[int, int, int, int]]:
        """(shard index, first, stop, epoch position of ``first``) covering epoch positions [lo, hi)."""
        offset = 0
        for shard in self.order:
            n = self.counts[shard]
            a, b = max(lo, offset), min(hi, offset + n)
            if a < b:
                yield shard, a - offset, b - offset, a
            offset += n
            if offset >= hi:
                return


class WebDatasetStream(IterableDataset):
    """Streaming pretraining samples (same item dict as the map-style datasets) from webdataset shards.

    patch_size: the model's (``SegCLIP.patch_size``): superpixel labels are pooled on its grid."""

    name = "wds"

    def __init__(self, shards, *, patch_size: int, max_words: int = 32, use_seglabel: bool = False,
                 samples_per_epoch: Optional[int] = None, image_size: int = 224, superpixel_reduce: str = "mean",
                 seed: int = 0):
        self.shards = list_shards(shards)
        self.counts = shard_sample_counts(self.shards)
        total = sum(self.counts)
        if total <= 0:
            raise StoreError(f"no samples found in {len(self.shards)} shard(s); check --wds_shards")
        if samples_per_epoch is not None and not 0 < samples_per_epoch <= total:
            raise StoreError(f"--wds_samples_per_epoch {samples_per_epoch}: the shards hold {total} samples; give at "
                             f"most that many (an epoch reads each sample at most once)")
        self.samples_per_epoch = samples_per_epoch or total
        self.max_words, self.use_seglabel = max_words, use_seglabel
        self.image_size, self.patch_size, self.reduce = image_size, patch_size, superpixel_reduce
        self.seed, self.epoch, self.batch_size = seed, None, 1
        self.transform = TrainTransform(image_size)

    def set_epoch(self, epoch: int):
        """Reshuffle shard order for this epoch (call before iterating, like DistributedSampler.set_epoch)."""
        self.epoch = epoch

    def set_batch_size(self, batch_size: int) -> int:
        """Plan epochs in batches of ``batch_size`` (the DataLoader's, per rank; before iterating).

        Returns the exact number of batches ``DataLoader(self, batch_size=batch_size, drop_last=False)`` yields per
        epoch on every rank, for any number of workers (world size read now: call after the process group is up)."""
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        return self.plan(0).batches

    def __len__(self) -> int:
        """Samples per rank per epoch (world size read now: call after the process group is initialised)."""
        return self.samples_per_epoch // rank_and_world()[1]

    def plan(self, epoch: int) -> EpochPlan:
        world = rank_and_world()[1]
        if self.samples_per_epoch < world:
            raise StoreError(f"{self.samples_per_epoch} samples per epoch cannot be split over {world} processes")
        return EpochPlan.make(self.counts, self.samples_per_epoch, world, self.batch_size, self.seed, epoch)

    def _item(self, s: dict, rng: random.Random) -> Optional[dict]:
        """A training item from a raw sample, or None when the sample is unusable."""
        data, cap = sample_image(s), sample_caption(s)
        if data is None or cap is None:
            logger.warning("wds: sample '%s' has no %s; replaced", s.get("__key__"), "image" if data is None
                           else "caption")
            return None
        try:
            img = resize_short_side(decode_rgb(data))
        except Exception as e:  # any undecodable image: replaced and counted, never the end of a multi-day run
            logger.warning("wds: sample '%s' unreadable (%s: %s); replaced", s.get("__key__"), type(e).__name__, e)
            return None
        image, box = self.transform(img, rng)
        ids, mask = tokenize_captions([cap], max_words=self.max_words)
        item = {"input_ids": ids[0], "attention_mask": mask[0], "image": image, "skipped": 0}
        if self.use_seglabel:
            labels = sp.felzenszwalb(np.asarray(img)).astype(np.int64)
            item["superpixels"] = torch.from_numpy(sp.patch_labels(labels, box, self.image_size, self.patch_size,
                                                                   self.reduce))
        return item

    def _raw_samples(self, plan: EpochPlan, lo: int, hi: int) -> Iterator[Tuple[int, Optional[dict]]]:
        """(epoch position, raw sample or None where the shard ended early) for every position in [lo, hi)."""
        for shard, first, stop, pos in plan.pieces(lo, hi):
            got = 0
            for s in iter_tar_samples(self.shards[shard], first, stop):
                yield pos + got, s
                got += 1
            if got < stop - first:
                logger.warning("wds: shard %s holds fewer samples than the %d its stats file says; %d replaced",
                               self.shards[shard], plan.counts[shard], stop - first - got)
            for p in range(pos + got, pos + stop - first):
                yield p, None

    def __iter__(self):
        rank, _ = rank_and_world()
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        if self.epoch is None:
            self.epoch = 0
        epoch = self.epoch
        self.epoch += 1  # without set_epoch, each new iteration (epoch) still gets a new order
        plan = self.plan(epoch)
        lo, hi = plan.slot_range(rank, wid, nw)
        pool = collections.deque(maxlen=REPLACEMENT_POOL)  # recent good raw samples
        owed = []  # positions still waiting for a replacement (nothing good seen yet in this worker)
        for pos, s in self._raw_samples(plan, lo, hi):
            rng = random.Random(f"augment/{self.seed}/{epoch}/{pos}")
            item = self._item(s, rng) if s is not None else None
            if item is None:
                owed.append(pos)
            else:
                pool.append(s)
                yield item
            while owed and pool:
                yield self._replacement(pool, owed.pop(0), epoch)
        if owed:
            raise StoreError(f"rank {rank} worker {wid}: none of the {hi - lo} samples at epoch positions "
                             f"{lo}..{hi - 1} is usable; check the shards (corrupt download?)")

    def _replacement(self, pool, pos: int, epoch: int) -> dict:
        """Item standing for the unusable sample at ``pos``: a random recent good sample, flagged ``skipped``."""
        rng = random.Random(f"replace/{self.seed}/{epoch}/{pos}")
        item = self._item(pool[rng.randrange(len(pool))], rng)
        item["skipped"] = 1
        return item
