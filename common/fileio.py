"""Files that are either complete or absent: every output of the project is written through here.

A file is written under a temporary name in its destination folder, flushed and fsynced, then moved into place
with ``os.replace``; a crash, a kill or a full disk at any moment leaves either the previous complete file or the
new complete file, never a partial one, and no 0-byte file.

Temporary names are the project's own (:func:`temporary_name`)::

    .segclip-tmp-<host tag>-<pid>-<random>.<file name>

so that the clean-up of temporaries a killed run left behind (:func:`remove_stale_temporaries`) can tell them from
anything else in a folder the user chose: it removes only names of exactly this shape whose writer ran on this
host and is gone. A user's ``.thesis.part`` or ``.bashrc.tmp-backup`` never matches.
"""
import contextlib
import errno
import hashlib
import os
import re
import secrets
import socket
from pathlib import Path
from typing import IO, Any, Iterator, Optional, Union

from common.errors import SegCLIPError

PathLike = Union[str, os.PathLike]
TMP_PREFIX = ".segclip-tmp-"
# prefix, host tag (8 hex), pid, random part (12 hex), then "." and the destination's name (maybe shortened)
_TMP_RX = re.compile(r"^\.segclip-tmp-(?P<host>[0-9a-f]{8})-(?P<pid>[1-9][0-9]{0,9})-[0-9a-f]{12}\.")
_NAME_MAX = 255          # bytes per file name on the usual filesystems (ext4, xfs, btrfs, tmpfs, NFS)


def _host_tag() -> str:
    """8 hex digits naming this machine: a temporary in a folder shared between machines (NFS) is only ever judged
    by the machine whose processes it can see."""
    return hashlib.sha1(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]


def temporary_name(path: PathLike) -> Path:
    """A fresh temporary name for writing ``path``, in its folder: unique per call (pid + random part), and never
    longer than a file name may be (a long destination name is shortened inside the temporary's name)."""
    path = Path(path)
    head = f"{TMP_PREFIX}{_host_tag()}-{os.getpid()}-{secrets.token_hex(6)}."
    room = _NAME_MAX - len(head.encode())
    tail = path.name.encode("utf-8", "surrogateescape")[:room].decode("utf-8", "ignore")
    return path.with_name(head + tail)


def temporary_owner(name: str) -> Optional[tuple]:
    """(host tag, pid) of a temporary name this project writes, or None for any other name."""
    m = _TMP_RX.match(name)
    return (m.group("host"), int(m.group("pid"))) if m else None


class OutputError(SegCLIPError, OSError):
    """An output could not be written (no space left, not writable); the message names the path."""


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
    tmp = temporary_name(path)
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
        # the temporary is usually gone (renamed, or never created); an unlink that fails for another reason
        # (e.g. a name the file system refuses) must not replace the error that brought us here
        with contextlib.suppress(OSError):
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
    staged = atomic_write_text(temporary_name(path), text)
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
    """Delete the temporaries of this project's writers that died in ``folder`` (not its sub-folders); -> how many.

    Only names made by :func:`temporary_name` are considered, and of those only the ones written on this host by
    a process that no longer runs; everything else in the folder is left alone, whatever its name."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    host, removed = _host_tag(), 0
    for p in folder.iterdir():
        owner = temporary_owner(p.name)
        if owner is None or owner[0] != host or owner[1] == os.getpid() or _alive(owner[1]):
            continue
        if not p.is_file() or p.is_symlink():
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
    except (PermissionError, OverflowError):
        return True      # another user's process (or a pid this system cannot have): not ours to judge
    return True
