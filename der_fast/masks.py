"""DER's channel masks (from HAT): s annealing, gradient compensation, sparsity loss, pruning.

Mask of a point with embedding ``e``: ``m = sigmoid(s * e)``. Where masks sit is documented in
:mod:`der_fast.backbones`; the placement makes :func:`prune` exact.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .backbones import (LOGIT_BOUND, MASK_INIT, S_MAX, MaskedResNet, binarize, conv_layers,
                        floor_channels)

__all__ = [
    "anneal_s", "set_s", "compensate_grads", "clamp_embeddings", "sparsity_loss",
    "binary_masks", "prune", "prune_with_slices", "cut", "count_params", "keep_ratio", "shift_to_budget", "extractor_macs",
    "expand_from", "ramp", "RAMP", "RAMP_STEP0",
    "BudgetController", "S_MAX", "LOGIT_BOUND", "MASK_INIT", "MASK_LR",
]

THRES_COSH = 50.0  # HAT's clamp inside cosh
# Learning rate of e (plain SGD, constant): e moves ~0.01-0.2 logits (s_max e) per step at the
# compensated gradients seen on resnet32 (median 0.2-5); chosen so, not swept.
MASK_LR = 1e-4


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
    """Set the mask temperature; marks the masks as annealed (``update_fc`` checks it)."""
    net.s = float(s)
    net.annealed = True


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


def clamp_embeddings(net: MaskedResNet, s_max: float = S_MAX) -> None:
    """Clamp e to ``|e| <= LOGIT_BOUND / s_max`` after each optimiser step (HAT clamps to
    [-6, 6]; see :data:`LOGIT_BOUND` for why tighter)."""
    if net.mask_e is None:
        return
    bound = LOGIT_BOUND / float(s_max)
    with torch.no_grad():
        for e in net.mask_e.values():
            e.clamp_(-bound, bound)


def _mask_sums(net: MaskedResNet) -> dict:
    # |m_l|_1 as binarisation will count it: the floor channels (net.min_on, the largest e)
    # are kept whatever their gate, so they count one each and feel no sparsity pressure;
    # the pressure acts on the other channels only. Counting their soft gates would push all
    # of a stream's gates down together until the sum reached the floor, leaving half-on
    # channels for binarisation to switch fully on or off (benchmarks/RESULTS.md, "Masks
    # that cost under a point").
    sums = {}
    for p, e in net.mask_e.items():
        k = min(int(net.min_on(p)), e.numel())
        rest = ~floor_channels(e, k)
        sums[p] = (net.gate(p) * rest).sum() + float(k)
    sums["input"] = torch.tensor(float(net.in_channels), device=next(iter(sums.values())).device)
    return sums


def sparsity_loss(net: MaskedResNet) -> torch.Tensor:
    """Ratio of weights in use (DER.md):
    ``sum_l K_l |m_{l-1}|_1 |m_l|_1 / sum_l K_l c_{l-1} c_l`` over every conv ``l``, with the
    image as layer 0 (``|m_0|_1`` = its channel count). Differentiable in the embeddings.
    ``|m_l|_1`` counts the point's floor channels (:meth:`MaskedResNet.min_on`, the largest
    ``e``, which binarisation keeps whatever their sign) as one each, without gradient, plus
    the soft masks of the other channels."""
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
    return {p: net.binary_mask(p) for p in net.mask_e}


def _params_of(net: MaskedResNet, widths: dict) -> int:
    """Parameters of ``net``'s architecture at the given widths: every conv and its BN."""
    widths = dict(widths, input=net.in_channels)
    return sum(k * widths[src] * widths[dst] + 2 * widths[dst]
               for _, src, dst, k in conv_layers(net.arch))


def keep_ratio(net: MaskedResNet) -> float:
    """Fraction of ``net``'s parameters that pruning now would keep (binary masks)."""
    if net.mask_e is None:
        return 1.0
    on = {p: int(m.sum()) for p, m in binary_masks(net).items()}
    return _params_of(net, on) / _params_of(net, net.widths)


