"""DER's two training stages of a step: representation learning and classifier re-training."""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Optional

import torch

from .. import data as D
from ..masks import BudgetController, ramp, shift_to_budget
from ..objective import stage1_loss, stage2_loss
from .batches import min_images, seeded_generator
from .config import Schedule
from .loop import BatchStep, Runtime, train_epochs


def stage1(model, data, indices, cfg, t, n_old, device, rt: Optional[Runtime] = None,
           lambda_s0: Optional[float] = None, report: Optional[dict] = None) -> float:
    """Representation learning of step t: CE + aux CE + lambda_s * sparsity (masks learnt).

    With a budget (``cfg.keep``) lambda_s starts at ``lambda_s0`` (the previous step's final
    value) and is adapted after every step (:class:`masks.BudgetController`); when the ramp
    (:func:`masks.ramp`) ends the masks land on the budget and turn binary, and with
    ``cfg.prune`` the new extractor is pruned at that moment (``DERNet.prune(optimizer)``):
    the rest of the stage trains only the kept channels, which is exactly training the
    binary-masked network on. A ramp that ends at 0 (step 0's) lands before the first step.
    ``report`` receives ``lambda_s`` (final), ``keep_trace`` (the binary keep ratio after each
    epoch) and, when pruned here, the unpruned counts and ``time_prune_s``."""
    rt = rt or Runtime()
    report = {} if report is None else report
    lambda_a = cfg.lambda_a if t > 0 else 0.0
    use_masks = model.convnets[-1].mask_e is not None
    aux_used = lambda_a > 0 and len(model.convnets) > 1
    new = model.convnets[-1]
    sched = cfg.schedule(t)

    def land(opt) -> bool:
        # the masks land on the budget and turn binary; with cfg.prune the extractor is pruned
        # (True), and ``opt``, when given, goes on with the pruned parameters
        shift_to_budget(new, cfg.keep)
        new.binary_masks = True
        if not cfg.prune:
            return False
        t0 = time.perf_counter()
        report.update(unpruned_counts(model, (data.info.image_size,) * 2))
        model.prune(optimizer=opt)
        report["time_prune_s"] = time.perf_counter() - t0
        return True

    control = None
    lam = [cfg.lambda_s or 0.0]
    if use_masks and cfg.keep is not None:
        start, end = ramp(t)
        if end == 0:  # on the budget before the first step: the whole stage at the budget
            land(None)
        else:
            n_batches = max(1, math.ceil(len(indices) / cfg.batch_size))
            control = BudgetController(cfg.keep, sched.epochs * n_batches,
                                       lambda_s0 if lambda_s0 is not None else 1.0,
                                       start=start, end=end)
            lam = [control.lam]
    # the auxiliary classifier is trained only when it is in the loss (at step 0 or with
    # lambda_a = 0 it gets no gradient anyway; DDP needs every trained parameter used)
    params = [(n, p) for n, p in model.named_parameters()
              if p.requires_grad and (aux_used or not n.startswith("aux_fc."))]

    def loss_fn(net, x, y):
        return stage1_loss(model, net(x), y, n_old, lambda_a if aux_used else 0.0, lam[0])

    def keep_now() -> float:
        if "params_unpruned" in report:  # pruned early: the ratio pruning kept
            return model.extractor_params()[-1] / report["extractor_params_unpruned"][-1]
        return model.keep_ratio()

    def after_step(opt) -> bool:
        model.clamp_masks(cfg.s_max)
        if control is None or new.binary_masks:
            return False
        lam[0] = control.update(model.keep_ratio())
        if not control.finished:
            return False
        return land(opt)  # end of the ramp: fine-tune the rest with the masks fixed

    anneal = use_masks and cfg.s_anneal == "epoch"
    if use_masks and not anneal:
        model.set_s(cfg.s_max)
    after_backward = (lambda s: model.compensate_mask_grads(cfg.s_max if s is None else s,
                                                            cfg.s_max)) if use_masks else None
    trace = []

    def on_epoch(tag, epoch, loss):
        if use_masks:
            trace.append(round(keep_now(), 4))
        if rt.on_epoch is not None:
            rt.on_epoch(tag, epoch, loss)

    batch_step = BatchStep(loss_fn, after_backward, after_step if use_masks else None, anneal)
    loss = train_epochs(model, params, data, indices, cfg, sched, batch_step, device=device,
                        seed_salt=(t, 1), desc=f"step {t} stage 1", tag="train/loss_stage1",
                        rt=dataclasses.replace(rt, on_epoch=on_epoch))
    if use_masks:
        if model.convnets[-1] is new:  # not pruned early
            model.set_s(cfg.s_max)
            new.binary_masks = True
        recalibrate_bn(model, data, indices, cfg, device)
        # the final weight, the next step's start (None: landed before the first step)
        report["lambda_s"] = None if control is None and cfg.keep is not None else lam[0]
        report["keep_trace"] = trace
    return loss


@torch.no_grad()
def unpruned_counts(model, hw) -> dict:
    """The model's parameter and MAC counts before the newest extractor is pruned (the
    ``*_unpruned`` entries of a step's metrics)."""
    return {"params_unpruned": model.num_params(),
            "extractor_params_unpruned": model.extractor_params(),
            "extractor_macs_unpruned": model.extractor_macs(hw)}


def recalibrate_bn(model, data, indices, cfg, device) -> None:
    """Re-estimate the newest extractor's BatchNorm statistics with its binary masks: the
    plain average of the batch statistics over ``indices`` (no augmentation). The running
    averages also hold batches from before the masks became binary (soft gates; with
    ``s_anneal="epoch"`` every gate starts each epoch at ~1/2), i.e. inputs of other scales,
    and in eval mode such errors compound over the layers. Every process computes the same
    statistics from the same data. Only the newest extractor runs (the others are frozen, in
    eval mode, and the head does not touch BatchNorm), without autograd."""
    net = model.convnets[-1]
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    saved = [m.momentum for m in bns]
    was_training = model.training
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    least = min_images(model, data)  # a last batch of 1 image on a 1x1 map: left out
    try:
        with torch.no_grad():
            for x, _ in data.batches("train", indices, cfg.batch_size, device=device):
                if len(x) >= least:
                    net(x)
    finally:
        for m, mom in zip(bns, saved):
            m.momentum = mom
        model.train(was_training)


def stage2(model, data, pool, cfg, t, device, rt: Optional[Runtime] = None) -> float:
    """Balanced classifier re-training: every extractor frozen, H_t re-initialised and trained
    alone on a class-balanced subset (re-drawn each epoch) with logits / temperature."""
    model.freeze_conv()
    torch.manual_seed(cfg.seed * 7919 + t)
    model.reset_fc()
    labels = data.labels("train")
    params = list(model.fc.named_parameters())
    sched = Schedule(cfg.epochs_stage2, cfg.lr_stage2,
                     cfg.milestones_stage2 or [max(1, cfg.epochs_stage2 // 2)], cfg.weight_decay)

    def loss_fn(net, x, y):
        return stage2_loss(net(x), y, cfg.temperature)

    def subset(epoch):  # re-drawn every epoch
        gen = seeded_generator(cfg.seed, t, 2, epoch)
        return pool[D.balanced_subset(labels[pool], generator=gen)]

    return train_epochs(model, params, data, subset, cfg, sched, BatchStep(loss_fn),
                        device=device, seed_salt=(t, 3), desc=f"step {t} stage 2",
                        tag="train/loss_stage2", rt=rt)
