"""Triton kernels for ``der_fast.masked_gate`` (the CUDA implementation of the op).

    y[n, c, p] = g[c] * relu(scale[c] * x[n, c, p] + shift[c] (+ residual[n, c, p]))

``masked_gate_fwd`` / ``masked_gate_bwd`` take and return torch tensors; der_fast.ops registers
them as the op's CUDA kernels. They also run on CPU tensors under the Triton interpreter
(``TRITON_INTERPRET=1`` set before triton is imported), which is how
tests/test_masked_gate_triton.py checks them on machines without a GPU.

Layouts. Inputs are made dense: NCHW is seen as a matrix [N*C, HW] whose rows are (n, c)
planes (channel = row % C); channels_last and 2-D [N, C] inputs as [N*HW, C] (channel =
column). The gate g = sigmoid(s * e) is a length-C vector computed on the host in the compute
dtype (float32, or float64 for float64 inputs), exactly as the reference does.

Backward reductions (grad_scale, grad_shift, grad_e) are two-stage and deterministic (no
atomics): each program writes per-row (NCHW) or per-chunk (NHWC) partial sums in the compute
dtype, which are then summed with torch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


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
    pid_r = tl.program_id(0)
    pid_l = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    rmask = rows < n_rows
    cmask = cols < L
    mask = rmask[:, None] & cmask[None, :]
    offs = rows.to(tl.int64)[:, None] * L + cols[None, :]
    if CHANNEL_IS_COL:
        a = tl.load(SCALE + cols, mask=cmask, other=0)[None, :]
        b = tl.load(SHIFT + cols, mask=cmask, other=0)[None, :]
        if HAS_G:
            g = tl.load(G + cols, mask=cmask, other=0)[None, :]
    else:
        ch = rows % C
        a = tl.load(SCALE + ch, mask=rmask, other=0)[:, None]
        b = tl.load(SHIFT + ch, mask=rmask, other=0)[:, None]
        if HAS_G:
            g = tl.load(G + ch, mask=rmask, other=0)[:, None]
    x = tl.load(X + offs, mask=mask, other=0)
    if FP64:
        x = x.to(tl.float64)
        a = a.to(tl.float64)
        b = b.to(tl.float64)
    else:
        x = x.to(tl.float32)
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    z = x * a + b
    if HAS_R:
        r = tl.load(R + offs, mask=mask, other=0)
        if FP64:
            z = z + r.to(tl.float64)
        else:
            z = z + r.to(tl.float32)
    z = tl.where(z < 0, 0.0, z)
    if HAS_G:
        z = z * g
    tl.store(Y + offs, z.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _masked_gate_bwd_planes_kernel(
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
    HAS_G: tl.constexpr,
    HAS_X: tl.constexpr,
    WGX: tl.constexpr,
    WGR: tl.constexpr,
    FP64: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    """NCHW: rows are (n, c) planes of length L = HW; one partial sum per row."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < n_rows
    ch = rows % C
    sc = tl.load(SCALE + ch, mask=rmask, other=0)
    if FP64:
        sc = sc.to(tl.float64)
        acc_dz = tl.zeros([BLOCK_R], dtype=tl.float64)
    else:
        sc = sc.to(tl.float32)
        acc_dz = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc_dzx = acc_dz
    acc_gyy = acc_dz
    if HAS_G:
        g = tl.load(G + ch, mask=rmask, other=0)
    rbase = rows.to(tl.int64) * L
    for start in range(0, L, BLOCK_L):
        cols = start + tl.arange(0, BLOCK_L)
        mask = rmask[:, None] & (cols < L)[None, :]
        offs = rbase[:, None] + cols[None, :]
        gy = tl.load(GY + offs, mask=mask, other=0)
        y = tl.load(Y + offs, mask=mask, other=0)
        if FP64:
            gy = gy.to(tl.float64)
            y = y.to(tl.float64)
        else:
            gy = gy.to(tl.float32)
            y = y.to(tl.float32)
        if HAS_G:
            dz = tl.where(y > 0, gy * g[:, None], 0.0)
        else:
            dz = tl.where(y > 0, gy, 0.0)
        if WGX:
            tl.store(GX + offs, (dz * sc[:, None]).to(GX.dtype.element_ty), mask=mask)
        if WGR:
            tl.store(GR + offs, dz.to(GR.dtype.element_ty), mask=mask)
        acc_dz += tl.sum(dz, axis=1)
        if HAS_X:
            x = tl.load(X + offs, mask=mask, other=0)
            if FP64:
                x = x.to(tl.float64)
            else:
                x = x.to(tl.float32)
            acc_dzx += tl.sum(dz * x, axis=1)
        acc_gyy += tl.sum(gy * y, axis=1)
    tl.store(P_DZ + rows, acc_dz, mask=rmask)
    tl.store(P_DZX + rows, acc_dzx, mask=rmask)
    tl.store(P_GYY + rows, acc_gyy, mask=rmask)


