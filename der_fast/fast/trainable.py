"""The trainable extractor's forward with autograd: PyTorch convs and BatchNorm, and every
``gate * relu(bn(x) [+ residual])`` point as one ``masked_gate`` op."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..backbones import MaskedResNet, shortcut_a_index
from .fold import _a_shortcut_pad

_BIG_LOGIT = 1.0e4  # sigmoid(+-1e4) is exactly 1 / 0 in fp16, bf16, fp32 and fp64


def _bn_affine(bn: nn.BatchNorm2d, z: torch.Tensor):
    """``(x, scale, shift)`` for ``masked_gate``: ``x = bn(z)`` by PyTorch's native batch
    norm (train mode: batch statistics, running statistics updated exactly like
    ``nn.BatchNorm2d``; eval mode: running statistics) and an identity affine.

    Alternatives, both rejected:

    * batch mean/var by ``torch.var_mean`` with autograd, folded into ``scale``/``shift`` of
      the op: on CPU ``var_mean`` alone costs more than a whole native BN forward and its
      backward adds 4 elementwise passes; a resnet32 stage-1 step got slower than the
      reference (RESULTS.md, "6. The fast path's thresholds").
    * eval mode with BN's affine folded into ``scale``/``shift``: a pre-activation rounds
      differently from the reference's ``bn(z)``, so a ReLU input within rounding of 0 can
      land on the other side (seen in the tests). Identical ``bn(z)`` keeps the fast model's
      ReLU masks those of the reference; eval mode with gradients is not a hot path.
    """
    ones = torch.ones(z.shape[1], dtype=z.dtype, device=z.device)
    return bn(z), ones, torch.zeros_like(ones)


def _gate_args(net: MaskedResNet, point: str):
    """``(e, s)`` for ``masked_gate`` so that its gate equals ``net.gate(point)``."""
    if net.mask_e is None:
        return None, 1.0
    e = net.mask_e[point]
    if net.binary_masks:  # (e > 0) as sigmoid(+-big): exactly 1 / 0, no gradient to e
        return (net.binary_mask(point).to(e.dtype) * 2 - 1) * _BIG_LOGIT, 1.0
    return e, float(net.s)


def _trainable_shortcut(net: MaskedResNet, blk, y, si: int, bi: int):
    """``net._shortcut`` with the common option-A case (every input channel kept, the new
    ones zero) as a pad instead of a gather (its backward, index_add_, is slow in
    channels_last)."""
    if blk.sc_conv is None and bi == 0 and si > 0:
        idx = shortcut_a_index(net.kept(f"stream{si - 1}"), net.kept(f"stream{si}"))
        pad = _a_shortcut_pad(idx, net.kept(f"stream{si - 1}").numel())
        if pad is not None:
            return F.pad(y[:, :, ::blk.stride, ::blk.stride], (0, 0, 0, 0, 0, pad))
    return net._shortcut(blk, y, si, bi)


def trainable_feature_map(net: MaskedResNet, x: torch.Tensor) -> torch.Tensor:
    """The last feature map of one extractor, with autograd, through ``masked_gate``."""
    gate = ops.masked_gate
    stem = net.stem
    z = F.conv2d(x, stem.conv.weight, None, stem.conv.stride, stem.conv.padding)
    z, scale, shift = _bn_affine(stem.bn, z)
    e, s = _gate_args(net, "stream0")
    y = gate(z, scale, shift, e=e, s=s)
    if net.arch.stem_maxpool:
        y = F.max_pool2d(y, 3, 2, 1)
    for si, blocks in enumerate(net.stages):
        e_stream, s_stream = _gate_args(net, f"stream{si}")
        for bi, blk in enumerate(blocks):
            z = F.conv2d(y, blk.conv1.weight, None, blk.conv1.stride, blk.conv1.padding)
            z, scale, shift = _bn_affine(blk.bn1, z)
            e, s = _gate_args(net, f"inner{si}_{bi}")
            h = gate(z, scale, shift, e=e, s=s)
            r = _trainable_shortcut(net, blk, y, si, bi)
            z = F.conv2d(h, blk.conv2.weight, None, blk.conv2.stride, blk.conv2.padding)
            z, scale, shift = _bn_affine(blk.bn2, z)
            y = gate(z, scale, shift, e=e_stream, s=s_stream, residual=r)
    return y
