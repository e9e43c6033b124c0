"""COCO captions (Karpathy split) + train2014 images -> pickle-free LMDB store for pretraining (design.md §6).

    python preprocess/build_coco.py --karpathy_json data/karpathy/dataset_coco.json \
        --image_root data/coco --output_dir data/coco_store

Rerunning resumes (images already in the store are skipped). Images are stored as RGB JPEG (quality 95) with the
short side resized to 224; each image keeps all its captions (one training sample per caption).
"""
import sys

from common import cli
from dataloaders.build_stores import build_coco_store


def build_parser():
    p = cli.make_parser(__doc__)
    p.add_argument("--karpathy_json", required=True, help="Karpathy dataset_coco.json")
    p.add_argument("--image_root", required=True,
                   help="COCO root holding train2014/ (and val2014/ for restval), or the train2014 folder itself")
    p.add_argument("--output_dir", required=True, help="store folder to create or resume")
    p.add_argument("--splits", default="train",
                   help="Karpathy splits to store, comma-separated. Default: train (82,783 images, as in 2022)")
    cli.add_batch_job_args(p, "images")
    return p


@cli.run_main
def main(argv=None) -> int:
    a = cli.parse(build_parser(), argv)
    cli.check_input_file(a.karpathy_json, "--karpathy_json")
    cli.check_input_dir(a.image_root, "--image_root")
    cli.check_writable_dir(a.output_dir, "--output_dir")
    return cli.run_batch_job(build_coco_store, karpathy_json=a.karpathy_json, image_root=a.image_root,
                             output_dir=a.output_dir, splits=tuple(s for s in a.splits.split(",") if s),
                             workers=a.workers, max_samples=a.max_samples, progress=not a.no_progress)


if __name__ == "__main__":
    sys.exit(main())
