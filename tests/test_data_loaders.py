"""Pretraining loaders: item contract, 2022 formats, concatenation, bad data, transforms, worker/rank splitting."""
import argparse
import json
import math
import os
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import ConcatDataset, DataLoader, DistributedSampler

from dataloaders import stores
from dataloaders.datasets import StoreDataset
from dataloaders.imageio import encode_for_store
from dataloaders.pretrain import add_data_args, build_pretrain_dataset
from tests.helpers import (PATCH_SIZE, caption_for, cc_caption_for, data_arg_defaults, jpeg_bytes, make_tiny_coco,
                           random_image, run_or_fail_on_hang, write_cc3m_shards, write_legacy_cc3m, write_legacy_coco, write_legacy_superpixels)
from dataloaders.webdataset_stream import EpochPlan, WebDatasetStream
from dataloaders.transforms import CLIP_MEAN, CLIP_STD, RandomResizedCropBox, TrainTransform
from dataloaders import superpixels as sp
from modules.tokenization_clip import tokenize_captions


def ns(max_words=32, use_seglabel=False, **kw):
    return argparse.Namespace(**{**data_arg_defaults(), **kw}, max_words=max_words, use_seglabel=use_seglabel)


def ids_key(item):
    return tuple(item["input_ids"].tolist())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_coco(tmp_path_factory.mktemp("tiny"), n_images=4, captions_per_image=2)


@pytest.fixture(scope="module")
def cc_store(tmp_path_factory):
    from dataloaders.build_stores import build_cc3m_store
    root = tmp_path_factory.mktemp("cc")
    write_cc3m_shards(root / "raw", n_shards=2, per_shard=3)
    build_cc3m_store(root / "raw", root / "store", progress=False)
    return root / "store"


def test_add_data_args_leaves_training_flags_alone():
    p = argparse.ArgumentParser()
    for flag in ("--max_words", "--use_seglabel", "--seed", "--batch_size"):
        p.add_argument(flag)
    add_data_args(p)  # would raise on a conflicting flag
    a = p.parse_args(["--datatype", "cc,coco,", "--superpixel_reduce", "majority"])
    assert a.datatype == "cc,coco," and a.data_format == "auto" and a.superpixel_reduce == "majority"


def test_item_contract_and_captions(tiny):
    ds = build_pretrain_dataset(ns(**tiny["args"], max_words=12, use_seglabel=True), PATCH_SIZE)
    assert len(ds) == tiny["n_samples"] == 8
    expected = {tuple(tokenize_captions([caption_for(i, j)], 12)[0][0].tolist()) for i in range(4) for j in range(2)}
    items = [ds[i] for i in range(len(ds))]
    assert {ids_key(it) for it in items} == expected  # one sample per caption
    it = items[0]
    assert set(it) == {"input_ids", "attention_mask", "image", "superpixels", "skipped"}
    assert all(x["skipped"] == 0 for x in items)
    assert it["input_ids"].dtype == torch.long and it["input_ids"].shape == (12,)
    assert it["attention_mask"].tolist() == (it["input_ids"] != 0).long().tolist()
    assert it["image"].dtype == torch.float32 and it["image"].shape == (3, 224, 224)
    assert it["superpixels"].dtype == torch.long and it["superpixels"].shape == (14, 14)
    assert "superpixels" not in build_pretrain_dataset(ns(**tiny["args"]), PATCH_SIZE)[0]


def test_concatenation_cc_coco(tiny, cc_store):
    ds = build_pretrain_dataset(ns(**{**tiny["args"], "datatype": "cc,coco,", "cc_store": str(cc_store)}), PATCH_SIZE)
    assert isinstance(ds, ConcatDataset) and len(ds) == 6 + 8
    got = {ids_key(ds[i]) for i in range(len(ds))}
    cc_caps = {tuple(tokenize_captions([cc_caption_for(n)], 32)[0][0].tolist()) for n in range(6)}
    assert cc_caps <= got and len(got) == 14
    with pytest.raises(ValueError, match="holds 'cc3m' data"):
        build_pretrain_dataset(ns(**{**tiny["args"], "coco_store": str(cc_store)}), PATCH_SIZE)


