"""Pretraining loaders: item contract, 2022 formats, concatenation, bad data, transforms, worker/rank splitting."""
import argparse
import json
import math
import os
import random
import signal
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
from dataloaders.pretrain import add_data_args, build_pretrain_dataset
from dataloaders.testing import (caption_for, cc_caption_for, data_arg_defaults, make_tiny_coco, random_image, write_cc3m_shards,
                                 write_legacy_cc3m, write_legacy_coco)
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
    ds = build_pretrain_dataset(ns(**tiny["args"], max_words=12, use_seglabel=True))
    assert len(ds) == tiny["n_samples"] == 8
    expected = {tuple(tokenize_captions([caption_for(i, j)], 12)[0][0].tolist()) for i in range(4) for j in range(2)}
    items = [ds[i] for i in range(len(ds))]
    assert {ids_key(it) for it in items} == expected  # one sample per caption
    it = items[0]
    assert set(it) == {"input_ids", "attention_mask", "image", "superpixels"}
    assert it["input_ids"].dtype == torch.long and it["input_ids"].shape == (12,)
    assert it["attention_mask"].tolist() == (it["input_ids"] != 0).long().tolist()
    assert it["image"].dtype == torch.float32 and it["image"].shape == (3, 224, 224)
    assert it["superpixels"].dtype == torch.long and it["superpixels"].shape == (14, 14)
    assert "superpixels" not in build_pretrain_dataset(ns(**tiny["args"]))[0]


def test_concatenation_cc_coco(tiny, cc_store):
    ds = build_pretrain_dataset(ns(**{**tiny["args"], "datatype": "cc,coco,", "cc_store": str(cc_store)}))
    assert isinstance(ds, ConcatDataset) and len(ds) == 6 + 8
    got = {ids_key(ds[i]) for i in range(len(ds))}
    cc_caps = {tuple(tokenize_captions([cc_caption_for(n)], 32)[0][0].tolist()) for n in range(6)}
    assert cc_caps <= got and len(got) == 14
    with pytest.raises(ValueError, match="holds 'cc3m' data"):
        build_pretrain_dataset(ns(**{**tiny["args"], "coco_store": str(cc_store)}))


def test_bad_configuration_is_a_clear_error(tiny, tmp_path):
    with pytest.raises(ValueError, match="--cc_store is not set"):
        build_pretrain_dataset(ns(datatype="cc,coco", coco_store=tiny["store"]))
    with pytest.raises(ValueError, match="does not exist"):
        build_pretrain_dataset(ns(datatype="coco", coco_store=str(tmp_path / "missing")))
    with pytest.raises(ValueError, match="not a store written by preprocess"):
        build_pretrain_dataset(ns(datatype="coco", coco_store=str(tmp_path)))
    with pytest.raises(ValueError, match="unknown source"):
        build_pretrain_dataset(ns(datatype="laion"))
    with pytest.raises(ValueError, match="cannot be mixed"):
        build_pretrain_dataset(ns(datatype="wds,coco"))
    with pytest.raises(ValueError, match="superpixel store .* not found"):
        build_pretrain_dataset(ns(**{**tiny["args"], "coco_superpixels": str(tmp_path / "nope")}, use_seglabel=True))


def test_legacy_2022_formats(tmp_path):
    cc = write_legacy_cc3m(tmp_path / "cc", n=3)
    coco = write_legacy_coco(tmp_path / "coco", n_images=3, captions_per_image=2)
    args = ns(datatype="cc,coco", cc_store=cc["root"], coco_store=coco["root"], use_seglabel=True)
    with pytest.raises(ValueError, match="--allow_pickle"):
        build_pretrain_dataset(args)
    args.allow_pickle = True
    with pytest.warns(UserWarning, match="unpickling"):
        ds = build_pretrain_dataset(args)
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


def test_corrupt_image_skips_to_next_sample_and_is_counted(tmp_path, caplog):
    from dataloaders.imageio import encode_for_store
    good = encode_for_store(__import__("dataloaders.testing", fromlist=["jpeg_bytes"]).jpeg_bytes(
        random_image(np.random.default_rng(0))))[0]
    store = _store_with(tmp_path, {"a": (good, ["first"]), "b": (b"broken", ["second"]), "c": (good, ["third"])})
    ds = StoreDataset(store, max_words=8)
    assert ids_key(ds[1]) == tuple(tokenize_captions(["third"], 8)[0][0].tolist())
    assert ds.skipped == 1 and "skipping image 'b'" in caplog.text
    bad = _store_with(tmp_path / "x", {k: (b"broken", ["c"]) for k in "abc"})
    with pytest.raises(RuntimeError, match="damaged"):
        StoreDataset(bad, max_words=8, max_retries=5)[0]


