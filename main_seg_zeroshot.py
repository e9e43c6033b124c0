"""Zero-shot semantic segmentation evaluation of a SegCLIP checkpoint (design.md §7), or of a plain CLIP with the
training-free SCLIP / CLIP protocol (design.md §12).

    python main_seg_zeroshot.py --dataset voc --data_root data/VOCdevkit/VOC2012 --init_model checkpoints/segclip.bin
    python main_seg_zeroshot.py --method sclip --dataset voc --data_root data/VOCdevkit/VOC2012   # CLIP ViT-B/16
    torchrun --nproc_per_node 8 main_seg_zeroshot.py --dataset context --data_root data/VOCdevkit/VOC2010 ...

Prints a per-class IoU table and writes a JSON with --output. Results do not depend on the number of processes.
"""
import logging
import os.path as osp
import sys

import torch

from common import cli
from common.errors import UsageError
from engine.distributed import cleanup, init_distributed
from modules.precision import PRECISIONS
from seg_segmentation.classes import BG_THRESH, DATASET_CLASSES, parse_class_list
from seg_segmentation.datasets import CUSTOM_DATASET, LAYOUTS, resolve_data_root
from seg_segmentation.templates import TEMPLATES

LEGACY_FLAGS = {'--max_words': {'type': int}, '--max_frames': {'type': int}, '--resume': {'metavar': 'VALUE'}}


def build_parser():
    p = cli.make_parser('SegCLIP zero-shot segmentation evaluation (mmseg datasets, slide inference, mIoU).')
    p.add_argument('--data_root', default=None,
                   help='dataset folder in mmseg layout (default: ' +
                        ', '.join(f'{k}: {v.default_root}' for k, v in LAYOUTS.items() if k in ('voc', 'context', 'coco'))
                        + ', ...); a parent such as data/VOCdevkit also works')
    cli.add_vocabulary_args(
        p, datasets=sorted(DATASET_CLASSES) + [CUSTOM_DATASET], templates=TEMPLATES, dataset_default='coco',
        dataset_help="benchmark: voc/context/coco (COCO-Object) are SegCLIP's; voc20, context59, coco_stuff, "
                     "cityscapes, ade20k have no background class; custom = your own split in the VOC layout "
                     "with your own class names (label i = name i)",
        names_help='class names in label order, replacing the dataset\'s (start with "background" for '
                   'background-by-threshold). Same count as the dataset\'s labels; required by --dataset custom '
                   '(any count)',
        bg_thresh_help='background threshold (default: ' + ', '.join(f'{k} {v}' for k, v in BG_THRESH.items()) +
                       '; unused by datasets without background)')
    cli.add_segmenter_args(
        p, init_model_help="SegCLIP checkpoint (e.g. the released segclip.bin). Default: the released checkpoint "
                           "in --cache_dir, downloaded when missing. 'none' evaluates --pretrained_clip_name with "
                           "freshly initialised centers (a sanity baseline only)",
        clip_help='CLIP weights: a name (ViT-B/16, downloaded when missing), an OpenAI / open_clip / '
                  '.safetensors file or a Hugging Face CLIP folder; the model of --method sclip / clip, and with '
                  '--init_model none the CLIP the centers are added to',
        first_stage_help='visual blocks before the center block; only with --init_model none (checkpoints carry it)',
        precisions=PRECISIONS)
    g = p.add_argument_group('evaluation run')
    g.add_argument('--batch_size', type=int, default=16, help='windows per visual forward pass (all images pooled)')
    g.add_argument('--num_workers', type=int, default=2, help='DataLoader processes per rank (decode + resize)')
    g.add_argument('--max_images', type=int, default=None, help='evaluate only the first N images (quick checks)')
    g.add_argument('--output', default=None, help='write the results (per-class IoU, mIoU, aAcc, timing) as JSON')
    g.add_argument('--save_pred', default=None, help='folder for the predicted label maps (palette PNGs)')
    g.add_argument('--seed', type=int, default=cli.PAPER_SEED,
                   help='seed of the freshly initialised centers of --init_model none (the evaluation itself is '
                        'deterministic)')
    g.add_argument('--tag', default=None, help='a label for this run, stored in the --output JSON')
    cli.add_runtime_args(p, amp_help='autocast dtype for the visual tower (GPU); off = float32 as published')
    cli.add_legacy_flags(p, LEGACY_FLAGS, 'class prompts always use 77 tokens, and evaluation neither resumes nor reads frames')
    return p


def parse_args(argv=None):
    """Flags -> settings, every input checked before any model is loaded."""
    args = cli.parse(build_parser(), argv)
    from seg_segmentation.dense import apply_method_defaults
    cli.check_segmenter_args(args, apply_method_defaults)
    cli.check_positive(args, 'batch_size', 'max_images')
    if args.num_workers < 0:
        raise UsageError(f'--num_workers must be >= 0, got {args.num_workers}')
    return args


def read_class_names(args):
    """--classes / --classes_file -> names (per label a list of names where the file has synonyms: "dog, puppy"),
    or None for the method's default (the dataset's names; with sclip / clip the project's synonym file)."""
    if args.classes is not None:
        return parse_class_list(args.classes)
    if not args.classes_file:
        return None
    from seg_segmentation.synonyms import read_name_file
    classes = read_name_file(args.classes_file, source='--classes_file')
    return [c[0] for c in classes] if all(len(c) == 1 for c in classes) else classes


