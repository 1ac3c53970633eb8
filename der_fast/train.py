"""The whole DER pipeline: ``python -m der_fast.train [flags]``.

Per step t: update_fc -> stage 1 (CE + aux CE + lambda_s * sparsity, masks annealed per batch)
-> pruning -> stage 2 (balanced classifier re-training with temperature, or weight aligning)
-> herding memory update -> evaluation. A checkpoint is written atomically after every stage;
``--resume DIR`` continues from the last complete one and reproduces an uninterrupted run.

Published protocols are presets (``--preset cifar100-b0-10``, :mod:`der_fast.presets`).
Under ``torchrun --nproc_per_node N -m der_fast.train`` the training stages run with
DistributedDataParallel: every global batch (``--batch-size``) is the batch a single process
would draw (same shuffled order, same augmentation draws); it is cut into N x
``--accum-steps`` contiguous micro-batches and process r trains on its share. Losses are
weighted so the averaged gradient is the gradient of the global batch mean. BatchNorm is per
micro-batch (per rank, no SyncBatchNorm); its running statistics are averaged over all
micro-batches and ranks after every batch, so all ranks hold the same model and ``N``
processes train like 1 process with ``--accum-steps N`` (same batches, same gradients, up to
float rounding). Herding and evaluation run on rank 0 (the memory is broadcast), and
rank 0 alone prints and writes metrics, plots and checkpoints.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import os
import platform
import signal
import sys
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from . import __version__
from . import data as D
from . import presets as P
from .backbones import ARCHS
from .masks import MASK_INIT, MASK_LR, BudgetController, anneal_s, shift_to_budget
from .objective import aux_targets, make_optimizer, stage1_loss, stage2_loss

__all__ = ["Config", "ConfigError", "NonFiniteLoss", "Interrupted", "aux_targets",
           "run", "main", "config_from_args"]

STAGE2_MODES = ("retrain", "weight_align", "none")
IMPLS = ("reference", "fast")
S_ANNEAL = ("epoch", "fixed")


class ConfigError(ValueError):
    """A bad configuration (clear message, non-zero exit from the CLI)."""


@dataclass
class Config:
    """Every knob of a run; saved with the results. Defaults: the offline demo run."""

    dataset: str = "fashion_mnist"
    data_root: Optional[str] = None
    download: bool = False
    # the default run uses the first 600/200 images per class: exactly the shipped subset, so it
    # gives the same result with or without the full Fashion-MNIST installed (0 = all images)
    train_per_class: Optional[int] = 600
    test_per_class: Optional[int] = 200
    backbone: str = "resnet32"
    init_cls: int = 2
    increment: int = 2
    class_seed: int = 1993
    memory_total: Optional[int] = 200
    memory_per_class: Optional[int] = None
    epochs: int = 4
    warmup_epochs: int = 0
    milestones: list = field(default_factory=list)  # stage-1 epochs where lr *= 0.1
    batch_size: int = 64
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lambda_a: float = 1.0
    # the parameter budget: fraction of each new extractor's parameters that pruning keeps
    # (lambda_s is then adapted during stage 1 to land there); None = manual lambda_s
    keep: Optional[float] = 0.2
    lambda_s: Optional[float] = None  # manual sparsity weight (only without keep)
    s_max: float = 400.0
    # mask temperature schedule: "epoch" = HAT/DER (s from 1/s_max to s_max within every epoch),
    # "fixed" = s = s_max throughout (the clamp on e keeps the gates' gradients alive)
    s_anneal: str = "epoch"
    masks: bool = True
    prune: bool = True
    mask_init: float = MASK_INIT
    mask_lr: float = MASK_LR  # plain SGD (no momentum, no decay) for the mask embeddings
    stage2: str = "retrain"
    epochs_stage2: int = 4
    lr_stage2: float = 0.1
    milestones_stage2: list = field(default_factory=list)
    temperature: float = 5.0
    top5: bool = False
    seed: int = 1993
    device: str = "auto"
    impl: str = "fast"
    out: str = "runs/der"
    progress: bool = True
    deterministic: bool = False
    # added with presets / distributed training / result files (defaults: the old behaviour)
    preset: Optional[str] = None  # record of the preset the values came from (see from_preset)
    epochs_scale: float = 1.0  # record: factor --epochs-scale already applied to the schedule
    color_jitter: float = 0.0  # ColorJitter(brightness=b) in stage-1/2 training batches
    accum_steps: int = 1  # micro-batches per batch (per process), BatchNorm per micro-batch
    plots: bool = True  # accuracy.png / params.png after every step (metrics.csv always)
    tensorboard: bool = False  # TensorBoard event files in OUT/tensorboard

    @classmethod
    def from_preset(cls, name: str, epochs_scale: float = 1.0, **overrides) -> "Config":
        """A preset's config (see :mod:`der_fast.presets`), its schedule scaled by
        ``epochs_scale``, then ``overrides`` taken literally."""
        try:
            d = P.preset_config(name)
        except KeyError as exc:
            raise ConfigError(exc.args[0]) from None
        d = _merge(asdict(cls()), d)
        if epochs_scale != 1.0:
            d = P.scale_schedule(d, epochs_scale)
            d["epochs_scale"] = epochs_scale
        return cls.from_dict(_merge(d, overrides)).validate()

    def validate(self) -> "Config":
        if self.backbone not in ARCHS:
            raise ConfigError(f"unknown backbone {self.backbone!r}; choose one of {sorted(ARCHS)}")
        if self.impl not in IMPLS:
            raise ConfigError(f"unknown impl {self.impl!r}; choose one of {IMPLS}")
        if self.stage2 not in STAGE2_MODES:
            raise ConfigError(f"unknown stage2 {self.stage2!r}; choose one of {STAGE2_MODES}")
        if (self.memory_total is None) == (self.memory_per_class is None):
            raise ConfigError("give exactly one of memory_total / memory_per_class")
        for name in ("epochs", "batch_size", "increment"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("epochs_stage2", "warmup_epochs", "init_cls"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.s_anneal not in S_ANNEAL:
            raise ConfigError(f"s_anneal must be one of {S_ANNEAL}, got {self.s_anneal!r}")
        if self.lr <= 0 or self.lr_stage2 <= 0 or self.s_max <= 0 or self.temperature <= 0:
            raise ConfigError("lr, lr_stage2, s_max and temperature must be > 0")
        if self.lambda_a < 0:
            raise ConfigError("lambda_a must be >= 0")
        if (self.keep is None) == (self.lambda_s is None):
            raise ConfigError("give exactly one of keep (a parameter budget) / lambda_s (a "
                              "manual sparsity weight)")
        if self.lambda_s is not None and not self.lambda_s >= 0:
            raise ConfigError(f"lambda_s must be >= 0, got {self.lambda_s}")
        if self.keep is not None and not 0.0 < self.keep <= 1.0:
            raise ConfigError(f"keep must be in (0, 1], got {self.keep}")
        if not self.mask_lr > 0:
            raise ConfigError(f"mask_lr must be > 0, got {self.mask_lr}")
        if self.prune and not self.masks:
            raise ConfigError("pruning needs masks: use --no-prune with --no-masks")
        if self.accum_steps < 1:
            raise ConfigError(f"accum_steps must be >= 1, got {self.accum_steps}")
        if not 0.0 <= self.color_jitter <= 1.0:
            raise ConfigError(f"color_jitter (brightness) must be in [0, 1], got "
                              f"{self.color_jitter}")
        if not self.epochs_scale > 0:
            raise ConfigError(f"epochs_scale must be > 0, got {self.epochs_scale}")
        if self.preset is not None and self.preset not in P.PRESETS:
            raise ConfigError(f"unknown preset {self.preset!r}; choose one of "
                              f"{', '.join(sorted(P.PRESETS))}")
        if self.accum_steps > self.batch_size:
            raise ConfigError(f"accum_steps ({self.accum_steps}) cannot exceed batch_size "
                              f"({self.batch_size})")
        for name in ("train_per_class", "test_per_class"):
            if getattr(self, name) == 0:
                setattr(self, name, None)  # 0 = all images
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 0 (0 = all)")
        return self

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown config keys {unknown}")
        return cls(**d)


def _merge(base: dict, layer: dict) -> dict:
    """``base`` updated with ``layer``; a layer that sets one memory budget (total or per
    class) clears the other, so ``--memory N`` overrides a per-class preset and vice versa;
    likewise a parameter budget ``keep`` and a manual ``lambda_s``."""
    out = dict(base)
    out.update(layer)
    for mine, other in (("memory_total", "memory_per_class"),
                        ("memory_per_class", "memory_total"),
                        ("keep", "lambda_s"), ("lambda_s", "keep")):
        if layer.get(mine) is not None and other not in layer:
            out[other] = None
    return out


# ------------------------------------------------------------------------------ helpers
def _device(name: str, local_rank: Optional[int] = None) -> torch.device:
    """``auto``: CUDA when available. Under torchrun (``local_rank`` given) ``auto`` and
    ``cuda`` mean ``cuda:LOCAL_RANK``; an explicit ``cuda:N`` is kept."""
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        name = "cuda"
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available")
    if dev.type == "cuda" and dev.index is None and local_rank is not None:
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} "
                              "CUDA devices are visible: use --nproc_per_node <= #GPUs")
        dev = torch.device("cuda", local_rank)
    return dev


def _model_class(impl: str):
    if impl == "reference":
        from .reference import DERNet
        return DERNet
    from .fast import FastDERNet
    return FastDERNet


def _gen(seed: int, *salt: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(int(np.random.SeedSequence([seed, *salt]).generate_state(1)[0]))
    return g


def _lr_at(epoch: int, base: float, warmup: int, milestones) -> float:
    if warmup and epoch < warmup:
        return base * (epoch + 1) / warmup
    return base * 0.1 ** sum(epoch >= m for m in milestones)


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return None
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _write_json(path: Path, obj) -> None:
    _atomic_write(path, lambda p: p.write_text(json.dumps(obj, indent=2)))


# ------------------------------------------------------------------------------ faults
class NonFiniteLoss(RuntimeError):
    pass


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


# ------------------------------------------------------------------------------ distributed
class _Dist:
    """This process's place in a torch.distributed job (world 1 and inactive when alone).

    Collectives are no-ops unless a process group is active. ``agree`` runs a function on
    rank 0 and broadcasts its result or its error, so every rank raises the same error
    instead of waiting forever for a rank that failed."""

    def __init__(self, rank=0, world=1, local_rank=None, active=False, owns=False,
                 backend=None, device=None):
        self.rank, self.world, self.local_rank = rank, world, local_rank
        self.active, self.owns, self.backend = active, owns, backend
        self.device = device if device is not None else torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @staticmethod
    def setup(cfg: "Config") -> "_Dist":
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():  # set up by the caller
            lr = os.environ.get("LOCAL_RANK")
            device = _device(cfg.device, int(lr) if lr is not None else None)
            return _Dist(dist.get_rank(), dist.get_world_size(), lr, True, False,
                         dist.get_backend(), device)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return _Dist(device=_device(cfg.device))
        if not dist.is_available():
            raise ConfigError("WORLD_SIZE > 1 but this torch has no torch.distributed")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = _device(cfg.device, local)
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # rank 0 alone herds and evaluates while the others wait in a broadcast: allow time
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=60))
        return _Dist(dist.get_rank(), dist.get_world_size(), local, True, True, backend, device)

    def close(self, ok: bool = True) -> None:
        """Tear down the process group this run created. After a normal finish every rank
        first meets in a barrier: a rank that destroys its gloo group while a peer still has
        work in flight can make that peer abort at exit ("terminate called without an active
        exception", seen once in 20 runs of the 2-process test on a loaded 2-core machine).
        After an error there is no barrier (the peers may never arrive)."""
        if self.owns:
            import torch.distributed as dist

            if dist.is_initialized():
                if ok:
                    dist.barrier()
                dist.destroy_process_group()
            self.owns = False

    def _comm_device(self):
        return self.device if self.backend == "nccl" else torch.device("cpu")

    def any(self, *flags) -> list:
        """Element-wise max of integer flags over ranks."""
        if not self.active:
            return [int(f) for f in flags]
        import torch.distributed as dist

        t = torch.tensor([int(f) for f in flags], dtype=torch.int64, device=self._comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [int(v) for v in t.tolist()]

    def sum(self, *values) -> list:
        if not self.active:
            return list(values)
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t)
        return t.tolist()

    def broadcast(self, obj):
        if not self.active:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self._comm_device())
        return box[0]

    def agree(self, fn):
        """``fn()`` on rank 0, result broadcast to every rank; an error on rank 0 is raised on
        every rank (the same ConfigError/DataError, or a RuntimeError elsewhere)."""
        if not self.active:
            return fn()
        res, err = None, None
        if self.main:
            try:
                res = fn()
            except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
                err = exc
        kind, payload = self.broadcast(
            ("ok", res) if err is None else ("err", (type(err).__name__, str(err))))
        if err is not None:
            raise err
        if kind == "err":
            name, msg = payload
            if name in ("ConfigError", "DataError"):
                raise ConfigError(msg)
            raise RuntimeError(f"rank 0 failed: {name}: {msg}")
        return payload

    def agree_all(self, fn):
        """``fn()`` on every rank; if any rank fails, every rank raises (rank order)."""
        if not self.active:
            return fn()
        import torch.distributed as dist

        res, err = None, None
        try:
            res = fn()
        except Exception as exc:  # noqa: BLE001
            err = exc
        errs = [None] * self.world
        dist.all_gather_object(errs, None if err is None else (type(err).__name__, str(err)))
        if err is not None:
            raise err
        for e in errs:
            if e is not None:
                raise ConfigError(e[1]) if e[0] in ("ConfigError", "DataError") else \
                    RuntimeError(f"another rank failed: {e[0]}: {e[1]}")
        return res

    def stop_requested(self) -> int:
        """Signal number if any rank got SIGTERM (agreed over ranks), else 0."""
        return self.any(_STOP["signum"])[0]


def _wrap(model, d: _Dist):
    """DDP around the model for a training stage (re-wrapped after every structural change;
    only parameters with requires_grad take part, so frozen extractors are not reduced)."""
    if not d.active:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [d.device.index] if d.device.type == "cuda" else None
    # broadcast_buffers=False: BatchNorm running statistics are averaged over ranks after
    # every batch instead (_BNAverage), never copied from rank 0. Parameters outside the
    # stage's loss (the auxiliary classifier at step 0, with lambda_a = 0, in stage 2) do not
    # require grad during the stage (_run_epochs), so DDP's strict default mode
    # (find_unused_parameters=False) applies and fails loudly on any other unused parameter.
    with warnings.catch_warnings():  # newer torch: broadcast_buffers -> forward_sync_buffers
        warnings.simplefilter("ignore", FutureWarning)
        return DDP(model, device_ids=ids, broadcast_buffers=False, find_unused_parameters=False)


# ------------------------------------------------------------------------------ batches
def _jitter_factors(n: int, brightness: float, gen: torch.Generator) -> torch.Tensor:
    """torchvision's ColorJitter(brightness=b) factors, uniform in [max(0, 1-b), 1+b]."""
    lo, hi = max(0.0, 1.0 - brightness), 1.0 + brightness
    return lo + (hi - lo) * torch.rand(n, generator=gen)


def _brightness(x: torch.Tensor, factors: torch.Tensor, info) -> torch.Tensor:
    """Brightness jitter on a normalised batch, in pixel space [0, 1] (clamped, like
    torchvision's adjust_brightness), then normalised again."""
    mean = torch.as_tensor(info.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std = torch.as_tensor(info.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    f = factors.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)
    return ((x * std + mean) * f).clamp_(0.0, 1.0).sub_(mean).div_(std)


def _train_batches(data, indices, cfg, gen, device, chunks: int = 1, mine=(0,),
                   force_sharded: bool = False):
    """Yield ``(parts, n)`` per global batch of ``cfg.batch_size``: ``n`` its size and
    ``parts`` this process's micro-batches ``[(x, y), ...]``.

    The global batches are exactly those of one process (``data.batches`` with shuffle and
    augmentation from ``gen``, then brightness jitter from ``gen``); each is cut into
    ``chunks`` contiguous pieces (piece k = rows ``[k n // chunks, (k+1) n // chunks)``) and
    ``mine`` lists the pieces of this process. Every rank makes the same random draws, so
    the pieces of all ranks put together are the single-process batch (same images, same
    crops, flips and jitter). A final batch with fewer than ``chunks`` images is skipped
    (only possible with chunks > 1)."""
    bs, cj, info = cfg.batch_size, cfg.color_jitter, data.info
    if chunks == 1 and not force_sharded:
        for x, y in data.batches("train", indices, bs, augment=True, shuffle=True,
                                 generator=gen, device=device):
            if cj > 0:
                x = _brightness(x, _jitter_factors(len(y), cj, gen), info)
            yield [(x, y)], len(y)
        return
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if len(idx):  # the draw order of data.iterate_batches: permutation first
        idx = idx[torch.randperm(len(idx), generator=gen).numpy()]
    labels = data.labels("train")
    n_all = len(idx)
    spans = [(s, min(bs, n_all - s)) for s in range(0, n_all, bs)]

    def cut(nb, k):
        return k * nb // chunks, (k + 1) * nb // chunks

    ds = data.dataset
    if ds.in_memory:
        images = ds.images("train")
        dev = torch.device(device) if device is not None else images.device
        y_all = torch.from_numpy(labels)
        pad, flip = info.crop_padding, info.flip
        for s, nb in spans:
            b = idx[s:s + nb]
            draw = nb > 0 and (pad or flip)  # data.augment_batch's draws, whole batch
            if draw:
                i, j, f = D.sample_augment_params(nb, pad, flip, gen)
            fac = _jitter_factors(nb, cj, gen) if cj > 0 else None
            if nb < chunks:
                continue
            parts = []
            for k in mine:
                lo, hi = cut(nb, k)
                bb = torch.from_numpy(b[lo:hi])
                x = images[bb.to(images.device)].to(dev, non_blocking=True)
                if draw:
                    x = D.crop_flip(x, i[lo:hi], j[lo:hi], f[lo:hi], pad)
                x = D.normalize_batch(x, info.mean, info.std)
                if fac is not None:
                    x = _brightness(x, fac[lo:hi], info)
                parts.append((x, y_all[bb].to(dev, non_blocking=True)))
            yield parts, nb
        return
    # path-based (ImageFolder): the same per-image seeds as data.iterate_batches
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=gen).item())
    tds = D.TransformDataset(ds, "train", idx, train=True, labels=labels, seed=seed)
    sampler = [list(range(s + cut(nb, k)[0], s + cut(nb, k)[1]))
               for s, nb in spans if nb >= chunks for k in mine]
    pin = device is not None and torch.device(device).type == "cuda"
    it = iter(torch.utils.data.DataLoader(tds, batch_sampler=sampler, pin_memory=pin))
    for s, nb in spans:
        fac = _jitter_factors(nb, cj, gen) if cj > 0 else None
        if nb < chunks:
            continue
        parts = []
        for k in mine:
            x, y = next(it)
            if device is not None:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if fac is not None:
                lo, hi = cut(nb, k)
                x = _brightness(x, fac[lo:hi], info)
            parts.append((x, y))
        yield parts, nb


