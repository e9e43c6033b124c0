"""The demo's inputs: which files to segment.

    paths = collect_inputs("photos/*.jpg")          # a file, a folder or a glob -> sorted paths

Class lists are parsed by ``seg_segmentation.classes`` (parse_class_list, read_class_file); images are read
by ``common.images.read_image_bgr`` (pixel limit checked before decoding).
"""
from pathlib import Path
from typing import List, Sequence

from common.errors import MissingFileError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm", ".jp2")


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
