"""Segment photos with any vocabulary and draw the result (design.md §8).

    python main_seg_vis.py --input demo/examples/chelsea.jpg --classes "cat, wall, floor" --vis input_pred_label

Writes OUTPUT/vis_imgs/<mode>/<mode>_<name>.jpg per mode, and OUTPUT/labels/<name>.png (label ids, palette PNG)
with OUTPUT/labels/<name>.json (classes present and their pixel share). See docs/demo.md.
"""
import argparse
import logging
import sys
from pathlib import Path

from seg_segmentation.classes import DATASET_CLASSES
from seg_segmentation.templates import TEMPLATES
from seg_segmentation.visualize import VIS_MODES

LEGACY_FLAGS = {"--cfg": {}, "--opts": {"nargs": "+"}, "--resume": {}, "--pretrained_clip_name": {},
                "--max_words": {"type": int}, "--max_frames": {"type": int}, "--seed": {"type": int}}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", default=str(Path(__file__).resolve().parent / "demo" / "examples"),
                   help="an image file, a folder of images or a glob pattern such as 'photos/*.jpg' "
                        "(default: demo/examples)")
    p.add_argument("--output_dir", default="output/vis", help="where vis_imgs/ and labels/ are written "
                                                              "(default: output/vis)")
    p.add_argument("--vis", nargs="+", default=["input_pred_label"], choices=list(VIS_MODES) + ["all"],
                   metavar="MODE", help="one or more of: " + ", ".join(VIS_MODES) + ", or 'all' "
                                        "(default: input_pred_label)")
    p.add_argument("--dataset", default="voc", choices=list(DATASET_CLASSES),
                   help="use this benchmark's class names and background threshold when no --classes is given "
                        "(default: voc)")
    p.add_argument("--classes", default=None,
                   help="your own vocabulary, comma separated, e.g. \"cat, dog, sky\" (overrides --dataset)")
    p.add_argument("--classes_file", default=None, help="your own vocabulary, one class name per line")
    p.add_argument("--bg_thresh", type=float, default=None,
                   help="background threshold in [0, 1]: a region whose best class scores below it is background "
                        "(default: the dataset's, 0.8 for voc and for your own classes; higher = more background)")
    p.add_argument("--no_bg", action="store_true", help="no background class: every pixel gets one of the classes")
    p.add_argument("--templates", default="simple", choices=sorted(TEMPLATES),
                   help="prompt templates averaged per class: 'a photo of a {}.' (simple), 7 (subset) or 80 "
                        "(full) ImageNet prompts, or the bare name (identity) (default: simple)")
    p.add_argument("--init_model", default=None,
                   help="SegCLIP checkpoint (state dict). Default: <cache>/segclip.bin, downloaded from the "
                        "release page when missing")
    p.add_argument("--cache_dir", default=None,
                   help="folder for downloaded checkpoints (default: $SEGCLIP_CACHE, else checkpoints/)")
    p.add_argument("--first_stage_layer", type=int, default=None,
                   help="accepted for compatibility with the 2022 script; the value is read from the checkpoint "
                        "and this only checks that it matches")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu ... (default: cuda when available, else cpu)")
    p.add_argument("--crop_size", type=int, default=224, help="sliding-window size in pixels (default: 224)")
    p.add_argument("--stride", type=int, default=224, help="sliding-window stride in pixels (default: 224)")
    p.add_argument("--resolution", type=int, default=224,
                   help="short side the photo is resized to for inference; outputs keep the photo's size "
                        "(default: 224, as in the evaluation)")
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    legacy = p.add_argument_group("2022 flags, accepted so old command lines run; they have no effect here")
    for flag, kw in LEGACY_FLAGS.items():
        legacy.add_argument(flag, default=None, help=argparse.SUPPRESS if flag != "--cfg" else
                            "also --opts, --resume, --pretrained_clip_name, --max_words, --max_frames, --seed: "
                            "the checkpoint and the flags above carry every setting", **kw)
    args = p.parse_args(argv)
    args.ignored = [f for f in LEGACY_FLAGS if getattr(args, f.lstrip("-")) is not None]
    if "all" in args.vis:
        args.vis = list(VIS_MODES)
    args.vis = list(dict.fromkeys(args.vis))
    if args.classes is not None and args.classes_file is not None:
        p.error("give --classes or --classes_file, not both")
    if args.bg_thresh is not None and not 0.0 <= args.bg_thresh <= 1.0:
        p.error(f"--bg_thresh must be in [0, 1], got {args.bg_thresh}")
    for name in ("crop_size", "stride", "resolution"):
        if getattr(args, name) <= 0:
            p.error(f"--{name} must be positive")
    if args.stride > args.crop_size:
        p.error(f"--stride {args.stride} larger than --crop_size {args.crop_size} would leave pixels unlabelled")
    return args


