"""The segmentation demo (design.md §8): read any photo, label it with any vocabulary, draw and write the results.

Sections: palettes and drawing (numpy uint8 RGB [H, W, 3] images, integer [H, W] label maps; no model), label
files, input handling (files / folders / globs, robust decoding, class lists), and ``SegmentationDemo`` +
``run_visualization``, which run ``ZeroShotSegmentor`` (seg_segmentation/inference.py) on the evaluation's image
transform so that ``main_seg_vis.py`` only parses flags.
"""
import json
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from common.errors import MissingFileError, SegCLIPError, UsageError

if TYPE_CHECKING:  # torch is imported where it is used, so `main_seg_vis.py --help` answers at once
    import torch

VIS_MODES = ("input", "pred", "input_pred", "input_pred_label", "all_groups", "first_group", "final_group")
GROUP_MODES = ("all_groups", "first_group", "final_group")
# Colour weights of the 2022 demo (design.md §8): 0.8 for input_pred (background kept as the photo), 0.6 otherwise.
PRED_OPACITY = 0.8
LABEL_OPACITY = 0.6
GROUP_OPACITY = 0.6


# ---------------------------------------------------------------------------------------------------------------
# Palettes

def voc_palette(n: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map (bits of the label id spread over R, G, B): [n, 3] uint8, id 0 = black.

    The same map mmseg uses for VOC and that every VOC-style palette PNG carries, so label files open in the
    colours people know; it has 256 distinct colours, enough for any vocabulary that fits a palette PNG.
    """
    palette = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        palette[i] = (r, g, b)
    return palette


def class_palette(num_labels: int, with_bg: bool) -> np.ndarray:
    """[num_labels, 3] uint8 colours for label ids; with background, id 0 is black and classes start at VOC's 1."""
    base = voc_palette(max(256, num_labels + 1))
    # Beyond 256 ids the bit map repeats nothing useful; spread extra ids over hues instead.
    if num_labels + 1 > 256:
        extra = _hue_palette(num_labels + 1 - 256, seed_offset=0.13)
        base = np.concatenate([base[:256], extra])
    return base[:num_labels] if with_bg else base[1:num_labels + 1]


def _hue_palette(n: int, seed_offset: float = 0.0) -> np.ndarray:
    """n well-separated saturated colours (golden-ratio hue steps)."""
    hues = (seed_offset + np.arange(n) * 0.61803398875) % 1.0
    hsv = np.stack([hues * 179, np.full(n, 200), np.full(n, 230)], axis=1).astype(np.uint8)[None]
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0]


def group_palette(num_groups: int) -> np.ndarray:
    """[G, 3] uint8 colours for the learnable centers (fixed, so group g has one colour in every image)."""
    return _hue_palette(num_groups)


# ---------------------------------------------------------------------------------------------------------------
# Overlays

