"""Zero-shot semantic segmentation evaluation: a SegCLIP checkpoint (design.md §7) or a training-free method on a
plain CLIP (design.md §12, §13), on one benchmark or on a table of methods × benchmarks.

    python main_seg_zeroshot.py --dataset voc --data_root data/VOCdevkit/VOC2012 --init_model checkpoints/segclip.bin
    python main_seg_zeroshot.py --method naclip --dataset voc --data_root data/VOCdevkit/VOC2012   # CLIP ViT-B/16
    python main_seg_zeroshot.py --method sclip,naclip --dataset voc,context --data_root data --output_dir out/table
    torchrun --nproc_per_node 8 main_seg_zeroshot.py --dataset context --data_root data/VOCdevkit/VOC2010 ...

Prints a per-class IoU table and writes a JSON with --output; with --output_dir, one JSON per method and dataset
and the table of them all (results.md, results.csv). Results do not depend on the number of processes.
"""
import logging
import os.path as osp
import sys

import torch

from common import cli
from common.errors import UsageError
from engine.distributed import broadcast_object, cleanup, init_distributed, on_main_process
from modules.precision import PRECISIONS
from seg_segmentation.classes import BG_THRESH, DATASET_CLASSES, parse_class_list
from seg_segmentation.datasets import CUSTOM_DATASET, LAYOUTS, refuse_output_inside_dataset, resolve_data_root
from seg_segmentation.methods import METHODS
from seg_segmentation.templates import TEMPLATES

LEGACY_FLAGS = {'--max_words': {'type': int}, '--max_frames': {'type': int}, '--resume': {'metavar': 'VALUE'}}
DATASETS = sorted(DATASET_CLASSES) + [CUSTOM_DATASET]


def build_parser():
    p = cli.make_parser('Zero-shot segmentation evaluation (mmseg datasets, slide inference, mIoU) of SegCLIP and '
                        'the training-free methods.')
    p.add_argument('--data_root', default=None,
                   help='dataset folder in mmseg layout (default: ' +
                        ', '.join(f'{k}: {v.default_root}' for k, v in LAYOUTS.items() if k in ('voc', 'context', 'coco'))
                        + ', ...); a parent such as data/VOCdevkit or data also works, which is how several '
                          '--dataset share one flag; or DATASET=FOLDER pairs separated by commas')
    cli.add_vocabulary_args(
        p, datasets=DATASETS, templates=TEMPLATES, dataset_default='coco', several=True,
        dataset_help="benchmark, or several separated by commas: voc/context/coco (COCO-Object) have a background "
                     "class; voc20, context59, coco_stuff, cityscapes, ade20k have none; custom = your own split in "
                     "the VOC layout with your own class names (label i = name i)",
        names_help='class names in label order, replacing the dataset\'s (start with "background" for '
                   'background-by-threshold; with a training-free method, one line per class with its synonyms '
                   'separated by ", "). Same count as the dataset\'s labels; required by --dataset custom '
                   '(any count)',
        bg_thresh_help='SegCLIP\'s background threshold (default: ' +
                       ', '.join(f'{k} {v}' for k, v in BG_THRESH.items()) + '; unused by datasets without '
                       'background and by the training-free methods, which use --prob_thd)')
    cli.add_segmenter_args(
        p, methods=METHODS, several=True,
        init_model_help="SegCLIP checkpoint (e.g. the released segclip.bin). Default: the released checkpoint "
                        "in --cache_dir, downloaded when missing. 'none' evaluates --pretrained_clip_name with "
                        "freshly initialised centers (a sanity baseline only)",
        clip_help='CLIP weights: a name (ViT-B/16, ViT-L/14@336px, ... downloaded when missing), an OpenAI / '
                  'open_clip / .safetensors file or a Hugging Face CLIP folder; the model of the training-free '
                  'methods, and with --init_model none the CLIP the centers are added to',
        first_stage_help='visual blocks before the center block; only with --init_model none (checkpoints carry it)',
        precisions=PRECISIONS)
    g = p.add_argument_group('evaluation run')
    g.add_argument('--batch_size', type=int, default=16, help='windows per visual forward pass (all images pooled)')
    g.add_argument('--num_workers', type=int, default=2, help='DataLoader processes per rank (decode + resize)')
    g.add_argument('--max_images', type=int, default=None, help='evaluate only the first N images (quick checks)')
    g.add_argument('--output', default=None, help='write the results (per-class IoU, mIoU, aAcc, timing) as JSON')
    g.add_argument('--output_dir', default=None, metavar='DIR',
                   help='evaluate every --method on every --dataset: DIR/<method>/<dataset>.json per pair and the '
                        'table DIR/results.md, DIR/results.csv; a rerun skips the pairs already done with the same '
                        'settings')
    g.add_argument('--save_pred', default=None,
                   help='folder for the predicted label maps (palette PNGs named <image id>.png, the id being the '
                        'image\'s path below the dataset\'s image folder, sub-folders kept; with --output_dir one '
                        'sub-folder <method>/<dataset> per pair)')
    g.add_argument('--seed', type=int, default=cli.PAPER_SEED,
                   help='seed of the freshly initialised centers of --init_model none (the evaluation itself is '
                        'deterministic)')
    g.add_argument('--tag', default=None, help='a label for this run, stored in the --output JSON')
    cli.add_runtime_args(p)
    cli.add_legacy_flags(p, LEGACY_FLAGS, 'class prompts always use 77 tokens, and evaluation neither resumes nor reads frames')
    return p


