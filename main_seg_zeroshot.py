"""Zero-shot semantic segmentation evaluation of a SegCLIP checkpoint (design.md §7).

    python main_seg_zeroshot.py --dataset voc --data_root data/VOCdevkit/VOC2012 --init_model checkpoints/segclip.bin
    torchrun --nproc_per_node 8 main_seg_zeroshot.py --dataset context --data_root data/VOCdevkit/VOC2010 ...

Prints a per-class IoU table and writes a JSON with --output. Results do not depend on the number of processes.
"""
import argparse
import json
import logging
import os
import os.path as osp
import sys

import torch

from engine.distributed import add_distributed_args, cleanup, init_distributed
from seg_segmentation.classes import BG_THRESH, DATASET_CLASSES, validate_class_names
from seg_segmentation.datasets import LAYOUTS, DatasetError
from seg_segmentation.templates import TEMPLATES

# --opts / --cfg keys of the 2022 configs -> our flag names
_ALIASES = {'template': 'templates', 'crop_size': 'crop_size', 'img_size': 'resolution', 'local_rank': None,
            'mode': None, 'cfg': None, 'save_best': None, 'task': None, 'eval_only': None, 'eval_freq': None,
            'opts': None, 'output': None, 'tag': None, 'model_name': None, 'amp_opt_level': None, 'vis': None}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description='SegCLIP zero-shot segmentation evaluation (mmseg datasets, slide inference, mIoU).',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--dataset', default='coco', choices=sorted(DATASET_CLASSES),
                   help='benchmark: voc/context/coco (COCO-Object) are SegCLIP\'s; voc20, context59, coco_stuff, '
                        'cityscapes, ade20k have no background class')
    p.add_argument('--data_root', default=None,
                   help='dataset folder in mmseg layout (default: ' +
                        ', '.join(f'{k}: {v.default_root}' for k, v in LAYOUTS.items() if k in ('voc', 'context', 'coco'))
                        + ', ...); a parent such as data/VOCdevkit also works')
    p.add_argument('--init_model', default=None,
                   help="SegCLIP checkpoint (e.g. the released segclip.bin). Default: the released checkpoint in "
                        "--cache_dir, downloaded when missing. 'none' evaluates --pretrained_clip_name with freshly "
                        "initialised centers (a sanity baseline only)")
    p.add_argument('--pretrained_clip_name', default='ViT-B/16',
                   help="CLIP weights (name or file), used only with --init_model none")
    p.add_argument('--first_stage_layer', type=int, default=10,
                   help='visual blocks before the center block; only with --init_model none (checkpoints carry it)')
    p.add_argument('--cache_dir', default=None, help='where downloaded weights are kept')
    p.add_argument('--cfg', default=None,
                   help='YAML/JSON file of settings (keys = flag names; nested 2022 configs are flattened); '
                        'explicit flags win')
    p.add_argument('--opts', nargs='+', default=None,
                   help="override settings: 'KEY VALUE' pairs or KEY=VALUE, e.g. --opts bg_thresh 0.7 templates full")
    p.add_argument('--templates', '--template', dest='templates', default='simple', choices=sorted(TEMPLATES),
                   help='prompt set: simple = "a photo of a {}.", subset = 7 sub-ImageNet prompts, full = 80 '
                        'ImageNet prompts, identity = the bare name')
    p.add_argument('--class_names', default=None,
                   help='text file, one class name per line, in label order (replaces the dataset\'s names; start '
                        'with "background" for background-by-threshold). Same count as the dataset\'s labels, '
                        'except --dataset voc: any count, to evaluate your own VOC-layout split (label i = line i)')
    p.add_argument('--bg_thresh', type=float, default=None,
                   help='background threshold (default: ' + ', '.join(f'{k} {v}' for k, v in BG_THRESH.items()) +
                        '; unused by datasets without background)')
    p.add_argument('--resolution', type=int, default=224,
                   help='short side after the keep-ratio resize (mmseg img_scale (max_long, resolution))')
    p.add_argument('--max_long', type=int, default=2048, help='cap on the long side of the resize')
    p.add_argument('--crop_size', type=int, default=224, help='sliding-window size (multiple of the patch size)')
    p.add_argument('--stride', type=int, default=224, help='sliding-window stride')
    p.add_argument('--batch_size', type=int, default=16, help='windows per visual forward pass (all images pooled)')
    p.add_argument('--num_workers', type=int, default=2, help='DataLoader processes per rank (decode + resize)')
    p.add_argument('--amp', default='none', choices=['none', 'bf16', 'fp16'],
                   help='autocast dtype for the visual tower (GPU); none = float32 as published')
    p.add_argument('--max_images', type=int, default=None, help='evaluate only the first N images (quick checks)')
    p.add_argument('--output', default=None, help='write the results (per-class IoU, mIoU, aAcc, timing) as JSON')
    p.add_argument('--save_pred', default=None, help='folder for the predicted label maps (palette PNGs)')
    p.add_argument('--no_progress', action='store_true', help='no progress bar')
    p.add_argument('--seed', type=int, default=42, help='random seed (evaluation is deterministic; kept for 2022 CLI)')
    p.add_argument('--max_words', type=int, default=77, help='ignored: class prompts always use 77 tokens')
    p.add_argument('--tag', default=None, help='ignored (2022 CLI)')
    add_distributed_args(p)
    return p


