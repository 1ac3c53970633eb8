"""The SGD epoch loop shared by both training stages (lr schedule, micro-batches, DDP, stops)."""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..masks import anneal_s
from ..objective import make_optimizer
from .batches import min_images, seeded_generator, train_batches
from .config import Schedule
from .distributed import BNAverage, Dist, wrap_ddp
from .faults import STOP, Interrupted, NonFiniteLoss


_AUTOCAST = {"bf16": torch.bfloat16, "16": torch.float16}


def autocast(precision: str, device) -> contextlib.AbstractContextManager:
    """The forward's precision context: torch.autocast for ``bf16`` / ``16``, else nothing."""
    dtype = _AUTOCAST.get(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def _lr_at(epoch: int, base: float, warmup: int, milestones) -> float:
    """Linear warm-up over ``warmup`` epochs, then ``base`` divided by 10 at each milestone."""
    if warmup and epoch < warmup:
        return base * (epoch + 1) / warmup
    return base * 0.1 ** sum(epoch >= m for m in milestones)


def _progress(total: int, desc: str, enabled: bool):
    """A tqdm bar on stderr, or None (disabled or tqdm missing)."""
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return None
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)


@dataclass
class Runtime:
    """What the stages need besides the config: the distributed context and an optional
    per-epoch callback (TensorBoard)."""

    dist: Dist = field(default_factory=Dist)
    on_epoch: Optional[object] = None  # callable(tag, epoch, loss)


@dataclass
class BatchStep:
    """What a training stage does with each batch: its loss and the hooks around the step.

    ``loss_fn(net, x, y)`` gets the DDP wrapper (or the model). ``after_backward(s)`` (the
    gradient compensation; ``s`` the batch's mask temperature, or None) runs after
    ``backward()``, i.e. after DDP's all-reduce; ``after_step(opt)`` (the clamp) after the
    optimiser step, identically on every rank, and returns True when it changed the model's
    structure (the early prune of stage 1, which carries ``opt`` over to the pruned
    parameters): the model is then re-wrapped (DDP, compile) for the rest of the stage.
    ``s_anneal``: the mask temperature is annealed within every epoch (``model.set_s`` before
    each batch)."""

    loss_fn: Callable
    after_backward: Optional[Callable] = None
    after_step: Optional[Callable] = None
    s_anneal: bool = False


@contextlib.contextmanager
def _trained_only(model, params):
    """Only ``params`` require grad inside the block (DDP reduces exactly those; e.g. the
    auxiliary classifier is out of stage 2's loss); the others are restored afterwards."""
    training = {id(p) for _, p in params}
    paused = [p for p in model.parameters() if p.requires_grad and id(p) not in training]
    for p in paused:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in paused:
            p.requires_grad_(True)


@contextlib.contextmanager
def _compiled(net, enabled: bool):
    """``torch.compile(net)`` inside the block when ``enabled`` (else ``net``). ``net`` is the
    model or its DDP wrapper (torch compiles DDP's module graph by graph between its gradient
    buckets). The model changed since the last stage (update_fc, prune, freeze_conv), so the
    graphs compiled for it are dropped before (the recompile limit then counts this stage's
    recompiles only) and after the stage (their memory freed)."""
    if not enabled:
        yield net
        return
    torch._dynamo.reset()
    try:
        yield torch.compile(net)
    finally:
        torch._dynamo.reset()


