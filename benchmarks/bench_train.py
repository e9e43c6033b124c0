"""Throughput and peak memory of full SegCLIP training steps (contrastive + superpixel KL + MAE, AdamW, clipping).

    python benchmarks/bench_train.py                         # ViT-B/16, batch 8, fp32 and bf16, on CPU or the GPU
    python benchmarks/bench_train.py --device cuda --find_max_batch

The model is a randomly initialised ViT-B/16-sized CLIP (same shapes and FLOPs as the real one; no download).
Each precision runs in its own subprocess so the CPU peak RSS of one does not leak into the other.
Reference point: the 2022 code took 3.96 s for one batch-8 forward+backward on the 2-core CPU of this project.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build_model(args):
    from modules.modeling import SegCLIP
    from engine.optimization import apply_freezing
    from preprocess.synthetic import random_clip_state_dict
    clip = random_clip_state_dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768,
                                  text_width=512, text_layers=12, seed=0)
    model = SegCLIP.from_clip(clip, first_stage_layer=10, use_vision_mae_recon=True, use_seglabel=True)
    apply_freezing(model)
    return model


def one_config(args) -> dict:
    """Time ``--steps`` full training steps after ``--warmup`` untimed ones."""
    import torch
    from engine.optimization import OptimConfig, build_optimizer
    torch.manual_seed(0)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_model(args).to(device).train()
    optimizer, scheduler = build_optimizer(model, OptimConfig(lr=4e-3, lower_lr=4e-6), total_steps=1000)
    B = args.batch_size
    ids = torch.randint(1, 49000, (B, 32), device=device)
    ids[:, 20] = 49407                                            # EOT
    images = torch.randn(B, 3, 224, 224, device=device)
    superpixels = torch.randint(0, 20, (B, 14, 14), device=device)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    params = [p for p in model.parameters() if p.requires_grad]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def step():
        """-> (seconds of forward+backward, seconds of the whole step) in wall and process-CPU time."""
        t0, c0 = time.perf_counter(), time.process_time()
        with (torch.autocast(device.type, dtype=dtype) if dtype is not None else torch.autocast(device.type,
                                                                                                 enabled=False)):
            losses = model.compute_losses(ids, images, superpixels=superpixels)
        losses["total"].backward()
        sync()
        t1, c1 = time.perf_counter(), time.process_time()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        t2, c2 = time.perf_counter(), time.process_time()
        return t1 - t0, t2 - t0, c1 - c0, c2 - c0

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup):
        step()
    runs = sorted((step() for _ in range(args.steps)), key=lambda r: r[1])
    fb, full, cpu_fb, cpu_full = runs[len(runs) // 2]     # the median step
    out = dict(device=str(device), precision=args.precision, batch_size=B, steps=args.steps,
               threads=torch.get_num_threads(), s_per_step_median=full, s_per_step_min=runs[0][1],
               s_fwd_bwd=fb, samples_per_s=B / full,
               # process CPU-seconds: on a busy shared machine, CPU-s / threads estimates the idle-machine wall time
               cpu_s_per_step=cpu_full, cpu_s_fwd_bwd=cpu_fb, load_avg_1min=os.getloadavg()[0])
    if device.type == "cuda":
        out["gpu_name"] = torch.cuda.get_device_name(device)
        out["peak_gpu_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    return out


def run_child(args, precision, batch_size):
    cmd = [sys.executable, os.path.abspath(__file__), "--_child", "--precision", precision, "--batch_size",
           str(batch_size), "--device", args.device, "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--threads", str(args.threads)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or ["?"]
        return {"precision": precision, "batch_size": batch_size, "error": tail[0][:300]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--batch_size", type=int, default=8, help="batch per step")
    ap.add_argument("--precisions", default="fp32,bf16", help="comma list of fp32, bf16, fp16")
    ap.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    ap.add_argument("--find_max_batch", action="store_true",
                    help="GPU: also double the batch until out of memory and time the largest that fits")
    ap.add_argument("--max_batch", type=int, default=4096, help="--find_max_batch stops doubling here")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    ap.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    ap.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.device is None:
        import torch
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args._child:
        print(json.dumps(one_config(args)))
        return
    results = []
    for prec in [p for p in args.precisions.split(",") if p]:
        r = run_child(args, prec, args.batch_size)
        results.append(r)
        print(json.dumps(r), flush=True)
        if args.find_max_batch and args.device.startswith("cuda"):
            b, best = args.batch_size * 2, None
            while b <= args.max_batch:
                r = run_child(args, prec, b)
                if "error" in r:
                    break
                best = r
                print(json.dumps(r), flush=True)
                b *= 2
            if best:
                results.append(dict(best, largest_fitting_batch=True))
    if args.json:
        from common.fileio import atomic_write_text
        atomic_write_text(args.json, json.dumps(results, indent=1) + "\n")
    print("\nprecision  batch  s/step (fwd+bwd)  samples/s  CPU-s/step (fwd+bwd)  peak mem   load")
    for r in results:
        if "error" in r:
            print(f"{r['precision']:<10} {r['batch_size']:>5}  error: {r['error']}")
            continue
        mem = (f"{r['peak_gpu_mem_gib']:.2f} GiB GPU" if "peak_gpu_mem_gib" in r else f"{r['peak_rss_gib']:.2f} GiB RSS")
        print(f"{r['precision']:<10} {r['batch_size']:>5}  {r['s_per_step_median']:6.2f} ({r['s_fwd_bwd']:6.2f})"
              f"  {r['samples_per_s']:9.2f}  {r['cpu_s_per_step']:9.2f} ({r['cpu_s_fwd_bwd']:7.2f})  {mem}"
              f"  {r['load_avg_1min']:.1f}")


if __name__ == "__main__":
    main()
