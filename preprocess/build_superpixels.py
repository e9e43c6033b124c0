"""Felzenszwalb superpixels (scale 224, sigma 0.9, min_size 224) for every image of a store (design.md §6).

    python preprocess/build_superpixels.py --store data/coco_store

Writes STORE/superpixels_scale224_sigma9.0_min_size224.lmdb (key -> zlib-compressed .npy label map), where the
loaders look for it with --use_seglabel. Rerunning resumes.
"""
import sys

from common import cli
from dataloaders.build_stores import build_superpixel_store


def build_parser():
    p = cli.make_parser(__doc__)
    p.add_argument("--store", required=True, help="store folder written by build_coco.py / build_cc3m.py")
    p.add_argument("--output", default=None, help="superpixel LMDB folder (default: inside the store)")
    cli.add_batch_job_args(p, "maps")
    return p


@cli.run_main
def main(argv=None) -> int:
    a = cli.parse(build_parser(), argv)
    cli.check_input_dir(a.store, "--store")
    cli.check_writable_dir(a.output, "--output")
    return cli.run_batch_job(build_superpixel_store, store_dir=a.store, output=a.output, workers=a.workers,
                             max_samples=a.max_samples, progress=not a.no_progress)


if __name__ == "__main__":
    sys.exit(main())
