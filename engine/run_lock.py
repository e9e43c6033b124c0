"""One training run per output folder: ``OUTPUT_DIR/run.lock`` names the pid and host of the run that owns it.

A second run on the same folder would interleave log.txt and leave one run's training state next to the other's
checkpoints (and ``--resume auto`` would continue the wrong one), so it is refused. A lock whose process is gone
(same host, no such pid: a killed run) is stale and taken over; a lock of another host cannot be checked and is
respected -- the message says which file to delete if that run is gone.
"""
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Optional

from common.errors import SegCLIPError
from common.fileio import atomic_create_text, temporary_name

from .distributed import DistEnv, on_main_process

logger = logging.getLogger("segclip.train")

LOCK_NAME = "run.lock"


class RunLockError(SegCLIPError):
    """The output folder belongs to another training run that is still alive."""


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:          # exists, owned by another user
        return True
    return True


class RunLock:
    """``lock = RunLock(dir); lock.acquire() ... lock.release()`` (or ``with``)."""

    def __init__(self, output_dir):
        self.path = Path(output_dir) / LOCK_NAME
        self.owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": round(time.time()),
                      "argv": sys.argv[:8]}
        self.held = False

    def _read(self) -> Optional[dict]:
        try:
            owner = json.loads(self.path.read_text(encoding="utf-8"))
            return owner if isinstance(owner, dict) and isinstance(owner.get("pid"), int) else {}
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}                    # unreadable: no owner can be shown to be alive

    def _alive(self, owner: dict) -> bool:
        if not owner:
            return False
        if owner.get("host") != self.owner["host"]:
            return True                  # cannot look at another machine's processes
        return owner["pid"] != os.getpid() and _process_alive(owner["pid"])

    def acquire(self) -> "RunLock":
        text = json.dumps(self.owner)
        for _ in range(5):
            if atomic_create_text(self.path, text):
                self.held = True
                return self
            owner = self._read()
            if owner is None:            # released meanwhile
                continue
            if self._alive(owner):
                started = time.strftime("%Y-%m-%d %H:%M", time.localtime(owner.get("started", 0)))
                raise RunLockError(f"{self.path.parent} is in use by another training run (pid {owner['pid']} on "
                                   f"{owner.get('host')}, started {started}); wait for it to end or choose another "
                                   f"--output_dir (if that run is gone, delete {self.path})")
            self._take_over(owner)
        raise RunLockError(f"could not take the run lock {self.path}: other runs keep starting on this folder")

    def _take_over(self, stale: dict) -> None:
        """Move the stale lock aside; if another starting run replaced it meanwhile, put that one back."""
        grave = temporary_name(self.path)     # a crash right here leaves a temporary the clean-up knows
        try:
            os.replace(self.path, grave)
        except FileNotFoundError:
            return
        try:
            moved = json.loads(grave.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            moved = {}
        if moved and moved != stale:
            try:
                os.link(grave, self.path)
            except OSError:
                pass
        else:
            logger.warning("took over the stale run lock of pid %s on %s (that process is gone)",
                           stale.get("pid", "?"), stale.get("host", "?"))
        grave.unlink(missing_ok=True)

    def release(self) -> None:
        if self.held and self._read() == self.owner:
            self.path.unlink(missing_ok=True)
        self.held = False

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def lock_output_dir(env: DistEnv, output_dir) -> Optional[RunLock]:
    """Rank 0 takes the lock of ``output_dir``; a refusal is raised on every rank (so that no rank waits for the
    others in a collective). Returns the held lock on rank 0, None elsewhere."""
    lock = RunLock(output_dir) if env.is_main else None
    on_main_process(env, lambda: lock.acquire())
    return lock