def parse_args(argv=None):
    """Flags -> settings, every input checked before any model is loaded."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a == '--amp' or a.startswith('--amp=') for a in argv):
        raise UsageError('--amp is not a flag of the evaluation: lower its precision with --precision bf16')
    args = cli.parse(build_parser(), argv)
    cli.check_segmenter_args(args, METHODS)
    cli.check_positive(args, 'batch_size', 'max_images')
    if args.num_workers < 0:
        raise UsageError(f'--num_workers must be >= 0, got {args.num_workers}')
    args.methods, args.datasets = cli.method_list(args.method), cli.method_list(args.dataset)
    bad = [d for d in args.datasets if d not in DATASETS]
    if not args.datasets or bad:
        raise UsageError(f'--dataset {bad[0] if bad else args.dataset!r}: choose from {", ".join(DATASETS)}')
    several = len(args.methods) > 1 or len(args.datasets) > 1
    if several and args.output_dir is None:
        raise UsageError('several methods or datasets make a table: give --output_dir DIR for its files')
    if args.output_dir is not None and args.output is not None:
        raise UsageError('--output writes one result; with --output_dir every pair has its own JSON there')
    if len(args.datasets) > 1 and (args.classes is not None or args.classes_file is not None):
        raise UsageError('--classes / --class_names replace one dataset\'s names; give a single --dataset')
    args.data_roots = data_roots(args.data_root, args.datasets)
    return args


def data_roots(value, datasets):
    """--data_root -> {dataset: folder or None}: one folder for every dataset (each finds its usual sub-folder
    below it), or DATASET=FOLDER pairs separated by commas."""
    if value is None or '=' not in value:
        return {d: value for d in datasets}
    pairs = {}
    for item in value.split(','):
        name, sep, folder = item.partition('=')
        if not sep or not folder.strip():
            raise UsageError(f'--data_root {value}: give one folder, or DATASET=FOLDER pairs separated by commas')
        pairs[name.strip()] = folder.strip()
    missing = [d for d in datasets if d not in pairs]
    if missing:
        raise UsageError(f'--data_root names no folder for {", ".join(missing)}')
    return {d: pairs[d] for d in datasets}


def read_class_names(args):
    """--classes / --classes_file -> names (per label a list of names where the file has synonyms: "dog, puppy"),
    or None for the method's default (the dataset's names; with a training-free method the project's synonym file)."""
    if args.classes is not None:
        return parse_class_list(args.classes)
    if not args.classes_file:
        return None
    from seg_segmentation.synonyms import read_name_file
    classes = read_name_file(args.classes_file, source='--classes_file')
    return [c[0] for c in classes] if all(len(c) == 1 for c in classes) else classes