def shift_to_budget(net: MaskedResNet, target: float) -> float:
    """Shift every ``e`` of ``net`` by one constant so that the binary keep ratio comes as close
    to ``target`` as whole channels allow (the channels with the lowest margins go, or come
    back). Returns the keep ratio after the shift. Binarisation stays ``e > 0``."""
    if net.mask_e is None:
        return 1.0
    with torch.no_grad():
        values = torch.cat([e.detach().flatten() for e in net.mask_e.values()]).double()
        cuts = torch.unique(values)  # sorted; cut k turns off every e <= cuts[k]
        shifts = torch.cat([cuts[:1] - 1.0, (cuts[:-1] + cuts[1:]) / 2, cuts[-1:] + 1.0])

        full = _params_of(net, net.widths)

        def keep_at(shift: float) -> float:
            on = {p: int(binarize(e.detach() - shift, net.min_on(p)).sum())
                  for p, e in net.mask_e.items()}
            return _params_of(net, on) / full

        lo, hi = 0, len(shifts) - 1  # keep_at falls as the shift grows
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if keep_at(float(shifts[mid])) >= target:
                lo = mid
            else:
                hi = mid
        best = min((lo, hi), key=lambda i: abs(keep_at(float(shifts[i])) - target))
        for e in net.mask_e.values():
            e.sub_(float(shifts[best]))
    return keep_ratio(net)


