"""The bordered executor (the direct plan): a folded network with every activation kept as a
zero-bordered NCHW tensor, narrow 3x3 convs on the conv3x3_bordered kernel, the rest on oneDNN;
in one call of the compiled ``bordered_resnet`` op, or layer by layer from Python."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .. import ops
from .fold import FoldedBlock, FoldedConv, FoldedNet, convs_with_size
from .plan import use_kernel
from .run_loop import gather_features, run_blocks, shortcut_a

# Batch chunk: narrow layers are memory-bound (a 5 -> 5 channel conv at 32x32 moves 3 x 3 MiB
# per 128 images), so the batch is cut into chunks whose activations stay in the L2 cache
# through the whole network (per-image timings by chunk size: RESULTS.md, "The fast
# path's thresholds").
_CHUNK_BYTES = 1 << 20  # target bytes of the widest activation of one chunk
_CHUNK_MIN = 8


def run_bordered(f: FoldedNet, x: torch.Tensor, force: bool = False,
                 chunk: int | None = None, executor: bool | None = None) -> torch.Tensor:
    """Features [N, sum(out_dims)] of a folded network, every activation kept as a
    zero-bordered NCHW tensor [N, C, H + 2, W + 2] so that narrow 3x3 convs run the
    conv3x3_bordered kernel (``der_fast.ops.conv3x3_bordered``) with no padding copies; other
    convs run oneDNN on the same tensors. ``force``: the kernel for every 3x3 conv of stride 1
    or 2, whatever its width. ``chunk``: images per pass (default: as many as keep the widest
    activation within ~1 MiB, so a pass stays in the L2 cache; 0 = the whole batch at once).
    ``executor``: run the whole network in one call of the compiled executor
    (``der_fast.ops.bordered_resnet``: same kernels, no per-layer tensors or dispatch; the
    default where the extension has it), or (False) layer by layer from Python.
    CPU, float32, no autograd."""
    if not ops.HAS_CPU_EXT:
        raise RuntimeError("run_bordered needs der_fast's compiled CPU extension (der_fast._C, "
                           "with the conv3x3_bordered kernel); use run_folded without it")
    chunk = _bordered_chunk(f, x) if chunk is None else chunk
    use_executor = ops.HAS_BORDERED_RESNET if executor is None else executor
    if use_executor:  # ops.bordered_resnet raises if the extension lacks it
        return ops.bordered_resnet(x.contiguous(), *bordered_program(f, force), chunk)
    if 0 < chunk < x.shape[0]:
        return torch.cat([_run_bordered(f, xc, force) for xc in x.split(chunk)], 0)
    return _run_bordered(f, x, force)


def _bordered_chunk(f: FoldedNet, x: torch.Tensor) -> int:
    key = ("chunk", tuple(x.shape[2:]), x.element_size())
    if key in f.memo:
        return f.memo[key]
    widest = 0
    for c, hw in convs_with_size(f, tuple(x.shape[2:])):  # (h+2)(w+2) <= hw + 4 sqrt(hw) + 4
        bordered = hw + 4 * int(hw ** 0.5 + 1) + 4
        widest = max(widest, c.weight.shape[0] * bordered * x.element_size())
    f.memo[key] = max(_CHUNK_MIN, _CHUNK_BYTES // max(widest, 1))
    return f.memo[key]


def bordered_program(f: FoldedNet, force: bool) -> tuple:
    """The arguments of ``ops.bordered_resnet`` (all but ``x`` and ``chunk``) for a folded net
    (memoized): convs in the order stem, then per block conv1, conv2 [, shortcut conv], each
    with (stride, padding, groups, conv3x3_bordered kernel?) chosen by the same rule as the
    Python executor (use_kernel)."""
    key = ("program", force)
    if key in f.memo:
        return f.memo[key]
    empty = f.stem.bias.new_empty(0)
    weights, biases, meta, blocks, idx, gates = [], [], [], [], [], []

    def add(c: FoldedConv) -> None:
        kernel = use_kernel(c, force)
        weights.append(_kernel_weight(c) if kernel else c.weight)
        biases.append(c.bias)
        meta.extend([c.stride, c.padding, c.groups, int(kernel)])

    add(f.stem)
    for b in f.blocks:
        add(b.conv1)
        add(b.conv2)
        if b.sc == "B":
            add(b.sc_conv)
        blocks.extend([{"id": 0, "A": 1, "B": 2}[b.sc], b.sc_stride])
        idx.append(b.sc_index if b.sc == "A" else empty.long())
        gates.append(b.gate if b.gate is not None else empty)
    last = f.blocks[-1].conv2 if f.blocks else f.stem
    out_dim = sum(f.out_dims) if f.out_index is not None else last.weight.shape[0]
    prog = (weights, biases, meta, blocks, idx, gates, f.out_index, int(out_dim), f.maxpool)
    f.memo[key] = prog
    return prog


def _run_bordered(f: FoldedNet, x: torch.Tensor, force: bool) -> torch.Tensor:
    xb = ops.border(x)
    y = _conv_bordered(xb, f.stem, True, force=force)
    if f.maxpool:
        y = ops.border(F.max_pool2d(y[:, :, 1:-1, 1:-1], 3, 2, 1))
    y = run_blocks(f, y, functools.partial(_conv_bordered, force=force), _shortcut_bordered)
    hw = (y.shape[2] - 2) * (y.shape[3] - 2)
    return gather_features(f, y.sum((2, 3)).div_(hw))  # the border is 0


def _shortcut_bordered(yb, b: FoldedBlock):
    """Option-A shortcut of block ``b`` from and to the zero-bordered layout."""
    return ops.border(shortcut_a(yb[:, :, 1:-1, 1:-1], b))


def _kernel_weight(c: FoldedConv) -> torch.Tensor:
    """The conv's weight as the kernel reads it (NCHW-contiguous), made once per folded conv."""
    if c.weight_nchw is None:
        c.weight_nchw = c.weight.contiguous()
    return c.weight_nchw


def _conv_bordered(xb, c: FoldedConv, relu: bool, residual=None, gate=None, force=False):
    """``gate * [relu](conv(x) + bias [+ residual])`` from and to the zero-bordered layout."""
    if use_kernel(c, force):
        return ops.conv3x3_bordered(xb, _kernel_weight(c), c.bias, residual, gate, relu,
                                    c.stride)
    # oneDNN / aten: the border is the conv's padding (or the interior, for padding 0)
    if c.padding >= 1:
        y = F.conv2d(xb, c.weight, c.bias, c.stride, c.padding - 1, 1, c.groups)
    else:
        y = F.conv2d(xb[:, :, 1:-1, 1:-1], c.weight, c.bias, c.stride, 0, 1, c.groups)
    if residual is not None:
        y = y.add_(residual[:, :, 1:-1, 1:-1])
    if relu:
        y = y.relu_()
    if gate is not None:
        y = y.mul_(gate.view(1, -1, 1, 1))
    return ops.border(y)

