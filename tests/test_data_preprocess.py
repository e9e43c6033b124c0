"""Preprocessing scripts run as subprocesses on generated raw COCO / CC3M inputs, read back through the loaders."""
import argparse
import io
import json
import subprocess
import sys

import lmdb
import numpy as np
import pytest
from PIL import Image

from dataloaders import stores
from tests.helpers import PATCH_SIZE, caption_for, data_arg_defaults, write_cc3m_shards, write_coco_raw


def run_script(repo_root, name, *args, check=True):
    proc = subprocess.run([sys.executable, str(repo_root / "preprocess" / name), "--no_progress", *map(str, args)],
                          capture_output=True, text=True, timeout=120)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("SUMMARY ")]
        assert line, proc.stdout
        return json.loads(line[-1][len("SUMMARY "):])
    return proc


def dump_store(path):
    """Every (table, key, value) of a store or plain LMDB, to compare stores byte for byte."""
    env = lmdb.open(str(path), readonly=True, lock=False, max_dbs=3)
    out = {}
    with env.begin() as txn:
        names = [bytes(k) for k, _ in txn.cursor()]
        tables = [None]
        if (path.name == stores.STORE_LMDB):
            tables = [env.open_db(n, txn=txn, create=False) for n in (b"images", b"captions", b"meta")]
        for i, db in enumerate(tables):
            out.update({(i, bytes(k)): bytes(v) for k, v in txn.cursor(db=db)})
    env.close()
    return out


@pytest.fixture(scope="module")
def coco_built(tmp_path_factory, repo_root):
    root = tmp_path_factory.mktemp("coco")
    # image 1 grayscale, image 2 CMYK: both must come out as RGB
    raw = write_coco_raw(root / "raw", n_images=4, captions_per_image=2, modes=["RGB", "L", "CMYK"])
    (root / "raw" / "train2014" / "COCO_train2014_000000000003.jpg").write_bytes(b"\xff\xd8 corrupt")
    store = root / "store"
    s1 = run_script(repo_root, "build_coco.py", "--karpathy_json", raw["karpathy_json"], "--image_root",
                    raw["image_root"], "--output_dir", store, "--workers", 2)
    s2 = run_script(repo_root, "build_superpixels.py", "--store", store, "--workers", 0)
    return root, raw, store, s1, s2


def test_coco_store_roundtrip(coco_built):
    root, raw, store, s1, s2 = coco_built
    assert s1["written"] == 3 and s1["failed"] == 1 and s1["images_in_store"] == 3  # the val image is not stored
    assert s2["written"] == 3
    env = lmdb.open(str(store / stores.STORE_LMDB), readonly=True, lock=False, max_dbs=3)
    with env.begin() as txn:
        images = env.open_db(b"images", txn=txn, create=False)
        for i in range(3):
            data = txn.get(f"COCO_train2014_{i:012d}.jpg".encode(), db=images)
            img = Image.open(io.BytesIO(data))
            src = Image.open(f"{raw['image_root']}/train2014/COCO_train2014_{i:012d}.jpg")
            assert img.mode == "RGB" and img.format == "JPEG"
            assert min(img.size) == 224 and abs(img.size[0] / img.size[1] - src.size[0] / src.size[1]) < 0.02
    env.close()

    from dataloaders.pretrain import build_pretrain_dataset
    args = argparse.Namespace(**{**data_arg_defaults(), "datatype": "coco", "coco_store": str(store)},
                              max_words=16, use_seglabel=True)
    ds = build_pretrain_dataset(args, PATCH_SIZE)
    assert len(ds) == 6  # 3 images x 2 captions, one sample per caption
    from modules.tokenization_clip import tokenize_captions
    expected = {tuple(tokenize_captions([caption_for(i, j)], 16)[0][0].tolist()) for i in range(3) for j in range(2)}
    seen = set()
    for k in range(len(ds)):
        item = ds[k]
        assert item["image"].shape == (3, 224, 224) and item["input_ids"].shape == (16,)
        assert item["superpixels"].shape == (14, 14) and item["superpixels"].dtype.is_floating_point is False
        seen.add(tuple(item["input_ids"].tolist()))
    assert seen == expected


