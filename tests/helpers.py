"""Generated data for the tests: real files in the real layouts, small enough to write in a second.

Pretraining (``dataloaders``)::

    data = make_tiny_coco(tmp_path, n_images=4)          # raw files + preprocessed store + superpixels
    args = argparse.Namespace(**data["args"], max_words=32, use_seglabel=True)
    ds = build_pretrain_dataset(args, patch_size=PATCH_SIZE)   # 4 images x 2 captions = 8 samples
    write_cc3m_shards(tmp_path / "shards", n_shards=2, per_shard=3)   # img2dataset shards, by webdataset itself

Segmentation benchmarks (``seg_segmentation``)::

    root = write_fake_dataset('voc', tmp_path / 'VOC2012', num_images=3, size=(120, 90))

The shards are written with webdataset's own ``TarWriter``, so the loaders are tested against the library that
defines the format. (The quickstart world, ``preprocess/synthetic.py``, is the generated data for people and
benchmarks; this module is only for tests.)
"""
import argparse
import io
import json
import os
import os.path as osp
import pickle
import signal
import subprocess
import sys
import zlib
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import lmdb
import numpy as np
from PIL import Image
from webdataset import TarWriter

from dataloaders.build_stores import build_coco_store, build_superpixel_store
from dataloaders.imageio import decode_rgb, encode_for_store
from dataloaders.pretrain import add_data_args
from dataloaders.superpixels import felzenszwalb, superpixel_store_name

# Patch size of the models whose data the tests build (ViT-B/16 and the tiny reference model): 224 / 16 = 14.
PATCH_SIZE = 16

WORDS = ["red", "blue", "green", "small", "large", "dog", "cat", "car", "tree", "house", "boat", "bird"]


def random_image(rng: np.random.Generator, size=(320, 256), mode: str = "RGB",
                 labels: Optional[np.ndarray] = None) -> Image.Image:
    """A random picture of ``size`` (width, height).

    Without ``labels``: a few flat rectangles (so Felzenszwalb finds several real regions). With ``labels``
    ([h, w] ids): a colour per label value plus noise, so the picture correlates with its segmentation."""
    w, h = size
    if labels is not None:
        colours = rng.integers(0, 256, size=(256, 3))
        arr = np.clip(colours[labels] + rng.integers(-20, 21, size=(h, w, 3)), 0, 255).astype(np.uint8)
        return Image.fromarray(arr)
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