def test_bad_configuration_is_a_clear_error(tiny, tmp_path):
    with pytest.raises(ValueError, match="--cc_store is not set"):
        build_pretrain_dataset(ns(datatype="cc,coco", coco_store=tiny["store"]), PATCH_SIZE)
    with pytest.raises(ValueError, match="does not exist"):
        build_pretrain_dataset(ns(datatype="coco", coco_store=str(tmp_path / "missing")), PATCH_SIZE)
    with pytest.raises(ValueError, match="not a store written by preprocess"):
        build_pretrain_dataset(ns(datatype="coco", coco_store=str(tmp_path)), PATCH_SIZE)
    with pytest.raises(ValueError, match="unknown source"):
        build_pretrain_dataset(ns(datatype="laion"), PATCH_SIZE)
    with pytest.raises(ValueError, match="cannot be mixed"):
        build_pretrain_dataset(ns(datatype="wds,coco"), PATCH_SIZE)
    with pytest.raises(ValueError, match="superpixel store .* not found"):
        build_pretrain_dataset(ns(**{**tiny["args"], "coco_superpixels": str(tmp_path / "nope")}, use_seglabel=True), PATCH_SIZE)


def test_legacy_2022_formats(tmp_path):
    cc = write_legacy_cc3m(tmp_path / "cc", n=3)
    coco = write_legacy_coco(tmp_path / "coco", n_images=3, captions_per_image=2)
    args = ns(datatype="cc,coco", cc_store=cc["root"], coco_store=coco["root"], use_seglabel=True)
    with pytest.raises(ValueError, match="--allow_pickle"):
        build_pretrain_dataset(args, PATCH_SIZE)
    args.allow_pickle = True
    with pytest.warns(UserWarning, match="unpickling"):
        ds = build_pretrain_dataset(args, PATCH_SIZE)
    assert len(ds) == 3 + 3 * 2
    got = {ids_key(ds[i]) for i in range(len(ds))}
    for cap in list(cc["captions"].values()) + [caption_for(i, j) for i in range(3) for j in range(2)]:
        assert tuple(tokenize_captions([cap], 32)[0][0].tolist()) in got
    # superpixels come from the 2022 zlib-JSON LMDB: labels of a crop = design.md §6 pooling of the stored map
    legacy_cc = ds.datasets[0]
    key = legacy_cc.key(1)
    labels = legacy_cc.superpixels.labels(key, None)
    np.testing.assert_array_equal(labels, sp.felzenszwalb(np.asarray(Image.open(
        __import__("io").BytesIO(cc["images"][key])).convert("RGB"))))
    assert legacy_cc.superpixels.computed == 0


def _store_with(tmp_path, values):
    w = stores.StoreWriter(tmp_path / "s", "coco")
    for k, (data, caps) in values.items():
        w.put(k, data, caps)
    w.close()
    return tmp_path / "s"


