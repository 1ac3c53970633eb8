"""The loop executor: a folded network run conv by conv in channels_last, each conv + bias
[+ residual] + ReLU one fused oneDNN primitive on CPU (plans "loop" and "grouped")."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .fold import FoldedBlock, FoldedConv, FoldedNet


def mkldnn_ok(x: torch.Tensor) -> bool:
    """Whether fused oneDNN conv primitives can run on ``x`` (CPU, float32 / bfloat16)."""
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn,
                                                                 "_convolution_pointwise"))


def _conv(x, c: FoldedConv, relu: bool, residual=None, fused: bool = False):
    """``[relu](conv(x) + bias [+ residual])``; one oneDNN primitive when ``fused``."""
    if fused:
        p, s = [c.padding, c.padding], [c.stride, c.stride]
        if residual is None:
            return torch.ops.mkldnn._convolution_pointwise(
                x, c.weight, c.bias, p, s, [1, 1], c.groups, "relu" if relu else "none", [], "")
        residual = residual.contiguous(memory_format=torch.channels_last)
        return torch.ops.mkldnn._convolution_pointwise.binary(
            x, residual, c.weight, c.bias, p, s, [1, 1], c.groups, "add", None,
            "relu" if relu else None, [], "")
    y = F.conv2d(x, c.weight, c.bias, c.stride, c.padding, 1, c.groups)
    if residual is not None:
        y = y + residual if torch.is_grad_enabled() else y.add_(residual)
    if relu:
        y = F.relu(y) if torch.is_grad_enabled() else y.relu_()
    return y


def shortcut_a(y, b: FoldedBlock):
    """Option-A shortcut of block ``b``: ``y`` subsampled by the stride, its channels placed
    (or zero-filled) at the block's output positions."""
    xs = y[:, :, ::b.sc_stride, ::b.sc_stride]
    if b.sc_pad is not None:
        return F.pad(xs, (0, 0, 0, 0, 0, b.sc_pad))
    zero = xs.new_zeros(xs.shape[0], 1, *xs.shape[2:])
    return torch.cat([xs, zero], 1).index_select(1, b.sc_index)


def run_folded(f: FoldedNet, x: torch.Tensor, fused: bool | None = None) -> torch.Tensor:
    """Features [N, sum(out_dims)] of a folded (possibly fused) network.

    The input is not converted to channels_last: with channels_last weights the stem conv
    reads NCHW directly and writes channels_last (measured faster than converting first, and
    no extra copy of the batch: RESULTS.md, "The fast path's thresholds")."""
    if fused is None:
        fused = mkldnn_ok(x) and not (torch.is_grad_enabled() and x.requires_grad)
    y = _conv(x, f.stem, True, fused=fused)
    if f.maxpool:
        y = F.max_pool2d(y, 3, 2, 1)
    for b in f.blocks:
        h = _conv(y, b.conv1, True, fused=fused)
        if b.sc == "id":
            r = y
        elif b.sc == "B":
            r = _conv(y, b.sc_conv, False, fused=fused)
        else:
            r = shortcut_a(y, b)
        y = _conv(h, b.conv2, True, residual=r, fused=fused)
        if b.gate is not None:
            y = y * b.gate.view(1, -1, 1, 1)
    pooled = y.mean((2, 3))
    if f.out_index is not None:
        pooled = torch.cat([pooled, pooled.new_zeros(pooled.shape[0], 1)], 1).index_select(
            1, f.out_index)
    return pooled
