"""Triton kernels for ``der_fast::bn_gate`` (the CUDA implementation of the op).

BatchNorm2d (train or eval mode), an optional residual add, ReLU and a per-channel gate:

    a[n, c, p] = alpha[c] * z[n, c, p] + beta[c] (+ residual[n, c, p])
    y[n, c, p] = g[c] * relu(a[n, c, p])            (h = a instead of relu(a) when relu=False)
    alpha = weight * invstd,  beta = bias - mean * alpha,  invstd = 1 / sqrt(var + eps)

with (mean, var) the batch statistics over the M = N*H*W values of a channel (biased
variance) when training, else the given running buffers, and g = sigmoid(s * e) (1 without e).

``bn_gate_fwd`` / ``bn_gate_bwd`` take and return torch tensors; der_fast.ops registers them as
the op's CUDA kernels. They also run on CPU tensors under the Triton interpreter
(``TRITON_INTERPRET=1`` set before triton is imported), which is how
tests/test_bn_gate_triton.py checks them on machines without a GPU.

Layouts (NCHW planes or channel columns of a dense 2-D view), launches: kernels/_common.py.
Outputs (y, grad_z, grad_residual) have z's memory format. The gate g is a length-C
vector computed on the host in the compute dtype (float32, or float64 for float64 inputs;
float16/bfloat16 inputs are computed in float32), exactly as the reference does.

Forward. (1) Statistics (training only), on shifted data z - K[c], K[c] = z[0, c, 0, 0] (so
sums of large equal offsets do not cost the mean its low bits: the float32 mean stays within
~0.5 ulp): each program reduces a block of NCHW rows (or, for channels_last, a chunk of rows for
a block of channels) in tiles; per tile it takes the tile's mean and centred sum of squares (two
passes over registers, tree sums) and merges them into its running (mean, M2) with Chan's
formula, never E[z^2] - mean^2. It writes one (mean, M2) partial per row / per (chunk,
channel). (2) A per-channel finalize kernel combines the P partials of a channel in a fixed
order (m = sum cnt_p mean_p / M, then M2 = sum M2_p + cnt_p (mean_p - m)^2, mean = K + m), so
the result is deterministic (no atomics); it writes mean, var and the channel's
(mean, invstd, alpha, bias). In eval mode the same kernel copies mean_in/var_in instead. (3) One
elementwise pass writes y, forming a as (z - mean) * alpha + bias (+ residual), the same value
as alpha * z + beta but without rounding the large terms alpha * z and mean * alpha when |mean|
is large next to the spread of z (with z = 100 + noise, alpha * z + beta measured ~10x the
float32 error of PyTorch's own batch_norm). Statistics and arithmetic are in the
compute dtype; no fused multiply-adds (identical rounding in every kernel that forms a).

Backward. The finalize kernel (eval mode, fed the saved mean/var) recomputes (invstd, alpha)
bit for bit as in the forward, so ReLU's mask a > 0 is the forward's. (1) One reduction
pass computes da = grad_y * g * [a > 0], writes grad_residual = da, and per row / per (chunk,
channel) partial sums of da, da * xhat and grad_y * h, xhat = (z - mean) * invstd. (2) A
per-channel kernel sums the partials in a fixed order and writes grad_bias = sum da, grad_weight
= sum da * xhat, grad_e = s g (1 - g) sum grad_y * h, and the coefficients of (3) one
elementwise pass: grad_z = weight * invstd * (da - grad_bias / M - xhat * grad_weight / M) when
training, da * alpha in eval mode (da is re-read from grad_residual when that was written in
float32/float64, else recomputed from grad_y, z and the residual).

M = 0: training gives NaN mean/var (0/0, as torch.mean of an empty tensor) and zero gradient
sums; empty outputs stay empty.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import triton
import triton.language as tl

if __package__:  # der_fast.kernels.bn_gate
    from . import _common
else:  # loaded by path as a lone file (tests/test_bn_gate_triton.py compiles it so)
    _spec = importlib.util.spec_from_file_location(
        "_common", Path(__file__).with_name("_common.py")
    )
    _common = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_common)
# the kernels call the @triton.jit helpers by name
cvt, sums_lines, sums_tile, tile_2d = (
    _common.cvt, _common.sums_lines, _common.sums_tile, _common.tile_2d
)


@triton.jit
def _div(a, b, FP64: tl.constexpr):
    # IEEE division (Triton's float32 "/" may be an approximate division)
    if FP64:
        r = a / b
    else:
        r = tl.div_rn(a, b)
    return r


@triton.jit
def _sqrt(x, FP64: tl.constexpr):
    if FP64:
        r = tl.sqrt(x)  # float64 sqrt is always correctly rounded
    else:
        r = tl.sqrt_rn(x)
    return r


@triton.jit
def _chan_merge(mean, m2, Z, offs, mask, k, n_a, n_b, AXIS: tl.constexpr, FP64: tl.constexpr):
    """Merges the tile z - k (n_b >= 0 valid values along AXIS per channel, after n_a merged
    ones) into the running (mean, M2) with Chan's formula -> (mean, M2)."""
    x = cvt(tl.load(Z + offs, mask=mask, other=0), FP64)
    x = tl.where(mask, x - k, 0.0)
    mean_b = _div(tl.sum(x, axis=AXIS), tl.maximum(n_b, 1.0), FP64)
    d = tl.where(mask, x - tl.expand_dims(mean_b, AXIS), 0.0)
    m2_b = tl.sum(d * d, axis=AXIS)
    n_ab = n_a + n_b
    delta = mean_b - mean
    mean = mean + delta * _div(n_b, n_ab, FP64)
    m2 = m2 + m2_b + delta * delta * _div(n_a * n_b, n_ab, FP64)
    return mean, m2