def check_inputs(args) -> None:
    """Data, checkpoint, outputs and device, before the model is loaded (a typo must not cost a model load)."""
    resolve_data_root(args.dataset, args.data_root)
    if args.method != 'segclip':
        if args.init_model is not None:
            raise UsageError(f'--init_model is a SegCLIP checkpoint; --method {args.method} runs the CLIP of '
                             '--pretrained_clip_name')
        check_clip_weights(args.pretrained_clip_name)
    elif args.init_model is not None and args.init_model.lower() != 'none':
        cli.check_input_file(args.init_model, '--init_model')
    cli.check_writable_file(args.output, '--output')
    cli.check_writable_dir(args.save_pred, '--save_pred')
    cli.resolve_device(args.device)


def check_clip_weights(name: str) -> None:
    """--pretrained_clip_name: a known model name, or a file / folder that exists."""
    from common.download import CLIP_URLS
    if name not in CLIP_URLS and not osp.exists(name):
        raise UsageError(f'--pretrained_clip_name {name}: neither a file or folder nor one of the known models '
                         f'{sorted(CLIP_URLS)}')


def load_model(args, device):
    from modules.checkpoint import load_clip, load_clip_state_dict, load_segclip, segclip_checkpoint_keys
    if args.method != 'segclip':   # a plain CLIP for the training-free methods
        from modules.precision import set_precision
        model = load_clip(args.pretrained_clip_name, cache_dir=args.cache_dir, device=device,
                          activation=args.clip_activation)
        return set_precision(model, args.precision).eval()
    if args.init_model is not None and args.init_model.lower() == 'none':
        from modules.modeling import SegCLIP
        torch.manual_seed(args.seed)          # the fresh centers
        model = SegCLIP.from_clip(load_clip_state_dict(args.pretrained_clip_name, cache_dir=args.cache_dir),
                                  first_stage_layer=args.first_stage_layer, use_vision_mae_recon=False)
        from modules.precision import set_precision
        return set_precision(model.to(device), args.precision).eval()
    from common.download import resolve_segclip_checkpoint
    path = resolve_segclip_checkpoint(args.init_model, cache_dir=args.cache_dir, expected_keys=segclip_checkpoint_keys)
    return load_segclip(path, device=device, use_vision_mae_recon=False, precision=args.precision)


def make_prediction_writer(folder: str, dataset: str):
    """on_prediction callback: each label map -> <folder>/<image name>.png (palette PNG, VOC colours), written
    atomically; temporaries a killed earlier run left in ``folder`` are removed first."""
    from pathlib import Path
    from common.fileio import remove_stale_temporaries
    from seg_segmentation.drawing import voc_palette
    from seg_segmentation.outputs import save_label_png
    remove_stale_temporaries(folder)
    palette = voc_palette()
    suffix = LAYOUTS[dataset].img_suffix

    def write(img_path: str, pred: torch.Tensor):
        name = osp.basename(img_path)
        name = name[:-len(suffix)] if name.endswith(suffix) else osp.splitext(name)[0]
        save_label_png(Path(folder) / (name + '.png'), pred.numpy(), palette)
    return write


def eval_config(args, class_names, device):
    from seg_segmentation.evaluate import EvalConfig
    given = dict(class_names=class_names, logit_scale=args.logit_scale, prob_thd=args.prob_thd,
                 area_thd=args.area_thd)
    return EvalConfig.preset(
        args.method, args.dataset, data_root=args.data_root, templates=args.templates, bg_thresh=args.bg_thresh,
        resolution=args.resolution, max_long=args.max_long, crop=args.crop_size, stride=args.stride,
        batch_size=args.batch_size, num_workers=args.num_workers, amp=args.amp, device=device,
        max_images=args.max_images, max_image_pixels=args.max_image_pixels, progress=not args.no_progress,
        pamr_steps=args.pamr_steps, pamr_dilations=tuple(args.pamr_dilations),
        **{k: v for k, v in given.items() if v is not None})     # unset: the method's preset


@cli.run_main
def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(message)s')
    args = parse_args(argv)
    class_names = read_class_names(args)
    check_inputs(args)
    cli.note_ignored_flags(args)

    env = init_distributed(args.local_rank, args.device, args.dist_backend)
    from seg_segmentation.evaluate import format_table, run_zero_shot_eval
    try:
        model = load_model(args, env.device)
        writer = make_prediction_writer(args.save_pred, args.dataset) if args.save_pred else None
        result = run_zero_shot_eval(model, eval_config(args, class_names, env.device), on_prediction=writer)
        if env.is_main:
            print(format_table(result), flush=True)
            if args.output:
                from common.fileio import remove_stale_temporaries
                from seg_segmentation.outputs import write_json
                remove_stale_temporaries(osp.dirname(osp.abspath(args.output)))
                result['settings'].update(init_model=args.init_model, world_size=env.world_size, tag=args.tag,
                                          clip_weights=args.pretrained_clip_name if args.method != 'segclip' else None)
                write_json(args.output, result)
                print(f'results written to {args.output}', flush=True)
    finally:   # a user error goes on to run_main, which prints it on rank 0 (that knows every rank's message)
        cleanup(env)
    return 0


if __name__ == '__main__':
    sys.exit(main())