def vocabulary(args):
    """-> (class names without background, with_bg, bg_thresh)."""
    from seg_segmentation.classes import BG_THRESH, DATASET_CLASSES, foreground_names, has_background
    from seg_segmentation.visualize import parse_class_list, read_class_file
    if args.classes is not None or args.classes_file is not None:
        names = parse_class_list(args.classes) if args.classes is not None else read_class_file(args.classes_file)
        if not args.no_bg and "background" in (n.lower() for n in names):
            raise ValueError("'background' is added automatically from --bg_thresh; remove it from your classes "
                             "(or add --no_bg to keep it as an ordinary class)")
        with_bg = not args.no_bg
        default_thresh = BG_THRESH["voc"]
    else:
        names = foreground_names(DATASET_CLASSES[args.dataset])
        with_bg = has_background(args.dataset) and not args.no_bg
        default_thresh = BG_THRESH.get(args.dataset, BG_THRESH["voc"])
    return names, with_bg, (default_thresh if args.bg_thresh is None else args.bg_thresh)


def main(argv=None) -> int:
    args = get_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import torch

    from modules.checkpoint import CheckpointError, load_segclip, segclip_checkpoint_keys
    from common.download import DownloadError, resolve_segclip_checkpoint
    from seg_segmentation.visualize import SegmentationDemo, collect_inputs, run_visualization

    try:
        names, with_bg, bg_thresh = vocabulary(args)
        inputs = collect_inputs(args.input)
        try:
            device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        except (RuntimeError, ValueError):
            raise ValueError(f"--device {args.device}: not a device (use cpu, cuda or cuda:N)") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {args.device}: CUDA is not available here; use --device cpu")
        ckpt = resolve_segclip_checkpoint(args.init_model, cache_dir=args.cache_dir, progress=not args.no_progress,
                                          expected_keys=segclip_checkpoint_keys)
        model = load_segclip(ckpt, device=device, use_vision_mae_recon=False)
        if args.first_stage_layer is not None and args.first_stage_layer != model.config.first_stage_layer:
            raise ValueError(f"--first_stage_layer {args.first_stage_layer} does not match the checkpoint "
                             f"({model.config.first_stage_layer}); leave the flag out")
        demo = SegmentationDemo(model, names, with_bg=with_bg, bg_thresh=bg_thresh, templates=args.templates,
                                crop=args.crop_size, stride=args.stride, resolution=args.resolution)
    except (FileNotFoundError, ValueError, CheckpointError, DownloadError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

    if args.ignored:
        print(f"note: {', '.join(args.ignored)} ignored (2022 flags without effect here)", file=sys.stderr)
    vocab = ", ".join(demo.label_names[:12]) + (f" ... ({len(demo.label_names)} labels)"
                                                 if len(demo.label_names) > 12 else "")
    print(f"{len(inputs)} image(s); vocabulary: {vocab}; modes: {', '.join(args.vis)}; device: {device}", flush=True)
    try:
        report = run_visualization(demo, inputs, Path(args.output_dir), args.vis, progress=not args.no_progress)
    except OSError as e:  # output folder not writable, disk full
        print(f"error: cannot write results: {e}", file=sys.stderr)
        return 1
    for path, reason in report["skipped"]:
        print(f"skipped {reason}", file=sys.stderr)
    print(f"wrote {len(report['written'])} image(s), skipped {len(report['skipped'])}; "
          f"results in {Path(args.output_dir) / 'vis_imgs'} and {Path(args.output_dir) / 'labels'}")
    return 0 if report["written"] else 1


if __name__ == "__main__":
    sys.exit(main())
