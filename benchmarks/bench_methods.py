"""Speed and memory of every training-free method of the harness on VOC-sized images, fp32 and bf16.

    python benchmarks/bench_methods.py                          # every method, CPU, 2 images 500x375, fp32 + bf16
    python benchmarks/bench_methods.py --methods sclip,cass --images 4 --precisions fp32 --json methods.json

The models are full size with random weights: CLIP ViT-B/16 (and DINO ViT-B/8, the official architecture of
``dino_vitb8``, for the methods with a second vision model). Each image is a 500x375 photo resized as the method's
VOC21 preset says (short side 336 or 448), so each method runs its own windows (six 224 windows at 336x448, two of
448, or the whole image). Timed: the prediction of every image with the windows of all images batched
(``--batch_size``), and the same with one window at a time, which is how the methods' own code runs them. Text
queries are encoded once, outside the timing. Each method and precision runs in a fresh process, so its peak
resident memory is its own: ``peak_rss_mb`` is the peak while the images are segmented (counted from after a
warm-up image, models built), ``run_mb`` that peak minus the memory before the timed runs.
Wall seconds count waiting for a core on a shared machine; ``cpu_s_per_image`` (process time over all threads) is
the steadier figure. Prints per method and precision the median of ``--repeat`` runs, and the pixel agreement of
bf16 with fp32.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def full_size_clip(seed: int = 0):
    """CLIP ViT-B/16's sizes (visual 768 x 12 blocks, text 512 x 12 blocks, 224 px), random weights."""
    from modules.clip import CLIP
    from preprocess.synthetic import random_clip_state_dict
    sd = random_clip_state_dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768,
                                text_width=512, text_layers=12, seed=seed)
    return CLIP.from_state_dict(sd).eval()


def full_size_vfm(name: str, seed: int = 0):
    """A second vision model of the real size (random weights): the official architecture of ``name``."""
    import torch
    from modules.vfm import VFM_CONFIGS, VisionTransformerVFM
    torch.manual_seed(seed)
    model = VisionTransformerVFM(VFM_CONFIGS[name])
    with torch.no_grad():
        for p in (model.cls_token, model.pos_embed):
            p.normal_(0, 0.02)
    return model.eval()


def photos(n: int, seed: int = 0):
    """n random 500x375 photos (uint8 BGR, smooth colour fields so the picture is not pure noise)."""
    import numpy as np
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        small = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
        img = np.kron(small, np.ones((63, 63, 1), dtype=np.uint8))[:375, :500]
        out.append(np.clip(img.astype(np.int16) + rng.integers(-12, 13, img.shape), 0, 255).astype(np.uint8))
    return out


def status_mb(field: str) -> float:
    """VmRSS (resident now) or VmHWM (peak resident) of this process, in MB."""
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ':')) / 1024


def reset_peak() -> bool:
    """Restart the peak-memory count (Linux: writing 5 to clear_refs), so the peak of building the models in
    float32 before a bf16 cast is not counted as the images'."""
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        return True
    except OSError:
        return False


def median_time(fn, repeats: int):
    """(median wall s, median CPU s; to the millisecond) of ``repeats`` calls of ``fn`` after one warm-up call."""
    fn()
    walls, cpus = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return round(statistics.median(walls), 3), round(statistics.median(cpus), 3)


