"""Drawing the demo's pictures (design.md §8): palettes, overlays, region names, the colour key.

No model and no files: numpy uint8 RGB [H, W, 3] images and integer [H, W] label maps in, images out.

    rgb = render("input_pred_label", photo_rgb, labels, groups, label_names, class_palette(len(label_names), True), True)
"""
from typing import Dict, Optional, Sequence, Tuple

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

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
