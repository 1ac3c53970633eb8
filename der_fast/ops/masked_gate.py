"""``der_fast::masked_gate``: ``y = sigmoid(s * e) * relu(scale * x + shift [+ residual])``.

Checks, the pure-PyTorch reference, the PyTorch fallback kernels, the Triton (CUDA) kernel
registration, fake kernels, the autograd formula and the public wrapper. CPU kernels:
csrc/masked_gate.cpp (der_fast._C); CUDA: kernels/masked_gate.py (Triton).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _backend
from ._checks import _check_like, _kernel_format
from ._library import CPU_EXT_OPS, HAS_TRITON, _resolve_backend, lib, register_autograd

# ==============================================================================================
# checks and reference


def _check_masked_gate(x, scale, shift, e=None, residual=None) -> None:
    op = "der_fast.masked_gate"
    if x.dim() not in (2, 4):
        raise ValueError(
            f"{op}: x must be 2-D [N, C] or 4-D [N, C, H, W], got a {x.dim()}-D tensor of "
            f"shape {list(x.shape)}"
        )
    if not x.is_floating_point():
        raise TypeError(f"{op}: x must be a floating point tensor, got dtype {x.dtype}")
    C = x.shape[1]
    for name, t in (("scale", scale), ("shift", shift), ("e", e)):
        if t is None:
            continue
        if t.dim() != 1:
            raise ValueError(f"{op}: {name} must be 1-D [C] with C={C}, got shape {list(t.shape)}")
        _check_like(t, x, op, name, "x")
        if t.shape[0] != C:
            raise ValueError(
                f"{op}: {name} has {t.shape[0]} channels but x has C={C} (x.shape={list(x.shape)})"
            )
    if residual is not None:
        _check_like(residual, x, op, "residual", "x")
        if residual.shape != x.shape:
            raise ValueError(
                f"{op}: residual has shape {list(residual.shape)} but x has shape "
                f"{list(x.shape)} (they must be equal)"
            )


def masked_gate_ref(
    x: Tensor,
    scale: Tensor,
    shift: Tensor,
    e: Tensor | None = None,
    s: float = 1.0,
    residual: Tensor | None = None,
) -> Tensor:
    """Reference for :func:`masked_gate`: ``g * relu(scale * x + shift [+ residual])`` with
    ``g = sigmoid(s * e)`` (per channel), written as plain PyTorch ops (autograd by PyTorch)."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    z = x * scale.view(shape) + shift.view(shape)
    if residual is not None:
        z = z + residual
    y = torch.relu(z)
    if e is not None:
        y = y * torch.sigmoid(s * e).view(shape)
    return y


# ==============================================================================================
# kernels registered from Python: PyTorch fallback (where no compiled kernel), Triton on CUDA


def _masked_gate_fallback(x, scale, shift, e=None, s=1.0, residual=None):
    _check_masked_gate(x, scale, shift, e, residual)
    return masked_gate_ref(x, scale, shift, e, s, residual).contiguous(
        memory_format=_kernel_format(x)
    )


def _masked_gate_backward_fallback(grad_y, y, x, scale, e, s, output_mask):
    want_x, want_scale, want_shift, want_e, want_r = (bool(m) for m in output_mask)
    fmt = _kernel_format(y)
    C = y.shape[1]
    shape = (1, C) + (1,) * (y.dim() - 2)
    dims = (0, 2, 3) if y.dim() == 4 else (0,)
    empty = lambda: y.new_empty((0,))
    dz = torch.where(y > 0, grad_y, torch.zeros((), dtype=y.dtype, device=y.device))
    g = torch.sigmoid(s * e) if e is not None else None
    if g is not None:
        dz = dz * g.view(shape)
    gx = (dz * scale.view(shape)).contiguous(memory_format=fmt) if want_x else empty()
    gscale = (dz * x).sum(dims) if want_scale else empty()
    gshift = dz.sum(dims) if want_shift else empty()
    ge = (s * (1 - g) * (grad_y * y).sum(dims)) if want_e else empty()
    gr = dz.contiguous(memory_format=fmt).clone() if want_r else empty()
    return gx, gscale, gshift, ge, gr


def _triton_mg_fwd(x, scale, shift, e=None, s=1.0, residual=None):
    _check_masked_gate(x, scale, shift, e, residual)
    with torch.cuda.device(x.device):  # Triton launches on the current device
        return _backend.load_kernel_module("masked_gate").masked_gate_fwd(
            x, scale, shift, e, s, residual
        )


def _triton_mg_bwd(grad_y, y, x, scale, e, s, output_mask):
    with torch.cuda.device(y.device):
        return _backend.load_kernel_module("masked_gate").masked_gate_bwd(
            grad_y, y, x, scale, e, s, output_mask
        )


if "masked_gate" not in CPU_EXT_OPS:
    lib.impl("masked_gate", _masked_gate_fallback, "CPU")
    lib.impl("masked_gate_backward", _masked_gate_backward_fallback, "CPU")
if torch.version.cuda:
    if HAS_TRITON:
        lib.impl("masked_gate", _triton_mg_fwd, "CUDA")
        lib.impl("masked_gate_backward", _triton_mg_bwd, "CUDA")
    else:
        lib.impl("masked_gate", _masked_gate_fallback, "CUDA")
        lib.impl("masked_gate_backward", _masked_gate_backward_fallback, "CUDA")