def test_corrupt_image_is_replaced_at_random_and_counted(tmp_path, caplog):
    """A corrupt image's item is a random other sample (a different one from epoch to epoch, not always the
    neighbour) flagged skipped = 1; the per-epoch sum of batch['skipped'] counts it with any number of workers."""
    from engine.loaders import SeededDataset
    good = encode_for_store(jpeg_bytes(random_image(np.random.default_rng(0))))[0]
    names = ["first", "second", "third", "fourth", "fifth"]
    store = _store_with(tmp_path, {k: (b"broken" if k == "b" else good, [c]) for k, c in zip("abcde", names)})
    ds = StoreDataset(store, max_words=8, patch_size=PATCH_SIZE)
    bad = ds.sample_key.tolist().index(ds.keys.tolist().index(b"b"))
    caption_of = {tuple(tokenize_captions([c], 8)[0][0].tolist()): c for c in names}
    seeded = SeededDataset(ds, seed=0)
    replacements = set()
    for epoch in range(6):
        seeded.set_epoch(epoch)
        item = seeded[bad]
        assert item["skipped"] == 1 and caption_of[ids_key(item)] != "second"
        replacements.add(caption_of[ids_key(item)])
    assert len(replacements) > 1 and "image 'b' unusable" in caplog.text
    for workers in (0, 2):  # the count reaches the training loop through the batches
        seeded.set_epoch(0)
        loader = DataLoader(seeded, batch_size=2, num_workers=workers)
        assert sum(int(b["skipped"].sum()) for b in loader) == 1
    damaged = _store_with(tmp_path / "x", {k: (b"broken", ["c"]) for k in "abc"})
    with pytest.raises(stores.StoreError, match="damaged"):
        StoreDataset(damaged, max_words=8, max_retries=5, patch_size=PATCH_SIZE)[0]


def test_missing_superpixel_entry(tiny, tmp_path):
    from dataloaders.build_stores import build_superpixel_store
    partial = tmp_path / "partial.lmdb"
    build_superpixel_store(tiny["store"], partial, max_samples=1, progress=False)  # only the first image
    ds = StoreDataset(tiny["store"], max_words=8, patch_size=PATCH_SIZE, use_seglabel=True, superpixel_path=partial)
    random.seed(0)
    item = ds[7]  # last image: not in the partial store -> computed on the fly, counted
    assert ds.superpixels.computed == 1 and item["superpixels"].shape == (14, 14)
    full = StoreDataset(tiny["store"], max_words=8, patch_size=PATCH_SIZE, use_seglabel=True)
    random.seed(0)
    assert torch.equal(full[7]["superpixels"], item["superpixels"]) and full.superpixels.computed == 0
    # --superpixel_missing error: refused when the dataset is built (one line naming the count and the fix),
    # not a KeyError inside a loader worker hours later
    with pytest.raises(stores.StoreError) as e:
        StoreDataset(tiny["store"], max_words=8, patch_size=PATCH_SIZE, use_seglabel=True, superpixel_path=partial,
                     superpixel_missing="error")
    msg = str(e.value)
    assert "\n" not in msg and "lacks 3 of 4 images" in msg and "build_superpixels.py" in msg
    StoreDataset(tiny["store"], max_words=8, patch_size=PATCH_SIZE, use_seglabel=True, superpixel_missing="error")


def test_random_resized_crop_box_formula():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 130, 3), dtype=np.uint8))
    crop = RandomResizedCropBox(224)
    for seed in range(20):
        i, j, h, w = crop.get_params(130, 90, random.Random(seed))
        assert 0.45 <= h * w / (130 * 90) <= 1.0 and 0.7 <= w / h <= 1.4  # scale (0.5, 1), ratio (3/4, 4/3), rounded
        out, box = crop(img, random.Random(seed))
        assert box == pytest.approx((j / 129, i / 89, (j + w - 1) / 129, (i + h - 1) / 89))
        ref = img.crop((j, i, j + w, i + h)).resize((224, 224), Image.BICUBIC)
        np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
    assert crop(Image.new("RGB", (1, 40)), random.Random(0))[1] == (0.0, 0.0, 0.0, 0.0)


def test_clip_normalisation():
    tensor, box = TrainTransform(224)(Image.new("L", (300, 250), 128), random.Random(0))
    expected = [(128 / 255 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD)]
    assert tensor.shape == (3, 224, 224) and box.shape == (4,)
    for c in range(3):
        assert tensor[c].mean().item() == pytest.approx(expected[c], abs=1e-5)


def test_dataloader_two_workers_two_ranks_cover_every_sample_once(tiny):
    ds = build_pretrain_dataset(ns(**tiny["args"], use_seglabel=True), PATCH_SIZE)
    for epoch in range(2):
        seen = []
        for rank in range(2):
            sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=0)
            sampler.set_epoch(epoch)
            loader = DataLoader(ds, batch_size=2, sampler=sampler, num_workers=2)
            for batch in loader:
                assert batch["superpixels"].shape == (2, 14, 14)
                seen += [tuple(r.tolist()) for r in batch["input_ids"]]
        assert len(seen) == len(ds) == len(set(seen))


