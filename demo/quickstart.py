"""Offline quickstart: train a tiny SegCLIP from scratch on a generated shapes world and measure that it segments.

    python demo/quickstart.py --output_dir output/quickstart

Runs the real pipeline, each step as its own process, with nothing to download:
  1. preprocess/synthetic.py    image-caption shards (img2dataset layout), a VOC-layout val split, a random tiny CLIP
  2. preprocess/build_cc3m.py   shards -> image/caption store
  3. preprocess/build_superpixels.py   Felzenszwalb superpixels for the KL loss
  4. main_task_align.py         pretraining with contrastive + superpixel KL + MAE losses
  5. main_seg_zeroshot.py      zero-shot mIoU of the untrained and the trained model on the val split
  6. main_seg_vis.py            pictures of a few val images
and prints what was trained, the loss curve and mIoU (trained vs untrained vs chance); everything is also written to
OUTPUT_DIR/summary.json. Step logs are in OUTPUT_DIR/logs/. See docs/quickstart.md for measured numbers.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from common.errors import SegCLIPError

REPO = Path(__file__).resolve().parents[1]

# The random CLIP: width 64 (1 head), 4 visual blocks cut after 2 (first_stage_layer), 2 text blocks, embed 64,
# input resolution = --train_size (the training crop and the zero-shot window; no position-embedding resize), patch 16.
FIRST_STAGE_LAYER = 2


class StepError(SegCLIPError, RuntimeError):
    """A pipeline step exited with an error; the message names it and its log."""


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--output_dir", default="output/quickstart", help="everything is written here")
    p.add_argument("--num_train", type=int, default=2000, help="generated image-caption pairs")
    p.add_argument("--num_val", type=int, default=40, help="generated val images with per-pixel labels")
    p.add_argument("--image_size", type=int, default=128, help="side of the generated images (pixels)")
    p.add_argument("--train_size", type=int, default=224,
                   help="training crop side = the tiny CLIP's input resolution = the zero-shot window (multiple of 16)")
    p.add_argument("--first_stage_layer", type=int, default=FIRST_STAGE_LAYER,
                   help="visual blocks (of 4) before the center block; the rest run on the group tokens")
    p.add_argument("--epochs", type=int, default=2, help="training epochs")
    p.add_argument("--batch_size", type=int, default=32, help="training batch")
    p.add_argument("--lr", type=float, default=1e-3,
                   help="learning rate of every parameter group (the CLIP is random, so no lower LR for it)")
    p.add_argument("--seed", type=int, default=42, help="seed of the data generator and of training")
    p.add_argument("--no_seglabel", action="store_true", help="train without the superpixel KL loss (ablation)")
    p.add_argument("--no_mae", action="store_true", help="train without the MAE reconstruction loss (ablation)")
    p.add_argument("--num_vis", type=int, default=4, help="val images drawn by main_seg_vis.py (0: skip)")
    p.add_argument("--workers", type=int, default=2, help="processes for preprocessing and data loading")
    p.add_argument("--keep_data", action="store_true",
                   help="reuse OUTPUT_DIR/data and OUTPUT_DIR/store when present (e.g. for the ablation runs)")
    args = p.parse_args(argv)
    if args.num_train < args.batch_size:
        p.error(f"--num_train ({args.num_train}) must be at least --batch_size ({args.batch_size})")
    if min(args.epochs, args.num_val, args.batch_size) < 1:
        p.error("--epochs, --num_val and --batch_size must be >= 1")
    return args


def run_step(name: str, cmd: list, log_dir: Path, threads: int = 0) -> float:
    """Run ``python cmd...`` in the repository root, output to log_dir/name.log; -> seconds taken.

    threads > 0 caps the step's intra-op threads (unless OMP_NUM_THREADS is set): on a small CPU shared with data
    loader processes, oversubscribed OpenMP threads spin and can make training 10x slower."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{name}.log"
    print(f"[{name}] python {' '.join(str(c) for c in cmd)}", flush=True)
    start = time.perf_counter()
    env = dict(os.environ)
    if threads > 0 and "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(threads)
    with open(log, "w") as f:
        rc = subprocess.run([sys.executable, *map(str, cmd)], cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                            env=env).returncode
    seconds = time.perf_counter() - start
    if rc != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-15:])
        raise StepError(f"step '{name}' failed (exit {rc}); last lines of {log}:\n{tail}")
    print(f"[{name}] done in {seconds:.0f}s", flush=True)
    return seconds


def parse_loss_curve(log_file: Path) -> list:
    """Training log lines '... (global 10/124) | contrastive 3.6 kl 0.007 mae 0.65 total 4.3 | ...' -> list of
    {'step': 10, 'contrastive': 3.6, ...}."""
    curve = []
    for line in log_file.read_text(errors="replace").splitlines():
        m = re.search(r"\(global (\d+)/\d+\) \| ([^|]+)\|", line)
        if m:
            values = m.group(2).split()
            point = {"step": int(m.group(1))}
            point.update({k: float(v) for k, v in zip(values[::2], values[1::2])})
            curve.append(point)
    return curve


