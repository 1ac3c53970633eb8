"""The loop executor: a folded network run conv by conv in channels_last, each conv + bias
[+ residual] + ReLU one fused oneDNN primitive on CPU (plans "loop" and "grouped")."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .fold import FoldedBlock, FoldedConv, FoldedNet


def mkldnn_ok(x: torch.Tensor) -> bool:
    """Whether fused oneDNN conv primitives can run on ``x`` (CPU, float32 / bfloat16)."""
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn,
                                                                 "_convolution_pointwise"))


def _conv(x, c: FoldedConv, relu: bool, residual=None, gate=None, fused: bool = False):
    """``gate * [relu](conv(x) + bias [+ residual])``; conv, bias, residual and ReLU one oneDNN
    primitive when ``fused``."""
    if fused:
        p, s = [c.padding, c.padding], [c.stride, c.stride]
        if residual is None:
            y = torch.ops.mkldnn._convolution_pointwise(
                x, c.weight, c.bias, p, s, [1, 1], c.groups, "relu" if relu else "none", [], "")
        else:
            residual = residual.contiguous(memory_format=torch.channels_last)
            y = torch.ops.mkldnn._convolution_pointwise.binary(
                x, residual, c.weight, c.bias, p, s, [1, 1], c.groups, "add", None,
                "relu" if relu else None, [], "")
    else:
        y = F.conv2d(x, c.weight, c.bias, c.stride, c.padding, 1, c.groups)
        if residual is not None:
            y = y + residual if torch.is_grad_enabled() else y.add_(residual)
        if relu:
            y = F.relu(y) if torch.is_grad_enabled() else y.relu_()
    if gate is not None:
        y = y * gate.view(1, -1, 1, 1)
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
    conv = functools.partial(_conv, fused=fused)
    y = conv(x, f.stem, True)
    if f.maxpool:
        y = F.max_pool2d(y, 3, 2, 1)
    y = run_blocks(f, y, conv, shortcut_a)
    return gather_features(f, y.mean((2, 3)))


def run_blocks(f: FoldedNet, y: torch.Tensor, conv, shortcut) -> torch.Tensor:
    """The residual blocks of a folded net on the stem's output ``y`` in an executor's layout:
    ``conv(x, folded_conv, relu, residual=None, gate=None)`` runs one of its convs (as
    ``_conv``), ``shortcut(y, block)`` an option-A shortcut."""
    for b in f.blocks:
        h = conv(y, b.conv1, True)
        if b.sc == "id":
            r = y
        elif b.sc == "B":
            r = conv(y, b.sc_conv, False)
        else:
            r = shortcut(y, b)
        y = conv(h, b.conv2, True, residual=r, gate=b.gate)
    return y


def gather_features(f: FoldedNet, pooled: torch.Tensor) -> torch.Tensor:
    """The pooled last activation [N, C] placed at the net's feature positions (zeros for
    pruned channels, ``out_index``)."""
    if f.out_index is None:
        return pooled
    return torch.cat([pooled, pooled.new_zeros(pooled.shape[0], 1)], 1).index_select(
        1, f.out_index)