def test_missing_superpixel_entry(tiny, tmp_path):
    from dataloaders.build_stores import build_superpixel_store
    partial = tmp_path / "partial.lmdb"
    build_superpixel_store(tiny["store"], partial, max_samples=1, progress=False)  # only the first image
    ds = StoreDataset(tiny["store"], max_words=8, use_seglabel=True, superpixel_path=partial)
    random.seed(0)
    item = ds[7]  # last image: not in the partial store -> computed on the fly, counted
    assert ds.superpixels.computed == 1 and item["superpixels"].shape == (14, 14)
    full = StoreDataset(tiny["store"], max_words=8, use_seglabel=True)
    random.seed(0)
    assert torch.equal(full[7]["superpixels"], item["superpixels"]) and full.superpixels.computed == 0
    strict = StoreDataset(tiny["store"], max_words=8, use_seglabel=True, superpixel_path=partial,
                          superpixel_missing="error")
    with pytest.raises(KeyError, match="COCO_train2014_000000000003.jpg"):
        strict[7]


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
    ds = build_pretrain_dataset(ns(**tiny["args"], use_seglabel=True))
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
    for shards in ("four", "two"):
        ds = WebDatasetStream(os.path.join(sys.argv[2], shards), max_words=16, use_seglabel=(shards == "two"))
        for epoch in range(2 if shards == "four" else 1):
            ds.set_epoch(epoch)
            loader = DataLoader(ds, batch_size=2, num_workers=2)
            out[f"{shards}/{epoch}"] = [r.tolist() for b in loader for r in b["input_ids"]]
            out[f"{shards}/len"] = [len(ds), len(loader)]
    with open(os.path.join(sys.argv[3], f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump(out, f)
    dist.destroy_process_group()
""")


def test_webdataset_stream_splits_over_ranks_and_workers(tmp_path, repo_root):
    write_cc3m_shards(tmp_path / "shards" / "four", n_shards=4, per_shard=3, seed=5)  # 4 shards = 2 ranks x 2 workers
    write_cc3m_shards(tmp_path / "shards" / "two", n_shards=2, per_shard=5, seed=6)   # fewer shards than slots
    (tmp_path / "script.py").write_text(WDS_RANK_SCRIPT)
    # own session so that a hang kills the whole launcher + ranks group, leaving no orphans behind
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(tmp_path / "script.py"), str(repo_root), str(tmp_path / "shards"), str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("torchrun run of the streaming loader timed out")
    assert proc.returncode == 0, err[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for name, n in (("four", 12), ("two", 10)):
        expected = {tuple(tokenize_captions([cc_caption_for(i)], 16)[0][0].tolist()) for i in range(n)}
        assert ranks[0][f"{name}/len"] == ranks[1][f"{name}/len"] == [n // 2, math.ceil(n / 2 / 2)]
        orders = []
        for epoch in range(2 if name == "four" else 1):
            seen = [tuple(x) for r in ranks for x in r[f"{name}/{epoch}"]]
            assert len(seen) == n and set(seen) == expected, (name, epoch)  # every sample exactly once
            orders.append(seen)
        if name == "four":
            assert orders[0] != orders[1]  # shard order reshuffled per epoch


def test_superpixels_of_other_images_are_refused(tiny, tmp_path):
    from dataloaders.testing import write_legacy_superpixels
    ds0 = StoreDataset(tiny["store"], max_words=8)
    write_legacy_superpixels(tmp_path / "wrong.lmdb", {ds0.key(0): np.zeros((10, 12), dtype=np.int64)})
    ds = StoreDataset(tiny["store"], max_words=8, use_seglabel=True, superpixel_path=tmp_path / "wrong.lmdb")
    with pytest.raises(ValueError, match="belongs to other images"):
        ds[0]


def test_image_size_flag_sets_crop_and_patch_grid(tiny):
    """--image_size 64: 64x64 crops and a 4x4 superpixel patch grid (a tiny model trains at its own resolution)."""
    p = add_data_args(argparse.ArgumentParser())
    assert p.parse_args([]).image_size == 224 and p.parse_args(["--image_size", "64"]).image_size == 64
    ds = build_pretrain_dataset(ns(**{**tiny["args"], "image_size": 64}, use_seglabel=True))
    it = ds[0]
    assert it["image"].shape == (3, 64, 64) and it["superpixels"].shape == (4, 4)
    with pytest.raises(ValueError, match="multiple of the patch size 16"):
        build_pretrain_dataset(ns(**{**tiny["args"], "image_size": 100}))
