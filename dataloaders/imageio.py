"""Store-time image handling, PIL only (no torch: preprocessing workers stay light)."""
import io
from typing import Tuple

from PIL import Image

from common.images import open_image

STORE_SHORT_SIDE = 224


def decode_rgb(data: bytes) -> Image.Image:
    """Encoded bytes -> RGB PIL image (grayscale, palette, CMYK, RGBA all converted). Raises on corrupt data and on
    formats outside ``common.images.IMAGE_FORMATS`` (PostScript never reaches Ghostscript)."""
    with open_image(io.BytesIO(data)) as img:
        img.load()  # decode now: truncated files must fail here, not later inside a transform
        return img.convert("RGB")


def resize_short_side(img: Image.Image, size: int = STORE_SHORT_SIDE) -> Image.Image:
    """Resize so the short side is ``size`` (aspect kept, long side truncated), only when both sides exceed it.

    Same rule and Lanczos filter as the 2022 preprocessing; smaller images are stored as they are.
    """
    w, h = img.size
    if w <= size or h <= size:
        return img
    aspect = w / h
    new = (int(size * aspect), size) if aspect >= 1 else (size, int(size / aspect))
    return img.resize(new, Image.LANCZOS)


def encode_for_store(data: bytes, size: int = STORE_SHORT_SIDE, quality: int = 95) -> Tuple[bytes, Tuple[int, int]]:
    """Raw image file bytes -> (RGB JPEG bytes resized for the store, (w, h)). Raises on undecodable input."""
    img = resize_short_side(decode_rgb(data), size)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue(), img.size
