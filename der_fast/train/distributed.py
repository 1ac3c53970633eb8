"""Data-parallel training: the process group, DDP wrapping and BatchNorm over micro-batches.

Under ``torchrun --nproc_per_node N -m der_fast.train`` every global batch (``--batch-size``)
is the batch a single process would draw (same shuffled order, same augmentation draws); it
is cut into N x ``--accum-steps`` contiguous micro-batches and process r trains on its share.
Losses are weighted so the averaged gradient is the gradient of the global batch mean.
BatchNorm is per micro-batch (per rank, no SyncBatchNorm); its running statistics are
averaged over all micro-batches and ranks after every batch, so all ranks hold the same model
and ``N`` processes train like 1 process with ``--accum-steps N`` (same batches, same
gradients, up to float rounding). Herding and evaluation run on rank 0 (the memory is
broadcast), and rank 0 alone prints and writes metrics, plots and checkpoints."""

from __future__ import annotations

import datetime
import os
import warnings
from typing import Optional

import torch

from .config import Config, ConfigError
from .faults import STOP


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


class Dist:
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
    def setup(cfg: Config) -> "Dist":
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():  # set up by the caller
            lr = os.environ.get("LOCAL_RANK")
            device = _device(cfg.device, int(lr) if lr is not None else None)
            return Dist(dist.get_rank(), dist.get_world_size(), lr, True, False,
                        dist.get_backend(), device)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return Dist(device=_device(cfg.device))
        if not dist.is_available():
            raise ConfigError("WORLD_SIZE > 1 but this torch has no torch.distributed")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = _device(cfg.device, local)
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # rank 0 alone herds and evaluates while the others wait in a broadcast: allow time
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=60))
        return Dist(dist.get_rank(), dist.get_world_size(), local, True, True, backend, device)

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
        return self.any(STOP["signum"])[0]


def wrap_ddp(model, d: Dist):
    """DDP around the model for a training stage (re-wrapped after every structural change;
    only parameters with requires_grad take part, so frozen extractors are not reduced)."""
    if not d.active:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [d.device.index] if d.device.type == "cuda" else None
    # broadcast_buffers=False: BatchNorm running statistics are averaged over ranks after
    # every batch instead (BNAverage), never copied from rank 0. Parameters outside the
    # stage's loss (the auxiliary classifier at step 0, with lambda_a = 0, in stage 2) do not
    # require grad during the stage (loop.train_epochs), so DDP's strict default mode
    # (find_unused_parameters=False) applies and fails loudly on any other unused parameter.
    with warnings.catch_warnings():  # newer torch: broadcast_buffers -> forward_sync_buffers
        warnings.simplefilter("ignore", FutureWarning)
        return DDP(model, device_ids=ids, broadcast_buffers=False, find_unused_parameters=False)


class BNAverage:
    """Per-micro-batch BatchNorm with one set of running statistics.

    Every micro-batch of a batch (this process's ``--accum-steps`` pieces, and the pieces of
    the other ranks) starts from the same running statistics; after the batch they are set to
    the mean, over all pieces of the batch, of the statistics each piece gave (summed in
    float64 over micro-batches and ranks), counted as one batch. So all ranks keep identical
    BatchNorm buffers, and N processes give the same buffers as 1 process with
    ``--accum-steps N`` (bit for bit when the float64 sums are exact, e.g. N = 2)."""

    def __init__(self, model, d: Dist, pieces: int):
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
