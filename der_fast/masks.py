"""DER's channel masks (from HAT): s annealing, gradient compensation, sparsity loss, pruning.

Mask of a point with embedding ``e``: ``m = sigmoid(s * e)``. Where masks sit is documented in
:mod:`der_fast.backbones`; the placement makes :func:`prune` exact.
"""

from __future__ import annotations

import torch
from torch import nn

from .backbones import MaskedResNet, binarize, conv_layers

__all__ = [
    "anneal_s", "set_s", "compensate_grads", "clamp_embeddings", "sparsity_loss",
    "binary_masks", "prune", "count_params",
]

THRES_COSH = 50.0  # HAT's clamp inside cosh
THRES_EMB = 6.0  # HAT's clamp of e after every step


def anneal_s(batch_index: int, n_batches: int, s_max: float) -> float:
    """s for batch ``b = batch_index + 1`` of ``B = n_batches`` in an epoch (DER.md):
    ``s = 1/s_max + (s_max - 1/s_max) * (b - 1) / (B - 1)``; ``s_max`` when B = 1."""
    if s_max <= 0:
        raise ValueError(f"s_max must be > 0, got {s_max}")
    if not 0 <= batch_index < n_batches:
        raise ValueError(f"batch_index {batch_index} outside [0, {n_batches})")
    if n_batches == 1:
        return float(s_max)
    return 1.0 / s_max + (s_max - 1.0 / s_max) * batch_index / (n_batches - 1)


def set_s(net: MaskedResNet, s: float) -> None:
    net.s = float(s)


def compensate_grads(net: MaskedResNet, s: float, s_max: float) -> None:
    """HAT's gradient compensation, in place on ``e.grad``:
    ``grad *= s_max / s * (cosh(clamp(s e, +-50)) + 1) / (cosh(e) + 1)``."""
    if net.mask_e is None:
        return
    with torch.no_grad():
        for e in net.mask_e.values():
            if e.grad is None:
                continue
            num = torch.cosh(torch.clamp(s * e, -THRES_COSH, THRES_COSH)) + 1
            den = torch.cosh(e) + 1
            e.grad.mul_(s_max / s * num / den)


def clamp_embeddings(net: MaskedResNet, thres: float = THRES_EMB) -> None:
    """HAT clamps e to [-6, 6] after each optimiser step."""
    if net.mask_e is None:
        return
    with torch.no_grad():
        for e in net.mask_e.values():
            e.clamp_(-thres, thres)


def _mask_sums(net: MaskedResNet) -> dict:
    sums = {p: net.gate(p).sum() for p in net.mask_e}
    sums["input"] = torch.tensor(float(net.in_channels), device=next(iter(sums.values())).device)
    return sums


def sparsity_loss(net: MaskedResNet) -> torch.Tensor:
    """Ratio of weights in use (DER.md):
    ``sum_l K_l |m_{l-1}|_1 |m_l|_1 / sum_l K_l c_{l-1} c_l`` over every conv ``l``, with the
    image as layer 0 (``|m_0|_1`` = its channel count). Differentiable in the embeddings."""
    if net.mask_e is None:
        raise ValueError("sparsity_loss needs a masked extractor (masked=True)")
    sums = _mask_sums(net)
    widths = dict(net.widths, input=net.in_channels)
    num = 0.0
    den = 0.0
    for _, src, dst, k in conv_layers(net.arch):
        num = num + k * sums[src] * sums[dst]
        den += k * widths[src] * widths[dst]
    return num / den


def binary_masks(net: MaskedResNet) -> dict:
    """The binarised masks (s = s_max, threshold 0.5 -> e > 0), point -> bool tensor."""
    if net.mask_e is None:
        raise ValueError("binary_masks needs a masked extractor")
    return {p: binarize(e.detach()) for p, e in net.mask_e.items()}


def count_params(module: nn.Module, include_masks: bool = False) -> int:
    """Number of parameters (mask embeddings excluded unless asked)."""
    return sum(p.numel() for n, p in module.named_parameters()
               if include_masks or "mask_e" not in n)


def _take(t: torch.Tensor, dim: int, idx: torch.Tensor) -> torch.Tensor:
    return t.detach().index_select(dim, idx.to(t.device)).clone()


def prune(net: MaskedResNet) -> MaskedResNet:
    """Binarise the masks and remove the off channels physically.

    Returns a new, unmasked :class:`MaskedResNet` whose ``kept_*`` buffers record the surviving
    original channels. It computes exactly the function of ``net`` with binary masks (in eval
    mode; BN running statistics are carried over). Pruning an already pruned net composes.
    """
    masks = binary_masks(net)
    local = {p: torch.nonzero(m).flatten() for p, m in masks.items()}  # positions in net
    kept = {p: net.kept(p)[local[p].to(net.kept(p).device)].cpu() for p in local}
    new = MaskedResNet(net.arch, net.in_channels, masked=False, kept=kept)
    new = new.to(device=next(net.parameters()).device, dtype=next(net.parameters()).dtype)
    local["input"] = torch.arange(net.in_channels)
    with torch.no_grad():
        for path, src, dst, _ in conv_layers(net.arch):
            old_conv, new_conv = net.get_submodule(path), new.get_submodule(path)
            w = _take(_take(old_conv.weight, 0, local[dst]), 1, local[src])
            new_conv.weight.copy_(w)
            bn_path = {"conv": "bn", "conv1": "bn1", "conv2": "bn2", "sc_conv": "sc_bn"}
            head, _, leaf = path.rpartition(".")
            bn_name = f"{head}.{bn_path[leaf]}"
            old_bn, new_bn = net.get_submodule(bn_name), new.get_submodule(bn_name)
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(new_bn, name).copy_(_take(getattr(old_bn, name), 0, local[dst]))
            new_bn.num_batches_tracked.copy_(old_bn.num_batches_tracked)
    new.train(net.training)
    return new


def expand_from(prev: MaskedResNet, masked: bool, mask_init: float = 1.0) -> MaskedResNet:
    """A new full-width extractor initialised from ``prev`` (DER: F_t starts from F_{t-1}).

    Channels that ``prev`` kept get its weights and BN state; channels pruned away from ``prev``
    keep a fresh initialisation (they were judged unimportant for the old task and start anew).
    """
    new = MaskedResNet(prev.arch, prev.in_channels, masked=masked, mask_init=mask_init)
    p0 = next(prev.parameters())
    new = new.to(device=p0.device, dtype=p0.dtype)
    idx = {p: prev.kept(p).to(p0.device) for p in prev.widths}
    idx["input"] = torch.arange(prev.in_channels, device=p0.device)
    with torch.no_grad():
        for path, src, dst, _ in conv_layers(prev.arch):
            w_new = new.get_submodule(path).weight
            w_old = prev.get_submodule(path).weight
            w_new[idx[dst][:, None], idx[src][None, :]] = w_old.detach()
            head, _, leaf = path.rpartition(".")
            bn = {"conv": "bn", "conv1": "bn1", "conv2": "bn2", "sc_conv": "sc_bn"}[leaf]
            b_new, b_old = new.get_submodule(f"{head}.{bn}"), prev.get_submodule(f"{head}.{bn}")
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(b_new, name)[idx[dst]] = getattr(b_old, name).detach()
            b_new.num_batches_tracked.copy_(b_old.num_batches_tracked)
    return new

