"""Cost of CASS with its default second vision model: time and peak memory per 336x448 image.

    python benchmarks/bench_cass.py                  # CPU, 2 threads, fp32 and bf16, median of 3 runs
    python benchmarks/bench_cass.py --json cass.json --repeats 5

Full-size random models: CLIP ViT-B/16 (OpenAI's sizes) and DINO ViT-B/8 (``dino_vitb8``'s sizes). One 336x448
image (a VOC image at CASS's short side) with 21 class names (text embedded once, not timed), under two presets:
``voc`` (the whole image in one window: 588 CLIP tokens, DINO on the 336² squash, 1,764 tokens) and ``context``
(six 224 windows: 196 CLIP and 784 DINO tokens each, plus CLIP once on the whole image for the global embedding).
Each precision runs in a fresh process: ``peak_rss_mb`` is that process's peak resident memory, ``run_mb`` the peak
minus the memory after the models are built. Wall seconds include waiting for a core on a shared machine; CPU
seconds (process time, all threads) are the steadier figure. ``parts`` times one 224 window's pieces: DINO's keys,
CLIP up to its last block, and the spectral distillation (eigenvalues, matching, randomised SVDs).
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
    from seg_segmentation.methods import cass
    torch.set_num_threads(threads)
    clip, vfm = full_size_clip(), full_size_vfm("dino_vitb8")
    method = set_precision(build_method("cass", clip, vfm=vfm), precision).eval()
    image = torch.randn(1, 3, 336, 448, generator=torch.Generator().manual_seed(1))
    weights = status_mb("VmRSS")
    row = dict(precision=precision, threads=threads, repeats=repeats, image="336x448")
    for preset in ("voc", "context"):
        seg = TrainingFreeSegmentor(method, classes=[[n] for n in DATASET_CLASSES["voc"]], **method.settings(preset))
        row[preset] = dict(zip(("wall_s", "cpu_s"), median_time(lambda: seg.predict(image, (336, 448)), repeats)))
    window = image[..., :224, :224]
    with torch.no_grad():
        keys = method.dino_keys(window)
        last = method.clip.visual.transformer.resblocks[-1]
        k = last.attn.qkv_heads(last.ln_1(method.clip.visual.tokens_before_last(window)))[1][:, :, 1:].float()
        attn = (k @ k.transpose(-1, -2)) * 0.125
        graph = cass.key_graph(cass.match_key_range(cass.keys_on_clip_grid(keys[:, :, 1:], 12, (14, 14)), k), 0.125)
        row["parts_wall_s"] = dict(
            dino_keys=median_time(lambda: method.dino_keys(window), repeats)[0],
            clip_to_last_block=median_time(lambda: method.clip.visual.tokens_before_last(window), repeats)[0],
            distill=median_time(lambda: cass.distill(attn[0], graph[0], torch.Generator().manual_seed(0)), repeats)[0])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    row.update(weights_rss_mb=round(weights), peak_rss_mb=round(peak), run_mb=round(peak - weights))
    return row


def main():
    result = rows_per_precision(__doc__, __file__, one_precision)
    if result is None:
        return
    rows, json_path = result
    print(f"{'precision':>9} {'voc wall/CPU s':>15} {'context wall/CPU s':>19} {'peak MiB':>9} {'run MiB':>8}  "
          "one 224 window: DINO keys / CLIP to last block / distillation (wall s)")
    for r in rows:
        p = r["parts_wall_s"]
        print(f"{r['precision']:>9} {r['voc']['wall_s']:>7} / {r['voc']['cpu_s']:<5} "
              f"{r['context']['wall_s']:>9} / {r['context']['cpu_s']:<6} {r['peak_rss_mb']:>9} {r['run_mb']:>8}  "
              f"{p['dino_keys']} / {p['clip_to_last_block']} / {p['distill']}")
    if json_path:
        Path(json_path).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
