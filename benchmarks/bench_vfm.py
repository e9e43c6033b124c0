"""Cost of ProxyCLIP with its default second vision model: time and peak memory per 336x448 image.

    python benchmarks/bench_vfm.py                 # CPU, 2 threads, fp32 and bf16, median of 3 runs
    python benchmarks/bench_vfm.py --json vfm.json --repeats 5

Full-size random models: CLIP ViT-B/16 (OpenAI's sizes) and DINO ViT-B/8 (``dino_vitb8``'s sizes). One image of
336x448 (a VOC image at ProxyCLIP's short side 336) through the whole segmentor with the voc20 preset (336 px
windows every 112 px: 2 windows, each 1,764 DINO tokens and 441 CLIP tokens), 21 class names (text embedded once,
not timed). Each precision runs in a fresh process, so its peak resident memory is its own: ``peak_rss_mb`` is the
process's peak, ``weights_rss_mb`` its resident memory after the models are built, and ``run_mb`` the difference
(what segmenting one image adds). Wall seconds count waiting for a core on a shared machine; CPU seconds (process
time over the threads) are the steadier figure. A breakdown times the parts of one window: the VFM's features, the
proxy attention, CLIP up to its last block.
"""
import json
import resource
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench_methods import (full_size_clip, full_size_vfm, median_time, rows_per_precision,   # noqa: E402
                           status_mb)   # this folder


def one_precision(precision: str, repeats: int, threads: int) -> dict:
    import torch
    from seg_segmentation.classes import DATASET_CLASSES
    from modules.precision import set_precision
    from seg_segmentation.dense import TrainingFreeSegmentor
    from seg_segmentation.methods import build_method
    from seg_segmentation.methods.proxyclip import imagenet_normalised, proxy_attention, similarity
    torch.set_num_threads(threads)
    clip, vfm = full_size_clip(), full_size_vfm("dino_vitb8")
    method = set_precision(build_method("proxyclip", clip, vfm=vfm), precision).eval()
    seg = TrainingFreeSegmentor(method, classes=[[n] for n in DATASET_CLASSES["voc"]], **method.settings("voc20"))
    image = torch.randn(1, 3, 336, 448, generator=torch.Generator().manual_seed(1))
    weights = status_mb("VmRSS")
    wall, cpu = median_time(lambda: seg.predict(image, (336, 448)), repeats)
    window = image[..., :336, :336]
    parts = {}
    with torch.no_grad():
        feats = method.vfm_model.features(imagenet_normalised(window))
        parts["vfm_features"] = median_time(lambda: method.vfm_model.features(imagenet_normalised(window)), repeats)
        parts["proxy_attention"] = median_time(lambda: proxy_attention(similarity(feats), 1.2, 3.0), repeats)
        parts["clip_to_last_block"] = median_time(lambda: method.clip.visual.tokens_before_last(window.to(torch.float32)),
                                            repeats)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return dict(precision=precision, threads=threads, repeats=repeats, image="336x448", windows=2,
                wall_s=round(wall, 3), cpu_s=round(cpu, 3), weights_rss_mb=round(weights),
                peak_rss_mb=round(peak), run_mb=round(peak - weights),
                per_window_wall_s={k: round(v[0], 3) for k, v in parts.items()})


def main():
    result = rows_per_precision(__doc__, __file__, one_precision)
    if result is None:
        return
    rows, json_path = result
    print(f"{'precision':>9} {'wall s':>7} {'CPU s':>7} {'weights MiB':>12} {'peak MiB':>9} {'run MiB':>8}  "
          "per window: VFM / proxy attention / CLIP to last block (wall s)")
    for r in rows:
        w = r["per_window_wall_s"]
        print(f"{r['precision']:>9} {r['wall_s']:>7} {r['cpu_s']:>7} {r['weights_rss_mb']:>12} {r['peak_rss_mb']:>9} "
              f"{r['run_mb']:>8}  {w['vfm_features']} / {w['proxy_attention']} / {w['clip_to_last_block']}")
    if json_path:
        Path(json_path).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