WDS_RANK_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch.distributed as dist
    from torch.utils.data import DataLoader
    from dataloaders.webdataset_stream import WebDatasetStream
    dist.init_process_group("gloo")
    out = {}
    ds = WebDatasetStream(sys.argv[1], patch_size=16, max_words=16, use_seglabel=True, image_size=64)
    out["batches"] = ds.set_batch_size(3)
    for epoch in range(2):
        ds.set_epoch(epoch)
        loader = DataLoader(ds, batch_size=3, num_workers=2, drop_last=False)
        batches = list(loader)
        out[f"{epoch}/sizes"] = [len(b["input_ids"]) for b in batches]
        out[f"{epoch}/ids"] = [r.tolist() for b in batches for r in b["input_ids"]]
        out[f"{epoch}/skipped"] = sum(int(b["skipped"].sum()) for b in batches)
        out["len"] = [len(ds), len(loader)]
    with open(os.path.join(sys.argv[2], f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump(out, f)
    dist.destroy_process_group()
""")


def caption_ids(n: int, max_words: int = 16) -> set:
    """Token ids of the captions of samples 0..n-1 written by write_cc3m_shards (each names its sample)."""
    return {tuple(tokenize_captions([cc_caption_for(i)], max_words)[0][0].tolist()) for i in range(n)}


def test_webdataset_stream_exact_epochs_torchrun(tmp_path):
    """5 equal shards x 4 samples on 2 ranks x 2 workers (torchrun, gloo): every sample exactly once per epoch,
    the same number of batches on both ranks, equal to set_batch_size's count (20/2 = 10 a rank = 3+3+3+1)."""
    write_cc3m_shards(tmp_path / "shards", n_shards=5, per_shard=4, seed=5)
    (tmp_path / "script.py").write_text(WDS_RANK_SCRIPT)
    rc, _, err = run_or_fail_on_hang([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                      "--nproc_per_node=2", tmp_path / "script.py", tmp_path / "shards", tmp_path],
                                     240, "torchrun run of the streaming loader timed out")
    assert rc == 0, err[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    orders = []
    for epoch in range(2):
        seen = [tuple(x) for r in ranks for x in r[f"{epoch}/ids"]]
        assert len(seen) == 20 and set(seen) == caption_ids(20), epoch  # every sample exactly once
        for r in ranks:
            assert sorted(r[f"{epoch}/sizes"]) == [1, 3, 3, 3] and r[f"{epoch}/skipped"] == 0
        assert ranks[0][f"{epoch}/sizes"] == ranks[1][f"{epoch}/sizes"]  # step k: one batch size on all ranks
        orders.append(seen)
    assert ranks[0]["batches"] == ranks[1]["batches"] == 4 and ranks[0]["len"] == ranks[1]["len"] == [10, 4]
    assert orders[0] != orders[1]  # shard order reshuffled per epoch


def _stream_epoch(ds, world: int, workers: int, batch: int, epoch: int, monkeypatch):
    """One epoch of every rank through the real DataLoader (rank/world from RANK/WORLD_SIZE, as without a process
    group; forked workers inherit them) -> per rank: list of batches."""
    out = []
    for rank in range(world):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", str(world))
        planned = ds.set_batch_size(batch)
        ds.set_epoch(epoch)
        loader = DataLoader(ds, batch_size=batch, num_workers=workers, drop_last=False)
        batches = list(loader)
        assert len(batches) == planned == len(loader)  # the count the training loop is given is the real one
        out.append(batches)
    return out


@pytest.mark.parametrize("sizes,world,workers,batch", [
    ((7, 3, 5, 1, 4), 2, 3, 2),      # unequal shards, more slots than shards, odd total (20 -> 10 a rank)
    ((4, 4, 4, 4, 4), 1, 2, 4),      # "5 equal shards and 2 workers": 2 of 20 were never seen before
    ((4, 3, 4), 3, 2, 2),            # 11 samples on 3 ranks: 3 a rank, 9 used, 2 (= 11 mod 3) held out
])
def test_webdataset_stream_exact_epochs_any_layout(tmp_path, monkeypatch, sizes, world, workers, batch):
    write_cc3m_shards(tmp_path / "shards", n_shards=len(sizes), per_shard=sizes)
    n = sum(sizes)
    ds = WebDatasetStream(tmp_path / "shards", patch_size=PATCH_SIZE, max_words=16, image_size=32)
    first = np.cumsum([0, *sizes])  # sample numbers of shard k: first[k] .. first[k+1]-1
    for epoch in range(2):
        ranks = _stream_epoch(ds, world, workers, batch, epoch, monkeypatch)
        per_rank = [[tuple(r.tolist()) for b in bs for r in b["input_ids"]] for bs in ranks]
        seen = [x for r in per_rank for x in r]
        assert len(seen) == len(set(seen)) == world * (n // world)  # nothing twice
        assert len({tuple(len(b["input_ids"]) for b in bs) for bs in ranks}) == 1  # step k: same size everywhere
        # left out: only the n mod world last samples of this epoch's shard order
        in_order = [i for k in ds.plan(epoch).order for i in range(first[k], first[k + 1])]
        assert set(seen) == {tuple(tokenize_captions([cc_caption_for(i)], 16)[0][0].tolist())
                             for i in in_order[:len(seen)]}


def test_webdataset_stream_plan_for_cc3m_layout():
    """The rule at CC3M's scale, without reading data: 332 shards of about 10k samples on 8 ranks x 10 workers.
    Every position 0..S-1 is read by exactly one (rank, worker) slot, in whole batches, and ranks run equal steps."""
    rng = np.random.default_rng(0)
    counts = [int(c) for c in rng.integers(9_000, 10_001, size=332)]
    world, workers, batch = 8, 10, 96
    plan = EpochPlan.make(counts, sum(counts), world, batch, seed=0, epoch=3)
    assert sorted(plan.order) == list(range(332))
    ranges = [plan.slot_range(r, w, workers) for r in range(world) for w in range(workers)]
    covered = np.zeros(sum(counts), dtype=np.int64)
    for lo, hi in ranges:
        covered[lo:hi] += 1
        got = sum(b - a for _, a, b, _ in plan.pieces(lo, hi))
        assert got == hi - lo
    assert (covered[:world * plan.per_rank] == 1).all() and (covered[world * plan.per_rank:] == 0).all()
    assert sum(counts) - world * plan.per_rank == sum(counts) % world
    for r in range(world):  # whole batches per worker except the rank's last one
        sizes = [hi - lo for lo, hi in ranges[r * workers:(r + 1) * workers]]
        assert sum(math.ceil(x / batch) for x in sizes) == plan.batches
        assert sum(x % batch != 0 for x in sizes) <= 1


def test_webdataset_stream_replaces_bad_samples_and_counts_them(tmp_path, monkeypatch):
    """A corrupt image and a missing caption keep the batch layout: each is replaced by a good sample of the same
    worker and flagged skipped = 1, so the epoch's sum of batch['skipped'] is 2 with any number of workers."""
    write_cc3m_shards(tmp_path / "s", n_shards=2, per_shard=4, corrupt=1, no_caption=1, seed=3)
    ds = WebDatasetStream(tmp_path / "s", patch_size=PATCH_SIZE, max_words=16, image_size=32)
    for workers in (0, 2):
        ranks = _stream_epoch(ds, 1, workers, 3, 0, monkeypatch)
        batches = ranks[0]
        assert sorted(len(b["input_ids"]) for b in batches) == [2, 3, 3]
        assert sum(int(b["skipped"].sum()) for b in batches) == 2
        ids = [tuple(r.tolist()) for b in batches for r in b["input_ids"]]
        bad = {cc_caption_for(2), cc_caption_for(3)}  # shard 0: samples 2 (no caption) and 3 (corrupt)
        assert set(ids) == caption_ids(8) - {tuple(tokenize_captions([c], 16)[0][0].tolist()) for c in bad}


def test_webdataset_stream_refuses_more_samples_than_the_shards_hold(tmp_path):
    write_cc3m_shards(tmp_path / "s", n_shards=1, per_shard=3)
    with pytest.raises(stores.StoreError, match="hold 3 samples"):
        WebDatasetStream(tmp_path / "s", patch_size=PATCH_SIZE, samples_per_epoch=4)


def test_training_loop_gets_the_exact_stream_length(tmp_path, monkeypatch):
    """engine.train's data step: with 2 loader workers and batches that do not divide a worker's share, the loop
    consumes exactly the planned batches and ends the epoch (it used to raise 'data loader ran out')."""
    from engine.distributed import DistEnv
    from engine.training import TrainConfig, train
    write_cc3m_shards(tmp_path / "s", n_shards=2, per_shard=7, seed=4)
    ds = WebDatasetStream(tmp_path / "s", patch_size=PATCH_SIZE, max_words=8, image_size=32)
    seen = []

    class Probe(torch.nn.Module):  # the loop only needs compute_losses, parameters and clip.logit_scale
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))
            self.clip = torch.nn.Module()
            self.clip.logit_scale = torch.nn.Parameter(torch.zeros(()))

        def compute_losses(self, input_ids, image, superpixels=None):
            seen.extend(tuple(r.tolist()) for r in input_ids)
            return {"total": self.w * image.mean()}

    res = train(Probe(), ds, TrainConfig(batch_size=4, epochs=1, num_workers=2, progress=False), DistEnv())
    # 14 samples in batches of 4 = 3 full + 1 of two (before: two workers of 7 yielded 1 + 1 batches, the loop
    # expected 14 // 4 = 3 and stopped with "data loader ran out")
    assert res.finished and res.global_step == 4
    assert sorted(seen) == sorted(caption_ids(14, 8))


def test_superpixels_of_other_images_are_refused(tiny, tmp_path):
    ds0 = StoreDataset(tiny["store"], max_words=8, patch_size=PATCH_SIZE)
    write_legacy_superpixels(tmp_path / "wrong.lmdb", {ds0.key(0): np.zeros((10, 12), dtype=np.int64)})
    ds = StoreDataset(tiny["store"], max_words=8, patch_size=PATCH_SIZE, use_seglabel=True, superpixel_path=tmp_path / "wrong.lmdb")
    with pytest.raises(ValueError, match="belongs to other images"):
        ds[0]


def test_image_size_flag_sets_crop_and_patch_grid(tiny):
    """--image_size 64: 64x64 crops and a 4x4 superpixel patch grid (a tiny model trains at its own resolution)."""
    p = add_data_args(argparse.ArgumentParser())
    assert p.parse_args([]).image_size == 224 and p.parse_args(["--image_size", "64"]).image_size == 64
    ds = build_pretrain_dataset(ns(**{**tiny["args"], "image_size": 64}, use_seglabel=True), PATCH_SIZE)
    it = ds[0]
    assert it["image"].shape == (3, 64, 64) and it["superpixels"].shape == (4, 4)
    with pytest.raises(ValueError, match="multiple of the model's patch size 16"):
        build_pretrain_dataset(ns(**{**tiny["args"], "image_size": 100}), PATCH_SIZE)
    # the patch grid is the model's: a patch-32 model gets a 2x2 grid on 64-pixel crops
    ds32 = build_pretrain_dataset(ns(**{**tiny["args"], "image_size": 64}, use_seglabel=True), patch_size=32)
    assert ds32[0]["superpixels"].shape == (2, 2)


class _ThreadProbe(torch.utils.data.Dataset):
    """Items report the thread pools of the process that loads them."""

    def __len__(self):
        return 2

    def __getitem__(self, i):
        import cv2
        return torch.tensor([torch.get_num_threads(), cv2.getNumThreads()])


def test_loader_workers_run_one_thread_and_the_main_process_the_rest(monkeypatch):
    from dataloaders.workers import available_cores, init_loader_worker, main_process_threads
    loader = DataLoader(_ThreadProbe(), batch_size=1, num_workers=2, worker_init_fn=init_loader_worker)
    assert all(b.tolist() == [[1, 1]] for b in loader)  # torch (OpenMP) and OpenCV: one thread per worker
    cores = available_cores()
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert main_process_threads(0) == cores and main_process_threads(cores + 3) == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun: 2 processes share this machine's cores
    assert main_process_threads(1) == max(1, cores // 2 - 1) == main_process_threads(1, local_world_size=2)


def test_half_filled_superpixel_store_is_one_line_in_training(tiny, tmp_path, repo_root, clip_file):
    """main_task_align.py --superpixel_missing error with a superpixel store that lacks images: exit code 2 and one
    line naming the store and the fix, before any step (it was a KeyError traceback from a loader worker)."""
    from dataloaders.build_stores import build_superpixel_store
    partial = tmp_path / "partial.lmdb"
    build_superpixel_store(tiny["store"], partial, max_samples=2, progress=False)
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    p = subprocess.run([sys.executable, "main_task_align.py", "--do_pretrain", "--datatype", "coco",
                        "--coco_store", tiny["store"], "--coco_superpixels", str(partial), "--use_seglabel",
                        "--superpixel_missing", "error", "--pretrained_clip_name", str(clip_file), "--first_stage_layer",
                        "2", "--batch_size", "2",
                        "--epochs", "1", "--num_thread_reader", "0", "--output_dir", str(tmp_path / "out"),
                        "--no_progress"], cwd=repo_root, env=dict(env, CUDA_VISIBLE_DEVICES=""),
                       capture_output=True, text=True, timeout=240)
    assert p.returncode == 2, p.stderr[-3000:]
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "lacks 2 of 4 images" in lines[0] and "build_superpixels.py" in lines[0], p.stderr
    assert "Traceback" not in p.stdout + p.stderr


OPENCV_POOL_THEN_WORKERS = textwrap.dedent("""
    import cv2, numpy as np, torch
    from torch.utils.data import DataLoader
    from dataloaders.workers import init_loader_worker, start_workers

    class Probe(torch.utils.data.Dataset):
        def __len__(self):
            return 4
        def __getitem__(self, i):
            return torch.tensor([torch.get_num_threads(), cv2.getNumThreads()])

    big = np.zeros((2000, 2000, 3), np.uint8)
    for _ in range(3):                      # the parent's OpenCV pool is running (as after an evaluation)
        cv2.GaussianBlur(big, (15, 15), 0)
    threads = cv2.getNumThreads()
    loader = DataLoader(Probe(), batch_size=1, num_workers=2, worker_init_fn=init_loader_worker)
    for epoch in range(2):
        seen = [b.tolist() for b in start_workers(loader)]
        assert seen == [[[1, 1]]] * 4, seen
    assert cv2.getNumThreads() == threads
    print("OK", flush=True)
""")


def test_loader_workers_start_after_opencv_ran_in_the_parent(tmp_path, repo_root):
    """A worker forked while the parent's OpenCV pool runs used to hang in cv2.setNumThreads (training's epoch after
    an in-process evaluation hung the same way)."""
    script = tmp_path / "cv_pool.py"
    script.write_text(OPENCV_POOL_THEN_WORKERS)
    rc, out, err = run_or_fail_on_hang([sys.executable, script], 120, "loader workers hung in cv2.setNumThreads "
                                       "after the parent had used OpenCV", cwd=repo_root)
    assert rc == 0 and "OK" in out, out[-2000:] + err[-2000:]