def zero_shot_step(name: str, checkpoint: Path, val_root: Path, out: Path, args, logs: Path) -> tuple:
    """main_seg_zeroshot.py on the synthetic VOC-layout split with its own class list -> (result dict, seconds).

    The window is the training size: the tiny model sees val images at the resolution it was trained at."""
    result = out / f"zeroshot_{name}.json"
    # Every pixel of the synthetic split has a named class (the backgrounds are classes), so the class list has no
    # leading 'background' and main_seg_zeroshot.py runs without a background threshold.
    seconds = run_step(f"zeroshot_{name}", [
        "main_seg_zeroshot.py", "--dataset", "custom", "--data_root", val_root, "--class_names", val_root / "classes.txt",
        "--init_model", checkpoint, "--resolution", args.train_size,
        "--crop_size", args.train_size, "--stride", args.train_size, "--device", "cpu",
        "--num_workers", 0, "--no_progress", "--output", result], logs)
    return json.loads(result.read_text()), seconds


def chance_levels(val_root: Path, class_names: list, seed: int) -> dict:
    """mIoU of two trivial predictors: every pixel the most frequent class of the split, and a uniformly random
    class per pixel."""
    import numpy as np
    import torch
    from PIL import Image
    from seg_segmentation.evaluate import areas_to_metrics, intersect_and_union
    rng = np.random.default_rng(seed)
    C = len(class_names)
    gts = [torch.from_numpy(np.asarray(Image.open(png)).astype(np.int64))
           for png in sorted((val_root / "SegmentationClass").glob("*.png"))]
    majority = int(torch.bincount(torch.cat([g.flatten() for g in gts]), minlength=C).argmax())
    bg, rnd = torch.zeros(4, C, dtype=torch.int64), torch.zeros(4, C, dtype=torch.int64)
    for gt in gts:
        bg += intersect_and_union(torch.full_like(gt, majority), gt, C)
        rnd += intersect_and_union(torch.from_numpy(rng.integers(0, C, size=tuple(gt.shape))), gt, C)
    return {"majority_class": areas_to_metrics(bg, class_names)["mIoU"],
            "uniform_random": areas_to_metrics(rnd, class_names)["mIoU"]}


def foreground_miou(per_class: dict) -> float:
    """Mean IoU over the shape classes only (backgrounds excluded; classes absent from prediction and truth too)."""
    from preprocess.synthetic import BACKGROUNDS
    values = [v for k, v in per_class.items() if k not in {b[0] for b in BACKGROUNDS} and v is not None]
    return sum(values) / len(values) if values else float("nan")


