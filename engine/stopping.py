"""When a run stops early: SIGTERM / SIGINT (preemption, Ctrl-C) and divergence (too many non-finite steps).

A signal does not interrupt a step: the handler only sets a flag, the loop finishes the step, saves the training
state and returns (``--resume auto`` continues from there). A second Ctrl-C interrupts at once.
"""
import logging
import multiprocessing
import signal
import threading
from typing import Optional

from common.errors import SegCLIPError

logger = logging.getLogger("segclip.train")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_shared_stop = None


def shared_stop_flag():
    """One byte in shared memory, set by the main process when a stop signal arrives. Loader workers read it to
    tell a preemption (keep serving until the step ends) from being terminated by their own DataLoader."""
    global _shared_stop
    if _shared_stop is None:
        _shared_stop = multiprocessing.RawValue("b", 0)
    return _shared_stop


class DivergenceError(SegCLIPError, RuntimeError):
    """Training produced non-finite losses or gradients for too many consecutive steps."""


class StopSignals:
    """``with StopSignals() as stop: ... if stop.requested: ...`` -- records SIGTERM / SIGINT instead of dying.

    Handlers are installed only in the main thread (Python's rule) and the previous ones restored on exit.
    """

    def __init__(self):
        self.signum: Optional[int] = None
        self._announced = False
        self._previous = {}

    @property
    def requested(self) -> bool:
        if self.signum is not None and not self._announced:
            # said here, by the loop that checks, not in the handler: logging from a signal handler can re-enter a
            # stream the interrupted code was writing to (a RuntimeError that would replace the orderly stop)
            self._announced = True
            logger.warning("%s received: stopping after this step and saving the training state", self.name)
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt       # a second Ctrl-C: the user does not want to wait for the save
        if self.signum is None:
            self.signum = signum
            shared_stop_flag().value = 1

    def __enter__(self) -> "StopSignals":
        shared_stop_flag().value = 0
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()


class DivergenceGuard:
    """Counts consecutive skipped (non-finite) steps; ``update`` says True once ``limit`` is reached (0: never)."""

    def __init__(self, limit: int):
        if limit < 0:
            raise ValueError(f"--max_nonfinite_steps must be >= 0 (0 disables the check), got {limit}")
        self.limit, self.streak, self.first_bad = limit, 0, None

    def update(self, skipped: bool, step: int) -> bool:
        if not skipped:
            self.streak, self.first_bad = 0, None
            return False
        self.streak += 1
        if self.first_bad is None:
            self.first_bad = step
        return 0 < self.limit <= self.streak
