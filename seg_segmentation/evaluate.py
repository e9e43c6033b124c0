"""Zero-shot segmentation evaluation over a whole split, on one process or many (design.md §7).

    from seg_segmentation.evaluate import EvalConfig, run_zero_shot_eval
    res = run_zero_shot_eval(model, EvalConfig(dataset='voc', data_root='data/VOCdevkit/VOC2012'))
    res = run_zero_shot_eval(model, dataset='voc', data_root=...)    # the same: settings by keyword
    res['mIoU'], res['aAcc'], res['per_class']     # percentages, mmseg's arithmetic

Three steps: ``predict_shard`` (this rank's images -> summed intersection / union areas), ``reduce_across_ranks``
(every rank first learns whether any rank failed, so none waits for a collective that will not come; then the
areas are summed) and ``build_report`` (metrics + settings). Inside an initialised torch.distributed group every
rank evaluates a disjoint, unpadded share of the images, so the numbers do not depend on the number of processes.
"""
import dataclasses
import time
from collections import OrderedDict
from typing import Callable, Dict, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist

from common.errors import SegCLIPError, UsageError, brief
from common.images import DEFAULT_MAX_IMAGE_PIXELS
from common.ranks import rank_and_world
from dataloaders.workers import init_loader_worker, start_workers
from modules.precision import model_precision
from . import mmcv_compat  # noqa: F401
from .classes import BG_THRESH, DATASET_CLASSES, has_background, validate_class_names
from .datasets import CUSTOM_DATASET, LAYOUTS, DatasetError, ZeroShotSegDataset, collate_list
from .inference import ZeroShotSegmentor, slide_windows, unwrap_model

IGNORE_INDEX = 255
SEGCLIP = 'segclip'


