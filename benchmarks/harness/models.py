"""Seeded DER models in the state a case needs (frozen pruned extractors + one trainable masked
one, or all frozen), cached per case, and the case's fixed random batches."""

from __future__ import annotations

import copy
import zlib
from typing import Optional

import torch
from torch import nn

from der_fast.backbones import MaskedResNet
from der_fast.reference import DERNet

from .constants import CLASSES_PER_TASK, S_TRAIN
from .grid import Case


def _seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode()) & 0x7FFFFFFF


def _perturb(net: MaskedResNet, gen: torch.Generator) -> None:
    """Make each new extractor distinct from the one it was copied from (weights +-10%, BN
    affine random), so the equivalence check sees t different extractors."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.mul_(1 + 0.1 * torch.randn(m.weight.shape, generator=gen))
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=gen))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))


def _calibrate_bn(net: MaskedResNet, x: torch.Tensor) -> None:
    """Realistic BN running statistics: one train-mode forward with cumulative averaging."""
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    was = net.training
    with torch.no_grad():
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None
        net.train()
        net(x)
        for bn in bns:
            bn.momentum = 0.1
    net.train(was)


def _random_e(net: MaskedResNet, density: float, gen: torch.Generator, soft: bool) -> None:
    with torch.no_grad():
        for e in net.mask_e.values():
            mag = 0.5 + 1.5 * torch.rand(e.shape, generator=gen)
            if soft:  # trainable extractor: mostly-on soft gates, some near 0.5, some off
                e.copy_(torch.rand(e.shape, generator=gen) * 3.0 - 1.0)
            else:
                on = torch.rand(e.shape, generator=gen) < density
                e.copy_(torch.where(on, mag, -mag))


def build_reference(backbone: str, t: int, density: float, state: str, seed: int = 0,
                    n_calib: int = 16, hw: int = 32) -> DERNet:
    """A seeded DERNet with t extractors (CPU, float32).

    ``state="stage1"``: extractors 1..t-1 frozen and pruned to about ``density`` of their
    channels per mask point (random e with P(e > 0) = density, then ``prune()``); extractor t
    trainable with soft masks sigmoid(S_TRAIN * e). ``state="final"``: all t pruned and frozen
    (``freeze_conv``): what inference and stage 2 see. BN statistics are calibrated on random
    images, weights perturbed per extractor, so folding and pruning are exercised for real.
    """
    if state not in ("stage1", "final"):
        raise ValueError(state)
    gen = torch.Generator().manual_seed(_seed(backbone, t, density, state, seed))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_seed("init", backbone, t, density, state, seed))
        net = DERNet(backbone, use_masks=True)
        for i in range(t):
            net.update_fc(CLASSES_PER_TASK * (i + 1))
            new = net.convnets[-1]
            _perturb(new, gen)
            last = i == t - 1
            freeze = not last or state == "final"
            _random_e(new, density, gen, soft=not freeze)
            new.binary_masks = freeze
            new.s = 1.0 if freeze else S_TRAIN
            _calibrate_bn(new, torch.randn(n_calib, net.in_channels, hw, hw, generator=gen))
            if freeze:
                net.prune()
                with torch.no_grad():  # a trained-looking head, not the zero-padded init
                    net.fc.weight.normal_(0, 0.05, generator=gen)
                    net.fc.bias.normal_(0, 0.05, generator=gen)
        if state == "final":
            net.freeze_conv()
        net.train()
    return net


def lru_get(cache: dict, key, make, keep: int = 2):
    """A tiny LRU: the floor case's entries survive next to the current case's."""
    if key in cache:
        cache[key] = cache.pop(key)  # most recent last
    else:
        while len(cache) >= keep:
            cache.pop(next(iter(cache)))
        cache[key] = make()
    return cache[key]


_MODEL_CACHE: dict = {}


def reference_model(case: Case, state: Optional[str] = None) -> DERNet:
    """A fresh copy of the case's seeded reference model (cached build, deep-copied)."""
    state = state or ("final" if case.workload in ("infer", "stage2") else "stage1")
    t = 1 if case.workload == "floor" else case.t
    key = (case.backbone, t, case.density, state, case.hw)
    model = lru_get(_MODEL_CACHE, key, lambda: build_reference(
        case.backbone, t, case.density, state, hw=case.hw))  # keep 2: models at t=10 are big
    return copy.deepcopy(model)


def make_data(case: Case, device: torch.device, n_batches: int = 1) -> list:
    """Fixed random batches (x, y) with labels over every seen class."""
    gen = torch.Generator().manual_seed(_seed("data", case.id))
    t = 1 if case.workload == "floor" else case.t
    out = []
    for _ in range(n_batches):
        x = torch.randn(case.batch, 3, case.hw, case.hw, generator=gen)
        y = torch.randint(0, CLASSES_PER_TASK * t, (case.batch,), generator=gen)
        out.append((x.to(device), y.to(device)))
    return out