def check_inputs(args) -> None:
    """Data, weights, outputs and device, before any model is loaded (a typo must not cost a model load)."""
    for dataset, root in args.data_roots.items():
        resolve_data_root(dataset, root)
        for method in args.methods:     # no output among the dataset's own files (e.g. over its label maps)
            outputs = (('--save_pred', pred_folder(args, method, dataset)), ('--output', args.output),
                       ('--output_dir', args.output_dir))
            for flag, path in outputs:
                if path is not None:
                    refuse_output_inside_dataset(path, flag, dataset, root)
    free = [m for m in args.methods if m != cli.SEGCLIP]
    if free:
        check_clip_weights(args.pretrained_clip_name)
        if args.init_model is not None and cli.SEGCLIP not in args.methods:
            raise UsageError(f'--init_model is a SegCLIP checkpoint; --method {args.method} runs the CLIP of '
                             '--pretrained_clip_name')
    if cli.SEGCLIP in args.methods and args.init_model is not None and args.init_model.lower() != 'none':
        cli.check_input_file(args.init_model, '--init_model')
    cli.check_writable_file(args.output, '--output')
    cli.check_writable_dir(args.output_dir, '--output_dir')
    cli.check_writable_dir(args.save_pred, '--save_pred')
    cli.resolve_device(args.device)


def pred_folder(args, method: str, dataset: str):
    """Where the label maps of one pair go: --save_pred itself, or its <method>/<dataset> with --output_dir."""
    if not args.save_pred:
        return None
    return args.save_pred if args.output_dir is None else osp.join(args.save_pred, method, dataset)


def check_clip_weights(name: str) -> None:
    """--pretrained_clip_name: a known model name, or a file / folder that exists."""
    from common.download import CLIP_URLS
    if name not in CLIP_URLS and not osp.exists(name):
        raise UsageError(f'--pretrained_clip_name {name}: neither a file or folder nor one of the known models '
                         f'{sorted(CLIP_URLS)}')


def load_model(args, method: str, device, loaded: dict):
    """The model ``method`` evaluates: SegCLIP, or the training-free method (sharing one CLIP through ``loaded``)."""
    from modules.checkpoint import load_clip_state_dict, load_segclip, segclip_checkpoint_keys
    from modules.precision import set_precision
    if method != cli.SEGCLIP:
        from seg_segmentation.methods import load_method
        return load_method(method, args.pretrained_clip_name, vfm=getattr(args, 'vfm', None), cache_dir=args.cache_dir,
                           device=device, precision=args.precision, activation=args.clip_activation, loaded=loaded)
    if args.init_model is not None and args.init_model.lower() == 'none':
        from modules.modeling import SegCLIP
        torch.manual_seed(args.seed)          # the fresh centers
        model = SegCLIP.from_clip(load_clip_state_dict(args.pretrained_clip_name, cache_dir=args.cache_dir),
                                  first_stage_layer=args.first_stage_layer, use_vision_mae_recon=False)
        return set_precision(model.to(device), args.precision).eval()
    from common.download import resolve_segclip_checkpoint
    path = resolve_segclip_checkpoint(args.init_model, cache_dir=args.cache_dir, expected_keys=segclip_checkpoint_keys)
    return load_segclip(path, device=device, use_vision_mae_recon=False, precision=args.precision)


