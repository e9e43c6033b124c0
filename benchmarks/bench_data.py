"""Pretraining-data benchmark: preprocessing throughput and peak memory (2k vs 8k images: memory must stay flat),
superpixel throughput, and loader samples/s with 0 and 2 workers (stores, and streaming from the shards). The
shards are the quickstart world's (preprocess/synthetic.py) at 400x400. Prints a table and one JSON line.

    python benchmarks/bench_data.py                       # 2000 and 8000 images, ~3 min on 2 cores
    python benchmarks/bench_data.py --sizes 500,2000 --workers 2 --keep data/bench
"""
import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from torch.utils.data import DataLoader

from dataloaders.datasets import StoreDataset
from dataloaders.webdataset_stream import WebDatasetStream
from dataloaders.workers import init_loader_worker
from preprocess.synthetic import write_train_shards

ROOT = Path(__file__).resolve().parents[1]
# Side of the generated square pictures (the quickstart world's shapes on textured backgrounds): ~30-50 kB JPEGs
# like CC3M's after img2dataset's resize.
IMAGE_SIDE = 400
PATCH_SIZE = 16  # ViT-B/16


def run_script(name, *args):
    t0 = time.time()
    p = subprocess.run([sys.executable, str(ROOT / "preprocess" / name), "--no_progress", *map(str, args)],
                       capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"{name} failed:\n{p.stderr[-3000:]}")
    summary = json.loads([ln for ln in p.stdout.splitlines() if ln.startswith("SUMMARY ")][-1][8:])
    summary["wall_s"] = round(time.time() - t0, 2)
    return summary


def loader_rate(store, workers: int, samples: int, use_seglabel: bool) -> float:
    ds = StoreDataset(store, max_words=32, use_seglabel=use_seglabel, patch_size=PATCH_SIZE)
    loader = DataLoader(ds, batch_size=min(32, len(ds)), shuffle=True, num_workers=workers, persistent_workers=workers > 0,
                        worker_init_fn=init_loader_worker)
    return _rate(loader, samples)


def stream_rate(shards, workers: int, samples: int) -> float:
    """--datatype wds: the streaming loader straight from the shards (one process, exact epoch plan)."""
    ds = WebDatasetStream(shards, max_words=32, patch_size=PATCH_SIZE)
    batch = 32
    ds.set_batch_size(batch)
    loader = DataLoader(ds, batch_size=batch, num_workers=workers, drop_last=False, worker_init_fn=init_loader_worker)
    return _rate(loader, samples)


def _rate(loader, samples: int) -> float:
    n, t0 = 0, None
    while n < samples:  # small stores: several epochs
        for batch in loader:
            if t0 is None:  # first batch pays worker start-up; time the steady state
                t0 = time.time()
                continue
            n += batch["image"].shape[0]
            if n >= samples:
                break
    return n / (time.time() - t0)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="2000,8000", help="image counts to preprocess, comma-separated")
    ap.add_argument("--per_shard", type=int, default=1000, help="samples per generated shard")
    ap.add_argument("--workers", type=int, default=2, help="preprocessing processes")
    ap.add_argument("--superpixel_images", type=int, default=200,
                    help="images of the first store to run Felzenszwalb on (slow: ~10 img/s per core)")
    ap.add_argument("--loader_samples", type=int, default=640, help="samples timed per loader setting")
    ap.add_argument("--keep", default=None, help="work folder to keep (default: a temporary one, deleted)")
    a = ap.parse_args()
    work = Path(a.keep or tempfile.mkdtemp(prefix="bench_data_"))
    results = {"preprocess": [], "superpixels": None, "loader": [], "stream": []}
    try:
        for n in (int(x) for x in a.sizes.split(",")):
            shards = work / f"shards_{n}"
            if not shards.exists():
                write_train_shards(str(shards), n, IMAGE_SIDE, seed=0, shard_size=a.per_shard)
            store = work / f"store_{n}"
            shutil.rmtree(store, ignore_errors=True)
            s = run_script("build_cc3m.py", "--shards", shards, "--output_dir", store, "--workers", a.workers)
            results["preprocess"].append({"images": n, "images_per_s": s["images_per_s"],
                                          "peak_private_mb": s["peak_private_mb"], "peak_rss_mb": s["peak_rss_mb"],
                                          "peak_rss_worker_mb": s["peak_rss_worker_mb"],
                                          "store_mb": round(sum(f.stat().st_size for f in store.rglob("*.mdb")) / 2**20, 1)})
        first = work / f"store_{a.sizes.split(',')[0]}"
        small = work / "store_small"
        shutil.rmtree(small, ignore_errors=True)
        run_script("build_cc3m.py", "--shards", sorted((work / f"shards_{a.sizes.split(',')[0]}").glob("*.tar"))[0],
                   "--output_dir", small, "--workers", a.workers, "--max_samples", a.superpixel_images)
        s = run_script("build_superpixels.py", "--store", small, "--workers", a.workers)
        results["superpixels"] = {"images": s["written"], "images_per_s": s["images_per_s"],
                                  "peak_private_mb": s["peak_private_mb"]}
        for workers in (0, 2):
            for seg, store in ((False, first), (True, small)):
                results["loader"].append({"workers": workers, "use_seglabel": seg,
                                          "samples_per_s": round(loader_rate(store, workers, a.loader_samples, seg), 1)})
            results["stream"].append({"workers": workers, "samples_per_s": round(stream_rate(
                work / f"shards_{a.sizes.split(',')[0]}", workers, a.loader_samples), 1)})
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    # private = anonymous memory of the writer process; RSS adds LMDB's file-backed (reclaimable) mapped pages
    print(f"{'images':>8} {'img/s':>8} {'peak private MiB':>17} {'peak RSS MiB':>13} {'peak RSS worker MiB':>20} "
          f"{'store MiB':>10}")
    for r in results["preprocess"]:
        print(f"{r['images']:>8} {r['images_per_s']:>8} {r['peak_private_mb']:>17} {r['peak_rss_mb']:>13} "
              f"{r['peak_rss_worker_mb']:>20} {r['store_mb']:>10}")
    print(f"superpixels: {results['superpixels']}")
    for r in results["loader"]:
        print(f"loader workers={r['workers']} use_seglabel={r['use_seglabel']}: {r['samples_per_s']} samples/s")
    for r in results["stream"]:
        print(f"stream (--datatype wds) workers={r['workers']}: {r['samples_per_s']} samples/s")
    print("RESULTS " + json.dumps(results))


if __name__ == "__main__":
    main()
