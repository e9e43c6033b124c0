"""Offline quickstart: train a tiny CLIP, then a tiny SegCLIP from it, on a generated shapes world; measure that it segments.

    python demo/quickstart.py --output_dir output/quickstart

Runs the real pipeline, each step as its own process, with nothing to download:
  1. preprocess/synthetic.py    image-caption shards (img2dataset layout), a VOC-layout val split, a random tiny CLIP
  2. preprocess/build_cc3m.py   shards -> image/caption store
  3. preprocess/build_superpixels.py   Felzenszwalb superpixels for the KL loss
  4. main_task_align.py --plain_clip   the CLIP stage: the tiny CLIP learns the world's concepts from its captions
                                       (contrastive loss, every block; stands in for OpenAI's CLIP pretraining)
  5. main_task_align.py         the SegCLIP stage from that CLIP: contrastive + superpixel KL + MAE losses, new parts
                                at --lr and the inherited CLIP at --lower_lr (the published split)
  6. main_seg_zeroshot.py       zero-shot mIoU on the held-out val split: untrained, after the CLIP stage, after each
                                SegCLIP epoch
  7. main_seg_vis.py            center assignments and predictions on a few val images, at the start and the end
and prints what was trained, the loss curve and mIoU (trained vs untrained vs chance); everything is also written to
OUTPUT_DIR/summary.json and OUTPUT_DIR/curves.png. Step logs are in OUTPUT_DIR/logs/. See docs/quickstart.md.
"""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import cli
from common.errors import SegCLIPError, UsageError
from common.fileio import atomic_torch_save, atomic_write_text

REPO = Path(__file__).resolve().parents[1]

# The random CLIP: width 64 (1 head), 4 visual blocks cut after 2 (first_stage_layer), 2 text blocks, embed 64,
# input resolution = --train_size (the training crop and the zero-shot window; no position-embedding resize), patch 16.
FIRST_STAGE_LAYER = 2


# Written inside every folder of --output_dir the quickstart makes (data/, store/, train_clip/, train/): only such a
# folder is ever replaced by a later run; a folder of the same name without it is the user's and is never touched.
OWN_MARKER = ".segclip_quickstart"
OWN_FOLDERS = ("data", "store", "train_clip", "train")


class StepError(SegCLIPError, RuntimeError):
    """A pipeline step exited with an error; the message names it and its log."""


def build_parser():
    p = cli.make_parser(__doc__.split("\n\n")[0], config=False)
    p.add_argument("--output_dir", default="output/quickstart", help="everything is written here")
    g = p.add_argument_group("the world")
    g.add_argument("--num_train", type=int, default=2000, help="generated image-caption pairs")
    g.add_argument("--num_val", type=int, default=100, help="generated held-out val images with per-pixel labels")
    g.add_argument("--image_size", type=int, default=128, help="side of the generated images (pixels)")
    g = p.add_argument_group("training")
    g.add_argument("--train_size", type=int, default=112,
                   help="training crop side = the tiny CLIP's input resolution = the zero-shot window (multiple of 16)")
    g.add_argument("--first_stage_layer", type=int, default=FIRST_STAGE_LAYER,
                   help="visual blocks (of 4) before the center block; the rest run on the group tokens")
    g.add_argument("--clip_epochs", type=int, default=4,
                   help="epochs of the CLIP stage; 0 skips it: SegCLIP from the random CLIP (ablation)")
    g.add_argument("--clip_lr", type=float, default=1e-3, help="learning rate of the CLIP stage (every parameter)")
    g.add_argument("--epochs", type=int, default=2, help="epochs of the SegCLIP stage")
    g.add_argument("--batch_size", type=int, default=32, help="training batch of both stages")
    g.add_argument("--lr", type=float, default=1e-4, help="SegCLIP stage: learning rate of the new parts "
                   "(centers, the blocks after them, MAE, projection)")
    g.add_argument("--lower_lr", type=float, default=1e-6,
                   help="SegCLIP stage: learning rate of the parts inherited from the CLIP stage")
    g.add_argument("--seed", type=int, default=42, help="seed of the data generator and of training")
    g.add_argument("--no_seglabel", action="store_true", help="train without the superpixel KL loss (ablation)")
    g.add_argument("--no_mae", action="store_true", help="train without the MAE reconstruction loss (ablation)")
    g = p.add_argument_group("running")
    g.add_argument("--num_vis", type=int, default=4, help="val images drawn by main_seg_vis.py (0: skip)")
    g.add_argument("--workers", type=int, default=2, help="processes for preprocessing and data loading")
    g.add_argument("--keep_data", action="store_true",
                   help="reuse OUTPUT_DIR/data and OUTPUT_DIR/store when present (e.g. for the ablation runs)")
    return p


