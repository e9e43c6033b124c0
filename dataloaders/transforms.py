"""Train-time image transform: random resized crop with its box, CLIP normalisation (design.md §6)."""
import math
import random
from typing import Tuple

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import functional as TF

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class RandomResizedCropBox:
    """RandomResizedCrop(size, scale, ratio, bicubic) that also returns the crop box (design.md §6).

    The box is (x0, y0, x1, y1) = (j/(W-1), i/(H-1), (j+w-1)/(W-1), (i+h-1)/(H-1)) in fractions of the image, the
    form the superpixel pooling expects (all zeros for a 1-pixel-wide/high image). Draws use Python's ``random``
    like the 2022 transform; DataLoader seeds it per worker.
    """

    def __init__(self, size: int = 224, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3)):
        self.size, self.scale, self.ratio = size, scale, ratio

    def get_params(self, width: int, height: int, rng=random) -> Tuple[int, int, int, int]:
        """-> (i, j, h, w): top row, left column, crop height, crop width (torchvision's algorithm)."""
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = rng.uniform(*self.scale) * area
            aspect = math.exp(rng.uniform(*log_ratio))
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                return rng.randint(0, height - h), rng.randint(0, width - w), h, w
        # Fallback: the central crop with the closest allowed aspect ratio.
        in_ratio = width / height
        if in_ratio < min(self.ratio):
            w, h = width, int(round(width / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            h, w = height, int(round(height * max(self.ratio)))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, img: Image.Image, rng=random) -> Tuple[Image.Image, Tuple[float, float, float, float]]:
        width, height = img.size
        i, j, h, w = self.get_params(width, height, rng)
        if width == 1 or height == 1:
            box = (0.0, 0.0, 0.0, 0.0)
        else:
            box = (j / (width - 1), i / (height - 1), (j + w - 1) / (width - 1), (i + h - 1) / (height - 1))
        out = TF.resized_crop(img, i, j, h, w, [self.size, self.size], TF.InterpolationMode.BICUBIC)
        return out, box


_MEAN255 = np.asarray(CLIP_MEAN, dtype=np.float32) * 255
_INV_STD255 = 1 / (np.asarray(CLIP_STD, dtype=np.float32) * 255)


def to_clip_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> [3, H, W] float tensor with CLIP normalisation ((x/255 - mean) / std).

    In NumPy rather than torch ops: per-sample tensors are tiny, and torch's intra-op thread pool in every
    DataLoader worker costs more than the arithmetic (10x slower on a busy 2-core machine)."""
    x = (np.asarray(img.convert("RGB"), dtype=np.float32) - _MEAN255) * _INV_STD255  # [H, W, 3]
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


class TrainTransform:
    """Encoded or PIL RGB image -> ([3, size, size] normalised tensor, crop box as a float64 array [4])."""

    def __init__(self, size: int = 224, scale=(0.5, 1.0)):
        self.crop = RandomResizedCropBox(size, scale=scale)

    def __call__(self, img: Image.Image, rng=random) -> Tuple[torch.Tensor, np.ndarray]:
        img, box = self.crop(img, rng)
        return to_clip_tensor(img), np.asarray(box, dtype=np.float64)
