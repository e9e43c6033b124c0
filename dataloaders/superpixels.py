"""Felzenszwalb superpixels and their pooling onto the ViT patch grid of a training crop (design.md §6).

The superpixel-consistency loss needs, for every patch of a training crop (16×16 patches of a 224×224 crop for
ViT-B/16), one superpixel label.
Superpixels are computed once per stored (short side 224) image; at load time the label map is cut with the
random crop's box, resized to the crop size and pooled per patch.

Label maps are stored as zlib-compressed ``.npy`` bytes (no pickle). The 2022 stores hold zlib-compressed JSON
``[h, w, label_0, ..., label_{h*w-1}]``; ``decode_label_map`` reads both.
"""
import functools
import io
import json
import math
import zlib
from typing import Sequence

import numpy as np

# The 2022 parameters; the store name encodes them the 2022 way (sigma written as sigma*10).
FELZENSZWALB_SCALE = 224
FELZENSZWALB_SIGMA = 0.9
FELZENSZWALB_MIN_SIZE = 224


def superpixel_store_name(prefix: str = "superpixels", scale: float = FELZENSZWALB_SCALE,
                          sigma: float = FELZENSZWALB_SIGMA, min_size: int = FELZENSZWALB_MIN_SIZE) -> str:
    """Folder name of a superpixel LMDB, e.g. ``superpixels_scale224_sigma9.0_min_size224.lmdb`` (2022 style)."""
    return f"{prefix}_scale{scale}_sigma{sigma * 10}_min_size{min_size}.lmdb"


def felzenszwalb(image: np.ndarray, scale: float = FELZENSZWALB_SCALE, sigma: float = FELZENSZWALB_SIGMA,
                 min_size: int = FELZENSZWALB_MIN_SIZE) -> np.ndarray:
    """[H, W, 3] uint8 RGB -> [H, W] int32 superpixel ids (0..n-1), scikit-image's graph segmentation."""
    from skimage.segmentation import felzenszwalb as _fz  # heavy import, only where superpixels are computed
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"felzenszwalb expects an [H, W, 3] RGB image, got shape {tuple(image.shape)}")
    return _fz(image, scale=scale, sigma=sigma, min_size=min_size).astype(np.int32)


def encode_label_map(labels: np.ndarray) -> bytes:
    """[h, w] integer labels -> zlib(.npy) bytes; the smallest unsigned dtype that holds the ids is used."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"label map must be 2-D, got shape {labels.shape}")
    dtype = np.uint16 if labels.size == 0 or labels.max() < 2 ** 16 else np.int32
    buf = io.BytesIO()
    np.save(buf, labels.astype(dtype), allow_pickle=False)
    return zlib.compress(buf.getvalue())


def decode_label_map(value: bytes) -> np.ndarray:
    """Stored value (ours: zlib .npy; 2022: zlib JSON [h, w, labels...]) -> [h, w] int64 labels."""
    raw = zlib.decompress(bytes(value))
    if raw.startswith(b"\x93NUMPY"):
        return np.load(io.BytesIO(raw), allow_pickle=False).astype(np.int64)
    flat = np.asarray(json.loads(raw), dtype=np.int64)
    if flat.ndim != 1 or flat.size < 2 or flat.size != 2 + flat[0] * flat[1]:
        raise ValueError("malformed superpixel entry: expected zlib JSON [h, w, h*w labels]")
    return flat[2:].reshape(int(flat[0]), int(flat[1]))


def crop_label_map(labels: np.ndarray, box: Sequence[float]) -> np.ndarray:
    """Cut [h, w] labels with a crop box (x0, y0, x1, y1) given as fractions of the image (design.md §6).

    x runs from floor(x0*w) to ceil(x1*w) (ceil so the cut is never empty). A box with x1 < x0 (y1 < y0) describes a
    horizontally (vertically) flipped crop: the cut is taken with the sorted bounds and then flipped. A cut under 2 px
    on either side keeps the whole map, as the 2022 code did.
    """
    h, w = labels.shape
    x0, y0, x1, y1 = (float(v) for v in box)
    flip_x, flip_y = x1 < x0, y1 < y0
    if flip_x:
        x0, x1 = x1, x0
    if flip_y:
        y0, y1 = y1, y0
    c0, c1 = int(x0 * w), math.ceil(x1 * w)  # int() == floor for the non-negative fractions of a crop box
    r0, r1 = int(y0 * h), math.ceil(y1 * h)
    out = labels if (c1 - c0 < 2 or r1 - r0 < 2) else labels[r0:r1, c0:c1]
    if flip_x:
        out = out[:, ::-1]
    if flip_y:
        out = out[::-1, :]
    return out


@functools.lru_cache(maxsize=4096)  # crop sizes repeat; avoids a torch call per sample in every loader worker
def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
    # PyTorch 'nearest' (what the 2022 code used; cv2/PIL nearest pick different pixels and miss the fixture):
    # source = floor(dst * n_in / n_out) in float32. Computed by torch itself so the rounding is identical.
    # (torch imported here: the preprocessing workers that import this module never pool and stay torch-free.)
    import torch
    import torch.nn.functional as F
    idx = F.interpolate(torch.arange(n_in, dtype=torch.float32).view(1, 1, n_in), size=n_out, mode="nearest")
    out = idx.view(-1).long().numpy()
    out.flags.writeable = False  # shared through the cache
    return out


def patch_labels(labels: np.ndarray, box: Sequence[float], img_size: int, patch_size: int,
                 reduce: str = "mean") -> np.ndarray:
    """[h, w] superpixel ids + crop box -> [img_size/patch_size]² int64 patch labels (design.md §6).

    reduce='mean' (default, the 2022 behaviour): arithmetic mean of the ids in the patch, truncated to int — not a
    meaningful label in general, but it is what the published model was trained with. reduce='majority': the most
    frequent id in the patch (ties -> smallest id).
    """
    if img_size % patch_size:
        raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
    cut = crop_label_map(np.asarray(labels), box)
    rows, cols = _nearest_index(cut.shape[0], img_size), _nearest_index(cut.shape[1], img_size)
    full = cut[rows[:, None], cols[None, :]].astype(np.int64)  # [img_size, img_size]
    n = img_size // patch_size
    patches = full.reshape(n, patch_size, n, patch_size).transpose(0, 2, 1, 3).reshape(n, n, patch_size ** 2)
    if reduce == "mean":
        return patches.mean(axis=-1).astype(np.int64)
    if reduce == "majority":
        flat = patches.reshape(n * n, -1)
        out = np.empty(n * n, dtype=np.int64)
        for i, row in enumerate(flat):  # 196 tiny bincounts; ids are dense 0..n-1 so bincount is cheap
            out[i] = np.bincount(row - row.min()).argmax() + row.min()
        return out.reshape(n, n)
    raise ValueError(f"unknown superpixel reduction {reduce!r}; use 'mean' or 'majority'")
