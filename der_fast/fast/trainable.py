"""The trainable extractor's forward with autograd: PyTorch convs, and every
``gate * relu(bn(x) [+ residual])`` point (BatchNorm included) as one ``bn_gate`` op."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..backbones import MaskedResNet, shortcut_a_index
from .fold import a_shortcut_pad

_BIG_LOGIT = 1.0e4  # sigmoid(+-1e4) is exactly 1 / 0 in fp16, bf16, fp32 and fp64


def _bn_gate(bn: nn.BatchNorm2d, z: torch.Tensor, e=None, s: float = 1.0, residual=None,
             relu: bool = True) -> torch.Tensor:
    """``g * relu(bn(z) [+ residual])`` (``relu=False``: ``g * (bn(z) [+ residual])``) as one
    ``bn_gate`` op: train mode uses the batch statistics and updates the running statistics
    exactly like ``nn.BatchNorm2d``, eval mode the running statistics. The op rounds like ATen's
    BatchNorm (same alpha / beta, same fused multiply-adds), so in eval mode and, in nearly
    every channel, in train mode its ``bn(z)`` is bit-identical to the reference's and the
    fast model's ReLU masks are the reference's (a pre-activation within rounding of 0 that
    lands on the other side costs a whole element's gradient).

    Rejected before it: batch mean/var by ``torch.var_mean`` with autograd, folded into the
    scale/shift of ``masked_gate``: on CPU ``var_mean`` alone cost more than a whole native BN
    forward and its backward added 4 elementwise passes; a resnet32 stage-1 step got slower than
    the reference (RESULTS.md, "The fast path's thresholds"). Native BatchNorm followed by
    ``masked_gate`` (the path until bn_gate): ATen's train-mode statistics are scalar double
    loops over z, twice, and its backward plus masked_gate's take three passes where the
    fused op takes two (benchmarks/bench_bn_gate.py).
    """
    return ops.bn_gate(z, bn, e=e, s=s, residual=residual, relu=relu)


def _gate_args(net: MaskedResNet, point: str):
    """``(e, s)`` for ``bn_gate`` so that its gate equals ``net.gate(point)``."""
    if net.mask_e is None:
        return None, 1.0
    e = net.mask_e[point]
    if net.binary_masks:  # (e > 0) as sigmoid(+-big): exactly 1 / 0, no gradient to e
        return (net.binary_mask(point).to(e.dtype) * 2 - 1) * _BIG_LOGIT, 1.0
    return e, float(net.s)


def _trainable_shortcut(net: MaskedResNet, blk, y, si: int, bi: int):
    """``net._shortcut`` with the common option-A case (every input channel kept, the new
    ones zero) as a pad instead of a gather (its backward, index_add_, is slow in
    channels_last), and option B's BatchNorm (no gate, no ReLU) through ``bn_gate``."""
    if blk.sc_conv is not None:
        z = F.conv2d(y, blk.sc_conv.weight, None, blk.sc_conv.stride, blk.sc_conv.padding)
        return _bn_gate(blk.sc_bn, z, relu=False)
    # compiled: always the gather (the pad's test branches on tensor values: a graph break)
    if bi == 0 and si > 0 and not torch.compiler.is_compiling():
        idx = shortcut_a_index(net.kept(f"stream{si - 1}"), net.kept(f"stream{si}"))
        pad = a_shortcut_pad(idx, net.kept(f"stream{si - 1}").numel())
        if pad is not None:
            return F.pad(y[:, :, ::blk.stride, ::blk.stride], (0, 0, 0, 0, 0, pad))
    return net._shortcut(blk, y, si, bi)


def trainable_feature_map(net: MaskedResNet, x: torch.Tensor) -> torch.Tensor:
    """The last feature map of one extractor, with autograd, through ``bn_gate``."""
    stem = net.stem
    z = F.conv2d(x, stem.conv.weight, None, stem.conv.stride, stem.conv.padding)
    e, s = _gate_args(net, "stream0")
    y = _bn_gate(stem.bn, z, e, s)
    if net.arch.stem_maxpool:
        y = F.max_pool2d(y, 3, 2, 1)
    for si, blocks in enumerate(net.stages):
        e_stream, s_stream = _gate_args(net, f"stream{si}")
        for bi, blk in enumerate(blocks):
            z = F.conv2d(y, blk.conv1.weight, None, blk.conv1.stride, blk.conv1.padding)
            e, s = _gate_args(net, f"inner{si}_{bi}")
            h = _bn_gate(blk.bn1, z, e, s)
            r = _trainable_shortcut(net, blk, y, si, bi)
            z = F.conv2d(h, blk.conv2.weight, None, blk.conv2.stride, blk.conv2.padding)
            y = _bn_gate(blk.bn2, z, e_stream, s_stream, residual=r)
    return y