def colorize(labels: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """labels [H, W] ints -> [H, W, 3] uint8."""
    return palette[labels]


def blend(image: np.ndarray, color: np.ndarray, opacity: float, keep: Optional[np.ndarray] = None) -> np.ndarray:
    """image*(1-opacity) + color*opacity on uint8 [H, W, 3]; pixels where ``keep`` [H, W] is True stay the photo."""
    out = cv2.addWeighted(image, 1.0 - opacity, color, opacity, 0.0)
    if keep is not None:
        out[keep] = image[keep]
    return out


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # scalable font bundled with Pillow (needs FreeType)
    except (TypeError, ValueError, OSError):
        return ImageFont.load_default()


def _font_size(height: int, width: int) -> int:
    return int(np.clip(round(min(height, width) / 28), 9, 64))


def label_anchor(mask: np.ndarray) -> Tuple[int, int]:
    """(x, y) at which to write a region's name: its centroid, moved to the most interior pixel of the region
    when the centroid falls outside it (rings, C shapes, several blobs)."""
    ys, xs = np.nonzero(mask)
    cx, cy = int(round(xs.mean())), int(round(ys.mean()))
    if mask[cy, cx]:
        return cx, cy
    dist = cv2.distanceTransform(np.pad(mask, 1).astype(np.uint8), cv2.DIST_L2, 3)[1:-1, 1:-1]
    cy, cx = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return int(cx), int(cy)


def draw_labels(image: np.ndarray, anchors: Dict[int, Tuple[int, int]], names: Dict[int, str]) -> np.ndarray:
    """Write names[id] centred on anchors[id] (x, y): white text with a black outline, readable on any colour."""
    height, width = image.shape[:2]
    size = _font_size(height, width)
    font = _font(size)
    stroke = max(1, size // 8)
    canvas = Image.fromarray(image)
    draw = ImageDraw.Draw(canvas)
    for label_id, (x, y) in anchors.items():
        name = names[label_id]
        left, top, right, bottom = draw.textbbox((0, 0), name, font=font, stroke_width=stroke)
        tw, th = right - left, bottom - top
        # centred on the anchor, shifted to stay inside the image where it fits
        x0 = int(np.clip(x - tw / 2, 0, max(width - tw, 0))) - left
        y0 = int(np.clip(y - th / 2, 0, max(height - th, 0))) - top
        draw.text((x0, y0), name, font=font, fill=(255, 255, 255), stroke_width=stroke, stroke_fill=(0, 0, 0))
    return np.asarray(canvas).copy()


def draw_legend(image: np.ndarray, entries: Sequence[Tuple[str, Sequence[int]]],
                avoid: Sequence[Tuple[int, int]] = ()) -> np.ndarray:
    """A colour key (swatch + name per entry) on a darkened box, in the corner holding fewest ``avoid`` points
    (the label anchors, so the key does not hide a name; top-left on ties).

    Rows that do not fit in the image are summarised as '+k more'; nothing is drawn on images too small for one row.
    """
    height, width = image.shape[:2]
    if not entries:
        return image
    size = max(9, _font_size(height, width) * 3 // 4)
    font = _font(size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    row_h = max(probe.textbbox((0, 0), "Ag", font=font)[3], size) + 4
    pad, swatch = 4, row_h - 6
    max_rows = (height - 2 * pad) // row_h
    if max_rows < 1 or width < 4 * row_h:
        return image
    shown = list(entries)
    if len(shown) > max_rows:
        shown = shown[:max_rows - 1] + [(f"+{len(entries) - max_rows + 1} more", None)]
    text_w = max(probe.textbbox((0, 0), name, font=font)[2] for name, _ in shown)
    box_w = min(width, pad * 3 + swatch + text_w)
    box_h = pad * 2 + row_h * len(shown)
    corners = [(0, 0), (width - box_w, 0), (0, height - box_h), (width - box_w, height - box_h)]
    margin = size  # a name extends around its anchor

    def covered(corner):
        cx, cy = corner
        return sum(cx - margin <= x < cx + box_w + margin and cy - margin <= y < cy + box_h + margin
                   for x, y in avoid)

    bx, by = min(corners, key=covered)
    out = image.copy()
    region = out[by:by + box_h, bx:bx + box_w]
    region[:] = (region.astype(np.uint16) * 2 // 5).astype(np.uint8)  # darken to 40% so text stays readable
    canvas = Image.fromarray(out)
    draw = ImageDraw.Draw(canvas)
    for i, (name, color) in enumerate(shown):
        y = by + pad + i * row_h
        if color is not None:
            draw.rectangle([bx + pad, y + 3, bx + pad + swatch, y + 3 + swatch], fill=tuple(int(c) for c in color),
                           outline=(255, 255, 255))
        draw.text((bx + pad * 2 + swatch, y + 1), name, font=font, fill=(255, 255, 255))
    return np.asarray(canvas).copy()


# ---------------------------------------------------------------------------------------------------------------
# Label files

def save_label_png(path: Path, labels: np.ndarray, palette: np.ndarray) -> None:
    """Palette PNG (pixel value = label id, shown in the palette's colours); 16-bit grey PNG beyond 256 ids."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if len(palette) <= 256:
        img = Image.fromarray(np.ascontiguousarray(labels, dtype=np.uint8))   # 'L'; putpalette makes it 'P'
        img.putpalette(np.asarray(palette, dtype=np.uint8).ravel().tolist())
        img.save(path)
    elif not cv2.imwrite(str(path), labels.astype(np.uint16)):
        raise OSError(f"could not write {path}")


def label_summary(labels: np.ndarray, label_names: Sequence[str], palette: np.ndarray) -> List[Dict]:
    """Classes present in ``labels`` with pixel count, share of the image and colour, largest first."""
    counts = np.bincount(labels.ravel(), minlength=len(label_names))
    rows = [{"id": int(i), "name": label_names[i], "pixels": int(counts[i]),
             "share": round(float(counts[i]) / labels.size, 6), "color": [int(c) for c in palette[i]]}
            for i in np.nonzero(counts)[0]]
    return sorted(rows, key=lambda r: -r["pixels"])


def write_json(path: Path, payload: Dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)


def save_jpg(path: Path, image_rgb: np.ndarray, quality: int = 95) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), np.ascontiguousarray(image_rgb[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, quality]):
        raise OSError(f"could not write {path}")


def render(mode: str, image: np.ndarray, labels: np.ndarray, groups: Optional[np.ndarray],
           label_names: Sequence[str], palette: np.ndarray, with_bg: bool) -> np.ndarray:
    """One design.md §8 visualisation as uint8 RGB [H, W, 3] (the input's size).

    As in 2022, the label overlays leave background pixels as the photo; the group overlays colour every pixel.
    """
    keep = (labels == 0) if with_bg else None
    if mode == "input":
        return image
    if mode == "pred":
        return colorize(labels, palette)
    if mode == "input_pred":
        return blend(image, colorize(labels, palette), PRED_OPACITY, keep=keep)
    if mode == "input_pred_label":
        out = blend(image, colorize(labels, palette), LABEL_OPACITY, keep=keep)
        counts = np.bincount(labels.ravel(), minlength=len(label_names))
        present = [int(i) for i in np.nonzero(counts)[0] if not (with_bg and i == 0)]
        anchors = {i: label_anchor(labels == i) for i in present}
        out = draw_labels(out, anchors, {i: label_names[i] for i in present})
        return draw_legend(out, [(label_names[i], palette[i]) for i in present], avoid=list(anchors.values()))
    if mode in GROUP_MODES:
        if groups is None:
            raise ValueError(f"mode {mode} needs the center assignment map")
        return blend(image, colorize(groups, group_palette(int(groups.max()) + 1)), GROUP_OPACITY)
    raise ValueError(f"unknown visualisation mode {mode!r}; choose from {', '.join(VIS_MODES)}")


def output_path(output_dir: Path, mode: str, name: str) -> Path:
    """OUTPUT/vis_imgs/<mode>/<mode>_<name>.jpg; ``pred`` is a palette PNG of the label ids, as in 2022."""
    return Path(output_dir) / "vis_imgs" / mode / f"{mode}_{name}{'.png' if mode == 'pred' else '.jpg'}"


# ---------------------------------------------------------------------------------------------------------------
# Inputs

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm", ".jp2")


class ImageReadError(SegCLIPError, ValueError):
    """A file that cannot be decoded as an image."""


def collect_inputs(spec: str) -> List[Path]:
    """A file, a folder (its image files, sorted) or a glob pattern -> list of image paths."""
    import glob
    path = Path(spec).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise MissingFileError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in folder {path}")
        return files
    if glob.has_magic(spec):
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not files:
            raise MissingFileError(f"no files match {spec!r}")
        return files
    raise MissingFileError(f"input not found: {spec} (give an image file, a folder or a glob pattern)")


def read_image_bgr(path: Path) -> np.ndarray:
    """Any image file -> uint8 BGR [H, W, 3], decoded as mmseg does (cv2, colour, EXIF orientation applied).

    Grey, palette, RGBA (alpha dropped), 16-bit and CMYK files become 8-bit BGR; formats cv2 cannot decode are
    tried with Pillow. Raises ImageReadError naming the file otherwise.
    """
    try:
        data = np.fromfile(str(path), dtype=np.uint8)
    except OSError as e:
        raise ImageReadError(f"{path}: cannot read file ({e.strerror or e})") from None
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None:
        try:
            from PIL import ImageOps
            with Image.open(path) as pil:
                pil = ImageOps.exif_transpose(pil)
                if pil.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grey: scale to 8 bits, not clip
                    arr = np.asarray(pil, dtype=np.float64)
                    arr = np.clip(arr / (257.0 if arr.max() > 255 else 1.0), 0, 255).astype(np.uint8)
                    pil = Image.fromarray(arr, mode="L")
                image = np.asarray(pil.convert("RGB"))[..., ::-1].copy()
        except Exception as e:  # noqa: BLE001 - any decoder failure means "not an image we can read"
            raise ImageReadError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None
    if image.ndim != 3 or image.shape[0] == 0 or image.shape[1] == 0:
        raise ImageReadError(f"{path}: empty image")
    return image


def unique_names(paths: Sequence[Path]) -> List[str]:
    """Output names from file stems, made unique with _2, _3 ... (folders and globs may repeat a stem)."""
    used, out = set(), []
    for p in paths:
        name, k = p.stem, 1
        while name in used:
            k += 1
            name = f"{p.stem}_{k}"
        used.add(name)
        out.append(name)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Segmentation of one photo with any vocabulary

def preprocess(bgr: np.ndarray, resolution: int = 224, max_long: int = 2048) -> "torch.Tensor":
    """uint8 BGR [H, W, 3] -> normalised RGB [1, 3, h, w] with design.md §7.3's test transform: mmseg's keep-ratio
    resize to scale (max_long, resolution) (mmcv.imrescale, bilinear, cv2) and mmcv.imnormalize with the
    evaluation's mean/std, exactly as ``seg_segmentation.datasets`` loads benchmark images."""
    import mmcv
    import torch
    from seg_segmentation.datasets import PIXEL_MEAN, PIXEL_STD
    h, w = bgr.shape[:2]
    scale = min(max_long / max(h, w), resolution / min(h, w))
    if min(h, w) * scale < 0.5:
        raise ImageReadError(f"a {w}x{h} image is too elongated to resize to short side {resolution} within "
                             f"long side {max_long}")
    img = mmcv.imrescale(bgr, (max_long, resolution), interpolation="bilinear", backend="cv2")
    img = mmcv.imnormalize(img, np.array(PIXEL_MEAN), np.array(PIXEL_STD), to_rgb=True)
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))[None]


def _bilinear_source(out_size: int, in_size: int):
    """Per output index: the two source indices and their weights, computed as PyTorch's upsample_bilinear2d
    does with align_corners=False (float32, source index clamped at 0)."""
    import torch
    scale = torch.tensor(np.float32(in_size) / np.float32(out_size))
    src = ((torch.arange(out_size, dtype=torch.float32) + 0.5) * scale - 0.5).clamp(min=0)
    i0 = src.long().clamp(max=in_size - 1)
    i1 = (i0 + 1).clamp(max=in_size - 1)
    l1 = (src - i0.float()).clamp(0, 1)
    return i0.numpy(), i1.numpy(), (1.0 - l1), l1


def upsample_argmax(scores: "torch.Tensor", size: Tuple[int, int], max_elements: int = 1 << 23) -> np.ndarray:
    """argmax over C of ``scores`` [C, h, w] resized bilinearly (align_corners=False) to ``size`` (H, W).

    Small outputs call F.interpolate directly (mmseg's resize). Large ones would need C*H*W floats (6 GB for a
    24 MP photo and 60 classes), so: an output pixel is a convex blend of four source pixels, hence where those
    four pick the same class (first maximum) the blend picks it too and the label is copied; only the pixels
    between disagreeing source pixels are blended, one source row at a time, with PyTorch's weights and nesting
    (the width pass by F.interpolate, then rows). Returns [H, W] uint8 (int32 beyond 256 classes).
    """
    import torch
    import torch.nn.functional as F
    C, h, w = scores.shape
    H, W = int(size[0]), int(size[1])
    dtype = np.uint8 if C <= 256 else np.int32
    scores = scores.detach().float().cpu()
    if C * H * W <= max_elements:
        up = F.interpolate(scores[None], size=(H, W), mode="bilinear", align_corners=False)[0]
        return up.argmax(dim=0).numpy().astype(dtype)
    src_label = scores.argmax(dim=0).numpy().astype(dtype)                          # [h, w]
    r1, c1 = np.minimum(np.arange(h) + 1, h - 1), np.minimum(np.arange(w) + 1, w - 1)
    settled = ((src_label == src_label[r1]) & (src_label == src_label[:, c1])
               & (src_label == src_label[r1][:, c1]))                                # [h, w] four corners agree
    y0, y1, ly0, ly1 = _bilinear_source(H, h)
    x0 = _bilinear_source(W, w)[0]
    out = src_label[y0[:, None], x0[None, :]]                                        # [H, W]
    # width pass (row weights 1 and 0 reproduce the kernel's inner blend exactly): [h, W, C], classes contiguous
    wide = F.interpolate(scores[None], size=(h, W), mode="bilinear", align_corners=False)[0].permute(1, 2, 0)
    wide = wide.contiguous()
    starts = np.searchsorted(y0, np.arange(h + 1))                                   # output rows of source row i
    for i in np.nonzero(~settled.all(axis=1))[0]:
        cols = torch.from_numpy(np.nonzero(~settled[i][x0])[0])                     # output columns to blend
        top, bottom = wide[i, cols], wide[y1[starts[i]] if starts[i] < H else i, cols]   # [n, C]
        step = max(1, max_elements // max(1, len(cols) * C))
        for r in range(starts[i], starts[i + 1], step):
            rows = slice(r, min(r + step, starts[i + 1]))
            blend = ly0[rows, None, None] * top + ly1[rows, None, None] * bottom     # [rows, n, C]
            out[rows, cols.numpy()] = blend.argmax(dim=-1).numpy()
    return out


class SegmentationDemo:
    """A SegCLIP model + a vocabulary -> per-pixel labels and center assignments for photos of any size.

    Labels: 0 = background (when ``with_bg``), then the classes in order. Inference runs on the image resized as
    in the evaluation (short side 224); labels are computed at the photo's own size.
    """

    def __init__(self, model, class_names: Sequence[str], with_bg: bool = True, bg_thresh: float = 0.8,
                 templates: str = "simple", crop: int = 224, stride: int = 224, resolution: int = 224,
                 max_long: int = 2048):
        from seg_segmentation.inference import ZeroShotSegmentor
        patch = model.patch_size
        if crop % patch:
            raise UsageError(f"crop size {crop} must be a multiple of the patch size {patch}")
        self.model = model
        self.segmentor = ZeroShotSegmentor(model, class_names=class_names, templates=templates, with_bg=with_bg,
                                           bg_thresh=bg_thresh)
        self.class_names = list(self.segmentor.class_names)
        self.with_bg = with_bg
        self.bg_thresh = bg_thresh
        self.label_names = (["background"] if with_bg else []) + self.class_names
        self.palette = class_palette(len(self.label_names), with_bg)
        self.crop, self.stride, self.resolution, self.max_long = crop, stride, resolution, max_long

    def labels(self, image: "torch.Tensor", size: Tuple[int, int]) -> np.ndarray:
        """image [1, 3, h, w] normalised -> labels [H, W] at the photo's size (slide inference, design.md §7.3)."""
        import torch.nn.functional as F
        h, w = image.shape[-2:]
        # A side shorter than one window (very elongated photos) is padded with zeros (the mean colour after
        # normalisation), so every window keeps a patch-aligned size; the padding is cut off again.
        ph, pw = max(self.crop - h, 0), max(self.crop - w, 0)
        if ph or pw:
            image = F.pad(image, (0, pw, 0, ph))
        logits = self.segmentor.slide_logits(image, crop=self.crop, stride=self.stride)[0][:, :h, :w]
        # softmax is monotonic per pixel, so argmax of the resized logits is mmseg's prediction
        return upsample_argmax(logits, size)

    def groups(self, image: "torch.Tensor", size: Tuple[int, int]) -> np.ndarray:
        """image [1, 3, h, w] -> index of the winning center per pixel [H, W].

        As in 2022: one pass over the whole resized image, whose patch grid covers floor(h/16) x floor(w/16)
        patches (the 2022 patch conv dropped the remainder; here it is cropped), soft assignment stretched
        bilinearly over the photo, argmax over centers."""
        import torch
        import torch.nn.functional as F
        p = self.model.patch_size
        h, w = image.shape[-2:]
        if h < p or w < p:  # thinner than one patch after resizing: pad with the mean colour
            image = F.pad(image, (0, max(p - w, 0), 0, max(p - h, 0)))
        gh, gw = image.shape[-2] // p, image.shape[-1] // p
        with torch.no_grad():
            soft, _, _ = self.segmentor.encode(image[..., :gh * p, :gw * p])   # [1, G, gh*gw]
        return upsample_argmax(soft[0].reshape(-1, gh, gw), size)

    def predict(self, bgr: np.ndarray, with_groups: bool = False) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        size = bgr.shape[:2]
        image = preprocess(bgr, self.resolution, self.max_long)
        labels = self.labels(image, size)
        return labels, (self.groups(image, size) if with_groups else None)


def run_visualization(demo: SegmentationDemo, inputs: Sequence[Path], output_dir: Path,
                      modes: Sequence[str] = ("input_pred_label",), progress: bool = True) -> Dict:
    """Segment every input and write, per image ``name``:
    ``vis_imgs/<mode>/<mode>_<name>.jpg`` for each mode (``.png`` label ids for ``pred``), ``labels/<name>.png`` (palette PNG of label ids) and
    ``labels/<name>.json`` (classes present with pixel share). Unreadable files are skipped and counted.
    Returns {'written': [names], 'skipped': [(path, reason)], 'files': [paths]}."""
    from tqdm import tqdm
    output_dir = Path(output_dir)
    with_groups = any(m in GROUP_MODES for m in modes)
    report = {"written": [], "skipped": [], "files": []}
    for path, name in tqdm(list(zip(inputs, unique_names(inputs))), desc="segmenting", unit="img",
                           disable=not progress or len(inputs) < 2):
        try:
            bgr = read_image_bgr(path)
            labels, groups = demo.predict(bgr, with_groups)
        except ImageReadError as e:
            report["skipped"].append((str(path), str(e)))
            continue
        rgb = np.ascontiguousarray(bgr[..., ::-1])
        del bgr
        for mode in modes:
            target = output_path(output_dir, mode, name)
            if mode == "pred":
                save_label_png(target, labels, demo.palette)
            else:
                save_jpg(target, render(mode, rgb, labels, groups, demo.label_names, demo.palette, demo.with_bg))
            report["files"].append(str(target))
        png = output_dir / "labels" / f"{name}.png"
        save_label_png(png, labels, demo.palette)
        summary = {"image": str(path), "height": int(labels.shape[0]), "width": int(labels.shape[1]),
                   "label_png": png.name, "vocabulary": demo.label_names, "background": demo.with_bg,
                   "bg_thresh": demo.bg_thresh if demo.with_bg else None,
                   "classes": label_summary(labels, demo.label_names, demo.palette)}
        write_json(output_dir / "labels" / f"{name}.json", summary)
        report["files"] += [str(png), str(output_dir / "labels" / f"{name}.json")]
        report["written"].append(name)
    return report