def train_epochs(model, params, data, indices, cfg, schedule: Schedule, batch_step: BatchStep,
                 *, device, seed_salt: tuple, desc: str = "", tag: str = "",
                 rt: Optional[Runtime] = None) -> float:
    """Train ``params`` (``[(name, p)]``) by SGD on ``schedule`` (epochs, lr with its warm-up
    and decays, weight decay), each batch as ``batch_step`` says; returns the mean loss of
    the last epoch (over all ranks).

    ``indices``: the training images, or ``epoch -> indices``. The batches of epoch e are
    drawn from ``seeded_generator(cfg.seed, *seed_salt, e)``. With several micro-batches per
    process (``--accum-steps``) or several processes, micro-batch k of a batch of n images
    has loss weight world * n_k / n: DDP's gradient average is then the gradient of the
    global batch's mean loss. ``desc`` names the stage on the progress bar and in errors;
    ``rt.on_epoch(tag, epoch, loss)`` is called after every epoch when ``tag`` is given."""
    rt = rt or Runtime()
    epochs = schedule.epochs
    opt = make_optimizer(params, schedule.lr, momentum=cfg.momentum,
                         weight_decay=schedule.weight_decay, mask_lr=cfg.mask_lr)
    d = rt.dist
    # float16: the loss is scaled for backward; the gradients are unscaled before the mask
    # compensation and the step (which the scaler skips when they overflowed)
    scaler = torch.amp.GradScaler(torch.device(device).type) if cfg.precision == "16" else None
    scaled = (lambda loss: scaler.scale(loss)) if scaler is not None else (lambda loss: loss)

    def wrap(stack, params):  # the model as this stage trains it: only params trained
        stack.enter_context(_trained_only(model, params))
        return stack.enter_context(_compiled(wrap_ddp(model, d), cfg.compile))

    with contextlib.ExitStack() as outer:
        stack = outer.enter_context(contextlib.ExitStack())
        net = wrap(stack, params)
        chunks = d.world * cfg.accum_steps
        # every micro-batch needs 2 images where the final feature map is 1x1 (the trainer
        # refuses a batch size that is always too small): a smaller last batch is dropped, as
        # train_batches drops one with fewer images than micro-batches
        least = chunks * min_images(model, data)
        mine = list(range(d.rank * cfg.accum_steps, (d.rank + 1) * cfg.accum_steps))
        pick = indices if callable(indices) else (lambda epoch: indices)
        bar = None
        last = float("nan")
        for epoch in range(epochs):
            for g in opt.param_groups:
                if g["scheduled"]:
                    g["lr"] = _lr_at(epoch, schedule.lr, schedule.warmup, schedule.milestones)
            idx = pick(epoch)
            n_batches = max(1, math.ceil(len(idx) / cfg.batch_size))
            if bar is None:
                bar = _progress(epochs * n_batches, desc, cfg.progress and d.main)
            gen = seeded_generator(cfg.seed, *seed_salt, epoch)
            total, count = 0.0, 0
            net.train()
            for b, (parts, n) in enumerate(train_batches(data, idx, cfg, gen, device, chunks,
                                                         mine)):
                if n < least:  # the last batch: a micro-batch of 1 image BatchNorm cannot take
                    continue
                s = anneal_s(b, n_batches, cfg.s_max) if batch_step.s_anneal else None
                if s is not None:
                    model.set_s(s)
                opt.zero_grad(set_to_none=True)
                bn = BNAverage(model, d, chunks) if chunks > 1 else None
                bad = False
                loss = None
                for k, (x, y) in enumerate(parts):
                    final = k == len(parts) - 1
                    if bn is not None:
                        bn.before(k)
                    no_sync = net.no_sync() if (d.active and not final) else \
                        contextlib.nullcontext()
                    with no_sync:
                        with autocast(cfg.precision, device):
                            loss = batch_step.loss_fn(net, x, y)
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
                            scaled(loss).backward()
                    if bn is not None:
                        bn.after()
                bad, stop = d.any(bad, STOP["signum"])  # every rank decides the same
                if bad:
                    raise NonFiniteLoss(f"{desc}: non-finite loss at epoch {epoch}, batch {b}")
                if stop:
                    raise Interrupted(stop, f"{desc} (epoch {epoch}, batch {b})")
                scaled(loss).backward()  # the synchronising backward under DDP
                if bn is not None:  # after backward: BN saved its buffers for it
                    bn.finish()
                if scaler is not None:
                    scaler.unscale_(opt)
                if batch_step.after_backward is not None:
                    batch_step.after_backward(s)
                if scaler is not None:
                    scaler.step(opt)
                    scaler.update()
                else:
                    opt.step()
                if batch_step.after_step is not None and batch_step.after_step(opt):
                    stack.close()
                    stack = outer.enter_context(contextlib.ExitStack())
                    net = wrap(stack, [(None, p) for g in opt.param_groups for p in g["params"]])
                    net.train()
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
