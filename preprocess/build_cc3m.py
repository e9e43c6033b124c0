"""CC3M webdataset shards (img2dataset output) -> pickle-free LMDB store, in one streaming pass (design.md §6).

    python preprocess/build_cc3m.py --shards data/cc3m_wds --output_dir data/cc3m_store

Reads ``NNNNN.tar`` members ``key.jpg`` + ``key.json`` (``caption``) or ``key.txt``; memory stays flat whatever the
number of shards. Corrupt images and samples without caption are skipped and counted. Rerunning resumes: finished
shards are skipped whole, a half-written shard continues where it stopped.
"""
import sys

from common import cli
from dataloaders.build_stores import build_cc3m_store


def build_parser():
    p = cli.make_parser(__doc__)
    p.add_argument("--shards", required=True, nargs="+",
                   help="shard folder (every *.tar), glob, or brace range like 'cc3m/{00000..00331}.tar'")
    p.add_argument("--output_dir", required=True, help="store folder to create or resume")
    cli.add_batch_job_args(p, "images")
    return p


@cli.run_main
def main(argv=None) -> int:
    a = cli.parse(build_parser(), argv)
    cli.check_writable_dir(a.output_dir, "--output_dir")
    return cli.run_batch_job(build_cc3m_store, shards=a.shards, output_dir=a.output_dir, workers=a.workers,
                             max_samples=a.max_samples, progress=not a.no_progress)


if __name__ == "__main__":
    sys.exit(main())
