"""Triton kernels for ``der_fast.masked_gate`` (the CUDA implementation of the op).

    y[n, c, p] = g[c] * relu(scale[c] * x[n, c, p] + shift[c] (+ residual[n, c, p]))

``masked_gate_fwd`` / ``masked_gate_bwd`` take and return torch tensors; der_fast.ops registers
them as the op's CUDA kernels. They also run on CPU tensors under the Triton interpreter
(``TRITON_INTERPRET=1`` set before triton is imported), which is how
tests/test_masked_gate_triton.py checks them on machines without a GPU.

Layouts (NCHW planes or channel columns of a dense 2-D view), launches: kernels/_common.py.
The gate g = sigmoid(s * e) is a length-C vector computed on the host in the compute
dtype (float32, or float64 for float64 inputs), exactly as the reference does.

Backward reductions (grad_scale, grad_shift, grad_e) are two-stage and deterministic (no
atomics): each program writes per-row (NCHW) or per-chunk (NHWC) partial sums in the compute
dtype, which are then summed with torch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common
from ._common import cvt, sums_lines, sums_tile, tile_2d


@triton.jit
def _masked_gate_fwd_kernel(
    X,
    R,
    Y,
    SCALE,
    SHIFT,
    G,
    n_rows,
    L,
    C,
    HAS_G: tl.constexpr,
    HAS_R: tl.constexpr,
    CHANNEL_IS_COL: tl.constexpr,
    FP64: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    offs, mask, cidx, cm = tile_2d(n_rows, L, C, CHANNEL_IS_COL, BLOCK_R, BLOCK_L)
    a = cvt(tl.load(SCALE + cidx, mask=cm, other=0), FP64)
    b = cvt(tl.load(SHIFT + cidx, mask=cm, other=0), FP64)
    x = cvt(tl.load(X + offs, mask=mask, other=0), FP64)
    z = x * a + b
    if HAS_R:
        z = z + cvt(tl.load(R + offs, mask=mask, other=0), FP64)
    z = tl.where(z < 0, 0.0, z)
    if HAS_G:
        z = z * tl.load(G + cidx, mask=cm, other=0)
    tl.store(Y + offs, z.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _masked_gate_bwd_tile(acc_dz, acc_dzx, acc_gyy, GY, Y, X, GX, GR, offs, mask, sc, g,
                          AXIS: tl.constexpr, HAS_G: tl.constexpr, HAS_X: tl.constexpr,
                          WGX: tl.constexpr, WGR: tl.constexpr, FP64: tl.constexpr):
    """One tile of the backward: writes grad_x / grad_residual (as asked) and adds its sums
    over AXIS of dz, dz * x and grad_y * y to the accumulators (sc, g broadcast to the tile)."""
    gy = cvt(tl.load(GY + offs, mask=mask, other=0), FP64)
    y = cvt(tl.load(Y + offs, mask=mask, other=0), FP64)
    if HAS_G:
        dz = tl.where(y > 0, gy * g, 0.0)
    else:
        dz = tl.where(y > 0, gy, 0.0)
    if WGX:
        tl.store(GX + offs, (dz * sc).to(GX.dtype.element_ty), mask=mask)
    if WGR:
        tl.store(GR + offs, dz.to(GR.dtype.element_ty), mask=mask)
    acc_dz += tl.sum(dz, axis=AXIS)
    if HAS_X:
        x = cvt(tl.load(X + offs, mask=mask, other=0), FP64)
        acc_dzx += tl.sum(dz * x, axis=AXIS)
    acc_gyy += tl.sum(gy * y, axis=AXIS)
    return acc_dz, acc_dzx, acc_gyy


@triton.jit
def _masked_gate_bwd_kernel(
    GY,
    Y,
    X,
    GX,
    GR,
    SCALE,
    G,
    P_DZ,
    P_DZX,
    P_GYY,
    n_rows,
    L,
    C,
    SPAN,
    HAS_G: tl.constexpr,
    HAS_X: tl.constexpr,
    WGX: tl.constexpr,
    WGR: tl.constexpr,
    FP64: tl.constexpr,
    CHANNEL_IS_COL: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    """One partial of each sum per line (``sums_lines``); writes grad_x / grad_residual (as
    asked)."""
    STEP: tl.constexpr = BLOCK_R if CHANNEL_IS_COL else BLOCK_L  # tile length along a line
    AXIS: tl.constexpr = 0 if CHANNEL_IS_COL else 1  # a tile's axis along its lines
    pofs, pmask, cidx, cm = sums_lines(n_rows, C, CHANNEL_IS_COL, BLOCK_R, BLOCK_L)
    sc = cvt(tl.load(SCALE + cidx, mask=cm, other=0), FP64)
    g = sc
    if HAS_G:
        g = tl.load(G + cidx, mask=cm, other=0)
    acc_dz = cvt(tl.zeros(pofs.shape, dtype=tl.float32), FP64)
    acc_dzx = acc_dz
    acc_gyy = acc_dz
    for start in range(0, SPAN, STEP):
        offs, mask = sums_tile(start, n_rows, L, C, SPAN, CHANNEL_IS_COL, BLOCK_R, BLOCK_L)
        acc_dz, acc_dzx, acc_gyy = _masked_gate_bwd_tile(
            acc_dz, acc_dzx, acc_gyy, GY, Y, X, GX, GR, offs, mask, sc, g,
            AXIS, HAS_G, HAS_X, WGX, WGR, FP64,
        )
    tl.store(P_DZ + pofs, acc_dz, mask=pmask)
    tl.store(P_DZX + pofs, acc_dzx, mask=pmask)
    tl.store(P_GYY + pofs, acc_gyy, mask=pmask)


# ----------------------------------------------------------------------------------------------
# host side


def masked_gate_fwd(x, scale, shift, e=None, s: float = 1.0, residual=None) -> torch.Tensor:
    """Forward of masked_gate with the Triton kernel (arguments already validated)."""
    fmt, x = _common.layout(x)
    r = _common.dense(residual, fmt)
    y = torch.empty_like(x, memory_format=fmt)
    if x.numel() == 0:
        return y
    cdt = _common.compute_dtype(x.dtype)
    g = _common.gate(e, s, cdt)
    _common.launch_elementwise(
        _masked_gate_fwd_kernel,
        _common.geometry(x, fmt),
        x,
        r if r is not None else x,
        y,
        scale.contiguous(),
        shift.contiguous(),
        g if g is not None else scale,
        HAS_G=g is not None,
        HAS_R=r is not None,
        FP64=cdt == torch.float64,
    )
    return y


def masked_gate_bwd(grad_y, y, x, scale, e, s: float, output_mask):
    """Backward of masked_gate with the Triton kernels.

    Returns (grad_x, grad_scale, grad_shift, grad_e, grad_residual); entries not requested by
    output_mask (same order) are empty tensors.
    """
    fmt, y = _common.layout(y)
    gy = _common.dense(grad_y, fmt)
    want_x, want_scale, want_shift, want_e, want_r = (bool(m) for m in output_mask)
    xd = _common.dense(x, fmt) if want_scale else None
    C = y.shape[1]
    empty = lambda: y.new_empty((0,))
    gx = torch.empty_like(y, memory_format=fmt) if want_x else empty()
    gr = torch.empty_like(y, memory_format=fmt) if want_r else empty()
    cdt = _common.compute_dtype(y.dtype)
    g = _common.gate(e, s, cdt)
    if y.numel() == 0:
        sums = torch.zeros((3, C), dtype=cdt, device=y.device)
    else:
        part, _ = _common.reduce_by_layout(
            _masked_gate_bwd_kernel,
            _common.geometry(y, fmt),
            gy,
            y,
            xd if xd is not None else y,
            gx if want_x else y,
            gr if want_r else y,
            scale.contiguous(),
            g if g is not None else scale,
            n_sums=3,
            cdt=cdt,
            HAS_G=g is not None,
            HAS_X=xd is not None,
            WGX=want_x,
            WGR=want_r,
            FP64=cdt == torch.float64,
        )
        sums = part.sum(1)
    gshift = sums[0].to(y.dtype, copy=True) if want_shift else empty()
    gscale = sums[1].to(y.dtype, copy=True) if want_scale else empty()
    ge = (s * (1 - g) * sums[2]).to(y.dtype) if want_e else empty()
    return gx, gscale, gshift, ge, gr
