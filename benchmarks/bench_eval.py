"""End-to-end zero-shot evaluation speed: our path vs the 2022 loop, on a generated VOC-layout split.

The split holds the quickstart world's pictures (preprocess/synthetic.py) at 500x375.

    python benchmarks/bench_eval.py                       # CPU, 12 images 500x375, random full-size ViT-B/16
    python benchmarks/bench_eval.py --device cuda --precision bf16 --images 200 --json eval.json

Both paths decode + resize (mmseg pipeline), run the model and accumulate mmseg's IoU areas. The reference loop does
what the 2022 code did: batch 1, one window at a time, the visual tower run twice per window (once for the
assignment map, once for the embeddings). Ours: one pass per window, windows of several images batched, decoding in
DataLoader workers. Prints seconds per image, images/s and the speed-up, and checks both give the same mIoU.
"""
import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from seg_segmentation.classes import BG_THRESH, DATASET_CLASSES
from seg_segmentation.datasets import ZeroShotSegDataset, collate_list
from seg_segmentation.evaluate import areas_to_metrics, intersect_and_union, run_zero_shot_eval
from seg_segmentation.inference import build_text_embedding, slide_windows
from preprocess.synthetic import write_voc_split


def write_voc_like(root: str, num_images: int) -> str:
    """``num_images`` pictures of the quickstart world in the VOC layout, stretched to 500x375 like VOC photos
    (so each needs two 224 windows after the short-side resize, as real VOC images do)."""
    write_voc_split(root, num_images, size=375, seed=0)
    for path in Path(root, "JPEGImages").glob("*.jpg"):
        Image.open(path).resize((500, 375), Image.BICUBIC).save(path, quality=92)
    for path in Path(root, "SegmentationClass").glob("*.png"):
        Image.open(path).resize((500, 375), Image.NEAREST).save(path)   # palette PNG: ids kept
    return root