class _BNAverage:
    """Per-micro-batch BatchNorm with one set of running statistics.

    Every micro-batch of a batch (this process's ``--accum-steps`` pieces, and the pieces of
    the other ranks) starts from the same running statistics; after the batch they are set to
    the mean, over all pieces of the batch, of the statistics each piece gave (summed in
    float64 over micro-batches and ranks), counted as one batch. So all ranks keep identical
    BatchNorm buffers, and N processes give the same buffers as 1 process with
    ``--accum-steps N`` (bit for bit when the float64 sums are exact, e.g. N = 2)."""

    def __init__(self, model, d: "_Dist", pieces: int):
        self.d, self.pieces = d, pieces
        self.bns = [m for m in model.modules()
                    if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training
                    and m.track_running_stats and m.running_mean is not None]
        self.start = [(m.running_mean.clone(), m.running_var.clone(),
                       m.num_batches_tracked.clone()) for m in self.bns]
        self.acc = None

    def before(self, k: int) -> None:
        if k > 0:
            with torch.no_grad():
                for m, (rm, rv, nbt) in zip(self.bns, self.start):
                    m.running_mean.copy_(rm)
                    m.running_var.copy_(rv)
                    m.num_batches_tracked.copy_(nbt)

    def after(self) -> None:
        if not self.bns:
            return
        cur = torch.cat([torch.cat([m.running_mean.detach().double(),
                                    m.running_var.detach().double()]) for m in self.bns])
        self.acc = cur if self.acc is None else self.acc + cur

    def finish(self) -> None:
        if not self.bns:
            return
        total = self.acc
        if self.d.active and self.d.world > 1:
            import torch.distributed as dist

            total = total.to(self.d._comm_device())
            dist.all_reduce(total)
        mean = (total / self.pieces).to(self.bns[0].running_mean.device)
        with torch.no_grad():
            o = 0
            for m in self.bns:
                c = m.running_mean.numel()
                m.running_mean.copy_(mean[o:o + c])
                m.running_var.copy_(mean[o + c:o + 2 * c])
                o += 2 * c


