"""The demo's and the evaluation's output files, each written atomically (common/fileio): complete or absent.

    save_label_png(path, labels, palette)     # label ids [H, W] -> palette PNG (16-bit grey beyond 256 ids)
    save_jpg(path, rgb)                       # uint8 RGB [H, W, 3] -> JPEG
    write_json(path, payload)
"""
import io
import json
import os
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np

from common.fileio import OutputError, atomic_write_bytes, atomic_write_text


def save_label_png(path: Path, labels: np.ndarray, palette: np.ndarray) -> None:
    """Palette PNG (pixel value = label id, shown in the palette's colours); 16-bit grey PNG beyond 256 ids."""
    if len(palette) <= 256:
        from PIL import Image
        img = Image.fromarray(np.ascontiguousarray(labels, dtype=np.uint8))   # 'L'; putpalette makes it 'P'
        img.putpalette(np.asarray(palette, dtype=np.uint8).ravel().tolist())
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        atomic_write_bytes(path, buf.getvalue())
    else:
        _write_encoded(path, ".png", labels.astype(np.uint16))


def save_jpg(path: Path, image_rgb: np.ndarray, quality: int = 95) -> None:
    import cv2
    _write_encoded(path, ".jpg", np.ascontiguousarray(image_rgb[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, quality])


def _write_encoded(path: Path, ext: str, image: np.ndarray, params=()) -> None:
    import cv2
    ok, data = cv2.imencode(ext, image, list(params))
    if not ok:
        raise OutputError(f"could not encode {path} as {ext[1:].upper()}")
    atomic_write_bytes(path, data.tobytes())


def write_json(path: Path, payload: Dict) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2) + "\n")


def output_path(output_dir: Path, mode: str, name: str) -> Path:
    """OUTPUT/vis_imgs/<mode>/<mode>_<name>.jpg; ``pred`` is a palette PNG of the label ids, as in 2022."""
    return Path(output_dir) / "vis_imgs" / mode / f"{mode}_{name}{'.png' if mode == 'pred' else '.jpg'}"


# Every output is written through a temporary file named after it (common/fileio: a dot, the name, a suffix with
# the process id); the room that temporary needs beyond the output's own name, with headroom for a longer scheme.
TEMP_NAME_ROOM = 40


def name_limit(folder: Path) -> int:
    """The longest file name (bytes) allowed in ``folder`` (or in its nearest existing parent): usually 255."""
    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def too_long_names(paths: Sequence[Path]) -> Optional[str]:
    """None when every output path's name (with its temporary's) fits its folder's limit; else a sentence naming
    the longest, for a 'skipped' line. A legal input name of 240 characters gives output names that do not."""
    longest = max(paths, key=lambda p: len(p.name.encode("utf-8")))
    size, limit = len(longest.name.encode("utf-8")), name_limit(longest.parent) - TEMP_NAME_ROOM
    if size <= limit:
        return None
    return (f"its output file name {longest.name[:40]}... would be {size} bytes, more than the {limit} this folder "
            "takes (with the temporary file it is written through); rename the file")
