"""Reading image files safely: the pixel count is checked from the file header BEFORE any decoding.

A PNG of 20000 x 20000 pixels compresses to a few hundred KB but decodes to gigabytes (a "decompression bomb");
every image the project reads from a user (demo photos, evaluation images and label maps) goes through
:func:`check_image_size` first. The limit defaults to Pillow's own (about 89 M pixels) and is set per call
(``--max_image_pixels`` in the scripts).

    bgr = read_image_bgr("photo.jpg")                 # uint8 BGR [H, W, 3], decoded as mmseg / OpenCV decode
    (w, h), mode = check_image_size("label.png")      # header only: no pixel is decoded
"""
import warnings
from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np
from PIL import Image

from common.errors import SegCLIPError

PathLike = Union[str, Path]
# The only formats the project decodes, by Pillow's names (JPEG includes MPO, the JPEG of many phone cameras).
# Pillow otherwise tries every format it knows on any file, by its content: an EPS, PS or PDF file, whatever its
# name, would be handed to Ghostscript, a PostScript interpreter with a history of sandbox escapes; other rarely
# used decoders are attack surface too.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF", "PPM", "JPEG2000")
# Pillow's MAX_IMAGE_PIXELS as shipped (1024 * 1024 * 1024 // 4 // 3); fixed here so that another library changing
# Pillow's global does not change ours.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485
# Pillow modes of a label map holding one class id per pixel (RGB(A) "colour labels" are refused by name)
LABEL_MODES = ("P", "L", "I", "I;16", "I;16L", "I;16B", "1")


class ImageReadError(SegCLIPError, ValueError):
    """A file that cannot be decoded as an image."""


class ImageTooLargeError(ImageReadError):
    """An image whose header announces more pixels than the limit (refused before decoding)."""


# Pillow's modules of those formats: registered before the first open, so that Pillow never loads all its plugins
# (which it does for a format it has not seen yet, and which runs code of every plugin at import).
_PLUGINS = ("JpegImagePlugin", "PngImagePlugin", "WebPImagePlugin", "BmpImagePlugin", "TiffImagePlugin",
            "GifImagePlugin", "PpmImagePlugin", "Jpeg2KImagePlugin")
_registered = False


def open_image(fp) -> Image.Image:
    """``PIL.Image.open`` restricted to :data:`IMAGE_FORMATS` (a path or a binary file; lazy: reads the header).
    Every image the project reads is opened here; any other format raises ``PIL.UnidentifiedImageError``."""
    global _registered
    if not _registered:
        import importlib
        for name in _PLUGINS:
            importlib.import_module(f"PIL.{name}")
        _registered = True
    return Image.open(fp, formats=IMAGE_FORMATS)


def _too_large(path, pixels_text: str, limit: int) -> ImageTooLargeError:
    return ImageTooLargeError(f"{path}: {pixels_text} is above the limit of {limit:,} pixels (a decompression bomb "
                              f"or a very large photo); downscale it, or raise the limit with --max_image_pixels")


def check_image_size(path: PathLike, max_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS) -> Tuple[Tuple[int, int], str]:
    """Read only the header of ``path`` -> ((width, height), Pillow mode). ``max_pixels`` None or 0: no limit.

    Raises ImageTooLargeError above the limit, ImageReadError when the file is not an image Pillow can identify.
    """
    limit = int(max_pixels) if max_pixels else 0
    if Image.MAX_IMAGE_PIXELS is not None and (not limit or limit > Image.MAX_IMAGE_PIXELS):
        # Pillow refuses at open() beyond twice its own (process-wide) limit; a user who allows more, or asks for
        # no limit, raises Pillow's too
        Image.MAX_IMAGE_PIXELS = limit or None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with open_image(path) as im:      # lazy: parses the header, decodes nothing
                size, mode = im.size, im.mode
    except Image.DecompressionBombError:     # above twice Pillow's limit, itself at least ours
        raise _too_large(path, f"more than {2 * Image.MAX_IMAGE_PIXELS:,} pixels", limit) from None
    except FileNotFoundError:
        raise ImageReadError(f"{path}: file not found") from None
    except Exception as e:  # noqa: BLE001 - UnidentifiedImageError, but a damaged header makes some of Pillow's
        # readers raise ValueError, SyntaxError, struct.error ... (a JPEG 2000 marker of length 0): all mean the same
        raise ImageReadError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None
    w, h = size
    if limit and w * h > limit:
        raise _too_large(path, f"{w} x {h} = {w * h:,} pixels", limit)
    return (w, h), mode


def read_image_bgr(path: PathLike, max_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """Any image file -> uint8 BGR [H, W, 3], decoded as mmseg does (cv2, colour, EXIF orientation applied).

    The header's pixel count is checked first (see :func:`check_image_size`). Grey, palette, RGBA (alpha dropped),
    16-bit and CMYK files become 8-bit BGR; formats cv2 cannot decode are tried with Pillow. Raises ImageReadError
    naming the file otherwise.
    """
    import cv2
    check_image_size(path, max_pixels)
    try:
        data = np.fromfile(str(path), dtype=np.uint8)
    except OSError as e:
        raise ImageReadError(f"{path}: cannot read file ({e.strerror or e})") from None
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None:
        try:
            from PIL import ImageOps
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with open_image(path) as pil:
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


def read_label_map(path: PathLike) -> np.ndarray:
    """A label map (one class id per pixel: palette, grey, 16- or 32-bit grey PNG / TIFF) -> [H, W] int64 of its
    exact pixel values: palette indices (not colours), 16-bit ids kept (mmseg casts label maps to 8 bits, which
    turns 260 into 4). Raises ImageReadError naming the file for anything else.

    The pixel limit is the caller's (``check_image_size`` first, as the evaluation does); Pillow's own guard
    against decompression bombs still applies here."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with open_image(path) as im:
                if im.mode not in LABEL_MODES:
                    raise ImageReadError(f"{path}: the label map is a {im.mode} image; labels must be single-channel "
                                         "(palette or grey) images whose pixel values are the class ids, not colours")
                labels = np.asarray(im)
    except ImageReadError:
        raise
    except Exception as e:  # noqa: BLE001 - any decoder failure means "not a label map we can read"
        raise ImageReadError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None
    return labels.astype(np.int64)