# ------------------------------------------------------------------------------ stages
@dataclass
class _Runtime:
    """What the stages need besides the config: the distributed context and an optional
    per-epoch callback (TensorBoard)."""

    dist: _Dist = field(default_factory=_Dist)
    on_epoch: Optional[object] = None  # callable(tag, epoch, loss)


def _run_epochs(model, params, data, indices, cfg, *, epochs, lr, milestones, warmup, seed_salt,
                device, loss_fn, after_backward=None, after_step=None, desc="", s_anneal=False,
                rt: Optional[_Runtime] = None, tag: str = ""):
    """Generic SGD loop; returns the mean loss of the last epoch (over all ranks).

    ``loss_fn(net, x, y)`` gets the DDP wrapper (or the model). With several micro-batches
    per process (``--accum-steps``) or several processes, micro-batch k of a batch of n
    images has loss weight world * n_k / n: DDP's gradient average is then the gradient of the
    global batch's mean loss. Gradient compensation (``after_backward``) runs after
    ``backward()``, i.e. after DDP's all-reduce, and the clamp (``after_step``) after the
    optimiser step, identically on every rank."""
    rt = rt or _Runtime()
    opt = make_optimizer(params, lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                         mask_lr=cfg.mask_lr)
    # only the parameters being trained require grad during the stage (DDP reduces exactly
    # those; e.g. the auxiliary classifier is out of stage 2's loss); restored afterwards
    training = {id(p) for _, p in params}
    paused = [p for p in model.parameters() if p.requires_grad and id(p) not in training]
    for p in paused:
        p.requires_grad_(False)
    try:
        return _epochs_loop(model, opt, data, indices, cfg, epochs=epochs, lr=lr,
                            milestones=milestones, warmup=warmup, seed_salt=seed_salt,
                            device=device, loss_fn=loss_fn, after_backward=after_backward,
                            after_step=after_step, desc=desc, s_anneal=s_anneal, rt=rt, tag=tag)
    finally:
        for p in paused:
            p.requires_grad_(True)


