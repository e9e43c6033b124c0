"""Speed of every training-free method of the harness: images/s on VOC-sized images, fp32 and bf16.

    python benchmarks/bench_methods.py                          # every method, CPU, 4 images 500x375, fp32 + bf16
    python benchmarks/bench_methods.py --methods sclip,naclip --images 8 --precisions fp32 --json methods.json

The models are full size with random weights: CLIP ViT-B/16 (and DINO ViT-B/8 for the methods with a second vision
model). Each image is a 500x375 photo-sized input resized as the method's VOC21 preset says (short side 336 or
448), so each method runs its own windows (e.g. 6 windows of 224 at 336x448, or the whole image). Timed: the
prediction of every image, windows of all images batched (``--batch_size``), versus the same with one window at a
time, which is how the methods' own code runs them. Text queries are encoded once, outside the timing. Prints
per method and precision: seconds per image (median of ``--repeat`` runs), images/s, windows per image, the
batch-1 time, and the pixel agreement of bf16 with fp32.
"""
import argparse
import copy
import json
import statistics
import sys
import time

import numpy as np
import torch

from modules.clip import CLIP
from modules.precision import set_precision
from preprocess.synthetic import random_clip_state_dict
from seg_segmentation.classes import DATASET_CLASSES
from seg_segmentation.dense import TrainingFreeSegmentor
from seg_segmentation.inference import slide_windows
from seg_segmentation.methods import METHODS, build_method
from seg_segmentation.preprocessing import eval_image_tensor


def full_size_clip(seed: int = 0) -> CLIP:
    """CLIP ViT-B/16's sizes (visual 768 x 12 blocks, text 512 x 12 blocks, 224 px), random weights."""
    sd = random_clip_state_dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768,
                                text_width=512, text_layers=12, seed=seed)
    return CLIP.from_state_dict(sd).eval()


def full_size_vfm(name: str, seed: int = 0):
    """A second vision model of the real size (random weights): the official architecture of ``name``."""
    from modules.vfm import VFM, VFM_CONFIGS
    torch.manual_seed(seed)
    model = VFM(VFM_CONFIGS[name])
    with torch.no_grad():
        for p in (model.cls_token, model.pos_embed):
            p.normal_(0, 0.02)
    return model.eval()


def photos(n: int, seed: int = 0):
    """n random 500x375 photos (uint8 BGR, smooth colour fields so the picture is not pure noise)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        small = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
        img = np.kron(small, np.ones((63, 63, 1), dtype=np.uint8))[:375, :500]
        out.append(np.clip(img.astype(np.int16) + rng.integers(-12, 13, img.shape), 0, 255).astype(np.uint8))
    return out


def run(seg: TrainingFreeSegmentor, images, sizes, batch_size: int):
    start = time.perf_counter()
    labels = seg.predict_labels(images, sizes, batch_size=batch_size)
    return time.perf_counter() - start, labels


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--methods', default=','.join(METHODS), help='comma-separated methods')
    p.add_argument('--images', type=int, default=4, help='500x375 images per run')
    p.add_argument('--precisions', default='fp32,bf16', help='comma-separated: fp32, bf16')
    p.add_argument('--batch_size', type=int, default=16, help='windows per forward pass (ours)')
    p.add_argument('--repeat', type=int, default=3, help='runs per setting; the median counts')
    p.add_argument('--no_batch1', action='store_true', help='skip the one-window-at-a-time runs')
    p.add_argument('--threads', type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument('--json', default=None, help='also write the figures to this JSON file')
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [m for m in args.methods.split(',') if m]
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        sys.exit(f'unknown method(s) {unknown}; choose from {", ".join(METHODS)}')

    clip, vfms = full_size_clip(), {}
    raw = photos(args.images)
    classes = [[n] for n in DATASET_CLASSES['voc'][1:]]
    print(f'CPU, {torch.get_num_threads()} threads; {args.images} images 500x375; random CLIP ViT-B/16'
          f'{" + DINO ViT-B/8" if any(METHODS[m].vfm for m in names) else ""}', flush=True)
    report = []
    for name in names:
        cls = METHODS[name]
        settings = cls.settings('voc')
        if cls.vfm and cls.vfm not in vfms:
            vfms[cls.vfm] = full_size_vfm(cls.vfm)
        images = [eval_image_tensor(bgr, settings['resolution'], 2048) for bgr in raw]
        sizes = [bgr.shape[:2] for bgr in raw]
        windows = sum(len(slide_windows(*img.shape[-2:], settings['crop'], settings['stride'])) for img in images)
        labels = {}
        for precision in args.precisions.split(','):
            model = set_precision(copy.deepcopy(clip), precision)
            vfm = set_precision(copy.deepcopy(vfms[cls.vfm]), precision) if cls.vfm else None
            seg = TrainingFreeSegmentor(build_method(name, model, vfm=vfm), classes=classes,
                                        batch_size=args.batch_size, **settings)
            run(seg, images[:1], sizes[:1], args.batch_size)                  # warm-up
            times = []
            for _ in range(args.repeat):
                t, labels[precision] = run(seg, images, sizes, args.batch_size)
                times.append(t / len(images))
            row = dict(method=name, precision=precision, resolution=settings['resolution'], crop=settings['crop'],
                       stride=settings['stride'], windows_per_image=windows / len(images),
                       s_per_image=statistics.median(times), images_per_s=1 / statistics.median(times))
            if not args.no_batch1:
                t1 = statistics.median(run(seg, images, sizes, 1)[0] / len(images) for _ in range(args.repeat))
                row.update(batch1_s_per_image=t1, speedup_vs_batch1=t1 / row['s_per_image'])
            if precision != 'fp32' and 'fp32' in labels:
                same = sum(int((a == b).sum()) for a, b in zip(labels['fp32'], labels[precision]))
                row['pixel_agreement_with_fp32'] = same / sum(a.numel() for a in labels['fp32'])
            report.append(row)
            line = (f'{name:10s} {precision:5s} {row["s_per_image"]:.3f} s/image ({row["images_per_s"]:.2f} img/s, '
                    f'{row["windows_per_image"]:.0f} windows of {row["crop"] or "the whole image"})')
            if 'batch1_s_per_image' in row:
                line += f'; one window at a time {row["batch1_s_per_image"]:.3f} s ({row["speedup_vs_batch1"]:.2f}x)'
            if 'pixel_agreement_with_fp32' in row:
                line += f'; labels equal to fp32 on {100 * row["pixel_agreement_with_fp32"]:.3f} % of pixels'
            print(line, flush=True)
    if args.json:
        from common.fileio import atomic_write_text
        atomic_write_text(args.json, json.dumps(report, indent=2) + '\n')


if __name__ == '__main__':
    main()
