"""Wall time of the README demo command on one photo with a FULL-SIZE checkpoint (issue: <= 2.5 s on 2 cores).

    python benchmarks/bench_startup.py                       # fp32, 5 runs, median printed
    python benchmarks/bench_startup.py --precision bf16 --runs 3 --json out.json

A random ViT-B/16 SegCLIP state dict (415 tensors, 755 MB: the released checkpoint's size; random weights cost the
same) is written once to --checkpoint (default: a file in the system temp folder, reused by later runs). Each run
is a fresh ``python main_seg_vis.py --input demo/examples/chelsea.jpg --classes "cat, wall, floor" --vis
input_pred_label`` process, so the figure includes the interpreter, imports, reading the checkpoint, building the
model, encoding the classes, inference and writing the outputs. The first run also warms the page cache and is
not counted. One in-process breakdown (imports, model, text, image) is printed too.
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
COMMAND = ["--input", str(REPO / "demo" / "examples" / "chelsea.jpg"), "--classes", "cat, wall, floor",
           "--vis", "input_pred_label"]


def full_size_checkpoint(path: Path) -> Path:
    if not path.is_file():
        import torch
        from common.fileio import atomic_torch_save
        from modules.modeling import SegCLIP, SegCLIPConfig
        torch.manual_seed(0)
        atomic_torch_save(SegCLIP(SegCLIPConfig()).state_dict(), path)
    return path


def breakdown(checkpoint: Path, precision: str) -> dict:
    """One run in a fresh process, timed by stage."""
    code = f"""
import time, json; t0 = time.perf_counter()
import torch
from modules.checkpoint import load_segclip
from common.images import read_image_bgr
from seg_segmentation.visualize import SegmentationDemo
t1 = time.perf_counter()
model = load_segclip({str(checkpoint)!r}, use_vision_mae_recon=False, precision={precision!r})
t2 = time.perf_counter()
demo = SegmentationDemo(model, ["cat", "wall", "floor"])
t3 = time.perf_counter()
demo.predict(read_image_bgr({str(REPO / 'demo' / 'examples' / 'chelsea.jpg')!r}))
t4 = time.perf_counter()
print(json.dumps(dict(imports_s=t1 - t0, load_model_s=t2 - t1, encode_classes_s=t3 - t2, predict_s=t4 - t3)))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=str(Path(tempfile.gettempdir()) / "segclip_random_vitb16.bin"))
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = ap.parse_args()
    ckpt = full_size_checkpoint(Path(args.checkpoint))
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, str(REPO / "main_seg_vis.py"), *COMMAND, "--init_model", str(ckpt), "--output_dir",
               out, "--no_progress", "--device", args.device, "--precision", args.precision]
        times, cpu = [], []
        for i in range(args.runs + 1):
            r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            t0 = time.perf_counter()
            subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, env=dict(os.environ, SEGCLIP_OFFLINE="1"))
            r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            if i:   # the first run fills the page cache
                times.append(time.perf_counter() - t0)
                cpu.append(r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime)
    stages = breakdown(ckpt, args.precision)
    result = dict(command="python main_seg_vis.py " + " ".join(COMMAND), precision=args.precision,
                  device=args.device, runs=times, median_s=statistics.median(times), min_s=min(times),
                  # CPU-seconds of the process (user + system, all threads): on a busy shared machine wall time
                  # also counts waiting for a core; CPU time does not
                  cpu_s=cpu, median_cpu_s=statistics.median(cpu),
                  stages=stages, cpu_count=os.cpu_count(), load_avg=os.getloadavg()[0])
    print(f"demo command, full-size checkpoint, {args.precision}: median {result['median_s']:.2f} s "
          f"(min {result['min_s']:.2f} s) over {len(times)} runs, median {result['median_cpu_s']:.2f} CPU-s; "
          f"load average {result['load_avg']:.1f}")
    print("stages (one run): " + ", ".join(f"{k} {v:.2f}" for k, v in stages.items()))
    if args.json:
        from common.fileio import atomic_write_text
        atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