def _epochs_loop(model, opt, data, indices, cfg, *, epochs, lr, milestones, warmup, seed_salt,
                 device, loss_fn, after_backward, after_step, desc, s_anneal, rt, tag):
    d = rt.dist
    net = _wrap(model, d)
    chunks = d.world * cfg.accum_steps
    mine = list(range(d.rank * cfg.accum_steps, (d.rank + 1) * cfg.accum_steps))
    pick = indices if callable(indices) else (lambda epoch: indices)
    bar = None
    last = float("nan")
    for epoch in range(epochs):
        for g in opt.param_groups:
            if g["scheduled"]:
                g["lr"] = _lr_at(epoch, lr, warmup, milestones)
        idx = pick(epoch)
        n_batches = max(1, math.ceil(len(idx) / cfg.batch_size))
        if bar is None:
            bar = _progress(epochs * n_batches, desc, cfg.progress and d.main)
        gen = _gen(cfg.seed, *seed_salt, epoch)
        total, count = 0.0, 0
        net.train()
        for b, (parts, n) in enumerate(_train_batches(data, idx, cfg, gen, device, chunks,
                                                      mine)):
            s = anneal_s(b, n_batches, cfg.s_max) if s_anneal else None
            if s is not None:
                model.set_s(s)
            opt.zero_grad(set_to_none=True)
            bn = _BNAverage(model, d, chunks) if chunks > 1 else None
            bad = False
            loss = None
            for k, (x, y) in enumerate(parts):
                final = k == len(parts) - 1
                if bn is not None:
                    bn.before(k)
                no_sync = net.no_sync() if (net is not model and not final) else \
                    contextlib.nullcontext()
                with no_sync:
                    loss = loss_fn(net, x, y)
                    value = float(loss.detach())
                    if math.isfinite(value):
                        total += value * len(y)
                        count += len(y)
                    else:
                        bad = True
                    w = d.world * len(y) / n
                    if w != 1.0:
                        loss = loss * w
                    if not final and not bad:
                        loss.backward()
                if bn is not None:
                    bn.after()
            bad, stop = d.any(bad, _STOP["signum"])  # every rank decides the same
            if bad:
                raise NonFiniteLoss(f"{desc}: non-finite loss at epoch {epoch}, batch {b}")
            if stop:
                raise Interrupted(stop, f"{desc} (epoch {epoch}, batch {b})")
            loss.backward()  # the synchronising backward under DDP
            if bn is not None:  # after backward: BN saved its buffers for it
                bn.finish()
            if after_backward is not None:
                after_backward(s)
            opt.step()
            if after_step is not None:
                after_step()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{total / max(count, 1):.3f}")
        total, count = d.sum(total, count)
        last = total / max(count, 1)
        if rt.on_epoch is not None and tag:
            rt.on_epoch(tag, epoch, last)
    if bar is not None:
        bar.close()
    return last


def stage1(model, data, indices, cfg, t, n_old, device, rt: Optional[_Runtime] = None,
           lambda_s0: Optional[float] = None, report: Optional[dict] = None) -> float:
    """Representation learning of step t: CE + aux CE + lambda_s * sparsity, masks annealed.

    With a budget (``cfg.keep``) lambda_s starts at ``lambda_s0`` (the previous step's final
    value) and is adapted after every step (:class:`masks.BudgetController`). ``report``
    receives ``lambda_s`` (final) and ``keep_trace`` (the binary keep ratio after each
    epoch)."""
    rt = rt or _Runtime()
    report = {} if report is None else report
    lambda_a = cfg.lambda_a if t > 0 else 0.0
    use_masks = model.convnets[-1].mask_e is not None
    aux_used = lambda_a > 0 and len(model.convnets) > 1
    # the auxiliary classifier is trained only when it is in the loss (at step 0 or with
    # lambda_a = 0 it gets no gradient anyway; DDP needs every trained parameter used)
    params = [(n, p) for n, p in model.named_parameters()
              if p.requires_grad and (aux_used or not n.startswith("aux_fc."))]

    new = model.convnets[-1]
    control = None
    if use_masks and cfg.keep is not None:
        n_batches = max(1, math.ceil(len(indices) / cfg.batch_size))
        control = BudgetController(cfg.keep, cfg.epochs * n_batches,
                                   lambda_s0 if lambda_s0 is not None else 1.0)
    lam = [control.lam if control is not None else (cfg.lambda_s or 0.0)]

    def loss_fn(net, x, y):
        return stage1_loss(model, net(x), y, n_old, lambda_a if aux_used else 0.0, lam[0])

    def after_step():
        model.clamp_masks(cfg.s_max)
        if control is not None and not new.binary_masks:
            lam[0] = control.update(model.keep_ratio())
            if control.finished:  # end of the ramp: land on the budget, fine-tune the rest
                shift_to_budget(new, cfg.keep)
                new.binary_masks = True

    anneal = use_masks and cfg.s_anneal == "epoch"
    if use_masks and not anneal:
        model.set_s(cfg.s_max)
    after_backward = (lambda s: model.compensate_mask_grads(cfg.s_max if s is None else s,
                                                            cfg.s_max)) if use_masks else None
    trace = []

    def on_epoch(tag, epoch, loss):
        if use_masks:
            trace.append(round(model.keep_ratio(), 4))
        if rt.on_epoch is not None:
            rt.on_epoch(tag, epoch, loss)

    milestones = cfg.milestones or [int(0.6 * cfg.epochs), int(0.85 * cfg.epochs)]
    loss = _run_epochs(model, params, data, indices, cfg, epochs=cfg.epochs, lr=cfg.lr,
                       milestones=[m for m in milestones if m > 0], warmup=cfg.warmup_epochs,
                       seed_salt=(t, 1), device=device, loss_fn=loss_fn,
                       after_backward=after_backward,
                       after_step=after_step if use_masks else None,
                       desc=f"step {t} stage 1", s_anneal=anneal,
                       rt=dataclasses.replace(rt, on_epoch=on_epoch), tag="train/loss_stage1")
    if use_masks:
        model.set_s(cfg.s_max)
        new.binary_masks = True
        recalibrate_bn(model, data, indices, cfg, device)
        report["lambda_s"] = lam[0]
        report["keep_trace"] = trace
    return loss