def intersect_and_union(pred: torch.Tensor, gt: torch.Tensor, num_classes: int,
                        ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """mmseg's IoUMetric.intersect_and_union for one image -> int64 [4, num_classes]
    (area_intersect, area_union, area_pred_label, area_label). Integers, so sums are exact in any order."""
    from mmseg.evaluation import IoUMetric
    areas = IoUMetric.intersect_and_union(pred, gt, num_classes, ignore_index)
    return torch.stack([a.round().to(torch.int64) for a in areas])


def areas_to_metrics(areas: torch.Tensor, class_names: Sequence[str]) -> Dict:
    """Summed areas [4, C] -> mmseg's metrics in percent: aAcc, mIoU (nan-mean: classes absent from both prediction
    and ground truth are left out), mAcc, per-class IoU / Acc (None where undefined)."""
    from mmseg.evaluation import IoUMetric
    inter, union, pred_area, label_area = areas.double()      # mmseg's function takes (and returns) tensors
    m = IoUMetric.total_area_to_metrics(inter, union, pred_area, label_area, ['mIoU'])
    iou, acc = np.asarray(m['IoU'], dtype=np.float64), np.asarray(m['Acc'], dtype=np.float64)

    def pct(v):
        return None if v is None or not np.isfinite(v) else float(v) * 100.0

    return dict(
        aAcc=pct(m['aAcc']),
        mIoU=pct(np.nanmean(iou)) if np.isfinite(iou).any() else None,
        mAcc=pct(np.nanmean(acc)) if np.isfinite(acc).any() else None,
        per_class=OrderedDict((n, pct(v)) for n, v in zip(class_names, iou)),
        per_class_acc=OrderedDict((n, pct(v)) for n, v in zip(class_names, acc)),
    )


class EvalError(SegCLIPError, RuntimeError):
    """The evaluation could not finish on some rank (the message says why and what to change)."""


def _all_reduce_sum(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if rank_and_world(use_env=False)[1] == 1:
        return t
    # NCCL reduces CUDA tensors only; gloo CPU tensors
    work = t.to(device) if dist.get_backend() == 'nccl' else t.cpu()
    dist.all_reduce(work, op=dist.ReduceOp.SUM)
    return work.cpu()


@dataclasses.dataclass
class EvalConfig:
    """Every setting of one evaluation (design.md §7.3 defaults: the SegCLIP protocol).

    dataset: voc | context | coco | voc20 | context59 | coco_stuff | cityscapes | ade20k, or ``custom``: your own
        split in the VOC layout with your own ``class_names`` (label i = class i; a label id >= the count raises
        DatasetError). A benchmark's ``class_names`` override must have the benchmark's count.
    data_root: the dataset folder (default: mmseg's ``data/...`` location; required for ``custom``).
    class_names: a leading 'background' means background-by-threshold.
    with_bg / bg_thresh: background channel and threshold (defaults: from the dataset / class list).
    resolution / max_long: keep-ratio resize to scale (max_long, resolution) - short side ``resolution``.
    crop / stride: sliding window. batch_size: crops per visual forward (windows of several images are pooled).
    num_workers: DataLoader processes decoding / resizing images.
    device: where the model runs (default: the model's device; the model is moved there). Precision is the
        model's own (``modules.precision.set_precision``: bf16 weights), reported in the settings.
    max_images: evaluate only the first N images of the split (quick checks).
    max_image_pixels: images / label maps with more pixels are refused before decoding (0 or None: no limit).
    method: 'segclip' (the model is a SegCLIP) or a training-free method of ``seg_segmentation.methods`` (the
        model is that method, a ``TrainingFreeMethod`` holding its CLIP; design.md §12, §13).
        ``EvalConfig.preset`` fills in a method's published settings for a dataset.
    class_names may also hold per label a list of names (synonyms, seg_segmentation/synonyms.py); for a
        dataset with background, label 0's names then stand for the background whatever they are.
    logit_scale / prob_thd / area_thd (training-free methods): set by ``preset``; area_thd 0 or None = off.
    pamr_steps / pamr_dilations: PAMR refinement at the original size (any method; 0 steps = off).
    knobs: the training-free method's own settings (e.g. NACLIP's gaussian_std); ``preset`` fills in its values
        for the dataset.
    """
    dataset: str = 'voc'
    data_root: Optional[str] = None
    class_names: Optional[Sequence[Union[str, Sequence[str]]]] = None
    templates: Union[str, Sequence[str]] = 'simple'
    with_bg: Optional[bool] = None
    bg_thresh: Optional[float] = None
    resolution: int = 224
    max_long: int = 2048
    crop: int = 224
    stride: int = 224
    batch_size: int = 16
    num_workers: int = 2
    device: Optional[Union[str, torch.device]] = None
    max_images: Optional[int] = None
    max_image_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS
    progress: bool = True
    method: str = 'segclip'
    logit_scale: Optional[float] = None
    prob_thd: Optional[float] = None
    area_thd: Optional[float] = None
    pamr_steps: int = 0
    pamr_dilations: Sequence[int] = (8, 16)
    knobs: Dict = dataclasses.field(default_factory=dict)

    @classmethod
    def preset(cls, method: str = SEGCLIP, dataset: str = 'voc', **settings) -> 'EvalConfig':
        """The published protocol of ``method`` on ``dataset``, with ``settings`` on top (``knobs`` are merged
        into the method's). SegCLIP: the defaults above. A training-free method: its own settings for the dataset
        (``TrainingFreeMethod.settings``: resolution, windows, prompts, logit_scale / thresholds / PAMR and its
        knobs) and the project's synonym file."""
        from .dense import method_defaults
        base = method_defaults(method, dataset)
        knobs = {}
        if method != SEGCLIP:
            from .methods import PROTOCOL_KEYS
            from .synonyms import dataset_name_file, read_name_file
            knobs = {k: base.pop(k) for k in list(base) if k not in PROTOCOL_KEYS}
            base['area_thd'] = base['area_thd'] or 0.0
            if dataset in DATASET_CLASSES:
                base['class_names'] = read_name_file(dataset_name_file(dataset))
        knobs.update(settings.pop('knobs', None) or {})
        base.update(method=method, dataset=dataset, knobs=knobs)
        base.update(settings)
        return cls(**base)

    def synonyms(self) -> Optional[list]:
        """Per label its names when ``class_names`` has synonyms, else None."""
        if self.class_names is None or all(isinstance(c, str) for c in self.class_names):
            return None
        return [[c] if isinstance(c, str) else [str(n) for n in c] for c in self.class_names]

    def vocabulary(self) -> Tuple[list, bool, float]:
        """-> (class names in label order, with_bg, bg_thresh); UsageError naming what does not fit."""
        if self.dataset != CUSTOM_DATASET and self.dataset not in DATASET_CLASSES:
            raise UsageError(f'unknown dataset {self.dataset!r}; choose one of '
                             f'{sorted(DATASET_CLASSES) + [CUSTOM_DATASET]}')
        given = self.class_names
        classes = self.synonyms()
        if classes is not None:   # the first name of each label; a background line is called 'background'
            given = [c[0] for c in classes]
            bg_line = (has_background(self.dataset) if self.dataset in DATASET_CLASSES
                       else any(n.strip().lower() == 'background' for n in classes[0]))
            if bg_line:
                given[0] = 'background'
        if self.dataset == CUSTOM_DATASET:
            if given is None:
                raise UsageError(f'dataset {CUSTOM_DATASET!r} needs its class names (label i = name i)')
            names = validate_class_names(given)
        else:
            names = validate_class_names(given if given is not None else DATASET_CLASSES[self.dataset])
            if len(names) != len(DATASET_CLASSES[self.dataset]):
                raise UsageError(f'{self.dataset} has {len(DATASET_CLASSES[self.dataset])} label values, but '
                                 f'{len(names)} class names were given (for a split of your own with its own '
                                 f'classes use dataset {CUSTOM_DATASET!r})')
        bg_in_names = names[0] == 'background'
        with_bg = bg_in_names if self.with_bg is None else bool(self.with_bg)
        if with_bg != bg_in_names:
            raise UsageError(f'with_bg={with_bg} needs the class list to {"start" if with_bg else "not start"} '
                             f'with "background" (it has {len(names)} classes, first {names[0]!r})')
        default = BG_THRESH['voc'] if self.dataset == CUSTOM_DATASET else BG_THRESH.get(self.dataset, 0.0)
        return names, with_bg, (default if self.bg_thresh is None else float(self.bg_thresh))


class ShardResult(NamedTuple):
    areas: torch.Tensor                 # int64 [4, C]: intersect, union, pred, label summed over this rank's images
    images: int                         # images predicted here
    error: Optional[BaseException]      # what stopped this rank, if anything


def make_loader(shard: ZeroShotSegDataset, cfg: EvalConfig, device: torch.device):
    """Samples one at a time (sizes differ), decoded in ``cfg.num_workers`` processes; on CUDA the batches are in
    pinned memory, so each whole image reaches the GPU by an asynchronous copy (the crops are cut there)."""
    return torch.utils.data.DataLoader(shard, batch_size=1, shuffle=False, num_workers=cfg.num_workers,
                                       collate_fn=collate_list, pin_memory=device.type == 'cuda',
                                       persistent_workers=False, worker_init_fn=init_loader_worker)


def predict_shard(seg: ZeroShotSegmentor, shard: ZeroShotSegDataset, cfg: EvalConfig, num_classes: int,
                  on_prediction: Optional[Callable] = None, bar=None) -> ShardResult:
    """Predict this rank's images and sum their areas. Never raises: an error is returned, so that the caller
    can tell the other ranks before raising it."""
    C = num_classes
    device = seg.device
    areas = torch.zeros(4, C, dtype=torch.int64, device=device)    # on the device: no synchronisation per image
    done = 0
    loader = make_loader(shard, cfg, device)

    def flush(pending):
        preds = seg.predict_labels([p['img'] for p in pending], [p['ori_shape'] for p in pending],
                                   crop=cfg.crop, stride=cfg.stride, batch_size=cfg.batch_size)
        for p, pred in zip(pending, preds):
            gt = p['gt'].to(pred.device, non_blocking=True)
            bad = gt[(gt != IGNORE_INDEX) & (gt >= C)]
            if bad.numel():   # mmseg's histogram would silently drop them
                raise DatasetError(f'{p["img_path"]}: label {int(bad.max())} but only {C} class names')
            areas.add_(intersect_and_union(pred, gt, C))
            if on_prediction is not None:
                on_prediction(p['img_path'], pred.cpu())
        if bar is not None:
            bar.update(len(pending) * rank_and_world(use_env=False)[1])
        return len(pending)

    try:
        pending, n_windows = [], 0
        for batch in start_workers(loader):       # pool images until their windows fill a forward pass
            for p in batch:
                pending.append(p)
                n_windows += len(slide_windows(*p['img'].shape[-2:], cfg.crop, cfg.stride))
            if n_windows >= cfg.batch_size:
                done += flush(pending)
                pending, n_windows = [], 0
        if pending:
            done += flush(pending)
    except DatasetError as e:
        # from a DataLoader worker the message carries the worker's traceback: keep only the reason
        return ShardResult(areas.cpu(), done, DatasetError(str(e).strip().splitlines()[-1].split('DatasetError: ', 1)[-1]))
    except torch.cuda.OutOfMemoryError:
        return ShardResult(areas.cpu(), done, EvalError(
            f'{device} ran out of memory with --batch_size {cfg.batch_size} (windows per forward pass); lower '
            '--batch_size, or use --precision bf16'))
    except Exception as e:  # noqa: BLE001 - not hidden: re-raised by reduce_across_ranks after the other ranks know
        return ShardResult(areas.cpu(), done, e)
    return ShardResult(areas.cpu(), done, None)


def reduce_across_ranks(shard: ShardResult, device: torch.device) -> Tuple[torch.Tensor, int]:
    """-> (areas [4, C] and image count summed over ranks). Every rank first contributes a failure flag, so a
    failing rank raises its own error and the others an EvalError instead of waiting in the sum."""
    failed = int(_all_reduce_sum(torch.tensor([shard.error is not None], dtype=torch.int64), device).item())
    if failed and rank_and_world(use_env=False)[1] == 1:
        raise shard.error
    if failed:
        # Every rank learns every failing rank's message, so rank 0 alone can report them all (the scripts print
        # on rank 0 only) while each failing rank keeps its own exception (and a bug its traceback).
        mine = None if shard.error is None else (
            str(shard.error) if isinstance(shard.error, SegCLIPError) else brief(shard.error))
        messages = [None] * rank_and_world(use_env=False)[1]
        dist.all_gather_object(messages, mine)
        if shard.error is not None:
            raise shard.error
        others = '; '.join(f'rank {r}: {m}' for r, m in enumerate(messages) if m is not None)
        raise EvalError(f'{failed} other process(es) failed: {others}')
    areas = _all_reduce_sum(shard.areas, device)
    counted = int(_all_reduce_sum(torch.tensor([shard.images], dtype=torch.int64), device).item())
    return areas, counted


def build_report(areas: torch.Tensor, names: Sequence[str], images: int, seconds: float, cfg: EvalConfig,
                 data_root: str, with_bg: bool, bg_thresh: float, precision: str,
                 method_settings: Optional[Dict] = None) -> Dict:
    """Summed areas -> the result dict: metrics (``areas_to_metrics``), counts, timing, areas and settings."""
    result = areas_to_metrics(areas, names)
    method_settings = method_settings or {}
    templates = cfg.templates if isinstance(cfg.templates, str) else list(cfg.templates)
    result.update(
        dataset=cfg.dataset, images=images, seconds=seconds, images_per_s=images / seconds if seconds > 0 else None,
        num_classes=len(names), world_size=rank_and_world(use_env=False)[1],
        areas=dict(intersect=areas[0].tolist(), union=areas[1].tolist(), pred=areas[2].tolist(),
                   label=areas[3].tolist()),
        settings=dict(data_root=data_root, templates=templates, with_bg=with_bg,
                      bg_thresh=bg_thresh if with_bg else None, resolution=cfg.resolution, max_long=cfg.max_long,
                      crop=cfg.crop, stride=cfg.stride, batch_size=cfg.batch_size,
                      precision=precision, device=str(cfg.device), method=cfg.method,
                      **method_settings,
                      reduce_zero_label=LAYOUTS[cfg.dataset].reduce_zero_label),
    )
    return result


def make_segmentor(model, cfg: EvalConfig, names: Sequence[str], with_bg: bool, bg_thresh: float):
    """The segmentor of ``cfg.method``: ZeroShotSegmentor (SegCLIP) or TrainingFreeSegmentor (``model`` is then
    the training-free method)."""
    classes = cfg.synonyms()
    pamr = dict(pamr_steps=cfg.pamr_steps, pamr_dilations=cfg.pamr_dilations)
    if cfg.method == SEGCLIP:
        vocab = dict(class_names=names) if classes is None else dict(classes=classes)
        return ZeroShotSegmentor(model, templates=cfg.templates, with_bg=with_bg, bg_thresh=bg_thresh, **vocab, **pamr)
    from .dense import TrainingFreeSegmentor
    from .methods import TrainingFreeMethod
    if not isinstance(model, TrainingFreeMethod) or model.name != cfg.method:
        raise UsageError(f'method {cfg.method!r} needs its TrainingFreeMethod (seg_segmentation.methods.build_method), '
                         f'got {type(model).__name__}')
    return TrainingFreeSegmentor(
        model, classes=classes if classes is not None else [[n] for n in names], templates=cfg.templates,
        crop=cfg.crop, stride=cfg.stride, batch_size=cfg.batch_size, logit_scale=cfg.logit_scale,
        prob_thd=cfg.prob_thd, area_thd=cfg.area_thd or None, **pamr, **cfg.knobs)


def _method_settings(cfg: EvalConfig, net) -> Dict:
    """The settings of the method's head that the report records (a training-free method's knobs as it ran)."""
    out = dict(pamr_steps=cfg.pamr_steps, pamr_dilations=list(cfg.pamr_dilations) if cfg.pamr_steps else None,
               synonyms=cfg.synonyms() is not None)
    if cfg.method != SEGCLIP:
        out.update(logit_scale=cfg.logit_scale, prob_thd=cfg.prob_thd, area_thd=cfg.area_thd or None)
        out.update(net.knob_values() if hasattr(net, 'knob_values') else cfg.knobs)
    return out


def run_zero_shot_eval(model, config: Optional[EvalConfig] = None, on_prediction: Optional[Callable] = None,
                       **settings) -> Dict:
    """Evaluate ``model`` zero-shot on a segmentation split (SegCLIP protocol by default).

    model: SegCLIP (or a DDP wrapper), or for a training-free ``config.method`` that method
        (``seg_segmentation.methods.build_method``); put in eval mode for the call and restored afterwards.
    config: an EvalConfig; ``settings`` (EvalConfig's fields by keyword) replace its values.
    on_prediction: called as ``on_prediction(img_path, pred)`` with each label map [H, W] (int64, CPU) this rank
        predicts (e.g. to save it).

    Returns dict: mIoU, aAcc, mAcc (percent), per_class (name -> IoU % or None), per_class_acc, images, seconds,
    images_per_s, num_classes, world_size, areas, settings.
    """
    cfg = dataclasses.replace(config or EvalConfig(), **settings)
    names, with_bg, bg_thresh = cfg.vocabulary()
    rank, world = rank_and_world(use_env=False)
    net = unwrap_model(model)
    cfg.device = torch.device(cfg.device) if cfg.device is not None else next(net.parameters()).device
    was_training = net.training
    net.to(cfg.device).eval()
    from tqdm import tqdm
    start, full, total = time.perf_counter(), None, 0
    try:
        full = ZeroShotSegDataset(cfg.dataset, cfg.data_root, resolution=cfg.resolution, max_long=cfg.max_long,
                                  max_image_pixels=cfg.max_image_pixels)
        total = len(full) if cfg.max_images is None else min(len(full), int(cfg.max_images))
        shard = full.subset(range(rank, total, world))    # disjoint, unpadded: every image counted once
        seg = make_segmentor(net, cfg, names, with_bg, bg_thresh)
        with tqdm(total=total, desc=f'zero-shot {cfg.dataset}', unit='img', dynamic_ncols=True,
                  disable=not cfg.progress or rank != 0) as bar:
            result = predict_shard(seg, shard, cfg, len(names), on_prediction, bar)
    except Exception as e:  # noqa: BLE001 - re-raised by reduce_across_ranks once every rank knows
        result = ShardResult(torch.zeros(4, len(names), dtype=torch.int64), 0, e)
    finally:
        if was_training:
            net.train()
    areas, counted = reduce_across_ranks(result, cfg.device)
    if counted != total:
        raise RuntimeError(f'{counted} images were evaluated across {world} process(es), expected {total}')
    return build_report(areas, names, counted, time.perf_counter() - start, cfg, full.data_root, with_bg, bg_thresh,
                        model_precision(net), _method_settings(cfg, net))


def format_table(result: Dict) -> str:
    """Per-class IoU table + summary line, for stdout."""
    names = list(result['per_class'])
    width = max(12, max(len(n) for n in names) + 2)
    lines = [f'{"class":<{width}}{"IoU":>8}{"Acc":>8}', '-' * (width + 16)]
    for n in names:
        iou, acc = result['per_class'][n], result['per_class_acc'][n]
        f = lambda v: f'{v:8.2f}' if v is not None else f'{"-":>8}'   # noqa: E731
        lines.append(f'{n:<{width}}{f(iou)}{f(acc)}')
    lines.append('-' * (width + 16))
    miou = result['mIoU']
    lines.append(f'{result["dataset"]}: mIoU {miou:.2f}  aAcc {result["aAcc"]:.2f}  mAcc {result["mAcc"]:.2f}  '
                 f'({result["images"]} images, {result["seconds"]:.1f} s, {result["images_per_s"]:.2f} img/s)'
                 if miou is not None else f'{result["dataset"]}: no labelled pixels')
    return '\n'.join(lines)
