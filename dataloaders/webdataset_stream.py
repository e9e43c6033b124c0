"""Train straight from img2dataset webdataset shards, no LMDB: an IterableDataset with rank/worker splitting.

The shard order is reshuffled every epoch (same permutation on every rank and worker). With at least as many shards
as (rank, worker) slots, each slot reads its own shards (``order[slot::slots]``); with fewer, every slot reads all
shards and keeps its share of the sample index, so each sample is used exactly once per epoch. An epoch is a fixed
number of samples per rank (``samples_per_epoch // world_size``; a slot whose shards run short cycles over them, one
with more stops early) so that all DDP ranks run the same number of steps and never deadlock. With shard splitting,
exact once-per-epoch coverage needs equal shard sizes (img2dataset's are, but for failures); otherwise a few samples
repeat or wait for the next epoch. Images get the same store-time resize as the LMDB
path, then the train transform; superpixels (``use_seglabel``) are computed on the fly (~50 ms per image).
"""
import json
import logging
import random
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from common.ranks import rank_and_world
from dataloaders.build_stores import iter_tar_samples, list_shards, sample_caption, sample_image
from dataloaders.imageio import decode_rgb, resize_short_side
from dataloaders.transforms import TrainTransform
from dataloaders import superpixels as sp

logger = logging.getLogger(__name__)


def count_samples(shards: List[Path]) -> int:
    """Samples in img2dataset shards: the ``NNNNN_stats.json`` 'successes' when present, else a scan of the tars."""
    total = 0
    for shard in shards:
        stats = shard.with_name(shard.stem + "_stats.json")
        if stats.is_file():
            try:
                total += int(json.loads(stats.read_text())["successes"])
                continue
            except (ValueError, KeyError):
                pass
        total += sum(1 for s in iter_tar_samples(shard) if sample_image(s) is not None)
    return total


class WebDatasetStream(IterableDataset):
    """Streaming pretraining samples (same item dict as the map-style datasets) from webdataset shards."""

    name = "wds"

    def __init__(self, shards, max_words: int = 32, use_seglabel: bool = False, samples_per_epoch: Optional[int] = None,
                 image_size: int = 224, patch_size: int = 16, superpixel_reduce: str = "mean", seed: int = 0):
        self.shards = list_shards(shards)
        self.samples_per_epoch = samples_per_epoch or count_samples(self.shards)
        if self.samples_per_epoch <= 0:
            raise ValueError(f"no samples found in {len(self.shards)} shard(s); check --wds_shards")
        self.max_words, self.use_seglabel = max_words, use_seglabel
        self.image_size, self.patch_size, self.reduce = image_size, patch_size, superpixel_reduce
        self.seed, self.epoch = seed, None
        self.transform = TrainTransform(image_size)
        self._rng = random.Random(seed)
        self.skipped = 0

    def set_epoch(self, epoch: int):
        """Reshuffle shard order for this epoch (call before iterating, like DistributedSampler.set_epoch)."""
        self.epoch = epoch

    def __len__(self) -> int:
        """Samples per rank per epoch (world size read now: call after the process group is initialised)."""
        return self.samples_per_epoch // rank_and_world()[1]

    def _slot_samples(self, order: List[Path], rank: int, world: int, wid: int, nw: int, per_rank: int):
        """One pass over the raw samples of this (rank, worker) slot, for a shard order shared by all slots."""
        slots, slot = world * nw, rank * nw + wid
        if len(order) >= slots:  # enough shards: each slot reads its own
            for shard in order[slot::slots]:
                yield from iter_tar_samples(shard)
            return
        # Few shards: every slot reads them all and keeps its share of the global sample index i: rank i % world,
        # then worker (i // world) % nw, up to per_rank samples a rank -> each sample exactly once per epoch.
        i = 0
        for shard in order:
            for s in iter_tar_samples(shard):
                j = i // world
                if j >= per_rank:
                    return
                if i % world == rank and j % nw == wid:
                    yield s
                i += 1

    def _item(self, s: dict) -> Optional[dict]:
        from modules.tokenization_clip import tokenize_captions
        data, cap = sample_image(s), sample_caption(s)
        if data is None or cap is None:
            return None
        try:
            img = resize_short_side(decode_rgb(data))
        except Exception as e:
            logger.warning("wds: skipping sample '%s' (%s: %s)", s.get("__key__"), type(e).__name__, e)
            return None
        image, box = self.transform(img, self._rng)
        ids, mask = tokenize_captions([cap], max_words=self.max_words)
        item = {"input_ids": ids[0], "attention_mask": mask[0], "image": image}
        if self.use_seglabel:
            labels = sp.felzenszwalb(np.asarray(img)).astype(np.int64)
            item["superpixels"] = torch.from_numpy(sp.patch_labels(labels, box, self.image_size, self.patch_size,
                                                                   self.reduce))
        return item

    def __iter__(self):
        rank, world = rank_and_world()
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        if self.epoch is None:
            self.epoch = 0
        epoch = self.epoch
        self.epoch += 1  # without set_epoch, each new iteration (epoch) still gets a new order
        per_rank = self.samples_per_epoch // world
        quota = per_rank // nw + (1 if wid < per_rank % nw else 0)
        # Shard order: same permutation in every slot (so the split stays a partition), new every epoch.
        order = list(self.shards)
        random.Random(self.seed * 1000003 + epoch).shuffle(order)
        # Own RNG per slot and epoch for the crops: distinct across workers/ranks, and the global state is untouched.
        self._rng = random.Random(self.seed * 7919 + epoch * 104729 + rank * 1009 + wid)
        made = 0
        while made < quota:  # a slot whose shards run short (corrupt samples, uneven shards) cycles to fill its quota
            got = 0
            for s in self._slot_samples(order, rank, world, wid, nw, per_rank):
                got += 1
                item = self._item(s)
                if item is None:
                    self.skipped += 1
                    continue
                made += 1
                yield item
                if made >= quota:
                    return
            if got == 0 or made == 0:
                raise RuntimeError(f"rank {rank} worker {wid}: no usable samples in its shards ({len(order)} shards "
                                   f"for {world * nw} rank x worker slots)")