def test_coco_superpixel_labels_equal_spec_pooling(coco_built, monkeypatch):
    """The loader's patch labels = Felzenszwalb of the stored image, cut with the crop box, pooled (design.md §6)."""
    root, raw, store, _, _ = coco_built
    from dataloaders.datasets import StoreDataset
    from dataloaders.imageio import decode_rgb
    from dataloaders import transforms
    from dataloaders import superpixels as sp
    ds = StoreDataset(store, max_words=16, use_seglabel=True, patch_size=PATCH_SIZE)
    boxes = []
    real = transforms.TrainTransform.__call__

    def spy(self, img, rng=None):
        out = real(self, img) if rng is None else real(self, img, rng)
        boxes.append(out[1])
        return out
    monkeypatch.setattr(transforms.TrainTransform, "__call__", spy)
    item = ds[0]
    stored = decode_rgb(ds.image_bytes(ds.key(0)))
    labels = sp.felzenszwalb(np.asarray(stored))
    np.testing.assert_array_equal(item["superpixels"].numpy(), sp.patch_labels(labels, boxes[0], 224, PATCH_SIZE))


def test_cc3m_store_skips_bad_samples_and_resumes(tmp_path, repo_root):
    shards = write_cc3m_shards(tmp_path / "raw", n_shards=3, per_shard=4, corrupt=1, no_caption=1)
    one = run_script(repo_root, "build_cc3m.py", "--shards", tmp_path / "raw", "--output_dir", tmp_path / "one",
                     "--workers", 2)
    assert (one["written"], one["failed"], one["no_caption"], one["images_in_store"]) == (10, 1, 1, 10)
    # shard 0 = 2 good + 1 without caption + 1 corrupt. Interrupted after 3 samples (inside shard 1), again after 4
    # more (across the shard 1/2 boundary), then finished
    part = tmp_path / "parts"
    a = run_script(repo_root, "build_cc3m.py", "--shards", *shards, "--output_dir", part, "--workers", 0,
                   "--max_samples", 3)
    b = run_script(repo_root, "build_cc3m.py", "--shards", f"{tmp_path}/raw/{{00000..00002}}.tar", "--output_dir",
                   part, "--workers", 0, "--max_samples", 4)
    c = run_script(repo_root, "build_cc3m.py", "--shards", tmp_path / "raw", "--output_dir", part, "--workers", 2)
    assert (a["written"], b["written"], c["written"]) == (3, 4, 3)
    # finished shards are skipped whole, the written keys of an unfinished shard one by one
    assert (b["shards_skipped"], b["already_done"]) == (1, 1) and (c["shards_skipped"], c["already_done"]) == (2, 1)
    assert dump_store(part / stores.STORE_LMDB) == dump_store(tmp_path / "one" / stores.STORE_LMDB)

    # superpixels: interrupted + resumed == one run
    s1 = run_script(repo_root, "build_superpixels.py", "--store", part, "--workers", 0, "--max_samples", 4)
    s2 = run_script(repo_root, "build_superpixels.py", "--store", part, "--workers", 2)
    s3 = run_script(repo_root, "build_superpixels.py", "--store", tmp_path / "one", "--workers", 2)
    assert (s1["written"], s2["written"], s2["already_done"], s3["written"]) == (4, 6, 4, 10)
    name = "superpixels_scale224_sigma9.0_min_size224.lmdb"
    assert dump_store(part / name) == dump_store(tmp_path / "one" / name)

    from dataloaders.pretrain import build_pretrain_dataset
    args = argparse.Namespace(**{**data_arg_defaults(), "datatype": "cc", "cc_store": str(part)}, max_words=32,
                              use_seglabel=True)
    ds = build_pretrain_dataset(args, PATCH_SIZE)
    assert len(ds) == 10
    item = ds[9]
    assert item["superpixels"].shape == (14, 14) and int(item["attention_mask"].sum()) > 2


def test_preprocess_bad_input_is_a_clear_error(tmp_path, repo_root):
    p = run_script(repo_root, "build_cc3m.py", "--shards", tmp_path / "nothing_here", "--output_dir", tmp_path / "o",
                   check=False)
    assert p.returncode == 2 and "not found" in p.stderr and "Traceback" not in p.stderr
    p = run_script(repo_root, "build_coco.py", "--karpathy_json", tmp_path / "missing.json", "--image_root", tmp_path,
                   "--output_dir", tmp_path / "o2", check=False)
    assert p.returncode == 2 and "missing.json" in p.stderr and "Traceback" not in p.stderr
    p = run_script(repo_root, "build_superpixels.py", "--store", tmp_path / "nostore", check=False)
    assert p.returncode == 2 and "does not exist" in p.stderr
    help_ = subprocess.run([sys.executable, str(repo_root / "preprocess" / "build_cc3m.py"), "--help"],
                           capture_output=True, text=True)
    assert help_.returncode == 0 and "--max_samples" in help_.stdout