@triton.jit
def _masked_gate_bwd_rows_kernel(
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
    C,
    ROWS_PER_PROG,
    HAS_G: tl.constexpr,
    HAS_X: tl.constexpr,
    WGX: tl.constexpr,
    WGR: tl.constexpr,
    FP64: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """NHWC / 2-D: rows of C channels; program (i, j) sums rows [i*RPP, (i+1)*RPP) for a
    block of channels and writes one partial per (i, channel)."""
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    sc = tl.load(SCALE + cols, mask=cmask, other=0)
    if FP64:
        sc = sc.to(tl.float64)
        acc_dz = tl.zeros([BLOCK_C], dtype=tl.float64)
    else:
        sc = sc.to(tl.float32)
        acc_dz = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_dzx = acc_dz
    acc_gyy = acc_dz
    if HAS_G:
        g = tl.load(G + cols, mask=cmask, other=0)
    row0 = pid_r * ROWS_PER_PROG
    for start in range(0, ROWS_PER_PROG, BLOCK_R):
        local = start + tl.arange(0, BLOCK_R)
        rows = row0 + local
        rmask = (rows < n_rows) & (local < ROWS_PER_PROG)
        mask = rmask[:, None] & cmask[None, :]
        offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
        gy = tl.load(GY + offs, mask=mask, other=0)
        y = tl.load(Y + offs, mask=mask, other=0)
        if FP64:
            gy = gy.to(tl.float64)
            y = y.to(tl.float64)
        else:
            gy = gy.to(tl.float32)
            y = y.to(tl.float32)
        if HAS_G:
            dz = tl.where(y > 0, gy * g[None, :], 0.0)
        else:
            dz = tl.where(y > 0, gy, 0.0)
        if WGX:
            tl.store(GX + offs, (dz * sc[None, :]).to(GX.dtype.element_ty), mask=mask)
        if WGR:
            tl.store(GR + offs, dz.to(GR.dtype.element_ty), mask=mask)
        acc_dz += tl.sum(dz, axis=0)
        if HAS_X:
            x = tl.load(X + offs, mask=mask, other=0)
            if FP64:
                x = x.to(tl.float64)
            else:
                x = x.to(tl.float32)
            acc_dzx += tl.sum(dz * x, axis=0)
        acc_gyy += tl.sum(gy * y, axis=0)
    pofs = pid_r * C + cols
    tl.store(P_DZ + pofs, acc_dz, mask=cmask)
    tl.store(P_DZX + pofs, acc_dzx, mask=cmask)
    tl.store(P_GYY + pofs, acc_gyy, mask=cmask)


# ----------------------------------------------------------------------------------------------
# host side


def _format(x: torch.Tensor) -> torch.memory_format:
    if (
        x.dim() == 4
        and not x.is_contiguous()
        and x.is_contiguous(memory_format=torch.channels_last)
    ):
        return torch.channels_last
    return torch.contiguous_format


def _dense(t: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    if t.dim() != 4:
        return t.contiguous()
    return t if t.is_contiguous(memory_format=fmt) else t.contiguous(memory_format=fmt)


# No fused multiply-adds: x * scale + shift rounds twice, exactly like the PyTorch reference.
_NO_FMA = {"enable_fp_fusion": False}


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _gate(e, s, cdt):
    # exactly the reference's `torch.sigmoid(s * e)` (in e's dtype), then the compute dtype
    return None if e is None else torch.sigmoid(s * e).to(cdt).contiguous()


def _geometry(x: torch.Tensor, fmt) -> tuple[bool, int, int, int]:
    """-> (channel_is_col, n_rows, L, C) of the dense 2-D view."""
    N, C = x.shape[0], x.shape[1]
    HW = x.shape[2] * x.shape[3] if x.dim() == 4 else 1
    if fmt == torch.channels_last or x.dim() == 2:
        return True, N * HW, C, C
    return False, N * C, HW, C


def _blocks_2d(L: int, channel_is_col: bool) -> tuple[int, int]:
    block_l = min(triton.next_power_of_2(max(L, 1)), 128 if channel_is_col else 1024)
    block_r = max(1, min(64, 2048 // block_l))
    return block_r, block_l


def masked_gate_fwd(x, scale, shift, e=None, s: float = 1.0, residual=None) -> torch.Tensor:
    """Forward of masked_gate with the Triton kernel (arguments already validated)."""
    fmt = _format(x)
    x = _dense(x, fmt)
    r = _dense(residual, fmt) if residual is not None else None
    y = torch.empty_like(x, memory_format=fmt)
    if x.numel() == 0:
        return y
    cdt = _compute_dtype(x.dtype)
    g = _gate(e, s, cdt)
    col, n_rows, L, C = _geometry(x, fmt)
    block_r, block_l = _blocks_2d(L, col)
    grid = (triton.cdiv(n_rows, block_r), triton.cdiv(L, block_l))
    _masked_gate_fwd_kernel[grid](
        x,
        r if r is not None else x,
        y,
        scale.contiguous(),
        shift.contiguous(),
        g if g is not None else scale,
        n_rows,
        L,
        C,
        HAS_G=g is not None,
        HAS_R=r is not None,
        CHANNEL_IS_COL=col,
        FP64=cdt == torch.float64,
        BLOCK_R=block_r,
        BLOCK_L=block_l,
        **_NO_FMA,
    )
    return y


def masked_gate_bwd(grad_y, y, x, scale, e, s: float, output_mask):
    """Backward of masked_gate with the Triton kernels.

    Returns (grad_x, grad_scale, grad_shift, grad_e, grad_residual); entries not requested by
    output_mask (same order) are empty tensors.
    """
    fmt = _format(y)
    y = _dense(y, fmt)
    gy = _dense(grad_y, fmt)
    want_x, want_scale, want_shift, want_e, want_r = (bool(m) for m in output_mask)
    xd = _dense(x, fmt) if want_scale else None
    C = y.shape[1]
    empty = lambda: y.new_empty((0,))
    gx = torch.empty_like(y, memory_format=fmt) if want_x else empty()
    gr = torch.empty_like(y, memory_format=fmt) if want_r else empty()
    cdt = _compute_dtype(y.dtype)
    g = _gate(e, s, cdt)
    col, n_rows, L, _ = _geometry(y, fmt)
    common = {
        "HAS_G": g is not None,
        "HAS_X": xd is not None,
        "WGX": want_x,
        "WGR": want_r,
        "FP64": cdt == torch.float64,
    }
    args = (
        gy,
        y,
        xd if xd is not None else y,
        gx if want_x else y,
        gr if want_r else y,
        scale.contiguous(),
        g if g is not None else scale,
    )
    if y.numel() == 0:
        sums = torch.zeros((3, C), dtype=cdt, device=y.device)
    elif col:
        block_c = min(triton.next_power_of_2(C), 128)
        block_r = max(1, min(64, 4096 // block_c))
        rows_per_prog = max(block_r, triton.cdiv(n_rows, 256))
        rows_per_prog = triton.cdiv(rows_per_prog, block_r) * block_r
        n_chunks = triton.cdiv(n_rows, rows_per_prog)
        part = torch.empty((3, n_chunks, C), dtype=cdt, device=y.device)
        grid = (n_chunks, triton.cdiv(C, block_c))
        _masked_gate_bwd_rows_kernel[grid](
            *args,
            part[0],
            part[1],
            part[2],
            n_rows,
            C,
            rows_per_prog,
            BLOCK_R=block_r,
            BLOCK_C=block_c,
            **common,
            **_NO_FMA,
        )
        sums = part.sum(1)
    else:
        block_l = min(triton.next_power_of_2(L), 1024)
        block_r = max(1, min(16, 2048 // block_l))
        part = torch.empty((3, n_rows), dtype=cdt, device=y.device)
        grid = (triton.cdiv(n_rows, block_r),)
        _masked_gate_bwd_planes_kernel[grid](
            *args,
            part[0],
            part[1],
            part[2],
            n_rows,
            L,
            C,
            BLOCK_R=block_r,
            BLOCK_L=block_l,
            **common,
            **_NO_FMA,
        )
        sums = part.view(3, -1, C).sum(1)
    gshift = sums[0].to(y.dtype, copy=True) if want_shift else empty()
    gscale = sums[1].to(y.dtype, copy=True) if want_scale else empty()
    ge = (s * (1 - g) * sums[2]).to(y.dtype) if want_e else empty()
    return gx, gscale, gshift, ge, gr
