"""Stopping a run: the non-finite-loss, signal and failed-write errors, and the stop flag;
and what never stops one: a broken stdout (:func:`print_or_drop`).

``STOP`` is the one flag object of the process: the SIGTERM / SIGINT handler sets it, the
epoch loop and the pipeline (via ``Dist.stop_requested``) poll it at batch and stage
boundaries. A second SIGINT (Ctrl-C pressed again) stops at once with KeyboardInterrupt."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading


class NonFiniteLoss(RuntimeError):
    """A training loss was NaN or infinite: the run stops, the last checkpoint is kept."""


class WriteFailed(RuntimeError):
    """A result file (checkpoint, metrics) could not be written, e.g. the disk is full; its
    temporary file is removed and the previous version of the file is kept."""


class Interrupted(RuntimeError):
    """SIGTERM or SIGINT received: the run stopped at a batch or stage boundary; the checkpoint
    of the last complete stage is intact (``--resume`` continues from it)."""

    def __init__(self, signum: int, where: str):
        self.signum = int(signum)
        self.where = where
        try:
            name = signal.Signals(self.signum).name
        except ValueError:
            name = f"signal {self.signum}"
        super().__init__(f"interrupted by {name} during {where}")


STOP = {"signum": 0}  # set by the signal handler, polled at batch / stage boundaries
_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _on_signal(signum, frame):  # only sets a flag: an ongoing (atomic) write finishes
    if signum == signal.SIGINT and STOP["signum"] == signal.SIGINT:
        raise KeyboardInterrupt  # Ctrl-C twice: stop now (writes are atomic all the same)
    STOP["signum"] = signum


@contextlib.contextmanager
def stop_signals():
    """SIGTERM and SIGINT set ``STOP`` while the block runs (handlers can be installed only
    from the main thread; elsewhere the block runs without one)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    STOP["signum"] = 0
    old = {s: signal.signal(s, _on_signal) for s in _SIGNALS}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        STOP["signum"] = 0


_STDOUT = {"broken": False}


def print_or_drop(*args, **kw) -> None:
    """``print`` to stdout, flushed, that survives a broken stdout (a pipe closed early as in
    ``| head -1``, a dead ``tee``, ``>/dev/full``): the first failed write points the
    stdout file descriptor at os.devnull (so the interpreter's final flush succeeds too) and
    this message and every later one are dropped; the run goes on and writes its files."""
    if _STDOUT["broken"]:
        return
    try:
        print(*args, **kw, flush=True)
    except OSError:  # BrokenPipeError (EPIPE), ENOSPC, EIO
        _STDOUT["broken"] = True
        try:
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, sys.stdout.fileno())
            os.close(null)
        except (OSError, ValueError, AttributeError):  # no file descriptor (captured)
            pass
