"""Zero-shot segmentation evaluation over a whole split, on one process or many (design.md §7).

    from seg_segmentation.evaluate import run_zero_shot_eval
    res = run_zero_shot_eval(model, dataset='voc', data_root='data/VOCdevkit/VOC2012')
    res['mIoU'], res['aAcc'], res['per_class']     # percentages, mmseg's arithmetic

Inside an initialised torch.distributed group every rank evaluates a disjoint, unpadded share of the images and the
intersection / union areas are summed across ranks, so the numbers do not depend on the number of processes.
"""
import time
from collections import OrderedDict
from typing import Callable, Dict, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from . import mmcv_compat  # noqa: F401
from .classes import BG_THRESH, DATASET_CLASSES, validate_class_names
from .datasets import LAYOUTS, DatasetError, ZeroShotSegDataset, collate_list
from .inference import ZeroShotSegmentor, slide_windows, unwrap_model

IGNORE_INDEX = 255


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


def _dist_info():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce_sum(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if _dist_info()[1] == 1:
        return t
    # NCCL reduces CUDA tensors only; gloo CPU tensors
    work = t.to(device) if dist.get_backend() == 'nccl' else t.cpu()
    dist.all_reduce(work, op=dist.ReduceOp.SUM)
    return work.cpu()


def _amp_dtype(amp) -> Optional[torch.dtype]:
    if amp in (None, False, 'off', 'none', 'fp32', 'float32'):
        return None
    table = {'bf16': torch.bfloat16, 'bfloat16': torch.bfloat16, 'fp16': torch.float16, 'float16': torch.float16}
    if isinstance(amp, torch.dtype):
        return amp
    if amp not in table:
        raise ValueError(f'unknown amp setting {amp!r}; use off, bf16 or fp16')
    return table[amp]


# Layouts whose label id i is simply class i (no reduce_zero_label, no id remapping): a custom dataset in such a
# layout may come with its own class list of any length (e.g. the quickstart's synthetic VOC-layout split).
ANY_CLASS_COUNT = frozenset({'voc'})


def run_zero_shot_eval(model, dataset: str = 'voc', data_root: Optional[str] = None,
                       device=None, batch_size: int = 16, num_workers: int = 2, templates='simple',
                       class_names: Optional[Sequence[str]] = None, with_bg: Optional[bool] = None,
                       bg_thresh: Optional[float] = None, resolution: int = 224, max_long: int = 2048,
                       crop: int = 224, stride: int = 224, amp=None, max_images: Optional[int] = None,
                       progress: bool = True, on_prediction: Optional[Callable] = None) -> Dict:
    """Evaluate ``model`` zero-shot on a segmentation split (SegCLIP protocol by default).

    Args:
        model: SegCLIP (or a DDP wrapper); put in eval mode for the call and restored afterwards.
        dataset: voc | context | coco | voc20 | context59 | coco_stuff | cityscapes | ade20k.
        data_root: the dataset folder (default: mmseg's ``data/...`` location).
        device: where the model runs (default: the model's device; the model is moved there).
        batch_size: crops per visual forward (windows of several images are pooled).
        num_workers: DataLoader processes decoding / resizing images.
        templates: prompt set (simple | subset | full | identity).
        class_names: override the dataset's names (same count and order as its labels; a leading 'background'
            means background-by-threshold). For ``voc`` any count: a custom VOC-layout split with its own classes
            (label i = class i; a label id >= the count raises DatasetError).
        with_bg / bg_thresh: background channel and threshold (defaults: from the dataset, design.md §7.3).
        resolution / max_long: keep-ratio resize to scale (max_long, resolution) - short side ``resolution``.
        crop / stride: sliding window.
        amp: None | 'bf16' | 'fp16': autocast for the visual tower (GPU).
        max_images: evaluate only the first N images of the split (quick checks).
        on_prediction: called as ``on_prediction(img_path, pred)`` with each label map [H, W] (int64, CPU) this
            rank predicts (e.g. to save it).

    Returns dict: mIoU, aAcc, mAcc (percent), per_class (name -> IoU % or None), images, seconds, images_per_s,
    num_classes, settings.
    """
    if dataset not in DATASET_CLASSES:
        raise ValueError(f'unknown dataset {dataset!r}; choose one of {sorted(DATASET_CLASSES)}')
    rank, world = _dist_info()
    names = validate_class_names(class_names if class_names is not None else DATASET_CLASSES[dataset])
    if class_names is not None and len(names) != len(DATASET_CLASSES[dataset]) and dataset not in ANY_CLASS_COUNT:
        raise ValueError(f'{dataset} has {len(DATASET_CLASSES[dataset])} label values, but {len(names)} class names '
                         f'were given (only {sorted(ANY_CLASS_COUNT)} take a list of another length)')
    bg_in_names = names[0] == 'background'
    with_bg = bg_in_names if with_bg is None else bool(with_bg)
    if with_bg != bg_in_names:
        raise ValueError(f'with_bg={with_bg} needs the class list to {"start" if with_bg else "not start"} with '
                         f'"background" (it has {len(names)} classes, first {names[0]!r})')
    if bg_thresh is None:
        bg_thresh = BG_THRESH.get(dataset, 0.0)

    net = unwrap_model(model)
    device = torch.device(device) if device is not None else next(net.parameters()).device
    was_training = net.training
    net.to(device).eval()

    full = ZeroShotSegDataset(dataset, data_root, resolution=resolution, max_long=max_long)
    total = len(full) if max_images is None else min(len(full), int(max_images))
    shard = full.subset(range(rank, total, world))    # disjoint, unpadded: every image counted once
    loader = torch.utils.data.DataLoader(shard, batch_size=1, shuffle=False, num_workers=num_workers,
                                         collate_fn=collate_list, pin_memory=device.type == 'cuda',
                                         persistent_workers=False)
    seg = ZeroShotSegmentor(net, class_names=names, templates=templates, with_bg=with_bg, bg_thresh=bg_thresh,
                            amp_dtype=_amp_dtype(amp))
    C = len(names)
    areas = torch.zeros(4, C, dtype=torch.int64)
    n_done = 0

    from tqdm import tqdm
    bar = tqdm(total=total, desc=f'zero-shot {dataset}', unit='img', disable=not progress or rank != 0,
               dynamic_ncols=True)

    def flush(pending):
        nonlocal areas, n_done
        if not pending:
            return
        preds = seg.predict([p['img'] for p in pending], [p['ori_shape'] for p in pending],
                            crop=crop, stride=stride, batch_size=batch_size)
        for p, pred in zip(pending, preds):
            gt = p['gt'].to(pred.device)
            bad = gt[(gt != IGNORE_INDEX) & (gt >= C)]
            if bad.numel():   # mmseg's histogram would silently drop them
                raise DatasetError(f'{p["img_path"]}: label {int(bad.max())} but only {C} class names')
            areas += intersect_and_union(pred, gt, C)
            if on_prediction is not None:
                on_prediction(p['img_path'], pred.cpu())
        n_done += len(pending)
        bar.update(len(pending) * world)

    start = time.perf_counter()
    error = None
    try:
        pending, n_windows = [], 0
        for batch in loader:       # pool images until their windows fill a forward pass
            for p in batch:
                pending.append(p)
                n_windows += len(slide_windows(*p['img'].shape[-2:], crop, stride))
            if n_windows >= batch_size:
                flush(pending)
                pending, n_windows = [], 0
        flush(pending)
    except DatasetError as e:
        # from a DataLoader worker the message carries the worker's traceback: keep only the reason
        error = DatasetError(str(e).strip().splitlines()[-1].split('DatasetError: ', 1)[-1])
    finally:
        bar.close()
        if was_training:
            net.train()

    # every rank learns whether any rank failed, so none is left waiting in the reduction below
    failed = int(_all_reduce_sum(torch.tensor([error is not None], dtype=torch.int64), device).item())
    if error is not None:
        raise error
    if failed:
        raise DatasetError(f'{failed} other process(es) failed to read their images (see their messages)')
    areas = _all_reduce_sum(areas, device)
    counted = int(_all_reduce_sum(torch.tensor([n_done], dtype=torch.int64), device).item())
    if counted != total:
        raise RuntimeError(f'{counted} images were evaluated across {world} process(es), expected {total}')
    seconds = time.perf_counter() - start

    result = areas_to_metrics(areas, names)
    result.update(
        dataset=dataset, images=counted, seconds=seconds, images_per_s=counted / seconds if seconds > 0 else None,
        num_classes=C, world_size=world,
        areas=dict(intersect=areas[0].tolist(), union=areas[1].tolist(), pred=areas[2].tolist(),
                   label=areas[3].tolist()),
        settings=dict(data_root=full.data_root, templates=templates if isinstance(templates, str) else list(templates),
                      with_bg=with_bg, bg_thresh=bg_thresh if with_bg else None, resolution=resolution,
                      max_long=max_long, crop=crop, stride=stride, batch_size=batch_size, amp=str(amp),
                      device=str(device), reduce_zero_label=LAYOUTS[dataset].reduce_zero_label),
    )
    return result


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