def get_args(argv=None):
    args = cli.parse(build_parser(), argv)
    cli.check_positive(args, "num_train", "num_val", "epochs", "batch_size", "image_size", "train_size")
    if args.clip_epochs < 0:
        raise UsageError(f"--clip_epochs must be >= 0, got {args.clip_epochs}")
    if args.num_train < args.batch_size:
        raise UsageError(f"--num_train ({args.num_train}) must be at least --batch_size ({args.batch_size})")
    if args.train_size % 16:
        raise UsageError(f"--train_size {args.train_size} must be a multiple of the patch size 16")
    return args


def is_own(folder: Path) -> bool:
    return folder.is_dir() and not folder.is_symlink() and (folder / OWN_MARKER).is_file()


def check_own_folders(out: Path) -> None:
    """Before any step: every folder the quickstart writes into is absent, empty, or its own (marker inside);
    otherwise UsageError naming it, and nothing is touched."""
    for name in OWN_FOLDERS:
        folder = out / name
        if not (folder.exists() or folder.is_symlink()) or is_own(folder):
            continue
        if folder.is_dir() and not folder.is_symlink() and not any(folder.iterdir()):
            continue
        raise UsageError(f"{folder} was not made by demo/quickstart.py (it has no {OWN_MARKER} marker inside; "
                         "quickstart runs before this version left none) and the quickstart would write into it: "
                         "move it away, or choose another --output_dir")


def own_folder(folder: Path, fresh: bool = False) -> Path:
    """``folder`` as the quickstart's own, with its marker; ``fresh``: emptied first (only ever an own folder:
    ``check_own_folders`` ran before)."""
    if fresh and is_own(folder):
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / OWN_MARKER).is_file():
        atomic_write_text(folder / OWN_MARKER, "this folder was made by demo/quickstart.py, which may replace it\n")
    return folder


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
    with open(log, "w") as f:   # a log, appended as the step runs (like log.txt), not a result file
        rc = subprocess.run([sys.executable, *map(str, cmd)], cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                            env=env).returncode
    seconds = time.perf_counter() - start
    if rc != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-15:])
        raise StepError(f"step '{name}' failed (exit {rc}); last lines of {log}:\n{tail}")
    print(f"[{name}] done in {seconds:.0f}s", flush=True)
    return seconds


def last_checkpoint(train_dir: Path, epochs: int) -> Path:
    """train_dir/pytorch_model.bin.{epochs-1}, else the latest one written."""
    checkpoint = train_dir / f"pytorch_model.bin.{epochs - 1}"
    if checkpoint.exists():
        return checkpoint
    found = sorted(train_dir.glob("pytorch_model.bin.*"), key=lambda p: int(p.suffix[1:]))
    if not found:
        raise StepError(f"training wrote no pytorch_model.bin.* in {train_dir}")
    return found[-1]


def loss_curve(train_dir: Path, stage: str, step_offset: int = 0) -> list:
    """The 'step' records of train_dir/metrics.jsonl -> [{'stage', 'step' (counted over both stages), 'epoch',
    term: mean loss ...}]."""
    from engine.metrics import METRICS_NAME, read_metrics
    return [dict(stage=stage, step=r["step"] + step_offset, epoch=r["epoch"], **r["loss"])
            for r in read_metrics(train_dir / METRICS_NAME, kind="step")]


def zero_shot_step(name: str, checkpoint: Path, val_root: Path, out: Path, args, logs: Path) -> tuple:
    """main_seg_zeroshot.py on the synthetic VOC-layout split with its own class list -> (result dict, seconds).

    The window is the training size: the tiny model sees val images at the resolution it was trained at."""
    result = out / "zeroshot" / f"{name}.json"
    result.parent.mkdir(parents=True, exist_ok=True)
    # Every pixel of the synthetic split has a named class (the backgrounds are classes), so the class list has no
    # leading 'background' and main_seg_zeroshot.py runs without a background threshold.
    seconds = run_step(f"zeroshot_{name}", [
        "main_seg_zeroshot.py", "--dataset", "custom", "--data_root", val_root,
        "--class_names", val_root / "classes.txt", "--init_model", checkpoint, "--resolution", args.train_size,
        "--crop_size", args.train_size, "--stride", args.train_size, "--device", "cpu",
        "--num_workers", 0, "--no_progress", "--output", result], logs)
    return json.loads(result.read_text()), seconds


