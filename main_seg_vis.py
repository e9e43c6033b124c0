"""Segment photos with any vocabulary and draw the result (design.md §8).

    python main_seg_vis.py --input demo/examples/chelsea.jpg --classes "cat, wall, floor" --vis input_pred_label
    python main_seg_vis.py --method naclip --input demo/examples/chelsea.jpg --classes "cat, wall, floor"  # CLIP only

Writes OUTPUT/vis_imgs/<mode>/<mode>_<name>.jpg per mode, and OUTPUT/labels/<name>.png (label ids, palette PNG)
with OUTPUT/labels/<name>.json (classes present and their pixel share). See docs/demo.md.
"""
import logging
import sys
from pathlib import Path

from common import cli
from common.errors import UsageError
from modules.precision import PRECISIONS
from seg_segmentation.classes import (BG_THRESH, DATASET_CLASSES, foreground_names, has_background,
                                      parse_class_list, refuse_listed_background)
from seg_segmentation.methods import METHODS
from seg_segmentation.synonyms import read_name_file
from seg_segmentation.templates import TEMPLATES
from seg_segmentation.drawing import VIS_MODES

LEGACY_FLAGS = {"--resume": {}, "--max_words": {"type": int},
                "--max_frames": {"type": int}, "--seed": {"type": int}}


def build_parser():
    p = cli.make_parser(__doc__)
    p.add_argument("--input", default=str(Path(__file__).resolve().parent / "demo" / "examples"),
                   help="an image file, a folder of images or a glob pattern such as 'photos/*.jpg' "
                        "(default: demo/examples)")
    p.add_argument("--output_dir", default="output/vis", help="where vis_imgs/ and labels/ are written")
    p.add_argument("--vis", nargs="+", default=["input_pred_label"], choices=list(VIS_MODES) + ["all"],
                   metavar="MODE", help="one or more of: " + ", ".join(VIS_MODES) + ", or 'all'")
    cli.add_vocabulary_args(
        p, datasets=list(DATASET_CLASSES), templates=TEMPLATES, dataset_default="voc", no_bg=True,
        dataset_help="use this benchmark's class names and background threshold when no --classes is given",
        names_help="your own vocabulary in a file (overrides --dataset)",
        bg_thresh_help="background threshold in [0, 1]: a region whose best class scores below it is background "
                       "(default: the dataset's, 0.8 for voc and for your own classes; higher = more background)")
    cli.add_segmenter_args(
        p, methods=METHODS, init_model_help="SegCLIP checkpoint (state dict). Default: <cache>/segclip.bin, downloaded from the "
                           "release page when missing",
        precisions=PRECISIONS, max_long=False, first_stage_layer=None)
    cli.add_runtime_args(p, distributed=False)
    cli.add_legacy_flags(p, LEGACY_FLAGS, "the checkpoint and the flags above carry every setting")
    return p


def get_args(argv=None):
    args = cli.parse(build_parser(), argv, aliases={"vis": "vis"})  # 2022 configs: vis = the modes
    cli.check_segmenter_args(args, METHODS)
    from seg_segmentation.drawing import GROUP_MODES
    if args.method != "segclip" and any(m in GROUP_MODES for m in args.vis):
        raise UsageError(f"--vis {' '.join(m for m in args.vis if m in GROUP_MODES)}: the center views exist only "
                         f"for SegCLIP, not --method {args.method}")
    if "all" in args.vis:   # with a training-free method: every mode but the center views
        args.vis = [m for m in VIS_MODES if args.method == "segclip" or m not in GROUP_MODES]
    args.vis = list(dict.fromkeys(args.vis))
    return args


def vocabulary(args):
    """-> (class names without background, with_bg, bg_thresh, synonyms: per class its names or None)."""
    synonyms = None
    if args.classes is not None or args.classes_file is not None:
        if args.classes is not None:
            names = parse_class_list(args.classes)
        else:   # one class per line, its names separated by ", "
            synonyms = read_name_file(args.classes_file, source="--classes_file")
            names = [c[0] for c in synonyms]
        if not args.no_bg:   # a synonym 'background' would be a second background class too
            refuse_listed_background([n for c in synonyms for n in c] if synonyms else names, "or add --no_bg")
        with_bg = not args.no_bg
        default_thresh = BG_THRESH["voc"]
    else:
        names = foreground_names(DATASET_CLASSES[args.dataset])
        with_bg = has_background(args.dataset) and not args.no_bg
        default_thresh = BG_THRESH.get(args.dataset, BG_THRESH["voc"])
    return names, with_bg, (default_thresh if args.bg_thresh is None else args.bg_thresh), synonyms


@cli.run_main
def main(argv=None) -> int:
    args = get_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from seg_segmentation.inputs import collect_inputs
    from seg_segmentation.visualize import SegmentationDemo, load_demo_model, run_visualization

    # every input is checked before the model is loaded
    names, with_bg, bg_thresh, synonyms = vocabulary(args)
    inputs = collect_inputs(args.input)
    device = cli.resolve_device(args.device)
    cli.check_writable_dir(args.output_dir, "--output_dir")
    model, head, _ = load_demo_model(args, device)
    demo = SegmentationDemo(model, names, with_bg=with_bg, bg_thresh=bg_thresh, templates=args.templates,
                            crop=args.crop_size, stride=args.stride, resolution=args.resolution,
                            method=args.method, head=head, synonyms=synonyms)

    cli.note_ignored_flags(args)
    vocab = ", ".join(demo.label_names[:12]) + (f" ... ({len(demo.label_names)} labels)"
                                                 if len(demo.label_names) > 12 else "")
    print(f"{len(inputs)} image(s); vocabulary: {vocab}; modes: {', '.join(args.vis)}; device: {device}", flush=True)
    # a full disk or an unwritable output is an OutputError (one line, exit status 2 from run_main)
    report = run_visualization(demo, inputs, Path(args.output_dir), args.vis, progress=not args.no_progress,
                               max_image_pixels=args.max_image_pixels)
    for path, reason in report["skipped"]:
        print(f"skipped {reason}", file=sys.stderr)
    print(f"wrote {len(report['written'])} image(s), skipped {len(report['skipped'])}; "
          f"results in {Path(args.output_dir) / 'vis_imgs'} and {Path(args.output_dir) / 'labels'}")
    return 0 if report["written"] else 1


if __name__ == "__main__":
    sys.exit(main())