def test_img2dataset_sample_fields(tmp_path):
    from dataloaders.shards import brace_expand, list_shards, sample_caption, sample_image
    assert sample_caption({"json": b'{"caption": " a dog "}', "txt": b"other"}) == "a dog"
    assert sample_caption({"json": b'{"caption": ""}', "txt": b"from txt"}) == "from txt"  # empty json -> txt
    assert sample_caption({"json": b'{"caption": "  "}'}) is None  # empty caption
    assert sample_caption({"jpg": b"x"}) is None  # missing caption
    assert sample_caption({"json": b"not json"}) is None
    assert sample_image({"png": b"p"}) == b"p" and sample_image({"json": b"{}"}) is None
    assert brace_expand("d/{00008..00011}.tar") == [f"d/{i:05d}.tar" for i in range(8, 12)]
    assert brace_expand("{a,b}/{1..2}") == ["a/1", "a/2", "b/1", "b/2"]
    with pytest.raises(ValueError, match="not found"):
        list_shards(str(tmp_path / "{00000..00001}.tar"))


def test_caption_json_nested_too_deep_is_skipped_and_counted(tmp_path):
    """A sample whose JSON nests deeper than Python's stack (RecursionError, not ValueError) stopped the whole
    store build, at the same sample on every rerun; it is now a sample without a caption, counted like one (its
    txt member is used when there is one). A Karpathy file nested so deep is refused in one line."""
    from webdataset import TarWriter
    from dataloaders.build_stores import build_cc3m_store, build_coco_store
    from dataloaders.shards import sample_caption
    from tests.helpers import jpeg_bytes, random_image
    deep = b"[" * 100_000 + b"]" * 100_000
    assert sample_caption({"json": deep}) is None
    assert sample_caption({"json": b'{"caption": ' + deep + b"}", "txt": b"from txt"}) == "from txt"
    img = jpeg_bytes(random_image(np.random.default_rng(0)))
    (tmp_path / "raw").mkdir()
    with TarWriter(str(tmp_path / "raw" / "00000.tar")) as tw:
        tw.write({"__key__": "a", "jpg": img, "json": b'{"caption": "a dog"}'})
        tw.write({"__key__": "b", "jpg": img, "json": deep})
        tw.write({"__key__": "c", "jpg": img, "json": b'{"caption": "a cat"}'})
    for _ in range(2):                                             # and again: the rerun is not stopped either
        s = build_cc3m_store(tmp_path / "raw", tmp_path / "store", progress=False)
    assert (s["shards_skipped"], s["images_in_store"]) == (1, 2)
    first = build_cc3m_store(tmp_path / "raw", tmp_path / "store2", progress=False)
    assert (first["written"], first["no_caption"]) == (2, 1)
    (tmp_path / "karpathy.json").write_bytes(deep)
    (tmp_path / "images").mkdir()
    with pytest.raises(stores.StoreError, match="is not a Karpathy caption file"):
        build_coco_store(tmp_path / "karpathy.json", tmp_path / "images", tmp_path / "coco", progress=False)