def chance_levels(val_root: Path, class_names: list, seed: int) -> dict:
    """mIoU of two trivial predictors: every pixel the most frequent class of the split, and a uniformly random
    class per pixel."""
    import numpy as np
    import torch
    from common.images import read_label_map
    from seg_segmentation.evaluate import areas_to_metrics, intersect_and_union
    rng = np.random.default_rng(seed)
    C = len(class_names)
    gts = [torch.from_numpy(read_label_map(png))
           for png in sorted((val_root / "SegmentationClass").glob("*.png"))]
    majority = int(torch.bincount(torch.cat([g.flatten() for g in gts]), minlength=C).argmax())
    bg, rnd = torch.zeros(4, C, dtype=torch.int64), torch.zeros(4, C, dtype=torch.int64)
    for gt in gts:
        bg += intersect_and_union(torch.full_like(gt, majority), gt, C)
        rnd += intersect_and_union(torch.from_numpy(rng.integers(0, C, size=tuple(gt.shape))), gt, C)
    return {"majority_class": areas_to_metrics(bg, class_names)["mIoU"],
            "uniform_random": areas_to_metrics(rnd, class_names)["mIoU"]}


def shapes_miou(per_class: dict) -> float:
    """Mean IoU over the shape classes only (backgrounds excluded; classes absent from prediction and truth too)."""
    from preprocess.synthetic import BACKGROUNDS
    values = [v for k, v in per_class.items() if k not in {b[0] for b in BACKGROUNDS} and v is not None]
    return sum(values) / len(values) if values else float("nan")


def plot_curves(path: Path, curve: list, miou_curve: list) -> None:
    """curves.png: training losses per logged step (both stages) and zero-shot mIoU per SegCLIP epoch."""
    import io
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from common.fileio import atomic_write_bytes
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for term, style in (("contrastive", "-"), ("kl", ":"), ("mae", "--")):
        pts = [(c["step"], c[term]) for c in curve if term in c]
        if pts:
            ax1.plot(*zip(*pts), style, label=term)
    clip_steps = [c["step"] for c in curve if c["stage"] == "clip"]
    if clip_steps:
        ax1.axvline(max(clip_steps), color="grey", lw=0.8)
        ax1.text(max(clip_steps), ax1.get_ylim()[1], " SegCLIP stage", va="top", fontsize=8, color="grey")
    ax1.set(xlabel="optimizer step (CLIP stage, then SegCLIP stage)", ylabel="loss", yscale="log")
    ax1.legend(fontsize=8)
    xs = [m["epoch"] for m in miou_curve]
    ax2.plot(xs, [m["mIoU"] for m in miou_curve], "o-", label="all 9 classes")
    ax2.plot(xs, [m["shapes_mIoU"] for m in miou_curve], "s-", label="5 shapes")
    ax2.set(xlabel="SegCLIP epoch (0 = after the CLIP stage, fresh centers)", ylabel="zero-shot mIoU (%)")
    ax2.set_xticks(xs)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def draw(name: str, checkpoint: Path, images: list, class_names: list, out: Path, logs: Path) -> float:
    """main_seg_vis.py: predictions and every center's assignment (all_groups) of ``images`` -> out/vis/name."""
    vis_in = out / "vis_inputs"
    vis_in.mkdir(parents=True, exist_ok=True)
    for p in images:   # main_seg_vis.py takes a folder; link the chosen few into one
        link = vis_in / p.name
        if not link.exists():
            link.symlink_to(p)
    return run_step(f"vis_{name}", [
        "main_seg_vis.py", "--input", vis_in, "--classes", ", ".join(class_names), "--no_bg",
        "--init_model", checkpoint, "--output_dir", out / "vis" / name, "--vis", "input_pred_label", "all_groups",
        "--device", "cpu", "--no_progress"], logs)


