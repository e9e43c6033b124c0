"""Tiny generated datasets in the real on-disk layouts (tests and benchmarks; no download needed).

    root = write_fake_dataset('voc', tmp_path / 'VOC2012', num_images=3, size=(120, 90))

Images are random-coloured blocks saved as JPEG/PNG; labels are blocks of random class ids with a band of 255
(ignore), written the way each benchmark stores them (VOC: palette PNG; others: grey PNG).
"""
import os
import os.path as osp
from typing import Optional, Tuple

import numpy as np
from PIL import Image

from .datasets import LAYOUTS
from .drawing import voc_palette

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


def random_image(rng: np.random.Generator, h: int, w: int, labels: Optional[np.ndarray] = None) -> np.ndarray:
    """[h, w, 3] uint8 RGB: a colour per label value plus noise (so the picture correlates with its labels)."""
    if labels is None:
        labels = random_label_map(rng, h, w, 8, ignore=False)
    colours = rng.integers(0, 256, size=(256, 3))
    img = colours[labels] + rng.integers(-20, 21, size=(h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _save_label(path: str, lab: np.ndarray, palette: bool) -> None:
    """VOC stores labels as palette PNGs (pixel value = palette index = class id), the others as grey PNGs."""
    im = Image.fromarray(lab)           # mode 'L'
    if palette:
        im = im.convert('P')            # keeps the index values; then give it VOC's colours
        im.putpalette(voc_palette().flatten().tolist())
    im.save(path)


def write_fake_dataset(dataset: str, root, num_images: int = 3, size: Tuple[int, int] = (120, 90),
                       seed: int = 0, sizes=None, jpeg_quality: int = 90) -> str:
    """Write ``num_images`` samples of ``dataset`` under ``root`` in its mmseg layout; returns ``root``.

    size: (width, height) of every image, or ``sizes``: a list of (width, height), one per image.
    """
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
        img = random_image(rng, h, w, lab)
        os.makedirs(osp.join(img_dir, sub), exist_ok=True)
        os.makedirs(osp.join(ann_dir, sub), exist_ok=True)
        img_path = osp.join(img_dir, sub, name + layout.img_suffix)
        if layout.img_suffix.endswith('.png'):
            Image.fromarray(img).save(img_path)
        else:
            Image.fromarray(img).save(img_path, quality=jpeg_quality)
        _save_label(osp.join(ann_dir, sub, name + layout.seg_map_suffix), lab, palette=dataset in ('voc', 'voc20'))
        names.append(name)
    if layout.split:
        os.makedirs(osp.dirname(osp.join(root, layout.split)), exist_ok=True)
        with open(osp.join(root, layout.split), 'w') as f:
            f.write('\n'.join(names) + '\n')
    return root
