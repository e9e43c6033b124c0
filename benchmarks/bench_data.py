"""Pretraining-data benchmark: preprocessing throughput and peak memory (2k vs 8k images: memory must stay flat),
superpixel throughput, and loader samples/s with 0 and 2 workers. Prints a table and one JSON line.

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

ROOT = Path(__file__).resolve().parents[1]


def write_shards(out: Path, n: int, per_shard: int, seed: int = 0):
    """n random 400x300 JPEGs with captions as img2dataset-style shards (webdataset TarWriter)."""
    import numpy as np
    from webdataset import TarWriter
    from dataloaders.testing import cc_caption_for, jpeg_bytes, random_image
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for s in range(0, n, per_shard):
        with TarWriter(str(out / f"{s // per_shard:05d}.tar")) as tw:
            for i in range(s, min(n, s + per_shard)):
                # noisy texture so JPEGs have realistic sizes (~30-60 kB) and decode cost
                img = np.asarray(random_image(rng, (400, 300))).astype(np.int16)
                img = np.clip(img + rng.integers(-25, 25, img.shape), 0, 255).astype(np.uint8)
                from PIL import Image
                tw.write({"__key__": f"{i:09d}", "jpg": jpeg_bytes(Image.fromarray(img)),
                          "json": json.dumps({"caption": cc_caption_for(i)}).encode(), "txt": cc_caption_for(i)})


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
    from torch.utils.data import DataLoader
    from dataloaders.datasets import StoreDataset
    ds = StoreDataset(store, max_words=32, use_seglabel=use_seglabel)
    loader = DataLoader(ds, batch_size=min(32, len(ds)), shuffle=True, num_workers=workers, persistent_workers=workers > 0)
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
    results = {"preprocess": [], "superpixels": None, "loader": []}
    try:
        for n in (int(x) for x in a.sizes.split(",")):
            shards = work / f"shards_{n}"
            if not shards.exists():
                write_shards(shards, n, a.per_shard)
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
    print("RESULTS " + json.dumps(results))


if __name__ == "__main__":
    main()
