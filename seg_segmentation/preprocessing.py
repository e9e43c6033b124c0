"""The test-time image transform of design.md §7.3, written once for the evaluation and the demo.

mmseg's ``Resize(scale=(max_long, resolution), keep_ratio=True)`` (``mmcv.imrescale``: one scale factor so the
short side reaches ``resolution`` without the long side passing ``max_long``, sizes rounded half up, OpenCV
bilinear) followed by ``mmcv.imnormalize`` with CLIP's mean / std after BGR -> RGB. The same OpenCV calls as mmcv,
so the pixels are identical (tests/test_seg_preprocessing.py compares against mmseg), without importing mmcv/mmseg
(the demo starts faster without them).

    img = eval_image_tensor(bgr)      # uint8 BGR [H, W, 3] -> float32 RGB [3, h, w], short side 224
"""
from typing import Tuple

import numpy as np

from common.images import ImageReadError

# mmseg's CLIP-normalisation of BGR uint8 images (applied after BGR -> RGB), design.md §7.3
PIXEL_MEAN = (122.7709383, 116.7460125, 104.09373615)
PIXEL_STD = (68.5005327, 66.6321579, 70.32316305)


def rescaled_size(height: int, width: int, resolution: int = 224, max_long: int = 2048) -> Tuple[int, int]:
    """(h, w) after the keep-ratio resize to scale (max_long, resolution), as ``mmcv.rescale_size``."""
    long_edge, short_edge = max(max_long, resolution), min(max_long, resolution)
    scale = min(long_edge / max(height, width), short_edge / min(height, width))
    return int(height * float(scale) + 0.5), int(width * float(scale) + 0.5)


def resize_keep_ratio(bgr: np.ndarray, resolution: int = 224, max_long: int = 2048) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [h, w, 3] (``mmcv.imrescale(img, (max_long, resolution), 'bilinear', 'cv2')``)."""
    import cv2
    h, w = rescaled_size(*bgr.shape[:2], resolution=resolution, max_long=max_long)
    if h < 1 or w < 1:
        raise ImageReadError(f"a {bgr.shape[1]}x{bgr.shape[0]} image is too elongated to resize to short side "
                         f"{resolution} within long side {max_long}")
    return cv2.resize(bgr, (w, h), interpolation=cv2.INTER_LINEAR)


def normalize(bgr: np.ndarray) -> np.ndarray:
    """uint8 BGR [h, w, 3] -> float32 RGB [h, w, 3] minus mean, over std (``mmcv.imnormalize(..., to_rgb=True)``)."""
    import cv2
    img = bgr.astype(np.float32)
    mean = np.float64(np.array(PIXEL_MEAN).reshape(1, -1))
    stdinv = 1 / np.float64(np.array(PIXEL_STD).reshape(1, -1))
    cv2.cvtColor(img, cv2.COLOR_BGR2RGB, img)
    cv2.subtract(img, mean, img)
    cv2.multiply(img, stdinv, img)
    return img


def to_chw_tensor(img: np.ndarray):
    """float32 [h, w, 3] -> torch [3, h, w] (contiguous)."""
    import torch
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))


def eval_image_tensor(bgr: np.ndarray, resolution: int = 224, max_long: int = 2048):
    """uint8 BGR [H, W, 3] -> the model's input [3, h, w] float32: resize, then normalise (design.md §7.3)."""
    return to_chw_tensor(normalize(resize_keep_ratio(bgr, resolution, max_long)))