# ==============================================================================================
# fake (meta) kernels


@torch.library.register_fake("der_fast::masked_gate")
def _masked_gate_fake(x, scale, shift, e=None, s=1.0, residual=None):
    _check_masked_gate(x, scale, shift, e, residual)
    return torch.empty_like(x, memory_format=_kernel_format(x))


@torch.library.register_fake("der_fast::masked_gate_backward")
def _masked_gate_backward_fake(grad_y, y, x, scale, e, s, output_mask):
    fmt = _kernel_format(y)
    C = y.shape[1]
    m = [bool(v) for v in output_mask]
    full = lambda ok: torch.empty_like(y, memory_format=fmt) if ok else y.new_empty((0,))
    vec = lambda ok: y.new_empty((C,)) if ok else y.new_empty((0,))
    return full(m[0]), vec(m[1]), vec(m[2]), vec(m[3]), full(m[4])


# ==============================================================================================
# autograd


def _masked_gate_setup_context(ctx, inputs, output):
    x, scale, _shift, e, s, residual = inputs
    ctx.s = float(s)
    ctx.has_e = e is not None
    ctx.has_r = residual is not None
    # Saved: y (the output; kept alive anyway as the next layer's input), x only when the
    # scale gradient is needed (in training BN's batch statistics keep it alive anyway),
    # scale and e (per-channel). The pre-activation z is never stored: relu'(z) = [y > 0]
    # (g > 0), and grad_e uses sum(grad_y * y) = g * sum(grad_y * relu(z)).
    ctx.save_for_backward(output, x if scale.requires_grad else None, scale, e)


def _masked_gate_backward(ctx, grad_y):
    y, x, scale, e = ctx.saved_tensors
    n = ctx.needs_input_grad
    mask = [
        bool(n[0]),
        bool(n[1]) and x is not None,
        bool(n[2]),
        bool(ctx.has_e and n[3]),
        bool(ctx.has_r and len(n) > 5 and n[5]),
    ]
    if grad_y is None or not any(mask):
        return (None,) * len(n)
    gx, gscale, gshift, ge, gr = torch.ops.der_fast.masked_gate_backward(
        grad_y, y, x, scale, e, ctx.s, mask
    )
    out = [
        gx if mask[0] else None,
        gscale if mask[1] else None,
        gshift if mask[2] else None,
        ge if mask[3] else None,
        None,
        gr if mask[4] else None,
    ]
    return tuple(out[: len(n)])


register_autograd("masked_gate", _masked_gate_backward, _masked_gate_setup_context)


# ==============================================================================================
# public wrapper


def masked_gate(
    x: Tensor,
    scale: Tensor,
    shift: Tensor,
    e: Tensor | None = None,
    s: float = 1.0,
    residual: Tensor | None = None,
    *,
    backend: str = "auto",
) -> Tensor:
    """Fused masked channel gating: ``y = g * relu(scale * x + shift [+ residual])``.

    ``y[n,c,h,w] = g[c] * relu(scale[c] * x[n,c,h,w] + shift[c] + residual[n,c,h,w])`` with
    ``g = sigmoid(s * e)`` when ``e`` is given, else ``g = 1``. ``x`` may also be 2-D ``[N, C]``.

    This is where DER's channel masks sit (see DEVNOTES.md): after BatchNorm, around the
    residual add. ``scale``/``shift`` are BN's per-channel affine (in training computed from the
    batch statistics outside the op, so gradients flow on to gamma/beta/mean/var); ``e`` is the
    mask embedding and ``s`` the annealed temperature. Every masked point of the ResNet
    (stem, inner ``m * relu(bn1(conv1 x))``, stream ``m * relu(bn2(conv2 h) + shortcut)``) is
    one call. With ``e=None`` (g = 1) it serves the frozen / fused paths, e.g. BN folded into
    ``scale/shift`` and binary masks folded into the convs, applied over all ``t*c`` channels of
    a grouped tensor at once.

    Backward gives gradients for ``x``, ``scale``, ``shift``, ``e`` and ``residual`` (the ones
    that require grad; the per-channel ones are reductions over N, H, W). It saves ``y`` and
    per-channel ``scale``/``e`` (plus ``x`` only if ``scale`` requires grad), never the
    pre-activation: ``relu'(z) = [y > 0]`` since ``g > 0``, and
    ``dL/de = s * (1 - g) * sum(grad_y * y)``. (If ``sigmoid(s*e)`` underflows to exactly 0 the
    channel's gradients are 0, as they are in the reference up to rounding.)

    Layout: NCHW-contiguous and channels_last inputs are processed directly (the output has
    the same layout); other strides are copied to contiguous first. All tensors must share
    dtype (float32, float64, bfloat16; float16 is computed in float32 on CPU) and device.

    backend: "auto" (the registered op: C++ on CPU, Triton on CUDA, PyTorch fallback where
    those are missing), "ref" (:func:`masked_gate_ref`), or "cpp"/"triton" to insist on a
    compiled implementation (raises if it is unavailable).
    """
    if _resolve_backend("masked_gate", backend, x.device) == "ref":
        return masked_gate_ref(x, scale, shift, e, s, residual)
    return torch.ops.der_fast.masked_gate(x, scale, shift, e, float(s), residual)