def make_prediction_writer(folder: str, dataset: str, data_root):
    """on_prediction callback: each label map -> <folder>/<image id>.png (palette PNG, VOC colours), written
    atomically. The id is the image's path below the dataset's image folder without its suffix, sub-folders kept
    (cityscapes' frankfurt/..., split files naming a/img and b/img), so no two images share a file; temporaries a
    killed earlier run left in a folder are removed before the first write into it."""
    from pathlib import Path
    from common.fileio import remove_stale_temporaries
    from seg_segmentation.datasets import DatasetError, dataset_folders
    from seg_segmentation.drawing import voc_palette
    from seg_segmentation.outputs import save_label_png
    palette = voc_palette()
    suffix = LAYOUTS[dataset].img_suffix
    img_dir = dataset_folders(dataset, data_root)[0]
    written, cleaned = {}, set()

    def write(img_path: str, pred: torch.Tensor):
        rel = osp.relpath(img_path, img_dir)
        if rel.startswith(osp.pardir + osp.sep) or osp.isabs(rel):   # a split line such as ../../x
            raise DatasetError(f'{img_path} is not below the image folder {img_dir}; its prediction has no name '
                               'inside --save_pred')
        image_id = rel[:-len(suffix)] if rel.endswith(suffix) else osp.splitext(rel)[0]
        target = Path(folder) / (image_id + '.png')
        if written.setdefault(target, img_path) != img_path:
            raise DatasetError(f'{written[target]} and {img_path} would both be saved as {target}; rename one')
        if target.parent not in cleaned:
            remove_stale_temporaries(target.parent)
            cleaned.add(target.parent)
        save_label_png(target, pred.numpy(), palette)
    return write


def eval_config(args, method: str, dataset: str, class_names, device):
    """The EvalConfig of one pair: ``method``'s preset for ``dataset`` with the flags given on top."""
    from seg_segmentation.dense import resolve_settings
    from seg_segmentation.evaluate import EvalConfig
    settings = resolve_settings(method, dataset, args)
    if method != cli.SEGCLIP:
        from seg_segmentation.methods import PROTOCOL_KEYS
        settings['knobs'] = {k: settings.pop(k) for k in list(settings) if k not in PROTOCOL_KEYS}
        settings['area_thd'] = settings['area_thd'] or 0.0
    if class_names is not None:
        settings['class_names'] = class_names
    return EvalConfig.preset(
        method, dataset, data_root=args.data_roots[dataset], bg_thresh=args.bg_thresh, max_long=args.max_long,
        batch_size=args.batch_size, num_workers=args.num_workers, device=device, max_images=args.max_images,
        max_image_pixels=args.max_image_pixels, progress=not args.no_progress, **settings)


def request_of(args, method: str, dataset: str, cfg) -> dict:
    """What one pair's result answers: a rerun with the same request skips the pair (seg_segmentation/results_table.py)."""
    return dict(method=method, dataset=dataset, data_root=cfg.data_root, resolution=cfg.resolution,
                max_long=cfg.max_long, crop=cfg.crop, stride=cfg.stride, templates=cfg.templates,
                logit_scale=cfg.logit_scale, prob_thd=cfg.prob_thd, area_thd=cfg.area_thd, pamr_steps=cfg.pamr_steps,
                pamr_dilations=list(cfg.pamr_dilations), knobs=cfg.knobs, bg_thresh=cfg.bg_thresh,
                class_names=cfg.class_names, max_images=cfg.max_images, precision=args.precision,
                weights=args.pretrained_clip_name if method != cli.SEGCLIP else args.init_model,
                vfm=vfm_of(args, method))


def vfm_of(args, method: str):
    """The second vision model ``method`` runs with (--vfm, else its default), None for a method without one."""
    cls = METHODS.get(method)
    return (getattr(args, 'vfm', None) or cls.vfm) if cls is not None and cls.vfm else None