def test_cc3m_store_keeps_every_sample_of_two_img2dataset_runs(tmp_path):
    """Two img2dataset output folders both hold 00000.tar and 00001.tar with the same sample keys (img2dataset
    keys are unique only within one run): all 28 samples are stored (by file name and key, run b was lost whole
    and silently), the same
    shards given again or moved are recognised by content and skipped, and no sample vanishes uncounted."""
    from dataloaders.build_stores import build_cc3m_store
    from dataloaders.datasets import StoreDataset
    from modules.tokenization_clip import tokenize_captions
    from tests.helpers import cc_caption_for
    a = write_cc3m_shards(tmp_path / "run_a", n_shards=2, per_shard=[8, 6], seed=1)
    b = write_cc3m_shards(tmp_path / "run_b", n_shards=2, per_shard=[8, 6], seed=2, first_sample=14)
    s = build_cc3m_store([tmp_path / "run_a", tmp_path / "run_b"], tmp_path / "store", progress=False)
    assert (s["written"], s["images_in_store"], s["shards_skipped"], s["duplicate_key"]) == (28, 28, 0, 0)
    ds = StoreDataset(tmp_path / "store", max_words=16, patch_size=PATCH_SIZE)
    got = {tuple(ds[i]["input_ids"].tolist()) for i in range(len(ds))}
    assert got == {tuple(tokenize_captions([cc_caption_for(n)], 16)[0][0].tolist()) for n in range(28)}
    # rerun, and the same shard under another name and folder: recognised by content, nothing added
    (tmp_path / "moved").mkdir()
    (tmp_path / "moved" / "renamed.tar").write_bytes(open(a[0], "rb").read())
    again = build_cc3m_store([*b, tmp_path / "moved"], tmp_path / "store", progress=False)
    assert (again["written"], again["shards_skipped"], again["images_in_store"]) == (0, 3, 28)


def test_cc3m_store_counts_every_sample_it_does_not_write(tmp_path):
    """A key repeated inside one shard is counted as duplicate_key (not silently merged); a store written with the
    old bare keys is refused with one line instead of being doubled."""
    from webdataset import TarWriter
    from dataloaders.build_stores import build_cc3m_store
    from tests.helpers import jpeg_bytes, random_image
    img = jpeg_bytes(random_image(np.random.default_rng(0)))
    (tmp_path / "raw").mkdir()
    with TarWriter(str(tmp_path / "raw" / "00000.tar")) as tw:
        for key in ("x", "y", "x"):
            tw.write({"__key__": key, "jpg": img, "txt": f"caption {key}"})
    s = build_cc3m_store(tmp_path / "raw", tmp_path / "store", progress=False)
    assert (s["written"], s["duplicate_key"], s["images_in_store"]) == (2, 1, 2)
    old = stores.StoreWriter(tmp_path / "old", "cc3m")  # what the previous version wrote: no "cc3m_keys" info
    old.put("000000000", img, ["a caption"])
    old.close()
    with pytest.raises(stores.StoreError, match="older version"):
        build_cc3m_store(tmp_path / "raw", tmp_path / "old", progress=False)


def test_compressed_shard_member_that_unpacks_to_gigabytes_is_not_read(tmp_path, caplog):
    """Poor case of issue 21. Before: a .tar.gz shard whose 'jpg' member unpacks to 80 MB of zeros (3-4 GB in a
    real bomb) was read whole into memory. Now the member's size is read from its tar header and the member is
    skipped with a warning naming it; the sample is counted as one without an image, the others are stored."""
    import tarfile
    import tracemalloc
    from dataloaders.build_stores import build_cc3m_store
    from dataloaders.shards import iter_tar_samples
    from tests.helpers import jpeg_bytes, random_image
    shard = tmp_path / "raw" / "00000.tar"          # gzip inside, as `tar czf` makes it: read with "r:*"
    shard.parent.mkdir()
    size = 80 << 20                                 # above the 64 MB a sample member may unpack to

    class Zeros(io.RawIOBase):
        def __init__(self, n):
            self.left = n

        def readinto(self, b):
            n = min(len(b), self.left)
            b[:n] = bytes(n)
            self.left -= n
            return n
    with tarfile.open(shard, "w:gz", compresslevel=1) as tar:
        good = jpeg_bytes(random_image(np.random.default_rng(0)))
        for key, data in (("000000000.jpg", None), ("000000000.txt", b"a bomb"), ("000000001.jpg", good),
                          ("000000001.txt", b"a photo")):
            info = tarfile.TarInfo(key)
            info.size = size if data is None else len(data)
            tar.addfile(info, Zeros(size) if data is None else io.BytesIO(data))
    assert shard.stat().st_size < 1 << 20
    tracemalloc.start()
    try:
        samples = list(iter_tar_samples(shard))
        stats = build_cc3m_store(shard.parent, tmp_path / "store", progress=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [sorted(s) for s in samples] == [["__key__", "txt"], ["__key__", "jpg", "txt"]]
    assert (stats["written"], stats["no_image"]) == (1, 1)
    assert peak < 40 << 20, f"{peak:,} bytes allocated"
    assert "member 000000000.jpg unpacks to 83886080 bytes, more than the 67108864" in caplog.text
