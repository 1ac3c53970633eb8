"""What a run writes to OUT/: checkpoints, metrics.json and the other result files, the table."""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .. import __version__
from ..plot import RUN_FILES
from .config import Config, ConfigError
from .distributed import Dist
from .faults import WriteFailed

try:
    import fcntl
except ImportError:  # not POSIX: runs go unlocked (see lock_out)
    fcntl = None


def _atomic_write(path: Path, write) -> None:
    """``write(tmp)`` then rename over ``path``: readers never see a partial file. A failed
    write (disk full, ...) removes the temporary file, keeps the old ``path`` and raises
    WriteFailed."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, Exception):
            raise WriteFailed(f"cannot write {path}: {exc}") from exc
        raise


def strict_json(obj):
    """``obj`` with every non-finite float replaced by None: valid JSON (no NaN/Infinity)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def write_json(path: Path, obj) -> None:
    text = json.dumps(strict_json(obj), indent=2, allow_nan=False)
    _atomic_write(path, lambda p: p.write_text(text))


def save_ckpt(out: Path, state: dict) -> None:
    _atomic_write(out / "checkpoint.pt", lambda p: torch.save(state, p))


def read_ckpt(path: Path) -> dict:
    """A checkpoint's dict (plain types and tensors: no der_fast class is pickled); a clear
    ConfigError if the file is unreadable or not a der_fast checkpoint."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # corrupt file: never a silent restart
        raise ConfigError(f"checkpoint {path} is corrupt or unreadable: {exc}") from exc
    if not isinstance(state, dict) or not isinstance(state.get("config"), dict) \
            or "model" not in state:
        raise ConfigError(f"checkpoint {path} is not a der_fast checkpoint")
    return state


# fields that do not change the numbers: they may differ when resuming
_RESUME_FREE = {"out", "progress", "device", "impl", "plots", "tensorboard", "last_step"}


def load_ckpt(out: Path, cfg: Config) -> Optional[dict]:
    """OUT/checkpoint.pt (None if absent), checked to be made with ``cfg`` (up to
    ``_RESUME_FREE``)."""
    path = out / "checkpoint.pt"
    if not path.exists():
        return None
    state = read_ckpt(path)
    saved = dict(state["config"])
    mine = asdict(cfg)
    default = asdict(Config())  # fields a checkpoint from an older version does not have
    diff = {k: (saved.get(k, default[k]), mine[k]) for k in mine
            if k not in _RESUME_FREE and saved.get(k, default[k]) != mine[k]}
    if diff:
        raise ConfigError(f"checkpoint {path} was made with another config: {diff}")
    missing = [k for k in _CKPT_ENTRIES if k not in state]
    if missing:
        raise ConfigError(f"checkpoint {path} is incomplete: it lacks {', '.join(missing)}")
    nxt, steps, mem = state["next"], state["steps"], state["memory"]
    if not isinstance(mem, dict) or not {"total", "per_class", "exemplars"} <= set(mem):
        raise ConfigError(f"checkpoint {path} is incomplete: its memory entry is malformed")
    if not (isinstance(nxt, (list, tuple)) and len(nxt) == 2
            and all(type(v) is int for v in nxt) and nxt[1] in (0, 1)
            and isinstance(steps, list) and len(steps) == nxt[0]):
        raise ConfigError(f"checkpoint {path} is inconsistent: position {nxt!r} with "
                          f"{len(steps) if isinstance(steps, list) else steps!r} step rows")
    return state


# what resuming needs besides config and model (checked by load_ckpt)
_CKPT_ENTRIES = ("memory", "steps", "next")


def clear_run(out: Path, resume: bool, overwrite: bool) -> list:
    """Never overwrite a run by accident: a fresh run into a directory holding a checkpoint or
    metrics is refused unless ``overwrite``. Returns the old result files that ``overwrite``
    replaces; they are removed (:func:`remove_run`) only once the new run has passed every
    check, so a new run refused for a bad flag or missing data leaves the old one intact."""
    if resume:
        if overwrite:
            raise ConfigError("--overwrite starts a run afresh: do not combine it with --resume")
        return []
    found = [f for f in RESULT_FILES if (out / f).exists()]
    if found and not overwrite:
        raise ConfigError(f"{out} already holds a run ({', '.join(found)}): continue it with "
                          f"--resume {out}, or replace it with --overwrite")
    return found


def remove_run(out: Path, found: list) -> None:
    for f in found:
        (out / f).unlink(missing_ok=True)


RESULT_FILES = ("checkpoint.pt", "metrics.json", "metrics.csv", "config.json", "accuracy.png",
                "params.png")
LOCK = ".lock"  # OUT/.lock: held (flock) by the trainer writing OUT, holds its PID
# plot refuses to write over a run's files: its list must know every one of them
assert set(RESULT_FILES) | {LOCK, "tensorboard"} <= set(RUN_FILES), "see plot.RUN_FILES"


@contextlib.contextmanager
def lock_out(out: Path, say):
    """Hold an exclusive flock on OUT/.lock while the block runs: a second trainer started
    into the same OUT is refused, naming the PID that holds it, instead of interleaving its
    files with the first one's. The kernel drops the lock when the process ends, however it
    ends (a lock file left by a killed trainer blocks nothing); the file is removed on
    release. Where flock is missing (no fcntl, a file system without locks) the run goes on
    unlocked, said once."""
    path = out / LOCK
    fd, why = None, "no fcntl on this platform"
    while fcntl is not None:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise ConfigError(f"cannot create the lock file {path}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            finally:
                os.close(fd)
            raise ConfigError(f"{out} is in use by another trainer (PID {pid} holds {path}): "
                              "wait for it to finish, or use another --out") from None
        except OSError as exc:  # e.g. ENOLCK on a network file system
            os.close(fd)
            fd, why = None, str(exc)
            break
        # the previous holder may have removed the file between our open and our flock: then
        # we hold a lock on a file nobody else will see; take the one now at the path
        try:
            st, mine = os.stat(path), os.fstat(fd)
            if (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    if fd is None:
        say(f"warning: cannot lock {path} ({why}): nothing stops a second trainer from "
            "writing into the same directory")
        yield
        return
    try:
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError:  # the PID is only for the message: the lock holds without it
            pass
        yield
    finally:
        path.unlink(missing_ok=True)  # before the unlock: a waiting opener retries (above)
        os.close(fd)


class Outputs:
    """Rank 0's files besides the checkpoint: metrics.json, metrics.csv, PNG plots and
    (optionally) TensorBoard events."""

    def __init__(self, out: Path, cfg: Config, main: bool, log):
        self.out, self.cfg, self.main, self.log = out, cfg, main, log
        self._tb, self._writer = None, None
        self.warned = False
        if main and cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise ConfigError(
                    f"--tensorboard needs the 'tensorboard' package ({exc}); install it with "
                    "'pip install tensorboard' or drop --tensorboard (metrics.json, metrics.csv "
                    "and the PNG plots are written anyway)") from None
            self._writer = SummaryWriter  # made on first use: a refused run writes nothing

    @property
    def tb(self):
        if self._tb is None and self._writer is not None:
            self._tb = self._writer(log_dir=str(self.out / "tensorboard"))
        return self._tb

    def epoch(self, first_epoch: dict):
        """The per-epoch loss callback of a step whose epochs of each loss ``tag`` start at
        ``first_epoch[tag]`` (TensorBoard x axis: epochs over the run)."""
        def on_epoch(tag, epoch, loss):
            if self.tb is not None:
                self.tb.add_scalar(tag, loss, first_epoch[tag] + epoch)
        return on_epoch

    def step(self, metrics: dict) -> None:
        """After every step: metrics.json, metrics.csv, plots, TensorBoard scalars."""
        if not self.main:
            return
        write_json(self.out / "metrics.json", metrics)
        from ..plot import write_run_outputs

        try:
            msg = write_run_outputs(self.out, metrics, plots=self.cfg.plots)
        except OSError as exc:  # metrics.csv
            raise WriteFailed(str(exc)) from exc
        if msg and not self.warned:
            self.log(f"warning: {msg}")
            self.warned = True
        if self.tb is not None and metrics["steps"]:
            row = metrics["steps"][-1]
            t = row["step"]
            for k in ("top1", "top5", "nme_top1", "params", "params_unpruned", "memory_size",
                      "loss_stage1", "loss_stage2", "time_total_s"):
                if k in row:
                    self.tb.add_scalar(f"step/{k}", row[k], t)
            self.tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        self._tb, self._writer = None, None


def format_table(steps: list) -> str:
    """One line per step. ``nme``: top-1 of the nearest mean of exemplars (PyCIL's NME);
    ``extractors``: parameters of all extractors (pruned / unpruned);
    ``keep``: the newest extractor's kept fraction; ``MMACs``: multiply-accumulates of one
    image through the super-feature extractor, in millions (pruned / unpruned)."""
    head = (f"{'step':>4} {'classes':>7} {'top1':>7} {'top5':>7} {'nme':>7} "
            f"{'extractors':>10} {'unpruned':>10} {'keep':>5} {'MMACs':>7} {'unpruned':>8} "
            f"{'stage1 s':>9} {'stage2 s':>9}")
    lines = [head, "-" * len(head)]
    for s in steps:
        top5 = f"{s['top5']:7.2f}" if "top5" in s else f"{'-':>7}"
        nme = f"{s['nme_top1']:7.2f}" if "nme_top1" in s else f"{'-':>7}"
        unp = f"{sum(s['extractor_params_unpruned']):>10,}" \
            if "extractor_params_unpruned" in s else f"{'-':>10}"
        keep = f"{s['keep']:5.2f}" if "keep" in s else f"{'-':>5}"
        macs = f"{s['macs'] / 1e6:7.1f}" if "macs" in s else f"{'-':>7}"
        unm = f"{s['macs_unpruned'] / 1e6:8.1f}" if "macs_unpruned" in s else f"{'-':>8}"
        lines.append(f"{s['step']:>4} {s['n_classes']:>7} {s['top1']:7.2f} {top5} {nme} "
                     f"{sum(s['extractor_params']):>10,} {unp} {keep} {macs} {unm} "
                     f"{s['time_stage1_s']:9.1f} {s['time_stage2_s']:9.1f}")
    return "\n".join(lines)


def env_info(device, d: Optional[Dist] = None) -> dict:
    """Versions, device and platform, recorded in metrics.json."""
    gpu = None
    if device.type == "cuda":
        gpu = torch.cuda.get_device_name(device.index if device.index is not None else 0)
    return {"der_fast": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version(), "device": str(device),
            "platform": platform.platform(), "cpu_threads": torch.get_num_threads(), "gpu": gpu,
            "world_size": d.world if d is not None else 1,
            "dist_backend": d.backend if d is not None and d.active else None}
