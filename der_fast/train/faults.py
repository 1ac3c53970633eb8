"""Stopping a run: the non-finite-loss and SIGTERM errors, and the SIGTERM flag.

``_STOP`` is the one flag object of the process: the handler sets it, the epoch loop and the
pipeline (via ``_Dist.stop_requested``) poll it at batch and stage boundaries."""

from __future__ import annotations

import contextlib
import signal
import threading


class NonFiniteLoss(RuntimeError):
    """A training loss was NaN or infinite: the run stops, the last checkpoint is kept."""


class Interrupted(RuntimeError):
    """SIGTERM received: the run stopped at a batch or stage boundary; the checkpoint of the
    last complete stage is intact (``--resume`` continues from it)."""

    def __init__(self, signum: int, where: str):
        self.signum = int(signum)
        self.where = where
        try:
            name = signal.Signals(self.signum).name
        except ValueError:
            name = f"signal {self.signum}"
        super().__init__(f"interrupted by {name} during {where}")


_STOP = {"signum": 0}  # set by the SIGTERM handler, polled at batch / stage boundaries


def _on_sigterm(signum, frame):  # only sets a flag: an ongoing (atomic) write finishes
    _STOP["signum"] = signum


@contextlib.contextmanager
def _sigterm_handler():
    """SIGTERM sets ``_STOP`` while the block runs (handlers can be installed only from the
    main thread; elsewhere the block runs without one)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _STOP["signum"] = 0
    old = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
        _STOP["signum"] = 0
