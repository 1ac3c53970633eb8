"""``der_fast::conv3x3_bordered``: the frozen path's direct 3x3 convolution on zero-bordered
planes (inference only, CPU, float32).

Checks, the pure-PyTorch reference (and :func:`border`, the layout), the PyTorch fallback
kernel, the fake kernel, the no-gradient registration and the public wrapper. Kernel:
csrc/conv3x3_bordered.cpp (der_fast._C).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._library import CPU_EXT_OPS, lib, register_no_backward

# ==============================================================================================
# checks and reference


def _conv3x3_out_hw(x, stride):
    return (x.shape[2] - 3) // stride + 3, (x.shape[3] - 3) // stride + 3


def _check_conv3x3(x, weight, bias, residual=None, gate=None, stride=1) -> None:
    """Same checks and messages as csrc/conv3x3_bordered.cpp."""
    if x.dim() != 4:
        raise RuntimeError("conv3x3_bordered: x must be [N, C_in, H + 2, W + 2], got "
                           f"{list(x.shape)}")
    if x.dtype != torch.float32:
        raise RuntimeError(f"conv3x3_bordered: only float32 is supported, got {x.dtype}")
    if x.shape[2] < 3 or x.shape[3] < 3:
        raise RuntimeError("conv3x3_bordered: each plane needs a 1-pixel zero border around at "
                           f"least 1x1 pixels, got planes of {x.shape[2]}x{x.shape[3]}")
    if weight.dim() != 4 or tuple(weight.shape[1:]) != (x.shape[1], 3, 3) or weight.shape[0] < 1:
        raise RuntimeError(f"conv3x3_bordered: weight must be [C_out, {x.shape[1]}, 3, 3], got "
                           f"{list(weight.shape)}")
    if stride not in (1, 2):
        raise RuntimeError(f"conv3x3_bordered: stride must be 1 or 2, got {stride}")
    co = weight.shape[0]
    if bias.dim() != 1 or bias.shape[0] != co:
        raise RuntimeError(f"conv3x3_bordered: bias must be [{co}], got {list(bias.shape)}")
    for t in (weight, bias):
        if t.dtype != torch.float32 or t.device != x.device:
            raise RuntimeError(f"conv3x3_bordered: weight and bias must be float32 on {x.device}")
    if residual is not None:
        want = (x.shape[0], co, *_conv3x3_out_hw(x, stride))
        if tuple(residual.shape) != want:
            raise RuntimeError(f"conv3x3_bordered: residual must be {list(want)}, got "
                               f"{list(residual.shape)}")
        if residual.dtype != torch.float32 or residual.device != x.device:
            raise RuntimeError(f"conv3x3_bordered: residual must be float32 on {x.device}")
    if gate is not None and (gate.dim() != 1 or gate.shape[0] != co
                             or gate.dtype != torch.float32 or gate.device != x.device):
        raise RuntimeError(f"conv3x3_bordered: gate must be a float32 [{co}] tensor on "
                           f"{x.device}")
    if x.device.type != "cpu" and x.device.type != "meta":
        raise RuntimeError(f"conv3x3_bordered: CPU tensors only, got {x.device}")


def border(x: Tensor) -> Tensor:
    """``x`` [N, C, H, W] with a 1-pixel zero border: the layout of :func:`conv3x3_bordered`."""
    return F.pad(x, (1, 1, 1, 1)).contiguous()


def conv3x3_bordered_ref(x, weight, bias, residual=None, gate=None, relu=True, stride=1):
    """Reference for :func:`conv3x3_bordered` (PyTorch ops, any dtype)."""
    if x.shape[1] == 0:  # a sum over no input channels is 0 (F.conv2d gives no channels)
        hw = [v - 2 for v in _conv3x3_out_hw(x, stride)]  # without the border
        y = bias.view(1, -1, 1, 1).expand(x.shape[0], -1, *hw).to(x.dtype).clone()
    else:
        y = F.conv2d(x[:, :, 1:-1, 1:-1], weight, bias, stride=stride, padding=1)
    if residual is not None:
        y = y + residual[:, :, 1:-1, 1:-1]
    if relu:
        y = F.relu(y)
    if gate is not None:
        y = y * gate.view(1, -1, 1, 1)
    return border(y)


def _conv3x3_fallback(x, weight, bias, residual=None, gate=None, relu=True, stride=1):
    _check_conv3x3(x, weight, bias, residual, gate, stride)
    return conv3x3_bordered_ref(x, weight, bias, residual, gate, relu, stride)


if "conv3x3_bordered" not in CPU_EXT_OPS:
    lib.impl("conv3x3_bordered", _conv3x3_fallback, "CPU")


# ==============================================================================================
# fake kernel and autograd (none: inference only)


@torch.library.register_fake("der_fast::conv3x3_bordered")
def _conv3x3_fake(x, weight, bias, residual=None, gate=None, relu=True, stride=1):
    _check_conv3x3(x, weight, bias, residual, gate, stride)
    return x.new_empty((x.shape[0], weight.shape[0], *_conv3x3_out_hw(x, stride)))


register_no_backward("conv3x3_bordered", "; use F.conv2d where one is needed")


# ==============================================================================================
# public wrapper


def conv3x3_bordered(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    residual: Tensor | None = None,
    gate: Tensor | None = None,
    relu: bool = True,
    stride: int = 1,
) -> Tensor:
    """Inference-only direct 3x3 convolution (padding 1, stride 1 or 2) for narrow layers,
    CPU, float32, on zero-bordered planes:

    ``y = gate[c] * act(conv3x3(x, weight) + bias[c] (+ residual))``, act = ReLU if ``relu``.

    ``x``: ``[N, C_in, H + 2, W + 2]`` whose 1-pixel border is zero (see :func:`border`);
    ``residual`` (optional) ``[N, C_out, H + 2, W + 2]`` in the same layout; ``gate`` (optional)
    ``[C_out]``. Returns ``[N, C_out, H' + 2, W' + 2]`` (``H' = (H - 1) // stride + 1``; the
    residual has that shape too) with a zero border, so layers chain
    without padding copies. No autograd (FastDERNet's frozen extractors only). Faster than
    oneDNN for layers with few channels (pruned extractors), slower for wide ones: see
    ``benchmarks/bench_conv3x3_bordered.py``.

    The zero border is a precondition, not checked: a non-zero border gives wrong values.
    Checking it would read the border of every input on every call of the frozen path;
    :func:`border` and the op's own outputs always have a zero border.
    """
    return torch.ops.der_fast.conv3x3_bordered(x, weight, bias, residual, gate, bool(relu),
                                               int(stride))