@cli.run_main
def main(argv=None) -> int:
    args = get_args(argv)
    from dataloaders.stores import is_store
    out = Path(args.output_dir).resolve()
    cli.check_writable_dir(str(out), "--output_dir")
    data, store, logs = out / "data", out / "store", out / "logs"
    clip_dir, train_dir = out / "train_clip", out / "train"
    clip_file = data / "tiny_clip.pt"
    use_seglabel, use_mae = not args.no_seglabel, not args.no_mae
    loader_workers = max(0, args.workers - 1)            # the rest of the cores compute
    threads = max(1, (os.cpu_count() or 1) - loader_workers)
    times = {}
    t_start = time.perf_counter()
    check_own_folders(out)                # a user's data/ (or store/, train/ ...) here: refused, nothing touched
    # A new world replaces the old one whole: stale shards or store entries of an earlier run (another seed or size)
    # would otherwise be trained on next to the new ones. Only the quickstart's own folders are ever replaced.
    new_world = not (args.keep_data and clip_file.exists())
    for name in OWN_FOLDERS:
        own_folder(out / name, fresh=new_world and name in ("data", "store"))
    if new_world:
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
    common = ["main_task_align.py", "--do_pretrain", "--datatype", "cc", "--cc_store", store,
              "--pretrained_clip_name", clip_file, "--first_stage_layer", args.first_stage_layer,
              "--batch_size", args.batch_size, "--max_words", 32, "--image_size", args.train_size,
              "--seed", args.seed, "--num_thread_reader", loader_workers, "--n_display", 5, "--no_progress"]
    # The MAE decoder is built in the CLIP stage too (and left untouched there) so that its checkpoint loads
    # strictly as the --init_model of a SegCLIP stage with the MAE loss.
    mae_flag = ["--use_vision_mae_recon"] * use_mae
    init = []
    if args.clip_epochs > 0:
        times["train_clip"] = run_step("train_clip", common + [
            "--plain_clip", "--epochs", args.clip_epochs, "--lr", args.clip_lr, "--lower_lr", args.clip_lr,
            "--freeze_layer_num", -1, "--output_dir", clip_dir, "--overwrite"] + mae_flag, logs, threads=threads)
        init = ["--init_model", last_checkpoint(clip_dir, args.clip_epochs)]
    times["train"] = run_step("train", common + init + [
        "--epochs", args.epochs, "--lr", args.lr, "--lower_lr", args.lower_lr,
        "--freeze_layer_num", -1,   # -1: no block frozen (the CLIP moves at --lower_lr only); as in 2022 the
        "--output_dir", train_dir, "--overwrite"]  # patch embedding stays frozen. --overwrite: the folder is
        # the quickstart's own (check_own_folders), and a rerun trains afresh
        + ["--use_seglabel"] * use_seglabel + mae_flag, logs, threads=threads)
    checkpoint = last_checkpoint(train_dir, args.epochs)

    import torch
    from modules.checkpoint import load_clip_state_dict, load_segclip
    from modules.modeling import SegCLIP
    from seg_segmentation.classes import read_class_file
    class_names = read_class_file(data / "val" / "classes.txt", "the quickstart's class-name file")
    # The untrained model: the random CLIP with freshly initialised (seeded) centers, saved as a checkpoint so that
    # every model goes through the same evaluation script.
    untrained_file = out / "untrained.bin"
    torch.manual_seed(args.seed)
    untrained = SegCLIP.from_clip(load_clip_state_dict(str(clip_file)), first_stage_layer=args.first_stage_layer,
                                 use_vision_mae_recon=False)
    atomic_torch_save(untrained.state_dict(), untrained_file)
    # The SegCLIP stage's starting point (epoch 0: the CLIP stage's model with its untouched fresh centers), then
    # every epoch's weights.
    start = init[1] if init else untrained_file
    stage = [(0, start)] + [(e + 1, train_dir / f"pytorch_model.bin.{e}") for e in range(args.epochs)]
    results = {}
    for name, ckpt in [("untrained", untrained_file)] + [(f"epoch{e}", c) for e, c in stage]:
        results[name], times[f"eval_{name}"] = zero_shot_step(name, ckpt, data / "val", out, args, logs)
    res_trained, res_untrained, res_start = results[f"epoch{args.epochs}"], results["untrained"], results["epoch0"]
    miou_curve = [{"epoch": e, "mIoU": results[f"epoch{e}"]["mIoU"],
                   "shapes_mIoU": shapes_miou(results[f"epoch{e}"]["per_class"])} for e, _ in stage]
    chance = chance_levels(data / "val", class_names, args.seed)
    # as trained: with the MAE decoder when the MAE loss was on (the evaluation loads it without)
    trained = load_segclip(str(checkpoint), use_vision_mae_recon=use_mae)

    if args.num_vis > 0:
        images = sorted((data / "val" / "JPEGImages").glob("*.jpg"))[:args.num_vis]
        times["vis"] = draw("start", start, images, class_names, out, logs) + \
            draw("end", checkpoint, images, class_names, out, logs)

    clip_curve = loss_curve(clip_dir, "clip") if args.clip_epochs > 0 else []
    curve = clip_curve + loss_curve(train_dir, "segclip", clip_curve[-1]["step"] if clip_curve else 0)
    losses = ["contrastive"] + ["kl"] * use_seglabel + ["mae"] * use_mae
    summary = {
        "trained": {"losses": losses, "clip_epochs": args.clip_epochs, "clip_lr": args.clip_lr,
                    "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "lower_lr": args.lower_lr,
                    "train_pairs": args.num_train, "val_images": args.num_val, "train_size": args.train_size,
                    "seed": args.seed, "checkpoint": str(checkpoint), "config": {
                        **{k: v for k, v in vars(trained.config).items() if isinstance(v, (int, float, bool))},
                        # the losses of the training run (a checkpoint file does not record them)
                        "use_vision_mae_recon": use_mae, "use_seglabel": use_seglabel}},
        "mIoU": {"trained": res_trained["mIoU"], "clip_stage": res_start["mIoU"], "untrained": res_untrained["mIoU"],
                 **chance},
        "shapes_mIoU": {"trained": shapes_miou(res_trained["per_class"]), "clip_stage": shapes_miou(
            res_start["per_class"]), "untrained": shapes_miou(res_untrained["per_class"])},
        "per_class_IoU": {"trained": res_trained["per_class"], "clip_stage": res_start["per_class"],
                          "untrained": res_untrained["per_class"]},
        "mIoU_per_epoch": miou_curve,
        "loss_curve": curve,
        "seconds": {k: round(v, 1) for k, v in times.items()},
        "total_seconds": round(time.perf_counter() - t_start, 1),
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    plot_curves(out / "curves.png", curve, miou_curve)

    cfg = trained.config
    print(f"\nTrained a tiny SegCLIP ({sum(p.numel() for p in trained.parameters()) / 1e6:.2f}M parameters: width "
          f"{cfg.vision_width}, {cfg.vision_layers} visual blocks cut after {cfg.first_stage_layer}, "
          f"{cfg.num_centers} centers, {cfg.text_layers} text blocks) on {args.num_train} synthetic image-caption "
          f"pairs at {args.train_size} px: " + (f"{args.clip_epochs} epochs as a plain CLIP from a random one, then "
                                               if args.clip_epochs else "from a random CLIP, ")
          + f"{args.epochs} SegCLIP epochs (batch {args.batch_size}, losses: {' + '.join(losses)}).")
    if curve:
        show = [curve[0]] + ([clip_curve[-1]] if clip_curve else []) + [curve[-1]]
        print("loss curve: " + "; ".join(f"step {c['step']} ({c['stage']}): " + " ".join(
            f"{k} {v:.3f}" for k, v in c.items() if k not in ("step", "stage", "epoch")) for c in show))
    sh = summary["shapes_mIoU"]
    print(f"zero-shot mIoU on {args.num_val} held-out val images ({len(class_names)} classes: 5 shapes + 4 "
          f"backgrounds)        all    shapes only")
    print(f"  trained                                              {res_trained['mIoU']:6.2f} {sh['trained']:6.2f}")
    if args.clip_epochs:
        print(f"  after the CLIP stage only (fresh centers)            {res_start['mIoU']:6.2f} "
              f"{sh['clip_stage']:6.2f}")
    print(f"  untrained (random CLIP, fresh centers)               {res_untrained['mIoU']:6.2f} "
          f"{sh['untrained']:6.2f}")
    print(f"  chance: majority class {chance['majority_class']:.2f}, uniform random {chance['uniform_random']:.2f}")
    print("  per class (trained): " + ", ".join(f"{k} {v:.1f}" if v is not None else f"{k} -"
                                               for k, v in res_trained["per_class"].items()))
    print("  per SegCLIP epoch (all / shapes): " + ", ".join(f"{m['epoch']}: {m['mIoU']:.1f} / {m['shapes_mIoU']:.1f}"
                                                          for m in miou_curve))
    print(f"time: {summary['total_seconds']:.0f}s (" + ", ".join(f"{k} {v:.0f}s" for k, v in times.items()) + ")")
    print(f"summary: {out / 'summary.json'}; curves: {out / 'curves.png'}"
          + (f"; pictures: {out / 'vis'}/{{start,end}}/vis_imgs" if args.num_vis else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