def write_cc3m_shards(root, n_shards: int = 2, per_shard: Union[int, Sequence[int]] = 3, seed: int = 1,
                      corrupt: int = 0, no_caption: int = 0, first_sample: int = 0) -> List[str]:
    """img2dataset-style shards ``root/00000.tar``... written with webdataset's TarWriter (key.jpg + key.json +
    key.txt), plus ``_stats.json``, as one img2dataset run names them (keys ``SSSSSIIII``).

    per_shard: samples of every shard, or one count per shard. Sample n (counted over the shards from
    ``first_sample``) has caption ``cc_caption_for(n)``. The last ``corrupt`` samples of shard 0 carry undecodable
    bytes and the ``no_caption`` samples before them an empty caption."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sizes = [per_shard] * n_shards if isinstance(per_shard, int) else list(per_shard)
    paths, n = [], first_sample
    for s, per_shard in enumerate(sizes):
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
    return vars(add_data_args(argparse.ArgumentParser()).parse_args([]))


def make_tiny_coco(root, n_images: int = 4, captions_per_image: int = 2, superpixels: bool = True,
                   seed: int = 0) -> dict:
    """Generate raw COCO-like files and preprocess them into a store (+ superpixel LMDB) in-process.

    Returns {"store": path, "karpathy_json": ..., "image_root": ..., "n_samples": n_images * captions_per_image,
    "args": {...}} where ``args`` are the data flags of ``add_data_args`` selecting this store
    (datatype 'coco'); add ``max_words`` and ``use_seglabel`` yourself. Takes ~1 s.
    """
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
        maps = {k: felzenszwalb(np.asarray(decode_rgb(v))) for k, v in images.items()}
        write_legacy_superpixels(root / superpixel_store_name("cc3m_train_lmdb_total_seg"), maps)
    return {"root": str(root), "captions": captions, "images": images}


def write_legacy_coco(root, n_images: int = 3, captions_per_image: int = 2, seed: int = 3,
                      superpixels: bool = True) -> dict:
    """The 2022 COCO layout: ``coco_train2014.pkl`` ({file name: bytes}) + ``karpathy/dataset_coco.json``."""
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


# raw label value range written per dataset (before mmseg's reduce_zero_label)
_RAW_LABELS = {'voc': 21, 'voc20': 21, 'context': 60, 'context59': 60, 'coco': 81, 'coco_stuff': 171,
               'cityscapes': 19, 'ade20k': 151}


def random_label_map(rng: np.random.Generator, h: int, w: int, num_labels: int, block: int = 16,
                     ignore: bool = True) -> np.ndarray:
    """Blocks of random ids in [0, num_labels) with a 3-pixel band of 255 along the top."""
    small = rng.integers(0, num_labels, size=(-(-h // block), -(-w // block)))
    lab = np.kron(small, np.ones((block, block), dtype=np.int64))[:h, :w].astype(np.uint8)
    if ignore:
        lab[:3] = 255
    return lab


def _save_label(path: str, lab: np.ndarray, palette: bool) -> None:
    """VOC stores labels as palette PNGs (pixel value = palette index = class id), the others as grey PNGs."""
    im = Image.fromarray(lab)           # mode 'L'
    if palette:
        from seg_segmentation.drawing import voc_palette  # OpenCV: only where a VOC layout is written
        im = im.convert('P')            # keeps the index values; then give it VOC's colours
        im.putpalette(voc_palette().flatten().tolist())
    im.save(path)


def write_fake_dataset(dataset: str, root, num_images: int = 3, size: Tuple[int, int] = (120, 90),
                       seed: int = 0, sizes=None, jpeg_quality: int = 90) -> str:
    """Write ``num_images`` samples of ``dataset`` under ``root`` in its mmseg layout; returns ``root``.

    size: (width, height) of every image, or ``sizes``: a list of (width, height), one per image.
    """
    from seg_segmentation.datasets import LAYOUTS  # mmseg: only for the tests that need a benchmark layout
    layout = LAYOUTS[dataset]
    rng = np.random.default_rng(seed)
    root = str(root)
    img_dir, ann_dir = osp.join(root, layout.img_dir), osp.join(root, layout.ann_dir)
    names = []
    for i in range(num_images):
        w, h = sizes[i] if sizes is not None else size
        name = f'{2007 + i:04d}_{i:06d}'
        sub = ''
        if dataset == 'cityscapes':
            sub = 'frankfurt' if i % 2 == 0 else 'lindau'
            name = f'{sub}_{i:06d}_000019'
        lab = random_label_map(rng, h, w, _RAW_LABELS[dataset])
        img = random_image(rng, (w, h), labels=lab)
        os.makedirs(osp.join(img_dir, sub), exist_ok=True)
        os.makedirs(osp.join(ann_dir, sub), exist_ok=True)
        img_path = osp.join(img_dir, sub, name + layout.img_suffix)
        if layout.img_suffix.endswith('.png'):
            img.save(img_path)
        else:
            img.save(img_path, quality=jpeg_quality)
        _save_label(osp.join(ann_dir, sub, name + layout.seg_map_suffix), lab, palette=dataset in ('voc', 'voc20'))
        names.append(name)
    if layout.split:
        os.makedirs(osp.dirname(osp.join(root, layout.split)), exist_ok=True)
        with open(osp.join(root, layout.split), 'w') as f:
            f.write('\n'.join(names) + '\n')
    return root


def run_or_fail_on_hang(cmd: Sequence[str], timeout: float, hang_message: str, **popen_kwargs):
    """Run ``cmd`` in its own session -> (returncode, stdout, stderr); on a hang kill the whole group (launcher and
    children: no orphans left behind) and fail the test with ``hang_message``."""
    import pytest
    proc = subprocess.Popen(list(map(str, cmd)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **popen_kwargs)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(hang_message)
    return proc.returncode, out, err


def eval_env() -> dict:
    """The environment of an evaluation subprocess: one thread per process, no inherited launcher variables."""
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONWARNINGS='ignore')
    env.pop('WORLD_SIZE', None)
    return env


def run_cli(repo_root, args, nproc: int = 1, timeout: float = 240) -> subprocess.CompletedProcess:
    """``main_seg_zeroshot.py ARGS`` in a fresh process, or under ``torchrun --nproc_per_node NPROC``."""
    script = str(Path(repo_root) / 'main_seg_zeroshot.py')
    if nproc == 1:
        cmd = [sys.executable, script]
    else:
        cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', str(nproc), script]
    return subprocess.run(cmd + [str(a) for a in args], cwd=repo_root, env=eval_env(), capture_output=True,
                          text=True, timeout=timeout)


def one_and_two_processes(repo_root, args, out_dir, images: int) -> Tuple[dict, dict]:
    """Evaluate ARGS in one process and under torchrun with two; assert that both count the same ``images``
    images once, score them identically and save identical label maps. -> the two result JSONs."""
    out_dir = Path(out_dir)
    results = []
    for nproc in (1, 2):
        r = run_cli(repo_root, list(args) + ['--output', out_dir / f'{nproc}.json', '--save_pred',
                                             out_dir / f'pred{nproc}'], nproc=nproc)
        assert r.returncode == 0, r.stderr[-3000:]
        results.append(json.loads((out_dir / f'{nproc}.json').read_text()))
    one, two = results
    assert (one['world_size'], two['world_size'], one['images'], two['images']) == (1, 2, images, images)
    assert one['areas'] == two['areas'] and one['per_class'] == two['per_class'] and one['mIoU'] == two['mIoU']
    p1, p2 = sorted((out_dir / 'pred1').iterdir()), sorted((out_dir / 'pred2').iterdir())
    assert [p.name for p in p1] == [p.name for p in p2] and len(p1) == images
    assert all(np.array_equal(np.array(Image.open(a)), np.array(Image.open(b))) for a, b in zip(p1, p2))
    return one, two


def evaluate_in_process(args, capsys) -> Tuple[int, str, str]:
    """``main_seg_zeroshot.main(ARGS)`` in this process -> (exit code, stdout, stderr)."""
    from main_seg_zeroshot import main
    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def tiny_dino_file(fixture: Path, folder: Path) -> Path:
    """The tiny DINO recorded in a fixture (``dino_state_dict``, the official layout) saved as a plain state-dict
    file, as a user would give it to ``--vfm``."""
    import torch
    path = Path(folder) / 'tiny_dino_vitb8.pth'
    torch.save(torch.load(fixture, map_location='cpu', weights_only=True)['dino_state_dict'], path)
    return path
