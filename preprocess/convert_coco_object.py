"""COCO-Stuff-164k label maps -> COCO-Object ``*_instanceTrainIds.png`` (design.md §7.4).

    python preprocess/convert_coco_object.py data/coco_stuff164k                 # val2017
    python preprocess/convert_coco_object.py data/coco_stuff164k --splits val train --nproc 8

Input: ``<coco_path>/annotations/<split>2017/<id>.png`` (COCO-Stuff's own maps: value = COCO category id - 1, 255 =
unlabelled). Output next to them (or under --out_dir): ``<id>_instanceTrainIds.png`` with 0 = background (every stuff
class and unlabelled pixels), 1..80 = the 80 things in COCO's order. Existing outputs are kept (idempotent) unless
--overwrite. Unreadable label files are skipped, listed and counted (exit status 1).
"""
import os
import os.path as osp
import sys
from functools import partial
from multiprocessing import Pool

import numpy as np
from PIL import Image
from tqdm import tqdm

from common import cli
from common.errors import MissingFileError
from common.fileio import atomic_save_image
from common.images import open_image

OUT_SUFFIX = '_instanceTrainIds.png'
# 0-based COCO category ids with no category (COCO skips 12, 26, 29, 30, 45, 66, 68, 69, 71, 83)
UNUSED_THING_IDS = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82)


def object_lut() -> np.ndarray:
    """[256] uint8: COCO-Stuff value -> COCO-Object label. Things 0..89 -> 1..80 in order, everything > 90 (stuff and
    255 unlabelled) -> 0. The unused ids (never present in COCO-Stuff) -> 255 (ignore); the 2022 script left them
    unchanged."""
    lut = np.zeros(256, dtype=np.uint8)
    things = [i for i in range(91) if i not in UNUSED_THING_IDS and i != 90]
    assert len(things) == 80
    lut[:91] = 255
    for new, old in enumerate(things, start=1):
        lut[old] = new
    return lut


def convert_file(src: str, dst: str, overwrite: bool = False):
    """One label map. Returns (src, status) with status 'done', 'kept' or an error message."""
    if not overwrite and osp.isfile(dst):
        return src, 'kept'
    try:
        with open_image(src) as im:
            lab = np.array(im)
        if lab.ndim != 2 or lab.dtype != np.uint8:
            return src, f'expected a single-channel 8-bit label map, got shape {lab.shape} {lab.dtype}'
        # atomic: an interrupted run never leaves a half-written output (nor a temporary of a name of its own)
        atomic_save_image(dst, Image.fromarray(object_lut()[lab]), format='PNG')
        return src, 'done'
    except Exception as e:  # corrupt file: skip and count it, keep converting the rest
        return src, f'{type(e).__name__}: {e}'


def list_jobs(coco_path: str, out_dir: str, split: str):
    src_dir = osp.join(coco_path, 'annotations', f'{split}2017')
    if not osp.isdir(src_dir):
        raise MissingFileError(f'{src_dir} not found: expected COCO-Stuff-164k labels in '
                                f'<coco_path>/annotations/{split}2017/*.png')
    dst_dir = osp.join(out_dir, 'annotations', f'{split}2017')
    os.makedirs(dst_dir, exist_ok=True)
    jobs = []
    for name in sorted(os.listdir(src_dir)):
        # skip our outputs and mmseg's *_labelTrainIds.png, which share the folder
        if not name.endswith('.png') or 'TrainIds' in name or name.endswith('.tmp.png'):
            continue
        jobs.append((osp.join(src_dir, name), osp.join(dst_dir, name[:-4] + OUT_SUFFIX)))
    return jobs


def _run(job, overwrite):
    return convert_file(*job, overwrite=overwrite)


def convert(coco_path: str, out_dir=None, splits=('val',), nproc: int = 1, overwrite: bool = False,
            progress: bool = True):
    """Convert every split; returns counts {'done', 'kept', 'failed'} and the failures [(file, reason)]."""
    out_dir = out_dir or coco_path
    counts, failures = {'done': 0, 'kept': 0, 'failed': 0}, []
    for split in splits:
        jobs = list_jobs(coco_path, out_dir, split)
        if out_dir != coco_path:     # keep the images reachable from the output root (mmseg layout)
            src_img, dst_img = osp.join(coco_path, 'images'), osp.join(out_dir, 'images')
            if osp.isdir(src_img) and not osp.exists(dst_img):
                os.symlink(osp.abspath(src_img), dst_img)
        run = partial(_run, overwrite=overwrite)
        bar = tqdm(total=len(jobs), desc=f'{split}2017', unit='map', disable=not progress)
        if nproc > 1 and len(jobs) > 1:
            with Pool(nproc) as pool:
                results = pool.imap_unordered(run, jobs, chunksize=16)
                for src, status in results:
                    _tally(counts, failures, src, status)
                    bar.update()
        else:
            for job in jobs:
                _tally(counts, failures, *run(job))
                bar.update()
        bar.close()
    return counts, failures


def _tally(counts, failures, src, status):
    if status in ('done', 'kept'):
        counts[status] += 1
    else:
        counts['failed'] += 1
        failures.append((src, status))


def build_parser():
    p = cli.make_parser('Convert COCO-Stuff-164k labels to COCO-Object *_instanceTrainIds.png')
    p.add_argument('coco_path', help='COCO-Stuff-164k root (holds images/ and annotations/<split>2017/*.png)')
    p.add_argument('-o', '--out_dir', default=None, help='output root (default: coco_path, next to the inputs)')
    p.add_argument('--splits', nargs='+', default=['val'], choices=['val', 'train'], help='splits to convert')
    p.add_argument('--nproc', type=int, default=os.cpu_count() or 1, help='worker processes')
    p.add_argument('--overwrite', action='store_true', help='rewrite outputs that already exist')
    p.add_argument('--no_progress', action='store_true', help='no progress bar')
    return p


@cli.run_main
def main(argv=None) -> int:
    args = cli.parse(build_parser(), argv)
    cli.check_writable_dir(args.out_dir, '--out_dir')
    counts, failures = convert(args.coco_path, args.out_dir, args.splits, args.nproc, args.overwrite,
                               progress=not args.no_progress)
    print(f"converted {counts['done']}, already present {counts['kept']}, failed {counts['failed']}")
    for src, why in failures[:20]:
        print(f'  skipped {src}: {why}', file=sys.stderr)
    return 1 if failures else 0


if __name__ == '__main__':
    sys.exit(main())
