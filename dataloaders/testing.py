"""Tiny generated pretraining data for tests (ours and other engineers'): real JPEGs, Karpathy JSON, shards.

    from dataloaders.testing import make_tiny_coco
    data = make_tiny_coco(tmp_path, n_images=4)          # raw files + preprocessed store + superpixels
    args = argparse.Namespace(**data["args"], max_words=32, use_seglabel=True)
    ds = build_pretrain_dataset(args)                    # 4 images x 2 captions = 8 samples
"""
import io
import json
from pathlib import Path
from typing import List, Optional

import numpy as np
from PIL import Image

WORDS = ["red", "blue", "green", "small", "large", "dog", "cat", "car", "tree", "house", "boat", "bird"]


def random_image(rng: np.random.Generator, size=(320, 256), mode: str = "RGB") -> Image.Image:
    """A blocky random picture (a few flat rectangles, so Felzenszwalb finds several real regions)."""
    w, h = size
    arr = np.full((h, w, 3), rng.integers(0, 256, 3), dtype=np.uint8)
    for _ in range(4):
        x0, y0 = rng.integers(0, w - 8), rng.integers(0, h - 8)
        arr[y0:y0 + rng.integers(8, h), x0:x0 + rng.integers(8, w)] = rng.integers(0, 256, 3)
    img = Image.fromarray(arr)
    return img.convert(mode) if mode != "RGB" else img


def jpeg_bytes(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def caption_for(i: int, j: int = 0) -> str:
    return f"a {WORDS[i % len(WORDS)]} {WORDS[(i * 7 + j * 3 + 5) % len(WORDS)]} number {i} take {j}"


def cc_caption_for(n: int) -> str:
    """Caption of the n-th sample (over all shards) written by ``write_cc3m_shards``."""
    return f"web photo {n} of a {WORDS[(n * 5 + 1) % len(WORDS)]}"


def write_coco_raw(root, n_images: int = 4, captions_per_image: int = 2, seed: int = 0,
                   modes: Optional[List[str]] = None) -> dict:
    """COCO-like raw input: ``root/train2014/*.jpg`` + ``root/dataset_coco.json`` (split 'train', plus one 'val'
    image that must be ignored). ``modes`` gives each image's PIL mode (e.g. 'L', 'CMYK'); default all RGB."""
    root = Path(root)
    (root / "train2014").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images = []
    for i in range(n_images + 1):
        name = f"COCO_train2014_{i:012d}.jpg"
        mode = (modes[i] if modes and i < len(modes) else "RGB")
        random_image(rng, (300 + 20 * (i % 3), 240 + 16 * (i % 2)), mode).save(root / "train2014" / name,
                                                                              format="JPEG", quality=90)
        images.append({"filepath": "train2014", "filename": name, "split": "train" if i < n_images else "val",
                       "sentences": [{"raw": caption_for(i, j)} for j in range(captions_per_image)]})
    (root / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))
    return {"karpathy_json": str(root / "dataset_coco.json"), "image_root": str(root)}


def write_cc3m_shards(root, n_shards: int = 2, per_shard: int = 3, seed: int = 1, corrupt: int = 0,
                      no_caption: int = 0) -> List[str]:
    """img2dataset-style shards ``root/00000.tar``... written with webdataset's TarWriter (key.jpg + key.json +
    key.txt), plus ``_stats.json``. The last ``corrupt`` samples of shard 0 carry undecodable bytes and the next
    ``no_caption`` samples an empty caption."""
    from webdataset import TarWriter
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths, n = [], 0
    for s in range(n_shards):
        path = root / f"{s:05d}.tar"
        with TarWriter(str(path)) as tw:
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                cap = cc_caption_for(n)
                img = jpeg_bytes(random_image(rng, (280 + 8 * (n % 4), 230 + 8 * (n % 3))))
                if s == 0 and i >= per_shard - corrupt:
                    img = b"\xff\xd8\xff\xe0 this is not a jpeg"
                elif s == 0 and i >= per_shard - corrupt - no_caption:
                    cap = ""
                tw.write({"__key__": key, "jpg": img, "txt": cap,
                          "json": json.dumps({"caption": cap, "key": key, "status": "success"}).encode()})
                n += 1
        (root / f"{s:05d}_stats.json").write_text(json.dumps({"successes": per_shard, "count": per_shard}))
        paths.append(str(path))
    return paths


def data_arg_defaults() -> dict:
    """The defaults of every flag ``add_data_args`` defines, as a dict."""
    import argparse
    from dataloaders.pretrain import add_data_args
    return vars(add_data_args(argparse.ArgumentParser()).parse_args([]))