@torch.no_grad()
def reference_crop_logits(model, crop, text, bg_thresh):
    """The 2022 per-crop head, batch 1: a visual pass for the assignment map, a second one for the embeddings."""
    h, w = crop.shape[-2:]
    p = model.patch_size
    soft = model.encode_image(crop).soft_attn                                 # pass 1: assignment map
    G = soft.shape[1]
    amap = F.interpolate(soft.reshape(1, G, h // p, w // p), size=(h, w), mode='bilinear', align_corners=False)
    onehot = F.one_hot(amap[0].permute(1, 2, 0).argmax(-1), G).float()       # [h, w, G]
    out = model.encode_image(crop)                                            # pass 2: embeddings
    z, u = F.normalize(out.group_embeds[0], dim=-1), F.normalize(out.image_embed, dim=-1)
    s = model.logit_scale_value()
    gaff = (z @ text.T) * s
    pre = F.softmax(gaff, dim=-1)
    avg = F.softmax((u @ text.T) * s, dim=-1)
    mask = torch.zeros_like(avg)
    mask.scatter_(-1, avg.topk(k=min(5, text.shape[0]), dim=-1).indices, 1.0)
    gaff = F.softmax(gaff.masked_fill(~mask.bool(), float('-inf')), dim=-1) * pre
    fg = onehot @ gaff                                                        # [h, w, N]
    logits = torch.zeros(1 + text.shape[0], h, w, device=crop.device)
    logits[1:] = fg.permute(2, 0, 1)
    logits[0, fg.max(-1).values < min(bg_thresh, gaff.max().item())] = 1
    return logits[None]


@torch.no_grad()
def reference_eval(model, root, text, bg_thresh, crop=224, stride=224):
    """2022-style loop: DataLoader with 1 worker, batch 1, windows one by one, on the model's device."""
    dev = text.device
    ds = ZeroShotSegDataset('voc', root)
    loader = torch.utils.data.DataLoader(ds, batch_size=1, num_workers=1, collate_fn=collate_list)
    C = text.shape[0] + 1
    areas = torch.zeros(4, C, dtype=torch.int64)
    start = time.perf_counter()
    for (sample,) in loader:
        img = sample['img'][None].to(dev)
        H, W = img.shape[-2:]
        preds, count = torch.zeros(1, C, H, W, device=dev), torch.zeros(1, 1, H, W, device=dev)
        for y1, y2, x1, x2 in slide_windows(H, W, crop, stride):
            preds += F.pad(reference_crop_logits(model, img[:, :, y1:y2, x1:x2], text, bg_thresh),
                           (x1, W - x2, y1, H - y2))
            count[:, :, y1:y2, x1:x2] += 1
        logits = F.interpolate(preds / count, size=sample['ori_shape'], mode='bilinear', align_corners=False)
        pred = F.softmax(logits, dim=1).argmax(dim=1)[0]
        areas += intersect_and_union(pred, sample['gt'].to(dev), C)
    if dev.type == 'cuda':
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return areas_to_metrics(areas, DATASET_CLASSES['voc'])['mIoU'], seconds, len(ds)


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--images', type=int, default=12, help='generated images (500x375 JPEGs, VOC layout)')
    p.add_argument('--data_root', default=None, help='use this VOC folder instead of generating one')
    p.add_argument('--init_model', default=None, help='SegCLIP checkpoint (default: random full-size ViT-B/16)')
    p.add_argument('--device', default=None, help='cpu or cuda (default: cuda when available)')
    p.add_argument('--batch_size', type=int, default=16, help='our path: windows per forward pass')
    p.add_argument('--num_workers', type=int, default=2, help='our path: DataLoader workers')
    p.add_argument('--precision', default='fp32', choices=['fp32', 'bf16'],
                   help='our path: model weights and activations (modules/precision.py); the reference stays fp32')
    p.add_argument('--json', default=None, help='also write the figures to this JSON file')
    p.add_argument('--skip_reference', action='store_true', help='time our path only')
    p.add_argument('--repeat', type=int, default=2, help='alternating runs of both paths; the best time counts')
    p.add_argument('--threads', type=int, default=None, help='torch CPU threads (default: torch\'s choice)')
    args = p.parse_args()

    from modules.modeling import SegCLIP, SegCLIPConfig
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    if args.init_model:
        from modules.checkpoint import load_segclip
        model = load_segclip(args.init_model, device=device, use_vision_mae_recon=False)
    else:
        torch.manual_seed(0)
        model = SegCLIP(SegCLIPConfig(use_vision_mae_recon=False)).to(device).eval()
    import copy
    from modules.precision import set_precision
    ours_model = set_precision(copy.deepcopy(model), args.precision) if args.precision != 'fp32' else model

    with tempfile.TemporaryDirectory() as tmp:
        root = args.data_root or write_voc_like(os.path.join(tmp, 'VOC2012'), args.images)
        # warm-up (first-call allocations, lazy imports) on one image
        run_zero_shot_eval(ours_model, dataset='voc', data_root=root, device=device, num_workers=0, max_images=1,
                           progress=False)
        text = build_text_embedding(model, DATASET_CLASSES['voc'][1:])
        print(f'device: {device} ({torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"}, '
              f'{torch.get_num_threads()} threads); images 500x375 -> 299x224 (2 windows each)', flush=True)
        best_ours = best_ref = None
        for rep in range(args.repeat):   # alternate the paths so that load from other processes hits both
            ours = run_zero_shot_eval(ours_model, dataset='voc', data_root=root, device=device,
                                      batch_size=args.batch_size, num_workers=args.num_workers, progress=False)
            n = ours['images']
            t_ours = ours['seconds'] / n
            best_ours = t_ours if best_ours is None else min(best_ours, t_ours)
            line = f'[{rep + 1}/{args.repeat}] ours {t_ours:.3f} s/image (mIoU {ours["mIoU"]:.4f})'
            if not args.skip_reference:
                miou_ref, sec_ref, n_ref = reference_eval(model, root, text, BG_THRESH['voc'])
                t_ref = sec_ref / n_ref
                best_ref = t_ref if best_ref is None else min(best_ref, t_ref)
                line += f', reference {t_ref:.3f} s/image (mIoU {miou_ref:.4f}), ratio {t_ref / t_ours:.2f}x'
                if args.precision == 'fp32' and abs(miou_ref - ours['mIoU']) > 1e-6:
                    line += '  WARNING: the mIoU differs between the paths'
            print(line, flush=True)
        print(f'ours      : {best_ours:.3f} s/image, {1 / best_ours:.2f} images/s (batch {args.batch_size}, '
              f'{args.num_workers} workers, {args.precision}; best of {args.repeat} runs over {n} images)')
        if best_ref is not None:
            print(f'reference : {best_ref:.3f} s/image, {1 / best_ref:.2f} images/s (2022 loop: batch 1, '
                  f'2 visual passes per window, fp32)')
            print(f'speed-up  : {best_ref / best_ours:.2f}x')
        if args.json:
            from common.fileio import atomic_write_text
            atomic_write_text(args.json, json.dumps(dict(
                device=str(device), images=n, batch_size=args.batch_size, num_workers=args.num_workers,
                precision=args.precision, ours_s_per_image=best_ours, ours_miou=ours['mIoU'],
                reference_s_per_image=best_ref, speedup=None if best_ref is None else best_ref / best_ours),
                indent=2) + '\n')

if __name__ == '__main__':
    main()