@torch.no_grad()
def recalibrate_bn(model, data, indices, cfg, device) -> None:
    """Re-estimate the newest extractor's BatchNorm statistics with its binary masks: the
    plain average of the batch statistics over ``indices`` (no augmentation). During stage 1
    its masks move from soft (s ~ 0: every gate ~ 1/2) to binary within every epoch, so the
    running averages mix inputs of other scales, and in eval mode the errors compound over
    the layers. Every process computes the same statistics from the same data."""
    net = model.convnets[-1]
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    saved = [m.momentum for m in bns]
    was_training = model.training
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    try:
        for x, _ in data.batches("train", indices, cfg.batch_size, device=device):
            model(x)
    finally:
        for m, mom in zip(bns, saved):
            m.momentum = mom
        model.train(was_training)


def stage2(model, data, pool, cfg, t, device, rt: Optional[_Runtime] = None) -> float:
    """Balanced classifier re-training: every extractor frozen, H_t re-initialised and trained
    alone on a class-balanced subset (re-drawn each epoch) with logits / temperature."""
    model.freeze_conv()
    torch.manual_seed(cfg.seed * 7919 + t)
    model.reset_fc()
    labels = data.labels("train")
    params = list(model.fc.named_parameters())
    milestones = cfg.milestones_stage2 or [max(1, cfg.epochs_stage2 // 2)]

    def loss_fn(net, x, y):
        return stage2_loss(net(x), y, cfg.temperature)

    def subset(epoch):  # re-drawn every epoch
        return pool[D.balanced_subset(labels[pool], generator=_gen(cfg.seed, t, 2, epoch))]

    return _run_epochs(model, params, data, subset, cfg, epochs=cfg.epochs_stage2,
                       lr=cfg.lr_stage2, milestones=milestones, warmup=0, seed_salt=(t, 3),
                       device=device, loss_fn=loss_fn, desc=f"step {t} stage 2", rt=rt,
                       tag="train/loss_stage2")


@torch.no_grad()
def extract(model, data, split, indices, batch_size, device) -> torch.Tensor:
    model.eval()
    feats = [model.extract_vector(x).float().cpu()
             for x, _ in data.batches(split, indices, batch_size, device=device)]
    return torch.cat(feats) if feats else torch.zeros(0, model.feature_dim)


@torch.no_grad()
def evaluate(model, data, t, cfg, device) -> dict:
    """Top-1 (and top-5) on the test images of all seen classes, plus accuracy per task."""
    model.eval()
    idx = data.test_indices(t)
    if cfg.test_per_class is not None:  # the first N test images of each class
        y = data.labels("test")[idx]
        keep = np.concatenate([idx[y == c][: cfg.test_per_class] for c in np.unique(y)])
        idx = np.sort(keep)
    preds, top5_hits, ys = [], [], []
    for x, y in data.batches("test", idx, 2 * cfg.batch_size, device=device):
        logits = model(x)["logits"].float()
        preds.append(logits.argmax(1).cpu())
        k = min(5, logits.shape[1])
        top5_hits.append((logits.topk(k, 1).indices == y[:, None]).any(1).cpu())
        ys.append(y.cpu())
    pred, y, hit5 = torch.cat(preds), torch.cat(ys), torch.cat(top5_hits)
    correct = pred == y
    per_task = []
    lo = 0
    for cls in data.steps[: t + 1]:
        hi = lo + len(cls)
        sel = (y >= lo) & (y < hi)
        per_task.append(100.0 * float(correct[sel].float().mean()) if sel.any() else float("nan"))
        lo = hi
    res = {"top1": 100.0 * float(correct.float().mean()), "per_task_top1": per_task,
           "n_test": int(len(y))}
    if cfg.top5:
        res["top5"] = 100.0 * float(hit5.float().mean())
    return res


def forgetting(per_task_history: list) -> float:
    """Average forgetting: for each task but the last, best accuracy at any earlier step minus
    accuracy at the final step, averaged (0 for a single step)."""
    if len(per_task_history) < 2:
        return 0.0
    final = per_task_history[-1]
    drops = []
    for j in range(len(final) - 1):
        best = max(h[j] for h in per_task_history[:-1] if len(h) > j)
        drops.append(best - final[j])
    return float(np.mean(drops)) if drops else 0.0


# ------------------------------------------------------------------------------ run
def _summary(steps: list) -> dict:
    if not steps:
        return {}
    accs = [s["top1"] for s in steps]
    out = {"avg_incremental_top1": float(np.mean(accs)), "last_top1": accs[-1],
           "forgetting": forgetting([s["per_task_top1"] for s in steps]),
           "avg_params": float(np.mean([s["params"] for s in steps])),
           "final_params": steps[-1]["params"],
           "total_time_s": float(sum(s["time_total_s"] for s in steps))}
    if "top5" in steps[0]:
        out["avg_incremental_top5"] = float(np.mean([s["top5"] for s in steps]))
        out["last_top5"] = steps[-1]["top5"]
    ext = [sum(s["extractor_params"]) for s in steps]
    out["avg_extractor_params"] = float(np.mean(ext))
    out["final_extractor_params"] = ext[-1]
    if all("macs" in s for s in steps):
        out["avg_macs"] = float(np.mean([s["macs"] for s in steps]))
        out["final_macs"] = steps[-1]["macs"]
    if all("params_unpruned" in s for s in steps):
        out["avg_params_unpruned"] = float(np.mean([s["params_unpruned"] for s in steps]))
        unp = [sum(s["extractor_params_unpruned"]) for s in steps]
        out["avg_extractor_params_unpruned"] = float(np.mean(unp))
        out["final_extractor_params_unpruned"] = unp[-1]
        out["avg_macs_unpruned"] = float(np.mean([s["macs_unpruned"] for s in steps]))
        out["final_macs_unpruned"] = steps[-1]["macs_unpruned"]
    return out


def format_table(steps: list) -> str:
    """One line per step. ``extractors``: parameters of all extractors (pruned / unpruned);
    ``keep``: the newest extractor's kept fraction; ``MMACs``: multiply-accumulates of one
    image through the super-feature extractor, in millions (pruned / unpruned)."""
    head = (f"{'step':>4} {'classes':>7} {'top1':>7} {'top5':>7} {'extractors':>10} "
            f"{'unpruned':>10} {'keep':>5} {'MMACs':>7} {'unpruned':>8} {'stage1 s':>9} "
            f"{'stage2 s':>9}")
    lines = [head, "-" * len(head)]
    for s in steps:
        top5 = f"{s['top5']:7.2f}" if "top5" in s else f"{'-':>7}"
        unp = f"{sum(s['extractor_params_unpruned']):>10,}" \
            if "extractor_params_unpruned" in s else f"{'-':>10}"
        keep = f"{s['keep']:5.2f}" if "keep" in s else f"{'-':>5}"
        macs = f"{s['macs'] / 1e6:7.1f}" if "macs" in s else f"{'-':>7}"
        unm = f"{s['macs_unpruned'] / 1e6:8.1f}" if "macs_unpruned" in s else f"{'-':>8}"
        lines.append(f"{s['step']:>4} {s['n_classes']:>7} {s['top1']:7.2f} {top5} "
                     f"{sum(s['extractor_params']):>10,} {unp} {keep} {macs} {unm} "
                     f"{s['time_stage1_s']:9.1f} {s['time_stage2_s']:9.1f}")
    return "\n".join(lines)


def _env_info(device, d: Optional[_Dist] = None) -> dict:
    gpu = None
    if device.type == "cuda":
        gpu = torch.cuda.get_device_name(device.index if device.index is not None else 0)
    return {"der_fast": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version(), "device": str(device),
            "platform": platform.platform(), "cpu_threads": torch.get_num_threads(), "gpu": gpu,
            "world_size": d.world if d is not None else 1,
            "dist_backend": d.backend if d is not None and d.active else None}


def _save_ckpt(out: Path, state: dict) -> None:
    _atomic_write(out / "checkpoint.pt", lambda p: torch.save(state, p))


# fields that do not change the numbers: they may differ when resuming
_RESUME_FREE = {"out", "progress", "device", "impl", "plots", "tensorboard"}


def _load_ckpt(out: Path, cfg: Config) -> Optional[dict]:
    path = out / "checkpoint.pt"
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # corrupt file: never a silent restart
        raise ConfigError(f"checkpoint {path} is corrupt or unreadable: {exc}") from exc
    if not isinstance(state, dict) or "config" not in state or "model" not in state:
        raise ConfigError(f"checkpoint {path} is not a der_fast checkpoint")
    saved = dict(state["config"])
    mine = asdict(cfg)
    default = asdict(Config())  # fields a checkpoint from an older version does not have
    diff = {k: (saved.get(k, default[k]), mine[k]) for k in mine
            if k not in _RESUME_FREE and saved.get(k, default[k]) != mine[k]}
    if diff:
        raise ConfigError(f"checkpoint {path} was made with another config: {diff}")
    return state


class _Outputs:
    """Rank 0's files besides the checkpoint: metrics.json, metrics.csv, PNG plots and
    (optionally) TensorBoard events."""

    def __init__(self, out: Path, cfg: Config, main: bool, log):
        self.out, self.cfg, self.main, self.log = out, cfg, main, log
        self.tb = None
        self.warned = False
        if main and cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise ConfigError(
                    f"--tensorboard needs the 'tensorboard' package ({exc}); install it with "
                    "'pip install tensorboard' or drop --tensorboard (metrics.json, metrics.csv "
                    "and the PNG plots are written anyway)") from None
            self.tb = SummaryWriter(log_dir=str(out / "tensorboard"))

    def epoch(self, t: int, epochs_per_step: dict):
        def on_epoch(tag, epoch, loss):
            if self.tb is not None:
                self.tb.add_scalar(tag, loss, t * max(1, epochs_per_step[tag]) + epoch)
        return on_epoch

    def step(self, metrics: dict) -> None:
        if not self.main:
            return
        _write_json(self.out / "metrics.json", metrics)
        from .plot import write_run_outputs

        msg = write_run_outputs(self.out, metrics, plots=self.cfg.plots)
        if msg and not self.warned:
            self.log(f"warning: {msg}")
            self.warned = True
        if self.tb is not None and metrics["steps"]:
            row = metrics["steps"][-1]
            t = row["step"]
            for k in ("top1", "top5", "params", "params_unpruned", "memory_size",
                      "loss_stage1", "loss_stage2", "time_total_s"):
                if k in row:
                    self.tb.add_scalar(f"step/{k}", row[k], t)
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def run(cfg: Config, resume: bool = False, log=print) -> dict:
    """Run the whole pipeline; returns the metrics dict (also written to OUT/metrics.json).

    Under torchrun (``WORLD_SIZE`` > 1) or inside an initialised torch.distributed process
    group, the training stages run data-parallel (see the module doc); every rank returns the
    same metrics, rank 0 writes the files."""
    cfg.validate()
    d = _Dist.setup(cfg)
    ok = False
    try:
        with _sigterm_handler():
            out = _run(cfg, resume, log, d)
        ok = True
        return out
    finally:
        d.close(ok)


def _probe_out(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"output directory {out} is not writable: {exc}") from exc


def _run(cfg: Config, resume: bool, log, d: _Dist) -> dict:
    device = d.device
    say = log if d.main else (lambda *a, **k: None)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
    if cfg.batch_size < d.world * cfg.accum_steps:
        raise ConfigError(f"batch_size {cfg.batch_size} is smaller than processes x "
                          f"accum_steps = {d.world * cfg.accum_steps}")
    out = Path(cfg.out)
    d.agree(lambda: _probe_out(out))

    def load_data():
        try:
            return D.IncrementalData(cfg.dataset, cfg.init_cls, cfg.increment,
                                     root=cfg.data_root, download=cfg.download and d.main,
                                     seed=cfg.class_seed, max_train_per_class=cfg.train_per_class)
        except D.DataError as exc:
            raise ConfigError(str(exc)) from exc

    if cfg.download and d.active:  # rank 0 downloads first, then everyone reads
        d.agree(lambda: load_data() and None)
    data = d.agree_all(load_data)
    memory = D.Memory(total=cfg.memory_total, per_class=cfg.memory_per_class)
    if cfg.memory_total is not None and cfg.memory_total < data.num_classes:
        raise ConfigError(f"memory_total {cfg.memory_total} is smaller than the number of "
                          f"classes ({data.num_classes})")
    if data.dataset.in_memory and device.type == "cuda":
        data.dataset = data.dataset.to(device)
    holder = {}

    def make_outputs():  # rank 0 (checks --tensorboard); no object crosses processes
        holder["outputs"] = _Outputs(out, cfg, True, say)

    d.agree(make_outputs)
    outputs = holder.get("outputs") or _Outputs(out, cfg, False, say)
    try:
        return _run_steps(cfg, resume, say, d, device, out, data, memory, outputs)
    finally:
        outputs.close()


def _run_steps(cfg, resume, say, d, device, out, data, memory, outputs) -> dict:
    torch.manual_seed(cfg.seed)
    Net = _model_class(cfg.impl)
    model = Net(cfg.backbone, in_channels=data.info.channels, use_masks=cfg.masks,
                mask_init=cfg.mask_init).to(device)
    metrics = {"config": asdict(cfg), "env": _env_info(device, d), "class_order": data.order,
               "steps": [], "summary": {}}
    start_t, start_stage = 0, 0
    if resume:
        def load():
            state = _load_ckpt(out, cfg)
            if state is None:
                raise ConfigError(f"--resume: no checkpoint in {out}")
            return state

        state = d.agree(load)
        model.load_state_dict(state["model"])
        model.to(device)
        memory.load_state_dict(state["memory"])
        metrics["steps"] = state["steps"]
        start_t, start_stage = state["next"]
        partial = state.get("partial", {})
        saved_world = state.get("world_size", 1)
        if saved_world != d.world:
            say(f"warning: the checkpoint was written by {saved_world} process(es), this run "
                f"has {d.world}: BatchNorm sees other micro-batches, so the numbers will not "
                "match an uninterrupted run exactly")
        say(f"resuming {out} at step {start_t}, stage {start_stage}")
    else:
        partial = {}
    if d.main:
        _write_json(out / "config.json", asdict(cfg))
    par = f", {d.world} processes ({d.backend})" if d.active else ""
    say(f"DER on {cfg.dataset} ({data.num_classes} classes, {data.num_steps} steps: "
        f"{cfg.init_cls or cfg.increment} + {cfg.increment}/step), backbone {cfg.backbone}, "
        f"impl {cfg.impl}, device {device}{par}")
    rt = _Runtime(dist=d)
    epochs_per = {"train/loss_stage1": cfg.epochs, "train/loss_stage2": cfg.epochs_stage2}

    def ckpt(next_t, next_stage, partial):
        if d.main:
            _save_ckpt(out, {"config": asdict(cfg), "model": model.state_dict(),
                             "memory": memory.state_dict(), "steps": metrics["steps"],
                             "next": (next_t, next_stage), "partial": partial,
                             "version": __version__, "world_size": d.world})

    def check_stop(done):  # SIGTERM during pruning / herding / evaluation / the writes
        stop = d.stop_requested()
        if stop:
            raise Interrupted(stop, f"the end of {done}")

    hw = (data.info.image_size, data.info.image_size)
    for t in range(start_t, data.num_steps):
        n_old, n_known = data.num_old(t), data.num_known(t)
        stage = start_stage if t == start_t else 0
        rt.on_epoch = outputs.epoch(t, epochs_per)
        if stage == 0:
            partial = {}
            torch.manual_seed(cfg.seed * 1009 + t)
            model.update_fc(n_known)
            model.to(device)
            train_idx = np.concatenate([data.train_indices(t), memory.indices()])
            t0 = time.perf_counter()
            prev = metrics["steps"][-1] if metrics["steps"] else {}
            report = {}
            partial["loss_stage1"] = stage1(model, data, train_idx, cfg, t, n_old, device, rt,
                                            lambda_s0=prev.get("lambda_s"), report=report)
            partial["time_stage1_s"] = time.perf_counter() - t0
            partial.update(report)
            partial["params_unpruned"] = model.num_params()
            partial["extractor_params_unpruned"] = model.extractor_params()
            partial["extractor_macs_unpruned"] = model.extractor_macs(hw)
            if cfg.masks and cfg.prune:
                t0 = time.perf_counter()
                model.prune()
                partial["time_prune_s"] = time.perf_counter() - t0
                partial["keep"] = (model.extractor_params()[-1]
                                   / partial["extractor_params_unpruned"][-1])
            stage = 1
            ckpt(t, 1, partial)
            check_stop(f"step {t} stage 1")
        if stage == 1:
            t0 = time.perf_counter()
            if t > 0 and cfg.stage2 == "retrain" and cfg.epochs_stage2 > 0:
                pool = np.concatenate([data.train_indices(t), memory.indices()])
                partial["loss_stage2"] = stage2(model, data, pool, cfg, t, device, rt)
            elif t > 0 and cfg.stage2 == "weight_align":
                partial["weight_align_gamma"] = model.weight_align(n_known - n_old)
            partial["time_stage2_s"] = time.perf_counter() - t0
            model.freeze_conv()

            def update_memory():  # rank 0 herds; the exemplars are broadcast
                memory.update(
                    lambda idx: extract(model, data, "train", idx, 2 * cfg.batch_size, device),
                    data.labels("train"), data.new_classes(t))
                return memory.state_dict()

            t0 = time.perf_counter()
            mem_state = d.agree(update_memory)
            if not d.main:
                memory.load_state_dict(mem_state)
            partial["time_memory_s"] = time.perf_counter() - t0

            def evaluate_step():
                t0 = time.perf_counter()
                ev = evaluate(model, data, t, cfg, device)
                time_eval = time.perf_counter() - t0
                macs = model.extractor_macs(hw)
                row = {"step": t, "n_classes": n_known, "n_new": n_known - n_old, **ev,
                       "params": model.num_params(),
                       "extractor_params": model.extractor_params(),
                       "macs": sum(macs), "extractor_macs": macs,
                       "memory_size": len(memory), "time_eval_s": time_eval, **partial}
                if cfg.masks and cfg.prune:
                    # unpruned: every extractor at the width it had before its own pruning
                    unp = [s["extractor_params_unpruned"][-1] for s in metrics["steps"]]
                    row["extractor_params_unpruned"] = unp + [
                        row["extractor_params_unpruned"][-1]]
                    row["params_unpruned"] = row["params"] + sum(row["extractor_params_unpruned"]) \
                        - sum(row["extractor_params"])
                    unm = [s["extractor_macs_unpruned"][-1] for s in metrics["steps"]]
                    row["extractor_macs_unpruned"] = unm + [row["extractor_macs_unpruned"][-1]]
                    row["macs_unpruned"] = sum(row["extractor_macs_unpruned"])
                else:
                    for k in ("params_unpruned", "extractor_params_unpruned",
                              "extractor_macs_unpruned"):
                        row.pop(k, None)
                row["time_total_s"] = sum(v for k, v in row.items()
                                          if k.startswith("time_") and k != "time_total_s")
                return row

            row = d.agree(evaluate_step)
            metrics["steps"].append(row)
            metrics["summary"] = _summary(metrics["steps"])
            ckpt(t + 1, 0, {})  # first: metrics.json never runs ahead of the checkpoint
            outputs.step(metrics)
            say(format_table(metrics["steps"][-1:]) if t == 0 and not resume
                else format_table(metrics["steps"][-1:]).splitlines()[-1])
            if t + 1 < data.num_steps:
                check_stop(f"step {t}")
    metrics["summary"] = _summary(metrics["steps"])
    if d.main:
        _write_json(out / "metrics.json", metrics)
    return metrics


# ------------------------------------------------------------------------------ CLI
_EPILOG = """\
presets (published protocols; every value can be overridden by a flag):
  {presets}
  precedence: defaults < --preset < --config FILE.json < flags. --epochs-scale F multiplies
  the schedule (epochs, warm-up, milestones, stage-2 epochs and milestones) coming from the
  defaults, the preset or the config file; epochs given as flags are taken literally.

multi-process (DistributedDataParallel; gloo on CPU, nccl on GPU):
  torchrun --standalone --nproc_per_node 4 -m der_fast.train --preset cifar100-b0-10 ...
  --batch-size is the global batch (split over processes); N processes train like
  1 process with --accum-steps N. Rank 0 writes OUT/.

seeds: --seed fixes data order, initialisation and augmentation; the class order has its
own --class-seed (1993, the field's convention).
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m der_fast.train",
        description="DER (Dynamically Expandable Representation) class-incremental training. "
                    "With no arguments: a multi-step run on Fashion-MNIST (works offline).",
        epilog=_EPILOG.format(presets="\n  ".join(
            f"{k:<18} {v[0]}" for k, v in sorted(P.PRESETS.items()))),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    d = Config()
    a = p.add_argument
    a("--preset", choices=sorted(P.PRESETS),
      help="a published protocol's hyper-parameters (see below; python -m der_fast.presets)")
    a("--epochs-scale", dest="epochs_scale", type=float, metavar="F",
      help="scale the preset/config schedule by F (epochs, warm-up, milestones, stage 2; "
           "each at least 1 epoch) for shortened runs")
    a("--config", help="JSON file with Config fields (flags given on the command line win); "
                       "OUT/config.json of a run is such a file")
    a("--dataset", choices=["fashion_mnist", "cifar100", "imagenet100", "imagefolder"])
    a("--data-root", dest="data_root", help="dataset folder (default: built-in / system copy)")
    a("--download", action="store_true", default=None, help="allow torchvision to download")
    a("--train-per-class", dest="train_per_class", type=int,
      help="use only the first N training images of each class (600; 0 = all)")
    a("--test-per-class", dest="test_per_class", type=int,
      help="evaluate on only the first N test images of each class (200; 0 = all)")
    a("--backbone", choices=sorted(ARCHS))
    a("--init-cls", dest="init_cls", type=int, help="classes in step 0 (0 = same as increment)")
    a("--increment", type=int, help="new classes per later step")
    a("--class-seed", dest="class_seed", type=int, help="seed of the class order (1993)")
    a("--memory", dest="memory_total", type=int, help="exemplar memory, total")
    a("--memory-per-class", dest="memory_per_class", type=int,
      help="exemplar memory per class (instead of --memory)")
    a("--epochs", type=int, help=f"stage-1 epochs per step ({d.epochs})")
    a("--warmup-epochs", dest="warmup_epochs", type=int)
    a("--milestones", type=int, nargs="*", help="stage-1 epochs where lr is divided by 10")
    a("--epochs-stage2", dest="epochs_stage2", type=int, help=f"stage-2 epochs ({d.epochs_stage2})")
    a("--lr-stage2", dest="lr_stage2", type=float)
    a("--milestones-stage2", dest="milestones_stage2", type=int, nargs="*",
      help="stage-2 epochs where lr is divided by 10 (default: half way)")
    a("--batch-size", dest="batch_size", type=int,
      help=f"global batch size, over all processes ({d.batch_size})")
    a("--accum-steps", dest="accum_steps", type=int,
      help="split each (per-process) batch into N micro-batches: gradient accumulation, "
           "BatchNorm per micro-batch (1)")
    a("--lr", type=float)
    a("--momentum", type=float)
    a("--weight-decay", dest="weight_decay", type=float)
    a("--color-jitter", dest="color_jitter", type=float, metavar="B",
      help="ColorJitter brightness B for training batches (0; CIFAR presets: 63/255)")
    a("--lambda-a", dest="lambda_a", type=float, help="auxiliary loss weight")
    a("--keep", type=float, metavar="R",
      help=f"parameter budget: the fraction of each new extractor's parameters that pruning "
           f"keeps; lambda_s is adapted during stage 1 to land there ({d.keep})")
    a("--lambda-s", dest="lambda_s", type=float,
      help="a fixed sparsity loss weight instead of a budget (replaces --keep)")
    a("--s-max", dest="s_max", type=float, help="mask annealing s_max (400)")
    a("--s-anneal", dest="s_anneal", choices=S_ANNEAL,
      help="mask temperature: anneal s to s_max within every epoch (HAT/DER) or keep it "
           "fixed at s_max (epoch)")
    a("--mask-init", dest="mask_init", type=float,
      help=f"initial mask embedding e ({d.mask_init:g})")
    a("--mask-lr", dest="mask_lr", type=float,
      help=f"learning rate of the mask embeddings, plain SGD ({d.mask_lr:g})")
    a("--no-masks", dest="masks", action="store_false", default=None,
      help="DER without masks (and without pruning)")
    a("--masks", dest="masks", action="store_true", default=None, help=argparse.SUPPRESS)
    a("--no-prune", dest="prune", action="store_false", default=None)
    a("--prune", dest="prune", action="store_true", default=None, help=argparse.SUPPRESS)
    a("--stage2", choices=STAGE2_MODES, help="classifier learning: paper's re-training, "
                                             "PyCIL's weight aligning, or none")
    a("--temperature", type=float)
    a("--top5", action="store_true", default=None)
    a("--no-top5", dest="top5", action="store_false", default=None)
    a("--seed", type=int, help="seed of data order, initialisation and augmentation (1993); "
                               "the class order has --class-seed")
    a("--device", help="cpu, cuda, cuda:N or auto (under torchrun: cuda:LOCAL_RANK)")
    a("--impl", choices=IMPLS)
    a("--out", help=f"output directory ({d.out})")
    a("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    a("--no-progress", dest="progress", action="store_false", default=None)
    a("--no-plots", dest="plots", action="store_false", default=None,
      help="do not write accuracy.png / params.png (metrics.csv is always written)")
    a("--tensorboard", action="store_true", default=None,
      help="also log to OUT/tensorboard (needs the tensorboard package)")
    a("--deterministic", action="store_true", default=None)
    return p


def _read_checkpoint_config(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ConfigError(f"checkpoint {path} is corrupt or unreadable: {exc}") from exc
    if not isinstance(state, dict) or not isinstance(state.get("config"), dict):
        raise ConfigError(f"checkpoint {path} is not a der_fast checkpoint")
    return dict(state["config"])


def config_from_args(argv=None):
    """Resolve the command line into a validated Config (and whether to resume).
    Precedence: defaults < --preset (or a config file's "preset") < --config < flags;
    --epochs-scale scales the first three layers' schedule."""
    p = _parser()
    args = p.parse_args(argv)
    special = ("config", "resume", "preset", "epochs_scale")
    given = {k: v for k, v in vars(args).items() if v is not None and k not in special}
    if args.resume:
        if args.preset or args.config:
            raise ConfigError("--resume DIR continues with the config saved in DIR's checkpoint;"
                              " do not combine it with --preset or --config")
        saved = Path(args.resume) / "checkpoint.pt"
        if not saved.exists():
            raise ConfigError(f"--resume: no checkpoint in {args.resume}")
        base = _read_checkpoint_config(saved)
        base["out"] = args.resume
        if args.epochs_scale is not None and \
                args.epochs_scale != base.get("epochs_scale", 1.0):
            raise ConfigError("--epochs-scale cannot change when resuming (the checkpoint's "
                              f"schedule was scaled by {base.get('epochs_scale', 1.0)})")
    else:
        file_cfg = {}
        if args.config:
            try:
                file_cfg = json.loads(Path(args.config).read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise ConfigError(f"cannot read config {args.config}: {exc}") from exc
            if not isinstance(file_cfg, dict):
                raise ConfigError(f"config {args.config} must hold a JSON object")
        base = asdict(Config())
        preset = args.preset or file_cfg.get("preset")
        if preset:
            try:
                base = _merge(base, P.preset_config(preset))
            except KeyError as exc:
                raise ConfigError(exc.args[0]) from None
        base = _merge(base, file_cfg)
        if args.epochs_scale is not None:
            try:
                base = P.scale_schedule(base, args.epochs_scale)
            except (ValueError, TypeError) as exc:
                raise ConfigError(f"--epochs-scale: {exc}") from None
            base["epochs_scale"] = float(base.get("epochs_scale") or 1.0) * args.epochs_scale
    cfg = Config.from_dict(_merge(base, given))
    if cfg.init_cls == 0:
        cfg.init_cls = cfg.increment
    return cfg.validate(), bool(args.resume)


def main(argv=None) -> int:
    rank0 = os.environ.get("RANK", "0") == "0"

    def error(msg):
        if rank0:
            print(f"error: {msg}", file=sys.stderr)

    cfg = None
    try:
        cfg, resume = config_from_args(argv)
        t0 = time.perf_counter()
        metrics = run(cfg, resume=resume)
    except (ConfigError, D.DataError) as exc:
        error(exc)
        return 2
    except NonFiniteLoss as exc:
        error(f"{exc}; stopped: the last good checkpoint (the last complete stage) is kept in "
              f"{cfg.out}")
        return 3
    except Interrupted as exc:
        error(f"{exc}; the last complete stage is checkpointed in {cfg.out}: continue with "
              f"--resume {cfg.out}")
        return 128 + exc.signum
    if not rank0:
        return 0
    s = metrics["summary"]
    print()
    print(format_table(metrics["steps"]))
    print(f"\naverage incremental top-1 {s['avg_incremental_top1']:.2f}  last top-1 "
          f"{s['last_top1']:.2f}  forgetting {s['forgetting']:.2f}  wall "
          f"{time.perf_counter() - t0:.1f} s")
    unp = (f" (unpruned {s['avg_extractor_params_unpruned']:,.0f} / "
           f"{s['final_extractor_params_unpruned']:,})"
           if "avg_extractor_params_unpruned" in s else "")
    print(f"extractor parameters, average over steps / final: "
          f"{s['avg_extractor_params']:,.0f} / {s['final_extractor_params']:,}{unp}")
    print(f"metrics: {Path(cfg.out) / 'metrics.json'} (also metrics.csv, config.json"
          f"{', accuracy.png, params.png' if cfg.plots else ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