def evaluate_pair(args, method, dataset, class_names, env, loaded, save_pred):
    from seg_segmentation.evaluate import run_zero_shot_eval
    cfg = eval_config(args, method, dataset, class_names, env.device)
    if ('method', method) not in loaded:   # loaded also keeps the CLIP (and VFM) the training-free methods share
        loaded['method', method] = load_model(args, method, env.device, loaded)
    model = loaded['method', method]
    writer = make_prediction_writer(save_pred, dataset, args.data_roots[dataset]) if save_pred else None
    result = run_zero_shot_eval(model, cfg, on_prediction=writer)
    result['settings'].update(init_model=args.init_model if method == cli.SEGCLIP else None,
                              world_size=env.world_size, tag=args.tag,
                              clip_weights=args.pretrained_clip_name if method != cli.SEGCLIP else None,
                              vfm=vfm_of(args, method))
    return cfg, result


def run_table(args, class_names, env) -> None:
    """Every --method on every --dataset: one JSON per pair in --output_dir (pairs done with the same request are
    skipped), then the table."""
    from pathlib import Path
    from seg_segmentation.evaluate import format_table
    from seg_segmentation.outputs import write_json
    from seg_segmentation.results_table import load_done, pair_path, write_tables
    pairs = [(m, d) for m in args.methods for d in args.datasets]
    results, loaded = {}, {}
    for n, (method, dataset) in enumerate(pairs, 1):
        cfg = eval_config(args, method, dataset, class_names, env.device)
        request = request_of(args, method, dataset, cfg)
        path = pair_path(args.output_dir, method, dataset)
        done = broadcast_object(env, load_done(path, request) if env.is_main else None)   # rank 0 decides for all
        if done is not None:
            if env.is_main:
                print(f'[{n}/{len(pairs)}] {method} on {dataset}: done before (mIoU {done["mIoU"]:.2f}), skipped',
                      flush=True)
            results.setdefault(method, {})[dataset] = done['mIoU']
            continue
        if env.is_main:
            print(f'[{n}/{len(pairs)}] {method} on {dataset}', flush=True)
        _, result = evaluate_pair(args, method, dataset, class_names, env, loaded, pred_folder(args, method, dataset))
        results.setdefault(method, {})[dataset] = result['mIoU']
        if env.is_main:
            print(format_table(result), flush=True)
            result['request'] = request

        def save(path=path, result=result):
            write_json(path, result)
            write_tables(args.output_dir, results, args.methods, args.datasets, published())
        on_main_process(env, save)     # a full disk on rank 0 stops every rank, with its message
    if env.is_main:
        files = write_tables(args.output_dir, results, args.methods, args.datasets, published())
        print(Path(files[0]).read_text(encoding='utf-8'), flush=True)
        print(f'results written to {args.output_dir} ({", ".join(str(f) for f in files)})', flush=True)


def published():
    return {name: dict(cls.published) for name, cls in METHODS.items()}


@cli.run_main
def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(message)s')
    args = parse_args(argv)
    class_names = read_class_names(args)
    check_inputs(args)
    cli.note_ignored_flags(args)

    env = init_distributed(args.local_rank, args.device, args.dist_backend)
    try:
        if args.output_dir is not None:
            from common.fileio import remove_stale_temporaries
            if env.is_main:
                remove_stale_temporaries(args.output_dir)
            run_table(args, class_names, env)
            return 0
        from seg_segmentation.evaluate import format_table
        method, dataset = args.methods[0], args.datasets[0]
        _, result = evaluate_pair(args, method, dataset, class_names, env, {}, args.save_pred)
        if env.is_main:
            print(format_table(result), flush=True)
            if args.output:
                from common.fileio import remove_stale_temporaries
                from seg_segmentation.outputs import write_json
                remove_stale_temporaries(osp.dirname(osp.abspath(args.output)))
                write_json(args.output, result)
                print(f'results written to {args.output}', flush=True)
    finally:   # a user error goes on to run_main, which prints it on rank 0 (that knows every rank's message)
        cleanup(env)
    return 0


if __name__ == '__main__':
    sys.exit(main())