@triton.jit
def _partials_tile(p0, P, cols, cmask, C, BLOCK_P: tl.constexpr):
    """Partials p0 + [0, BLOCK_P) of the channels cols (valid where cmask) of a [P, C] array of
    partials (``reduce_by_layout``) -> (offs, mask, ps): offsets, mask, partial indices."""
    ps = p0 + tl.arange(0, BLOCK_P)
    m = (ps < P)[:, None] & cmask[None, :]
    offs = ps.to(tl.int64)[:, None] * C + cols[None, :]
    return offs, m, ps


# ---------------------------------------------------------------------------------- statistics


@triton.jit
def _bn_stats_kernel(
    Z,
    P_MEAN,
    P_M2,
    n_rows,
    L,
    C,
    SPAN,
    FP64: tl.constexpr,
    CHANNEL_IS_COL: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    """One (mean of z - K[c], M2) partial per line (``sums_lines``), K[c] = z[0, c, 0, 0] (the
    shift: the channel's first value, at c * L in NCHW, at c in channel columns)."""
    STEP: tl.constexpr = BLOCK_R if CHANNEL_IS_COL else BLOCK_L  # tile length along a line
    AXIS: tl.constexpr = 0 if CHANNEL_IS_COL else 1  # a tile's axis along its lines
    pofs, pmask, cidx, cm = sums_lines(n_rows, C, CHANNEL_IS_COL, BLOCK_R, BLOCK_L)
    kofs = cidx.to(tl.int64) * (1 if CHANNEL_IS_COL else L)
    k = cvt(tl.load(Z + kofs, mask=cm, other=0), FP64)
    zero = cvt(tl.zeros(pofs.shape, dtype=tl.float32), FP64)
    mean = zero
    m2 = zero
    if CHANNEL_IS_COL:  # values per line: the chunk's rows (>= 1 by the grid), or L
        n_valid = tl.minimum(n_rows - tl.program_id(0) * SPAN, SPAN)
    else:
        n_valid = L
    for start in range(0, SPAN, STEP):
        offs, mask = sums_tile(start, n_rows, L, C, SPAN, CHANNEL_IS_COL, BLOCK_R, BLOCK_L)
        n_a_i = tl.minimum(start, n_valid)  # values merged so far (every earlier tile was full)
        n_a = zero + n_a_i
        n_b = zero + tl.minimum(n_valid - n_a_i, STEP)  # 0 past the last valid row
        mean, m2 = _chan_merge(mean, m2, Z, offs, mask, k, n_a, n_b, AXIS, FP64)
    tl.store(P_MEAN + pofs, mean, mask=pmask)
    tl.store(P_M2 + pofs, m2, mask=pmask)


@triton.jit
def _mean_partials(P_MEAN, p0, P, cols, cmask, C, CNT, TOTAL, FP64: tl.constexpr,
                   BLOCK_P: tl.constexpr):
    """Partials p0 + [0, BLOCK_P) of the channels cols -> (offs, m, pm, cnt): their offsets
    and mask, means and value counts (compute dtype)."""
    offs, m, ps = _partials_tile(p0, P, cols, cmask, C, BLOCK_P)
    pm = cvt(tl.load(P_MEAN + offs, mask=m, other=0), FP64)
    cnt = cvt(tl.minimum(CNT, TOTAL - ps * CNT), FP64)
    return offs, m, pm, cnt


@triton.jit
def _bn_stats_finalize_kernel(
    Z,
    P_MEAN,
    P_M2,
    MEAN_IN,
    VAR_IN,
    W,
    B,
    MEAN,
    VAR,
    AFF,
    P,
    C,
    CNT,
    TOTAL,
    KSTRIDE,
    eps: tl.float64,
    TRAINING: tl.constexpr,
    STORE_STATS: tl.constexpr,
    FP64: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Per channel: (mean, var) from the P partials (partial p of channel c at p*C + c, over
    min(CNT, TOTAL - p*CNT) values, means of z - K[c], K[c] = Z[c * KSTRIDE]) or from
    MEAN_IN/VAR_IN; writes MEAN, VAR (STORE_STATS) and
    AFF = [mean; invstd; alpha = weight * invstd; bias] (4 x C, compute dtype)."""
    pid = tl.program_id(0)
    cols = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    zero = cvt(tl.zeros([BLOCK_C], dtype=tl.float32), FP64)
    if TRAINING:
        total = zero + TOTAL
        acc = zero
        for p0 in range(0, P, BLOCK_P):
            offs, m, pm, cnt = _mean_partials(P_MEAN, p0, P, cols, cmask, C, CNT, TOTAL, FP64,
                                              BLOCK_P)
            acc += tl.sum(tl.where(m, pm * cnt[:, None], 0.0), axis=0)
        mean_s = _div(acc, total, FP64)  # mean of z - K
        acc2 = zero
        for p0 in range(0, P, BLOCK_P):
            offs, m, pm, cnt = _mean_partials(P_MEAN, p0, P, cols, cmask, C, CNT, TOTAL, FP64,
                                              BLOCK_P)
            pq = cvt(tl.load(P_M2 + offs, mask=m, other=0), FP64)
            d = pm - mean_s[None, :]
            acc2 += tl.sum(tl.where(m, pq + cnt[:, None] * (d * d), 0.0), axis=0)
        var = _div(acc2, total, FP64)
        k = cvt(tl.load(Z + cols.to(tl.int64) * KSTRIDE, mask=cmask, other=0), FP64)
        mean = k + mean_s
    else:
        mean = cvt(tl.load(MEAN_IN + cols, mask=cmask, other=0), FP64)
        var = cvt(tl.load(VAR_IN + cols, mask=cmask, other=1), FP64)
    if STORE_STATS:
        tl.store(MEAN + cols, mean.to(MEAN.dtype.element_ty), mask=cmask)
        tl.store(VAR + cols, var.to(VAR.dtype.element_ty), mask=cmask)
    epsv = cvt(zero + eps, FP64)  # eps rounded once to the compute dtype
    invstd = _div(zero + 1.0, _sqrt(var + epsv, FP64), FP64)
    w = cvt(tl.load(W + cols, mask=cmask, other=0), FP64)
    b = cvt(tl.load(B + cols, mask=cmask, other=0), FP64)
    tl.store(AFF + cols, mean, mask=cmask)
    tl.store(AFF + C + cols, invstd, mask=cmask)
    tl.store(AFF + 2 * C + cols, w * invstd, mask=cmask)
    tl.store(AFF + 3 * C + cols, b, mask=cmask)


# ------------------------------------------------------------------------------------- forward


@triton.jit
def _channel_affine(AFF, cidx, cm, C):
    """-> (mean, invstd, alpha, bias) of the channels cidx (AFF's rows; masked by cm)."""
    mu = tl.load(AFF + cidx, mask=cm, other=0)
    istd = tl.load(AFF + C + cidx, mask=cm, other=0)
    al = tl.load(AFF + 2 * C + cidx, mask=cm, other=0)
    bb = tl.load(AFF + 3 * C + cidx, mask=cm, other=0)
    return mu, istd, al, bb


@triton.jit
def _bn_gate_fwd_kernel(
    Z,
    R,
    Y,
    AFF,
    G,
    n_rows,
    L,
    C,
    HAS_G: tl.constexpr,
    HAS_R: tl.constexpr,
    RELU: tl.constexpr,
    CHANNEL_IS_COL: tl.constexpr,
    FP64: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    offs, mask, cidx, cm = tile_2d(n_rows, L, C, CHANNEL_IS_COL, BLOCK_R, BLOCK_L)
    mu, _, al, bb = _channel_affine(AFF, cidx, cm, C)
    z = cvt(tl.load(Z + offs, mask=mask, other=0), FP64)
    a = (z - mu) * al + bb
    if HAS_R:
        a = a + cvt(tl.load(R + offs, mask=mask, other=0), FP64)
    if RELU:
        a = tl.where(a < 0, 0.0, a)
    if HAS_G:
        a = a * cvt(tl.load(G + cidx, mask=cm, other=0), FP64)
    tl.store(Y + offs, a.to(Y.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------ backward


@triton.jit
def _bn_gate_da(gy, zc, r, al, bb, g, HAS_G: tl.constexpr, HAS_R: tl.constexpr, RELU: tl.constexpr):
    """-> (da, h) of one tile from zc = z - mean (everything in the compute dtype), with
    a = zc * alpha + bias (+ r), exactly as the forward kernel forms it."""
    a = zc * al + bb
    if HAS_R:
        a = a + r
    if HAS_G:
        gg = gy * g
    else:
        gg = gy
    if RELU:
        da = tl.where(a > 0, gg, 0.0)
        h = tl.where(a < 0, 0.0, a)
    else:
        da = gg
        h = a
    return da, h


@triton.jit
def _bn_gate_bwd_tile(acc_db, acc_dw, acc_gh, GY, Z, R, GR, offs, mask, mu, istd, al, bb, g,
                      AXIS: tl.constexpr, HAS_G: tl.constexpr, HAS_R: tl.constexpr,
                      RELU: tl.constexpr, WGR: tl.constexpr, FP64: tl.constexpr):
    """One tile of the backward reduction: writes grad_residual = da (WGR) and adds its sums
    over AXIS of da, da * xhat and grad_y * h to the accumulators (per-channel values
    broadcast to the tile)."""
    gy = cvt(tl.load(GY + offs, mask=mask, other=0), FP64)
    z = cvt(tl.load(Z + offs, mask=mask, other=0), FP64)
    r = z
    if HAS_R:
        r = cvt(tl.load(R + offs, mask=mask, other=0), FP64)
    zc = z - mu
    da, h = _bn_gate_da(gy, zc, r, al, bb, g, HAS_G, HAS_R, RELU)
    if WGR:
        tl.store(GR + offs, da.to(GR.dtype.element_ty), mask=mask)
    xh = zc * istd
    acc_db += tl.sum(da, axis=AXIS)
    acc_dw += tl.sum(tl.where(mask, da * xh, 0.0), axis=AXIS)
    acc_gh += tl.sum(tl.where(mask, gy * h, 0.0), axis=AXIS)
    return acc_db, acc_dw, acc_gh


@triton.jit
def _bn_gate_bwd_sums_kernel(
    GY,
    Z,
    R,
    GR,
    AFF,
    G,
    P_DB,
    P_DW,
    P_GH,
    n_rows,
    L,
    C,
    SPAN,
    HAS_G: tl.constexpr,
    HAS_R: tl.constexpr,
    RELU: tl.constexpr,
    WGR: tl.constexpr,
    FP64: tl.constexpr,
    CHANNEL_IS_COL: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    """One partial of each sum per line (``sums_lines``); writes grad_residual (WGR)."""
    STEP: tl.constexpr = BLOCK_R if CHANNEL_IS_COL else BLOCK_L  # tile length along a line
    AXIS: tl.constexpr = 0 if CHANNEL_IS_COL else 1  # a tile's axis along its lines
    pofs, pmask, cidx, cm = sums_lines(n_rows, C, CHANNEL_IS_COL, BLOCK_R, BLOCK_L)
    mu, istd, al, bb = _channel_affine(AFF, cidx, cm, C)
    g = istd
    if HAS_G:
        g = cvt(tl.load(G + cidx, mask=cm, other=0), FP64)
    acc_db = cvt(tl.zeros(pofs.shape, dtype=tl.float32), FP64)
    acc_dw = acc_db
    acc_gh = acc_db
    for start in range(0, SPAN, STEP):
        offs, mask = sums_tile(start, n_rows, L, C, SPAN, CHANNEL_IS_COL, BLOCK_R, BLOCK_L)
        acc_db, acc_dw, acc_gh = _bn_gate_bwd_tile(
            acc_db, acc_dw, acc_gh, GY, Z, R, GR, offs, mask, mu, istd, al, bb, g,
            AXIS, HAS_G, HAS_R, RELU, WGR, FP64,
        )
    tl.store(P_DB + pofs, acc_db, mask=pmask)
    tl.store(P_DW + pofs, acc_dw, mask=pmask)
    tl.store(P_GH + pofs, acc_gh, mask=pmask)


@triton.jit
def _bn_gate_bwd_finalize_kernel(
    P_DB,
    P_DW,
    P_GH,
    AFF,
    W,
    G,
    GW,
    GB,
    GE,
    COEF,
    P,
    C,
    TOTAL,
    s: tl.float64,
    HAS_G: tl.constexpr,
    TRAINING: tl.constexpr,
    WGW: tl.constexpr,
    WGB: tl.constexpr,
    WGE: tl.constexpr,
    FP64: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Per channel: sums the P partials (partial p of channel c at p*C + c) in a fixed order;
    writes grad_weight / grad_bias / grad_e (as asked) and COEF = [k_scale; k_mean; k_xhat]
    for the grad_z pass (3 x C, compute dtype)."""
    pid = tl.program_id(0)
    cols = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    zero = cvt(tl.zeros([BLOCK_C], dtype=tl.float32), FP64)
    db = zero
    dw = zero
    gh = zero
    for p0 in range(0, P, BLOCK_P):
        offs, m, _ = _partials_tile(p0, P, cols, cmask, C, BLOCK_P)
        db += tl.sum(tl.load(P_DB + offs, mask=m, other=0), axis=0)
        dw += tl.sum(tl.load(P_DW + offs, mask=m, other=0), axis=0)
        gh += tl.sum(tl.load(P_GH + offs, mask=m, other=0), axis=0)
    if WGB:
        tl.store(GB + cols, db.to(GB.dtype.element_ty), mask=cmask)
    if WGW:
        tl.store(GW + cols, dw.to(GW.dtype.element_ty), mask=cmask)
    if WGE:
        if HAS_G:
            g = cvt(tl.load(G + cols, mask=cmask, other=0), FP64)
            sv = cvt(zero + s, FP64)
            ge = sv * (g * (1.0 - g)) * gh
        else:
            ge = zero
        tl.store(GE + cols, ge.to(GE.dtype.element_ty), mask=cmask)
    if TRAINING:
        w = cvt(tl.load(W + cols, mask=cmask, other=0), FP64)
        istd = tl.load(AFF + C + cols, mask=cmask, other=0)
        total = zero + TOTAL
        tl.store(COEF + cols, w * istd, mask=cmask)
        tl.store(COEF + C + cols, _div(db, total, FP64), mask=cmask)
        tl.store(COEF + 2 * C + cols, _div(dw, total, FP64), mask=cmask)


@triton.jit
def _bn_gate_bwd_input_kernel(
    GY,
    Z,
    R,
    DA,
    GZ,
    AFF,
    G,
    COEF,
    n_rows,
    L,
    C,
    HAS_G: tl.constexpr,
    HAS_R: tl.constexpr,
    RELU: tl.constexpr,
    USE_DA: tl.constexpr,
    TRAINING: tl.constexpr,
    CHANNEL_IS_COL: tl.constexpr,
    FP64: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    """Elementwise grad_z: k_scale * (da - k_mean - xhat * k_xhat) (training) or da * alpha."""
    offs, mask, cidx, cm = tile_2d(n_rows, L, C, CHANNEL_IS_COL, BLOCK_R, BLOCK_L)
    mu, istd, al, bb = _channel_affine(AFF, cidx, cm, C)
    if USE_DA:
        da = cvt(tl.load(DA + offs, mask=mask, other=0), FP64)
        if TRAINING:
            z = cvt(tl.load(Z + offs, mask=mask, other=0), FP64)
    else:
        gy = cvt(tl.load(GY + offs, mask=mask, other=0), FP64)
        z = cvt(tl.load(Z + offs, mask=mask, other=0), FP64)
        r = z
        if HAS_R:
            r = cvt(tl.load(R + offs, mask=mask, other=0), FP64)
        g = istd
        if HAS_G:
            g = cvt(tl.load(G + cidx, mask=cm, other=0), FP64)
        da, h = _bn_gate_da(gy, z - mu, r, al, bb, g, HAS_G, HAS_R, RELU)
    if TRAINING:
        k_scale = tl.load(COEF + cidx, mask=cm, other=0)
        k_mean = tl.load(COEF + C + cidx, mask=cm, other=0)
        k_xh = tl.load(COEF + 2 * C + cidx, mask=cm, other=0)
        xh = (z - mu) * istd
        gz = k_scale * (da - k_mean - xh * k_xh)
    else:
        gz = da * al
    tl.store(GZ + offs, gz.to(GZ.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# host side


def _launch_per_channel(kernel, *args, P: int, C: int, **consts) -> None:
    """Launches a per-channel finalize kernel: kernel(*args, BLOCK_P, BLOCK_C, **consts), one
    program per BLOCK_C channels summing their P partials BLOCK_P at a time."""
    block_c = min(triton.next_power_of_2(C), 64)
    block_p = min(triton.next_power_of_2(max(P, 1)), max(1, 2048 // block_c))
    kernel[(triton.cdiv(C, block_c),)](
        *args, BLOCK_P=block_p, BLOCK_C=block_c, **consts, **_common.NO_FMA,
    )


def _affine(z, fmt, weight, bias, mean_src, var_src, eps, training, mean_out, var_out):
    """Runs the statistics (training) and the finalize kernel -> AFF [4, C] (mean, invstd,
    alpha, bias in the compute dtype). mean_out / var_out (or None) receive mean and var."""
    cdt = _common.compute_dtype(z.dtype)
    fp64 = cdt == torch.float64
    C = z.shape[1]
    M = z.numel() // C
    aff = torch.empty((4, C), dtype=cdt, device=z.device)
    P, cnt, kstride = 0, 1, 1
    p_mean = p_m2 = aff
    if training and M > 0:
        view = _common.geometry(z, fmt)
        part, cnt = _common.reduce_by_layout(_bn_stats_kernel, view, z, n_sums=2, cdt=cdt,
                                             FP64=fp64)
        P = part.shape[1]
        kstride = 1 if view.col else view.L  # K[c] = z[0, c, 0, 0]: row c (NCHW) or column c
        p_mean, p_m2 = part[0], part[1]
    store = mean_out is not None
    if not training:
        mean_src = mean_src.contiguous()
        var_src = var_src.contiguous()
    _launch_per_channel(
        _bn_stats_finalize_kernel,
        z,
        p_mean,
        p_m2,
        mean_src if not training else aff,
        var_src if not training else aff,
        weight.contiguous(),
        bias.contiguous(),
        mean_out if store else aff,
        var_out if store else aff,
        aff,
        P,
        C,
        cnt,
        max(M, 1),
        kstride,
        float(eps),
        P=P,
        C=C,
        TRAINING=bool(training) and M > 0,
        STORE_STATS=store,
        FP64=fp64,
    )
    if training and M == 0 and store:  # mean over no values: NaN, like torch.mean
        mean_out.fill_(float("nan"))
        var_out.fill_(float("nan"))
    return aff


def bn_gate_fwd(z, weight, bias, mean_in, var_in, e, s, residual, training, eps, relu):
    """Forward of bn_gate with the Triton kernels (arguments already validated).

    Returns (y, mean, var): y like z (same memory format), mean/var [C] in the compute dtype
    (batch mean and biased variance when training, copies of mean_in/var_in otherwise).
    """
    fmt, z = _common.layout(z)
    r = _common.dense(residual, fmt)
    cdt = _common.compute_dtype(z.dtype)
    C = z.shape[1]
    y = torch.empty_like(z, memory_format=fmt)
    mean = torch.empty((C,), dtype=cdt, device=z.device)
    var = torch.empty((C,), dtype=cdt, device=z.device)
    if C == 0:
        return y, mean, var
    aff = _affine(z, fmt, weight, bias, mean_in, var_in, eps, training, mean, var)
    if z.numel() == 0:
        return y, mean, var
    g = _common.gate(e, s, cdt)
    _common.launch_elementwise(
        _bn_gate_fwd_kernel,
        _common.geometry(z, fmt),
        z,
        r if r is not None else z,
        y,
        aff,
        g if g is not None else aff,
        HAS_G=g is not None,
        HAS_R=r is not None,
        RELU=bool(relu),
        FP64=cdt == torch.float64,
    )
    return y, mean, var


def bn_gate_bwd(
    grad_y, z, weight, bias, mean, var, e, s, residual, training, eps, relu, output_mask
):
    """Backward of bn_gate with the Triton kernels.

    mean/var: what the forward used (its returned batch statistics when training, the running
    buffers in eval mode). Returns (grad_z, grad_weight, grad_bias, grad_e, grad_residual);
    entries not asked for by output_mask (same order) are None, as are grad_e without e and
    grad_residual without residual.
    """
    want_z, want_w, want_b, want_e, want_r = (bool(m) for m in output_mask)
    want_e = want_e and e is not None
    want_r = want_r and residual is not None
    training = bool(training)
    fmt, z = _common.layout(z)
    gy = _common.dense(grad_y, fmt)
    r = _common.dense(residual, fmt)
    cdt = _common.compute_dtype(z.dtype)
    fp64 = cdt == torch.float64
    C = z.shape[1]
    M = z.numel() // C if C else 0
    gz = torch.empty_like(z, memory_format=fmt) if want_z else None
    gr = torch.empty_like(r, memory_format=fmt) if want_r else None
    gw = torch.empty((C,), dtype=weight.dtype, device=z.device) if want_w else None
    gb = torch.empty((C,), dtype=bias.dtype, device=z.device) if want_b else None
    ge = torch.empty((C,), dtype=e.dtype, device=z.device) if want_e else None
    need_sums = want_w or want_b or want_e or (want_z and training)
    if C == 0 or not (need_sums or want_z or want_r):
        return gz, gw, gb, ge, gr
    # the forward's (mean, invstd, alpha, bias), bit for bit
    aff = _affine(z, fmt, weight, bias, mean, var, eps, False, None, None)
    g = _common.gate(e, s, cdt)
    view = _common.geometry(z, fmt)
    flags = {"HAS_G": g is not None, "HAS_R": r is not None, "RELU": bool(relu), "FP64": fp64}
    gptr = g if g is not None else aff
    P, part = 0, aff.new_zeros((3, 1))
    if (need_sums or want_r) and M > 0:
        part, _ = _common.reduce_by_layout(
            _bn_gate_bwd_sums_kernel, view,
            gy, z, r if r is not None else z, gr if want_r else z, aff, gptr,
            n_sums=3, cdt=cdt, WGR=want_r, **flags,
        )
        P = part.shape[1]
    coef = aff  # unused unless training
    if need_sums:
        coef = torch.empty((3, C), dtype=cdt, device=z.device)
        _launch_per_channel(
            _bn_gate_bwd_finalize_kernel,
            part[0],
            part[1],
            part[2],
            aff,
            weight.contiguous(),
            gptr,
            gw if want_w else aff,
            gb if want_b else aff,
            ge if want_e else aff,
            coef,
            P,
            C,
            max(M, 1),
            float(s),
            P=P,
            C=C,
            HAS_G=g is not None,
            TRAINING=training,
            WGW=want_w,
            WGB=want_b,
            WGE=want_e,
            FP64=fp64,
        )
    if want_z and z.numel() > 0:
        # da is re-read from grad_residual when that holds it exactly
        use_da = want_r and z.dtype in (torch.float32, torch.float64) and gr.dtype == z.dtype
        _common.launch_elementwise(
            _bn_gate_bwd_input_kernel,
            view,
            gy,
            z,
            r if r is not None else z,
            gr if use_da else z,
            gz,
            aff,
            gptr,
            coef,
            USE_DA=use_da,
            TRAINING=training,
            **flags,
        )
    return gz, gw, gb, ge, gr