def main(argv=None) -> int:
    args = get_args(argv)
    from dataloaders.stores import is_store
    out = Path(args.output_dir).resolve()
    data, store, train_dir, logs = out / "data", out / "store", out / "train", out / "logs"
    clip_file = data / "tiny_clip.pt"
    use_seglabel, use_mae = not args.no_seglabel, not args.no_mae
    times = {}
    t_start = time.perf_counter()
    try:
        if not (args.keep_data and clip_file.exists()):
            times["generate"] = run_step("generate", [
                "-m", "preprocess.synthetic", "--output_dir", data, "--num_train", args.num_train,
                "--num_val", args.num_val, "--size", args.image_size, "--seed", args.seed,
                "--clip", clip_file.name, "--clip_resolution", args.train_size, "--clip_width", 64, "--clip_embed_dim", 64,
                "--clip_vision_layers", 4, "--clip_text_layers", 2], logs)
        if not (args.keep_data and is_store(store)):
            times["store"] = run_step("store", [
                "-m", "preprocess.build_cc3m", "--shards", *sorted((data / "train").glob("*.tar")),
                "--output_dir", store, "--workers", args.workers, "--no_progress"], logs)
        if use_seglabel and not (args.keep_data and any(store.glob("superpixels_*.lmdb"))):
            times["superpixels"] = run_step("superpixels", [
                "-m", "preprocess.build_superpixels", "--store", store, "--workers", args.workers,
                "--no_progress"], logs)
        train_cmd = [
            "main_task_align.py", "--do_pretrain", "--datatype", "cc", "--cc_store", store,
            "--pretrained_clip_name", clip_file, "--first_stage_layer", args.first_stage_layer,
            "--batch_size", args.batch_size, "--epochs", args.epochs, "--lr", args.lr, "--lower_lr", args.lr,
            "--max_words", 32, "--image_size", args.train_size, "--seed", args.seed, "--freeze_layer_num", -1,  # random CLIP: train all of it
            "--num_thread_reader", max(0, args.workers - 1), "--n_display", 5, "--no_progress",
            "--output_dir", train_dir]
        train_cmd += ["--use_seglabel"] * use_seglabel + ["--use_vision_mae_recon"] * use_mae
        loader_workers = max(0, args.workers - 1)   # the rest of the cores compute
        times["train"] = run_step("train", train_cmd, logs, threads=max(1, (os.cpu_count() or 1) - loader_workers))
        checkpoint = train_dir / f"pytorch_model.bin.{args.epochs - 1}"
        if not checkpoint.exists():
            found = sorted(train_dir.glob("pytorch_model.bin.*"), key=lambda p: int(p.suffix[1:]))
            if not found:
                raise StepError(f"training wrote no pytorch_model.bin.* in {train_dir}")
            checkpoint = found[-1]

        import torch
        from modules.checkpoint import load_clip_state_dict, load_segclip
        from modules.modeling import SegCLIP
        class_names = [c for c in (data / "val" / "classes.txt").read_text().split("\n") if c.strip()]
        # The untrained model: the random CLIP with freshly initialised (seeded) centers, saved as a checkpoint so
        # that both models go through the same evaluation script.
        untrained_file = out / "untrained.bin"
        torch.manual_seed(args.seed)
        untrained = SegCLIP.from_clip(load_clip_state_dict(clip_file), first_stage_layer=args.first_stage_layer,
                                     use_vision_mae_recon=False)
        torch.save(untrained.state_dict(), untrained_file)
        res_untrained, times["eval_untrained"] = zero_shot_step("untrained", untrained_file, data / "val", out, args,
                                                                logs)
        res_trained, times["eval_trained"] = zero_shot_step("trained", checkpoint, data / "val", out, args, logs)
        trained = load_segclip(str(checkpoint), use_vision_mae_recon=False)
        chance = chance_levels(data / "val", class_names, args.seed)

        if args.num_vis > 0:
            names = sorted((data / "val" / "JPEGImages").glob("*.jpg"))[:args.num_vis]
            vis_in = out / "vis_inputs"
            vis_in.mkdir(parents=True, exist_ok=True)
            for p in names:   # main_seg_vis.py takes a folder; link the chosen few into one
                link = vis_in / p.name
                if not link.exists():
                    link.symlink_to(p)
            times["vis"] = run_step("vis", [
                "main_seg_vis.py", "--input", vis_in, "--classes", ", ".join(class_names), "--no_bg",
                "--init_model", checkpoint, "--output_dir", out / "vis", "--vis", "input_pred_label", "all_groups",
                "--device", "cpu", "--no_progress"], logs)
    except StepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

    curve = parse_loss_curve(train_dir / "log.txt")
    losses = ["contrastive"] + ["kl"] * use_seglabel + ["mae"] * use_mae
    summary = {
        "trained": {"losses": losses, "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
                    "train_pairs": args.num_train, "checkpoint": str(checkpoint), "config": {
                        k: v for k, v in vars(trained.config).items() if isinstance(v, (int, float, bool))}},
        "mIoU": {"trained": res_trained["mIoU"], "untrained": res_untrained["mIoU"], **chance},
        "foreground_mIoU": {"trained": foreground_miou(res_trained["per_class"]),
                            "untrained": foreground_miou(res_untrained["per_class"])},
        "per_class_IoU": {"trained": res_trained["per_class"], "untrained": res_untrained["per_class"]},
        "loss_curve": curve, "seconds": {k: round(v, 1) for k, v in times.items()},
        "total_seconds": round(time.perf_counter() - t_start, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))

    cfg = trained.config
    print(f"\nTrained a tiny SegCLIP ({sum(p.numel() for p in trained.parameters()) / 1e6:.2f}M parameters: width "
          f"{cfg.vision_width}, {cfg.vision_layers} visual blocks cut after {cfg.first_stage_layer}, "
          f"{cfg.num_centers} centers, {cfg.text_layers} text blocks) from a random CLIP on {args.num_train} "
          f"synthetic image-caption pairs, {args.epochs} epochs x batch {args.batch_size}, losses: "
          f"{' + '.join(losses)}.")
    if curve:
        show = [curve[0], curve[len(curve) // 2], curve[-1]]
        print("loss curve: " + "; ".join(f"step {c['step']}: " + " ".join(f"{k} {v:.3f}" for k, v in c.items()
                                                                          if k != "step") for c in show))
    print(f"zero-shot mIoU on {args.num_val} val images ({len(class_names)} classes: 5 shapes + 4 backgrounds):")
    print(f"  trained   {res_trained['mIoU']:6.2f}")
    print(f"  untrained {res_untrained['mIoU']:6.2f}")
    print(f"  chance    {chance['majority_class']:6.2f} (majority class), {chance['uniform_random']:.2f} (random)")
    fg = summary["foreground_mIoU"]
    print(f"  shapes only (backgrounds excluded): trained {fg['trained']:.2f}, untrained {fg['untrained']:.2f}")
    print("  per class (trained): " + ", ".join(f"{k} {v:.1f}" if v is not None else f"{k} -"
                                               for k, v in res_trained["per_class"].items()))
    print(f"time: {summary['total_seconds']:.0f}s (" + ", ".join(f"{k} {v:.0f}s" for k, v in times.items()) + ")")
    print(f"summary: {out / 'summary.json'}" + (f"; pictures: {out / 'vis' / 'vis_imgs'}" if args.num_vis else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
