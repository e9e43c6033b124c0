"""Files that are either complete or absent: every output of the project is written through here.

A file is written under a temporary name in its destination folder (``.NAME.tmp-PID``), flushed and fsynced, then
moved into place with ``os.replace``; a crash, a kill or a full disk at any moment leaves either the previous
complete file or the new complete file, never a partial one, and no 0-byte file. Temporaries left by a killed run
are recognised by their pattern and removed by :func:`remove_stale_temporaries`.
"""
import contextlib
import errno
import os
from pathlib import Path
from typing import IO, Any, Iterator, Union

from common.errors import SegCLIPError

PathLike = Union[str, os.PathLike]
TMP_MARK = ".tmp-"


class OutputError(SegCLIPError, OSError):
    """An output could not be written (no space left, not writable); the message names the path."""


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the rename is still atomic
    finally:
        os.close(fd)


def describe_os_error(e: OSError, path: PathLike) -> str:
    """One line for a failed write: says 'no space left' or 'not writable' and where."""
    if e.errno == errno.ENOSPC:
        return f"no space left on the device while writing {path}; free some space or choose another folder"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write {path}: the folder is not writable ({e.strerror}); choose another folder"
    return f"cannot write {path}: {e.strerror or e}"


@contextlib.contextmanager
def atomic_open(path: PathLike, mode: str = "wb", **kwargs) -> Iterator[IO[Any]]:
    """``with atomic_open(p, 'w') as f: f.write(...)`` -> ``p`` appears complete when the block exits without error.

    On an exception nothing is left behind; an OSError (e.g. disk full) is re-raised as OutputError naming ``path``.
    """
    if not any(m in mode for m in "wx"):
        raise ValueError(f"atomic_open writes; mode {mode!r} has no 'w'")
    path = Path(path)
    tmp = _tmp_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, mode.replace("x", "w"), **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise OutputError(describe_os_error(e, path)) from e
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    _fsync_dir(path.parent)


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    with atomic_open(path, "wb") as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: PathLike, text: str) -> Path:
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return Path(path)


def atomic_create_text(path: PathLike, text: str) -> bool:
    """Create ``path`` holding ``text`` unless it already exists (then False): exclusive and complete-or-absent,
    for lock files. The text is written to this process's temporary name, then hard-linked into place."""
    path = Path(path)
    staged = atomic_write_text(_tmp_name(path), text)
    try:
        os.link(staged, path)
    except FileExistsError:
        return False
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise OutputError(describe_os_error(e, path)) from e
        try:                             # no hard links on this filesystem: exclusive create, then write
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
    finally:
        with contextlib.suppress(FileNotFoundError):
            staged.unlink()
    _fsync_dir(path.parent)
    return True


def atomic_torch_save(obj: Any, path: PathLike) -> Path:
    """``torch.save`` that never leaves a partial file (training states, checkpoints)."""
    import torch  # this module is imported by light paths (demo, download) that should not pay for torch
    with atomic_open(path, "wb") as f:
        torch.save(obj, f)
    return Path(path)


def atomic_save_image(path: PathLike, image, **save_kwargs) -> Path:
    """A PIL image saved atomically; the format comes from ``path``'s suffix."""
    path = Path(path)
    fmt = save_kwargs.pop("format", None) or {".jpg": "JPEG", ".jpeg": "JPEG"}.get(path.suffix.lower(),
                                                                                   path.suffix[1:].upper())
    with atomic_open(path, "wb") as f:
        image.save(f, format=fmt, **save_kwargs)
    return path


def remove_stale_temporaries(folder: PathLike) -> int:
    """Delete ``.NAME.tmp-PID`` / ``.NAME.*.part`` files whose writer process is gone; returns how many."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    removed = 0
    for p in folder.iterdir():
        if not p.name.startswith(".") or not p.is_file():
            continue
        pid = None
        if TMP_MARK in p.name:
            tail = p.name.rsplit(TMP_MARK, 1)[1]
            pid = int(tail) if tail.isdigit() else None
        elif not p.name.endswith(".part"):
            continue
        if pid is not None and pid != os.getpid() and _alive(pid):
            continue
        if pid == os.getpid():
            continue
        with contextlib.suppress(OSError):
            p.unlink()
            removed += 1
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