def rows_per_precision(doc: str, script: str, one_precision):
    """The driver of a benchmark that measures one precision per fresh process (bench_vfm.py, bench_cass.py):
    parses ``--repeats --threads --precisions --json``; in a child (``--one PRECISION``) prints the row of
    ``one_precision(precision, repeats, threads)`` as JSON and returns None; in the parent runs one child per
    precision and returns (rows, the ``--json`` path or None)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median; default 3)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--json", default=None, help="also write the rows here")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)   # the child process: one precision, JSON out
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one_precision(args.one, args.repeats, args.threads)))
        return None
    rows = []
    for precision in args.precisions:
        out = subprocess.run([sys.executable, script, "--one", precision, "--repeats", str(args.repeats),
                              "--threads", str(args.threads)], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return rows, args.json


def worker(args) -> None:
    """One method at one precision, in this (fresh) process: prints one JSON line, saves its labels."""
    import torch
    from modules.precision import set_precision
    from seg_segmentation.classes import DATASET_CLASSES
    from seg_segmentation.dense import TrainingFreeSegmentor
    from seg_segmentation.inference import slide_windows
    from seg_segmentation.methods import METHODS, build_method
    from seg_segmentation.preprocessing import eval_image_tensor
    if args.threads:
        torch.set_num_threads(args.threads)
    cls = METHODS[args.worker]
    settings = cls.settings('voc')
    clip = set_precision(full_size_clip(), args.worker_precision)
    vfm = set_precision(full_size_vfm(cls.vfm), args.worker_precision) if cls.vfm else None
    seg = TrainingFreeSegmentor(build_method(cls.name, clip, vfm=vfm), batch_size=args.batch_size,
                                classes=[[n] for n in DATASET_CLASSES['voc'][1:]], **settings)
    raw = photos(args.images)
    images = [eval_image_tensor(bgr, settings['resolution'], 2048) for bgr in raw]
    sizes = [bgr.shape[:2] for bgr in raw]
    windows = sum(len(slide_windows(*img.shape[-2:], settings['crop'], settings['stride'])) for img in images)

    def timed(batch_size):
        walls, cpus = [], []
        for _ in range(args.repeat):
            w0, c0 = time.perf_counter(), time.process_time()
            labels = seg.predict_labels(images, sizes, batch_size=batch_size)
            walls.append((time.perf_counter() - w0) / len(images))
            cpus.append((time.process_time() - c0) / len(images))
        return statistics.median(walls), statistics.median(cpus), labels

    seg.predict_labels(images[:1], sizes[:1])                                  # warm-up
    loaded_mb = status_mb('VmRSS')
    reset = reset_peak()
    wall, cpu, labels = timed(args.batch_size)
    row = dict(method=cls.name, precision=args.worker_precision, resolution=settings['resolution'],
               crop=settings['crop'], stride=settings['stride'], windows_per_image=windows / len(images),
               s_per_image=wall, cpu_s_per_image=cpu, images_per_s=1 / wall)
    if not args.no_batch1:
        wall1, cpu1, _ = timed(1)
        row.update(batch1_s_per_image=wall1, batch1_cpu_s_per_image=cpu1)
    peak = status_mb('VmHWM') if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    row.update(rss_before_mb=loaded_mb, peak_rss_mb=peak, run_mb=peak - loaded_mb)
    torch.save([lb.to(torch.int16) for lb in labels], args.labels_out)
    print('RESULT ' + json.dumps(row), flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--methods', default=None, help='comma-separated methods (default: every method)')
    p.add_argument('--images', type=int, default=2, help='500x375 images per run')
    p.add_argument('--precisions', default='fp32,bf16', help='comma-separated: fp32, bf16')
    p.add_argument('--batch_size', type=int, default=16, help='windows per forward pass (ours)')
    p.add_argument('--repeat', type=int, default=3, help='runs per setting; the median counts')
    p.add_argument('--no_batch1', action='store_true', help='skip the one-window-at-a-time runs')
    p.add_argument('--threads', type=int, default=2, help='torch CPU threads')
    p.add_argument('--json', default=None, help='also write the figures to this JSON file')
    p.add_argument('--worker', default=None, help=argparse.SUPPRESS)
    p.add_argument('--worker_precision', default=None, help=argparse.SUPPRESS)
    p.add_argument('--labels_out', default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)

    sys.path.insert(0, str(REPO))
    from seg_segmentation.methods import METHODS
    names = args.methods.split(',') if args.methods else list(METHODS)
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        sys.exit(f'unknown method(s) {unknown}; choose from {", ".join(METHODS)}')
    print(f'CPU, {args.threads} threads; {args.images} images 500x375; random CLIP ViT-B/16'
          f'{" + DINO ViT-B/8" if any(METHODS[m].vfm for m in names) else ""}; each run in a fresh process',
          flush=True)
    import torch
    report = []
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get('PYTHONPATH', '')]))
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            labels = {}
            for precision in args.precisions.split(','):
                out = Path(tmp) / f'{name}-{precision}.pt'
                cmd = [sys.executable, __file__, '--worker', name, '--worker_precision', precision, '--labels_out',
                       str(out), '--images', str(args.images), '--batch_size', str(args.batch_size), '--repeat',
                       str(args.repeat), '--threads', str(args.threads)] + (['--no_batch1'] if args.no_batch1 else [])
                r = subprocess.run(cmd, capture_output=True, text=True, env=env)
                lines = [ln for ln in r.stdout.splitlines() if ln.startswith('RESULT ')]
                if r.returncode or not lines:
                    print(f'{name} {precision}: failed\n{r.stderr[-2000:]}', flush=True)
                    continue
                row = json.loads(lines[-1][len('RESULT '):])
                labels[precision] = torch.load(out, weights_only=True)
                if precision != 'fp32' and 'fp32' in labels:
                    same = sum(int((a == b).sum()) for a, b in zip(labels['fp32'], labels[precision]))
                    row['pixel_agreement_with_fp32'] = same / sum(a.numel() for a in labels['fp32'])
                report.append(row)
                where = f'{row["windows_per_image"]:.0f} windows of {row["crop"]}' if row['crop'] else 'whole image'
                line = (f'{name:10s} {precision:5s} {row["s_per_image"]:.2f} s/image ({row["cpu_s_per_image"]:.2f} '
                        f'CPU s; {row["images_per_s"]:.2f} img/s; {where}); peak {row["peak_rss_mb"]:.0f} MB '
                        f'(+{row["run_mb"]:.0f} MB for the images)')
                if 'batch1_s_per_image' in row:
                    line += f'; one window at a time {row["batch1_s_per_image"]:.2f} s'
                if 'pixel_agreement_with_fp32' in row:
                    line += f'; labels equal to fp32 on {100 * row["pixel_agreement_with_fp32"]:.2f} % of pixels'
                print(line, flush=True)
    if args.json:
        from common.fileio import atomic_write_text
        atomic_write_text(args.json, json.dumps(report, indent=2) + '\n')


if __name__ == '__main__':
    main()