def make_tiny_coco(root, n_images: int = 4, captions_per_image: int = 2, superpixels: bool = True,
                   seed: int = 0) -> dict:
    """Generate raw COCO-like files and preprocess them into a store (+ superpixel LMDB) in-process.

    Returns {"store": path, "karpathy_json": ..., "image_root": ..., "n_samples": n_images * captions_per_image,
    "args": {...}} where ``args`` are the data flags of ``add_data_args`` selecting this store
    (datatype 'coco'); add ``max_words`` and ``use_seglabel`` yourself. Takes ~1 s.
    """
    from dataloaders.build_stores import build_coco_store, build_superpixel_store
    root = Path(root)
    raw = write_coco_raw(root / "raw", n_images, captions_per_image, seed)
    store = root / "coco_store"
    build_coco_store(raw["karpathy_json"], raw["image_root"], store, workers=0, progress=False)
    if superpixels:
        build_superpixel_store(store, workers=0, progress=False)
    args = {**data_arg_defaults(), "datatype": "coco", "coco_store": str(store)}
    return {"store": str(store), **raw, "n_samples": n_images * captions_per_image, "args": args}


def write_legacy_superpixels(path, label_maps: dict):
    """2022 superpixel LMDB: key -> zlib-compressed JSON [h, w, label_0, ...]."""
    import zlib
    import lmdb
    env = lmdb.open(str(path), map_size=1 << 30, subdir=True)
    with env.begin(write=True) as txn:
        for key, labels in label_maps.items():
            labels = np.asarray(labels)
            flat = [int(labels.shape[0]), int(labels.shape[1])] + labels.reshape(-1).tolist()
            txn.put(key.encode("ascii"), zlib.compress(json.dumps(flat).encode()))
    env.close()


def write_legacy_cc3m(root, n: int = 4, seed: int = 2, superpixels: bool = True) -> dict:
    """The 2022 CC3M layout: ``cc3m_train_lmdb_total/`` + ``_keys.pkl`` + ``cc3m_train_desc.pkl`` (+ superpixels).

    Returns {"root", "captions": {key: caption}, "images": {key: stored bytes}}."""
    import pickle
    import lmdb
    from dataloaders.imageio import encode_for_store
    from dataloaders.superpixels import felzenszwalb, superpixel_store_name
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    keys = [f"{i:09d}" for i in range(n)]
    images = {k: encode_for_store(jpeg_bytes(random_image(rng, (260 + 10 * i, 230))))[0] for i, k in enumerate(keys)}
    env = lmdb.open(str(root / "cc3m_train_lmdb_total"), map_size=1 << 30, subdir=True)
    with env.begin(write=True) as txn:
        for k, v in images.items():
            txn.put(k.encode("ascii"), v)
    env.close()
    with open(root / "cc3m_train_lmdb_total_keys.pkl", "wb") as f:
        pickle.dump({"key": keys}, f)
    captions = {k: f"legacy cc caption {WORDS[i % len(WORDS)]} {i}" for i, k in enumerate(keys)}
    with open(root / "cc3m_train_desc.pkl", "wb") as f:
        pickle.dump({k: {"caption": c, "key": k, "status": "success"} for k, c in captions.items()}, f)
    if superpixels:
        from dataloaders.imageio import decode_rgb
        maps = {k: felzenszwalb(np.asarray(decode_rgb(v))) for k, v in images.items()}
        write_legacy_superpixels(root / superpixel_store_name("cc3m_train_lmdb_total_seg"), maps)
    return {"root": str(root), "captions": captions, "images": images}


def write_legacy_coco(root, n_images: int = 3, captions_per_image: int = 2, seed: int = 3,
                      superpixels: bool = True) -> dict:
    """The 2022 COCO layout: ``coco_train2014.pkl`` ({file name: bytes}) + ``karpathy/dataset_coco.json``."""
    import pickle
    from dataloaders.imageio import decode_rgb, encode_for_store
    from dataloaders.superpixels import felzenszwalb, superpixel_store_name
    root = Path(root)
    raw = write_coco_raw(root / "raw", n_images, captions_per_image, seed)
    (root / "karpathy").mkdir(parents=True, exist_ok=True)
    Path(raw["karpathy_json"]).replace(root / "karpathy" / "dataset_coco.json")
    images = {p.name: encode_for_store(p.read_bytes())[0] for p in sorted((root / "raw" / "train2014").glob("*.jpg"))}
    with open(root / "coco_train2014.pkl", "wb") as f:
        pickle.dump(images, f)
    if superpixels:
        maps = {k: felzenszwalb(np.asarray(decode_rgb(v))) for k, v in images.items()}
        write_legacy_superpixels(root / superpixel_store_name("coco_train2014_seg"), maps)
    return {"root": str(root), "images": images}
