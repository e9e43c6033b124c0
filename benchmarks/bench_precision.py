"""--precision bf16 against fp32: speed of the visual tower and the demo, and agreement of the predictions.

    python benchmarks/bench_precision.py                      # CPU, 2 threads; prints a table, --json to save
    python benchmarks/bench_precision.py --device cuda --json precision.json

Speed: a full-size random ViT-B/16 SegCLIP, encode_image on a batch of 224x224 crops and the demo's whole
prediction of demo/examples/chelsea.jpg (3 classes), median of --repeats runs each.
Agreement (pixel agreement = share of pixels with the same label; mIoU difference in points):
  - the parity fixture's inputs (tests/fixtures: the tiny 2022 reference model, slide and whole-crop inputs);
  - the synthetic validation split of preprocess/synthetic.py (40 images, its 9 classes), with the tiny reference
    model and with the full-size random model;
  - the four demo photos with their suggested vocabularies (demo/examples/*.txt), full-size random model.
Random weights make many near-ties between classes, so their agreement is a lower bound of a trained model's.
"""
import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common.images import read_image_bgr
from modules.modeling import SegCLIP, SegCLIPConfig
from modules.precision import set_precision
from seg_segmentation.evaluate import run_zero_shot_eval
from seg_segmentation.inference import ZeroShotSegmentor
from seg_segmentation.visualize import SegmentationDemo

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / "tests" / "fixtures" / "segclip_reference_public.pt"


def timed(fn, repeats, device):
    """-> (median wall seconds, median process CPU-seconds) over ``repeats`` runs after one warm-up. On a shared,
    busy machine the CPU-seconds are the steadier figure (wall time also counts waiting for a core)."""
    fn()
    walls, cpus = [], []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return statistics.median(walls), statistics.median(cpus)


def agreement(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float((a == b).mean())


def synthetic_split(folder: Path) -> Path:
    from preprocess.synthetic import write_voc_split
    return Path(write_voc_split(str(folder / "val"), 40, 128, seed=1))


def eval_both(fp32, bf16, root: Path, names, size: int, device) -> dict:
    out = {}
    for tag, model in (("fp32", fp32), ("bf16", bf16)):
        preds = {}
        res = run_zero_shot_eval(model, dataset="custom", data_root=str(root), class_names=names, resolution=size,
                                 crop=size, stride=size, num_workers=0, progress=False, device=device,
                                 on_prediction=lambda p, pred: preds.__setitem__(p, pred.numpy()))
        out[tag] = (res["mIoU"], preds)
    (m32, p32), (m16, p16) = out["fp32"], out["bf16"]
    pixels = sum(v.size for v in p32.values())
    same = sum(int((p32[k] == p16[k]).sum()) for k in p32)
    return dict(images=len(p32), pixel_agreement=same / pixels, miou_fp32=m32, miou_bf16=m16,
                miou_diff=m16 - m32)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4, help="crops per encode_image call in the speed test")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--speed_only", action="store_true", help="skip the agreement measurements")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    result = dict(device=str(device), threads=args.threads)

    torch.manual_seed(0)
    full32 = SegCLIP(SegCLIPConfig(use_vision_mae_recon=False)).to(device).eval()
    full16 = set_precision(copy.deepcopy(full32), "bf16")
    crops = torch.randn(args.batch, 3, 224, 224, device=device)
    speed = {}
    with torch.no_grad():
        for tag, model in (("fp32", full32), ("bf16", full16)):
            speed[f"encode_image_b{args.batch}_{tag}"] = timed(lambda: model.encode_image(crops), args.repeats, device)
    chelsea = read_image_bgr(REPO / "demo" / "examples" / "chelsea.jpg")
    for tag, model in (("fp32", full32), ("bf16", full16)):
        demo = SegmentationDemo(model, ["cat", "wall", "floor"])
        speed[f"demo_predict_chelsea_{tag}"] = timed(lambda: demo.predict(chelsea), args.repeats, device)
    for what in (f"encode_image_b{args.batch}", "demo_predict_chelsea"):
        (w32, c32), (w16, c16) = speed[f"{what}_fp32"], speed[f"{what}_bf16"]
        speed[f"{what}_speedup_wall"], speed[f"{what}_speedup_cpu"] = w32 / w16, c32 / c16
    result["speed"] = speed
    if args.speed_only:
        return finish(result, args)

    ref = torch.load(REFERENCE, map_location="cpu", weights_only=True)
    tiny32 = SegCLIP.from_state_dict(ref["segclip_state_dict"], use_vision_mae_recon=False).to(device).eval()
    tiny16 = set_precision(copy.deepcopy(tiny32), "bf16")
    seg = ref["seg"]
    fixture = {}
    for name, image in (("slide_input", seg["slide_input"]), ("whole_input", seg["whole_input"])):
        a = ZeroShotSegmentor(tiny32, text_embedding=seg["text_embedding"]).predict(image, crop=112, stride=112)[0]
        b = ZeroShotSegmentor(tiny16, text_embedding=seg["text_embedding"]).predict(image, crop=112, stride=112)[0]
        fixture[name] = agreement(a.cpu(), b.cpu())
    result["fixture_pixel_agreement"] = fixture

    with tempfile.TemporaryDirectory() as tmp:
        root = synthetic_split(Path(tmp))
        names = [n for n in (root / "classes.txt").read_text().splitlines() if n.strip()]
        result["synthetic_tiny_model"] = eval_both(tiny32, tiny16, root, names, 112, device)
        result["synthetic_full_random_model"] = eval_both(full32, full16, root, names, 224, device)

    photos = {}
    for jpg in sorted((REPO / "demo" / "examples").glob("*.jpg")):
        names = [n for n in jpg.with_suffix(".txt").read_text().splitlines() if n.strip()]
        bgr = read_image_bgr(jpg)
        a = SegmentationDemo(full32, names).predict(bgr).labels
        b = SegmentationDemo(full16, names).predict(bgr).labels
        photos[jpg.stem] = agreement(a, b)
    result["demo_photos_full_random_pixel_agreement"] = photos

    finish(result, args)


def finish(result, args):
    print(json.dumps(result, indent=2))
    if args.json:
        from common.fileio import atomic_write_text
        atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