def _flatten(d, out=None):
    out = {} if out is None else out
    for k, v in d.items():
        if isinstance(v, dict):
            _flatten(v, out)
        else:
            out[k] = v
    return out


def _apply_settings(args, settings: dict, source: str, parser, explicit: set):
    known = {a.dest: a for a in parser._actions}
    for key, value in settings.items():
        key = key.split('.')[-1]
        key = _ALIASES.get(key, key)
        if key is None or key in explicit:
            continue
        if key not in known:
            raise ValueError(f'{source}: unknown setting {key!r}')
        action = known[key]
        if isinstance(value, str) and action.type is not None:
            value = action.type(value)
        if action.choices is not None and value not in action.choices:
            raise ValueError(f'{source}: {key}={value!r} is not one of {sorted(action.choices)}')
        setattr(args, key, value)


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    given = argv if argv is not None else sys.argv[1:]
    explicit = {a.dest for a in parser._actions       # flags typed on the command line beat --cfg
                if any(g == o or g.startswith(o + '=') for g in given for o in a.option_strings)}
    if args.cfg:
        import yaml
        if not osp.isfile(args.cfg):
            raise ValueError(f'--cfg file not found: {args.cfg}')
        with open(args.cfg) as f:
            cfg = yaml.safe_load(f) or {}
        if not isinstance(cfg, dict):
            raise ValueError(f'--cfg {args.cfg}: expected a mapping of settings')
        _apply_settings(args, _flatten(cfg), f'--cfg {args.cfg}', parser, explicit)
    if args.opts:
        pairs, items = [], list(args.opts)
        while items:
            item = items.pop(0)
            if '=' in item:
                pairs.append(tuple(item.split('=', 1)))
            elif items:
                pairs.append((item, items.pop(0)))
            else:
                raise ValueError(f'--opts: {item!r} has no value')
        _apply_settings(args, dict(pairs), '--opts', parser, set())
    return args


def read_class_names(path: str):
    if not osp.isfile(path):
        raise ValueError(f'--class_names file not found: {path}')
    with open(path, encoding='utf-8') as f:
        lines = f.read().splitlines()
    while lines and not lines[-1].strip():   # a trailing newline is not a class
        lines.pop()
    return validate_class_names(lines, source=path)


def load_model(args, device):
    from modules.checkpoint import load_clip_state_dict, load_segclip, segclip_checkpoint_keys
    if args.init_model is not None and args.init_model.lower() == 'none':
        from modules.modeling import SegCLIP
        model = SegCLIP.from_clip(load_clip_state_dict(args.pretrained_clip_name, cache_dir=args.cache_dir),
                                  first_stage_layer=args.first_stage_layer, use_vision_mae_recon=False)
        return model.to(device).eval()
    from common.download import resolve_segclip_checkpoint
    path = resolve_segclip_checkpoint(args.init_model, cache_dir=args.cache_dir, expected_keys=segclip_checkpoint_keys)
    return load_segclip(path, device=device, use_vision_mae_recon=False)


def make_prediction_writer(folder: str, dataset: str):
    """on_prediction callback: each label map -> <folder>/<image name>.png (palette PNG, VOC colours)."""
    from pathlib import Path
    from seg_segmentation.visualize import save_label_png, voc_palette
    palette = voc_palette()
    suffix = LAYOUTS[dataset].img_suffix

    def write(img_path: str, pred: torch.Tensor):
        name = osp.basename(img_path)
        name = name[:-len(suffix)] if name.endswith(suffix) else osp.splitext(name)[0]
        save_label_png(Path(folder) / (name + '.png'), pred.numpy(), palette)
    return write


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(message)s')
    try:
        args = parse_args(argv)
        class_names = read_class_names(args.class_names) if args.class_names else None
    except ValueError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2

    env = init_distributed(args.local_rank, args.device, args.dist_backend)
    from modules.checkpoint import CheckpointError
    from common.download import DownloadError
    from seg_segmentation.evaluate import format_table, run_zero_shot_eval
    try:
        model = load_model(args, env.device)
        writer = make_prediction_writer(args.save_pred, args.dataset) if args.save_pred else None
        result = run_zero_shot_eval(
            model, dataset=args.dataset, data_root=args.data_root, device=env.device, batch_size=args.batch_size,
            num_workers=args.num_workers, templates=args.templates, class_names=class_names,
            bg_thresh=args.bg_thresh, resolution=args.resolution, max_long=args.max_long, crop=args.crop_size,
            stride=args.stride, amp=args.amp, max_images=args.max_images, progress=not args.no_progress,
            on_prediction=writer)
    except (DatasetError, CheckpointError, DownloadError, FileNotFoundError, ValueError) as e:
        print(f'error: {e}', file=sys.stderr)
        cleanup(env)
        return 2

    if env.is_main:
        print(format_table(result), flush=True)
        if args.output:
            result['settings'].update(init_model=args.init_model, world_size=env.world_size)
            os.makedirs(osp.dirname(osp.abspath(args.output)), exist_ok=True)
            with open(args.output, 'w') as f:
                json.dump(result, f, indent=2)
            print(f'results written to {args.output}', flush=True)
    cleanup(env)
    return 0


if __name__ == '__main__':
    sys.exit(main())