def extractor_macs(net: MaskedResNet, hw: tuple) -> int:
    """Multiply-accumulates of the convolutions for one ``hw`` image (the extractor's cost;
    BatchNorm, ReLU, masks and pooling are not counted)."""
    arch = net.arch
    widths = dict(net.widths, input=net.in_channels)
    h, w = hw

    def down(n, k, stride):
        return (n + 2 * (k // 2) - k) // stride + 1

    h, w = down(h, arch.stem_kernel, arch.stem_stride), down(w, arch.stem_kernel,
                                                              arch.stem_stride)
    total = arch.stem_kernel ** 2 * widths["input"] * widths["stream0"] * h * w
    if arch.stem_maxpool:
        h, w = down(h, 3, 2), down(w, 3, 2)
    for path, src, dst, k in conv_layers(arch)[1:]:
        si, bi = (int(v) for v in path.split(".")[1:3])
        stride = arch.stages[si][2] if bi == 0 else 1
        if path.endswith("conv1"):
            h, w = down(h, 3, stride), down(w, 3, stride)
        total += k * widths[src] * widths[dst] * h * w
    return int(total)


def count_params(module: nn.Module, include_masks: bool = False) -> int:
    """Number of parameters (mask embeddings excluded unless asked)."""
    return sum(p.numel() for n, p in module.named_parameters()
               if include_masks or "mask_e" not in n)


def prune(net: MaskedResNet) -> MaskedResNet:
    """Binarise the masks and remove the off channels physically.

    Returns a new, unmasked :class:`MaskedResNet` whose ``kept_*`` buffers record the surviving
    original channels. It computes exactly the function of ``net`` with binary masks (in eval
    mode; BN running statistics are carried over). Pruning an already pruned net composes.
    """
    return prune_with_slices(net)[0]


def prune_with_slices(net: MaskedResNet) -> tuple:
    """:func:`prune`, and how each tensor of the pruned net was cut from ``net``'s: a dict
    state name -> ``[(dim, index), ...]`` (indices local to ``net``) for every conv weight and
    BatchNorm tensor, so that state kept beside the parameters (an optimiser's momentum) can
    be cut the same way."""
    masks = binary_masks(net)
    local = {p: torch.nonzero(m).flatten() for p, m in masks.items()}  # positions in net
    kept = {p: net.kept(p)[local[p].to(net.kept(p).device)].cpu() for p in local}
    new = MaskedResNet(net.arch, net.in_channels, masked=False, kept=kept)
    new = new.to(device=next(net.parameters()).device, dtype=next(net.parameters()).dtype)
    local["input"] = torch.arange(net.in_channels)
    bn_of = {"conv": "bn", "conv1": "bn1", "conv2": "bn2", "sc_conv": "sc_bn"}
    slices, bns = {}, []
    for path, src, dst, _ in conv_layers(net.arch):
        slices[f"{path}.weight"] = [(0, local[dst]), (1, local[src])]
        head, _, leaf = path.rpartition(".")
        bns.append(f"{head}.{bn_of[leaf]}")
        for name in ("weight", "bias", "running_mean", "running_var"):
            slices[f"{bns[-1]}.{name}"] = [(0, local[dst])]
    old_state, new_state = net.state_dict(keep_vars=True), new.state_dict(keep_vars=True)
    with torch.no_grad():
        for name, cuts in slices.items():
            new_state[name].copy_(cut(old_state[name], cuts))
        for bn in bns:
            new_state[f"{bn}.num_batches_tracked"].copy_(old_state[f"{bn}.num_batches_tracked"])
    new.train(net.training)
    return new, slices


def cut(t: torch.Tensor, cuts) -> torch.Tensor:
    """``t`` (detached) with ``index_select(dim, index)`` applied for each ``(dim, index)``."""
    t = t.detach()
    for dim, idx in cuts:
        t = t.index_select(dim, idx.to(t.device))
    return t.clone()


def expand_from(prev: MaskedResNet, masked: bool, mask_init: float = MASK_INIT) -> MaskedResNet:
    """A new full-width extractor initialised from ``prev`` (DER: F_t starts from F_{t-1}).

    Channels that ``prev`` kept get its weights and BN state; channels pruned away from ``prev``
    get a fresh initialisation (they were judged unimportant for the old task and start anew),
    but their connections *into* kept channels start at zero: with the fresh channels
    switched off the new extractor computes exactly ``prev``. Masks (``masked``): every
    channel starts on, ``e ~ U(0, mask_init)`` (kept channels drawn first, then the fresh
    ones), so the new extractor starts at full width and stage 1 prunes it to the budget
    again (fresh channels starting off measured worse: benchmarks/RESULTS.md, "Masks"). On,
    fresh stream channels reach kept ones through option-A shortcuts (no weights to zero).
    """
    full = MaskedResNet(prev.arch, prev.in_channels).full_widths
    p0 = next(prev.parameters())
    init = None
    if masked:
        init = {p: torch.zeros(w) for p, w in full.items()}
        for p in init:
            k = prev.kept(p).cpu()
            init[p][k] = torch.rand(k.numel()) * float(mask_init)
    new = MaskedResNet(prev.arch, prev.in_channels, masked=masked, mask_init=init)
    new = new.to(device=p0.device, dtype=p0.dtype)
    idx = {p: prev.kept(p).to(p0.device) for p in prev.widths}
    idx["input"] = torch.arange(prev.in_channels, device=p0.device)
    fresh = {p: torch.ones(full[p], dtype=torch.bool, device=p0.device) for p in full}
    for p in full:
        fresh[p][idx[p]] = False
    fresh["input"] = torch.zeros(prev.in_channels, dtype=torch.bool, device=p0.device)
    with torch.no_grad():
        for path, src, dst, _ in conv_layers(prev.arch):
            w_new = new.get_submodule(path).weight
            w_old = prev.get_submodule(path).weight
            w_new[idx[dst][:, None], idx[src][None, :]] = w_old.detach()
            w_new[idx[dst][:, None], torch.nonzero(fresh[src]).flatten()[None, :]] = 0
            head, _, leaf = path.rpartition(".")
            bn = {"conv": "bn", "conv1": "bn1", "conv2": "bn2", "sc_conv": "sc_bn"}[leaf]
            b_new, b_old = new.get_submodule(f"{head}.{bn}"), prev.get_submodule(f"{head}.{bn}")
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(b_new, name)[idx[dst]] = getattr(b_old, name).detach()
            b_new.num_batches_tracked.copy_(b_old.num_batches_tracked)
        if masked:
            for p, e in new.mask_e.items():
                n = int(fresh[p].sum())
                if n:
                    e[fresh[p]] = (torch.rand(n) * float(mask_init)).to(e)
    return new



# The budget's ramp, as fractions (start, end) of stage 1's optimiser steps
# (:class:`BudgetController`). A later step's new extractor starts from the previous one's
# trained weights, and its masks learn during the ramp which channels the new classes need.
# Step 0's extractor starts from random weights: masks learnt on them select no better than
# chance, and training under soft gates costs accuracy by itself, so step 0 lands on the
# budget before its first step (the channels with the largest initial e, about the same
# share of every layer) and trains the thin extractor for the whole stage
# (benchmarks/RESULTS.md, "Step 0 at the budget from the start").
RAMP = (0.1, 0.5)
RAMP_STEP0 = (0.0, 0.0)


def ramp(t: int) -> tuple:
    """(start, end) of the budget's ramp in step ``t``'s stage 1; ``end == 0``: the masks land
    on the budget before the stage's first optimiser step."""
    return RAMP_STEP0 if t == 0 else RAMP


class BudgetController:
    """Adapts the sparsity weight so that pruning keeps ``target`` of the extractor's
    parameters at the end of stage 1.

    The budget is approached gradually (as in gradual pruning, Zhu and Gupta 2017), while
    the learning rate is still high (before the usual milestones), so the weights adapt: the
    keep ratio aimed at after a fraction ``f`` of the stage's optimiser steps is 1 until
    ``start``, then ``target + (1 - target) * (1 - (f - start) / (end - start)) ** 3`` until
    ``end``, then ``target``: the network first learns, then adapts while channels go, then
    trains at the budget (with the masks fixed: see ``finished``). After every step, with
    ``keep`` = :func:`keep_ratio` and ``aim`` the ratio aimed at,
    ``err = clip((keep - aim) / aim, -1, 1)`` and

        log lambda = log I + kp * err,   I <- I * exp(ki * err),   lambda within [lo, hi]:

    a proportional-integral controller in log space, relative to the budget (the same for keep
    0.5 and 0.05). The integral finds the weight that holds the budget; the proportional term
    backs off at once when the masks overshoot (they respond with a lag). ``keep`` is the
    binary ratio: with e initialised spread out (:data:`MASK_INIT`) channels flip one by one,
    so it moves smoothly."""

    def __init__(self, target: float, total_steps: int, lam: float = 1.0, kp: float = 2.0,
                 ki: float = 0.2, start: float = RAMP[0], end: float = RAMP[1],
                 lo: float = 1e-3, hi: float = 1e3):
        if not 0.0 < target <= 1.0:
            raise ValueError(f"target keep ratio must be in (0, 1], got {target}")
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        if not 0.0 <= start < end <= 1.0:
            raise ValueError(f"need 0 <= start < end <= 1, got {start}, {end}")
        self.target, self.total = float(target), int(total_steps)
        self.kp, self.ki, self.start, self.end, self.lo, self.hi = kp, ki, start, end, lo, hi
        self.integral = min(hi, max(lo, float(lam)))
        self.lam = self.integral
        self.done = 0

    def aim(self) -> float:
        f = (self.done / self.total - self.start) / (self.end - self.start)
        f = min(1.0, max(0.0, f))
        return self.target + (1.0 - self.target) * (1.0 - f) ** 3

    @property
    def finished(self) -> bool:
        """The ramp is over (the trainer then fixes the binary masks and fine-tunes)."""
        return self.done >= self.end * self.total

    def update(self, keep: float) -> float:
        self.done += 1
        aim = self.aim()
        err = max(-1.0, min(1.0, (keep - aim) / aim))
        self.integral = min(self.hi, max(self.lo, self.integral * math.exp(self.ki * err)))
        self.lam = min(self.hi, max(self.lo, self.integral * math.exp(self.kp * err)))
        return self.lam
