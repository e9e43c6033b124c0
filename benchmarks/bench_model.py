"""Model throughput: encode_image at 224 (batch 1 and 8) and a full training step (all three losses, batch 8).

    python benchmarks/bench_model.py                 # CPU (and CUDA when present), fp32 and bf16
    python benchmarks/bench_model.py --threads 2 --device cpu --repeats 5

A full-size random ViT-B/16 SegCLIP (weights do not change the cost). For scale, the 2022 code on the 2-core CPU
machine (fp32) took 0.144 s for one 224x224 encode_image, 0.235 s for batch 2, 3.96 s for a batch-8 training
forward+backward with all losses.
"""
import argparse
import contextlib
import json
import resource
import time

import torch

from modules.modeling import SegCLIP, SegCLIPConfig

REF_2022_CPU = {"encode_image_b1_s": 0.144, "encode_image_b2_s": 0.235, "train_b8_s": 3.96}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats, warmup=1):
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return min(times), sum(times) / len(times)


def peak_mem_mb(device):
    """CUDA: peak allocated since the last reset (one per dtype); CPU: the process's peak RSS so far."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cpu, cuda, or both when omitted and CUDA is present")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (the 2022 numbers used 2)")
    ap.add_argument("--repeats", type=int, default=3, help="timed repetitions (the best is reported)")
    ap.add_argument("--train_batch", type=int, default=8, help="batch size of the training step")
    ap.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32, bf16, fp16 (fp16 on CUDA only)")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    devices = [args.device] if args.device else (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    model_cpu = SegCLIP(SegCLIPConfig())
    results = []
    for dev_name in devices:
        device = torch.device(dev_name)
        model = model_cpu.to(device)
        for dt in args.dtypes.split(","):
            if dt == "fp16" and device.type != "cuda":
                continue
            amp = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[dt]
            ctx = (lambda: torch.autocast(device.type, dtype=amp)) if amp else contextlib.nullcontext
            row = {"device": dev_name, "dtype": dt}
            if device.type == "cuda":   # each dtype's own peak, not the largest so far
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            model.eval()
            for b in (1, 2, 8):
                x = torch.randn(b, 3, 224, 224, device=device)
                def run():
                    with torch.no_grad(), ctx():
                        model.encode_image(x)
                best, mean = timed(run, device, args.repeats)
                row[f"encode_image_b{b}_s"] = round(best, 4)
                row[f"encode_image_b{b}_img_per_s"] = round(b / best, 2)
            model.train()
            B = args.train_batch
            images = torch.randn(B, 3, 224, 224, device=device)
            ids = torch.randint(1, 49000, (B, 32), device=device)
            ids[:, -1] = 49407
            sp = torch.randint(0, 6, (B, 14, 14), device=device)
            def step():
                with ctx():
                    losses = model.compute_losses(ids, images, superpixels=sp)
                losses["total"].backward()
                model.zero_grad(set_to_none=True)
            best, mean = timed(step, device, max(1, args.repeats - 1))
            row[f"train_b{B}_s"] = round(best, 3)
            row[f"train_b{B}_samples_per_s"] = round(B / best, 2)
            row["peak_mem_mb"] = round(peak_mem_mb(device))
            if device.type == "cpu":
                for k, ref in REF_2022_CPU.items():
                    if k in row:
                        row[k.replace("_s", "") + "_speedup_vs_2022"] = round(ref / row[k], 2)
            results.append(row)
            print(json.dumps(row))
    if args.json:
        from common.fileio import atomic_write_text
        atomic_write_text(args.json, json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
