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

Layouts. Inputs are made dense: NCHW is seen as a matrix [N*C, HW] whose rows are (n, c)
planes (channel = row % C); channels_last and 2-D [N, C] inputs as [N*HW, C] (channel =
column). Outputs (y, grad_z, grad_residual) have z's memory format. The gate g is a length-C
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

import torch
import triton
import triton.language as tl


@triton.jit
def _cvt(x, FP64: tl.constexpr):
    if FP64:
        r = x.to(tl.float64)
    else:
        r = x.to(tl.float32)
    return r


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


# ---------------------------------------------------------------------------------- statistics


@triton.jit
def _bn_stats_planes_kernel(
    Z,
    P_MEAN,
    P_M2,
    n_rows,
    L,
    C,
    FP64: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    """NCHW: rows are (n, c) planes of length L = HW; one (mean of z - K[c], M2) partial per
    row, K[c] = z[0, c, 0, 0] (the shift)."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < n_rows
    rbase = rows.to(tl.int64) * L
    k = _cvt(tl.load(Z + (rows % C).to(tl.int64) * L, mask=rmask, other=0), FP64)[:, None]
    zero = _cvt(tl.zeros([BLOCK_R], dtype=tl.float32), FP64)
    mean = zero
    m2 = zero
    for start in range(0, L, BLOCK_L):
        cols = start + tl.arange(0, BLOCK_L)
        mask = rmask[:, None] & (cols < L)[None, :]
        x = _cvt(tl.load(Z + rbase[:, None] + cols[None, :], mask=mask, other=0), FP64)
        x = tl.where(mask, x - k, 0.0)
        n_a = zero + start  # values merged so far (every earlier tile was full)
        n_b = zero + tl.minimum(L - start, BLOCK_L)
        mean_b = _div(tl.sum(x, axis=1), n_b, FP64)
        d = tl.where(mask, x - mean_b[:, None], 0.0)
        m2_b = tl.sum(d * d, axis=1)
        n_ab = n_a + n_b
        delta = mean_b - mean
        mean = mean + delta * _div(n_b, n_ab, FP64)
        m2 = m2 + m2_b + delta * delta * _div(n_a * n_b, n_ab, FP64)
    tl.store(P_MEAN + rows, mean, mask=rmask)
    tl.store(P_M2 + rows, m2, mask=rmask)


@triton.jit
def _bn_stats_rows_kernel(
    Z,
    P_MEAN,
    P_M2,
    n_rows,
    C,
    ROWS_PER_PROG,
    FP64: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """channels_last / 2-D: rows of C channels; program (i, j) reduces rows [i*RPP, (i+1)*RPP)
    for a block of channels and writes one (mean of z - K[c], M2) partial per (i, channel),
    K[c] = z at row 0 (the shift)."""
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    k = _cvt(tl.load(Z + cols, mask=cmask, other=0), FP64)[None, :]
    zero = _cvt(tl.zeros([BLOCK_C], dtype=tl.float32), FP64)
    mean = zero
    m2 = zero
    row0 = pid_r * ROWS_PER_PROG
    n_valid = tl.minimum(n_rows - row0, ROWS_PER_PROG)  # >= 1 by the grid
    for start in range(0, ROWS_PER_PROG, BLOCK_R):
        local = start + tl.arange(0, BLOCK_R)
        rows = row0 + local
        rmask = local < n_valid
        mask = rmask[:, None] & cmask[None, :]
        offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
        x = _cvt(tl.load(Z + offs, mask=mask, other=0), FP64)
        x = tl.where(mask, x - k, 0.0)
        n_a_i = tl.minimum(start, n_valid)
        n_a = zero + n_a_i
        n_b = zero + tl.minimum(n_valid - n_a_i, BLOCK_R)  # 0 past the last valid row
        mean_b = _div(tl.sum(x, axis=0), tl.maximum(n_b, 1.0), FP64)
        d = tl.where(mask, x - mean_b[None, :], 0.0)
        m2_b = tl.sum(d * d, axis=0)
        n_ab = n_a + n_b
        delta = mean_b - mean
        mean = mean + delta * _div(n_b, n_ab, FP64)
        m2 = m2 + m2_b + delta * delta * _div(n_a * n_b, n_ab, FP64)
    pofs = pid_r * C + cols
    tl.store(P_MEAN + pofs, mean, mask=cmask)
    tl.store(P_M2 + pofs, m2, mask=cmask)


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
    zero = _cvt(tl.zeros([BLOCK_C], dtype=tl.float32), FP64)
    if TRAINING:
        total = zero + TOTAL
        acc = zero
        for p0 in range(0, P, BLOCK_P):
            ps = p0 + tl.arange(0, BLOCK_P)
            m = (ps < P)[:, None] & cmask[None, :]
            offs = ps.to(tl.int64)[:, None] * C + cols[None, :]
            pm = _cvt(tl.load(P_MEAN + offs, mask=m, other=0), FP64)
            cnt = _cvt(tl.minimum(CNT, TOTAL - ps * CNT), FP64)
            acc += tl.sum(tl.where(m, pm * cnt[:, None], 0.0), axis=0)
        mean_s = _div(acc, total, FP64)  # mean of z - K
        acc2 = zero
        for p0 in range(0, P, BLOCK_P):
            ps = p0 + tl.arange(0, BLOCK_P)
            m = (ps < P)[:, None] & cmask[None, :]
            offs = ps.to(tl.int64)[:, None] * C + cols[None, :]
            pm = _cvt(tl.load(P_MEAN + offs, mask=m, other=0), FP64)
            pq = _cvt(tl.load(P_M2 + offs, mask=m, other=0), FP64)
            cnt = _cvt(tl.minimum(CNT, TOTAL - ps * CNT), FP64)
            d = pm - mean_s[None, :]
            acc2 += tl.sum(tl.where(m, pq + cnt[:, None] * (d * d), 0.0), axis=0)
        var = _div(acc2, total, FP64)
        k = _cvt(tl.load(Z + cols.to(tl.int64) * KSTRIDE, mask=cmask, other=0), FP64)
        mean = k + mean_s
    else:
        mean = _cvt(tl.load(MEAN_IN + cols, mask=cmask, other=0), FP64)
        var = _cvt(tl.load(VAR_IN + cols, mask=cmask, other=1), FP64)
    if STORE_STATS:
        tl.store(MEAN + cols, mean.to(MEAN.dtype.element_ty), mask=cmask)
        tl.store(VAR + cols, var.to(VAR.dtype.element_ty), mask=cmask)
    epsv = _cvt(zero + eps, FP64)  # eps rounded once to the compute dtype
    invstd = _div(zero + 1.0, _sqrt(var + epsv, FP64), FP64)
    w = _cvt(tl.load(W + cols, mask=cmask, other=0), FP64)
    b = _cvt(tl.load(B + cols, mask=cmask, other=0), FP64)
    tl.store(AFF + cols, mean, mask=cmask)
    tl.store(AFF + C + cols, invstd, mask=cmask)
    tl.store(AFF + 2 * C + cols, w * invstd, mask=cmask)
    tl.store(AFF + 3 * C + cols, b, mask=cmask)


# ------------------------------------------------------------------------------------- forward


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
    pid_r = tl.program_id(0)
    pid_l = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    rmask = rows < n_rows
    cmask = cols < L
    mask = rmask[:, None] & cmask[None, :]
    offs = rows.to(tl.int64)[:, None] * L + cols[None, :]
    if CHANNEL_IS_COL:
        cidx = cols[None, :]
        cm = cmask[None, :]
    else:
        cidx = (rows % C)[:, None]
        cm = rmask[:, None]
    mu = tl.load(AFF + cidx, mask=cm, other=0)
    al = tl.load(AFF + 2 * C + cidx, mask=cm, other=0)
    bb = tl.load(AFF + 3 * C + cidx, mask=cm, other=0)
    z = _cvt(tl.load(Z + offs, mask=mask, other=0), FP64)
    a = (z - mu) * al + bb
    if HAS_R:
        a = a + _cvt(tl.load(R + offs, mask=mask, other=0), FP64)
    if RELU:
        a = tl.where(a < 0, 0.0, a)
    if HAS_G:
        a = a * _cvt(tl.load(G + cidx, mask=cm, other=0), FP64)
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
def _bn_gate_bwd_planes_kernel(
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
    HAS_G: tl.constexpr,
    HAS_R: tl.constexpr,
    RELU: tl.constexpr,
    WGR: tl.constexpr,
    FP64: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    """NCHW: rows are (n, c) planes of length L = HW; one partial of each sum per row."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < n_rows
    ch = rows % C
    mu = tl.load(AFF + ch, mask=rmask, other=0)[:, None]
    istd = tl.load(AFF + C + ch, mask=rmask, other=0)[:, None]
    al = tl.load(AFF + 2 * C + ch, mask=rmask, other=0)[:, None]
    bb = tl.load(AFF + 3 * C + ch, mask=rmask, other=0)[:, None]
    g = istd
    if HAS_G:
        g = _cvt(tl.load(G + ch, mask=rmask, other=0), FP64)[:, None]
    acc_db = _cvt(tl.zeros([BLOCK_R], dtype=tl.float32), FP64)
    acc_dw = acc_db
    acc_gh = acc_db
    rbase = rows.to(tl.int64) * L
    for start in range(0, L, BLOCK_L):
        cols = start + tl.arange(0, BLOCK_L)
        mask = rmask[:, None] & (cols < L)[None, :]
        offs = rbase[:, None] + cols[None, :]
        gy = _cvt(tl.load(GY + offs, mask=mask, other=0), FP64)
        z = _cvt(tl.load(Z + offs, mask=mask, other=0), FP64)
        r = z
        if HAS_R:
            r = _cvt(tl.load(R + offs, mask=mask, other=0), FP64)
        zc = z - mu
        da, h = _bn_gate_da(gy, zc, r, al, bb, g, HAS_G, HAS_R, RELU)
        if WGR:
            tl.store(GR + offs, da.to(GR.dtype.element_ty), mask=mask)
        xh = zc * istd
        acc_db += tl.sum(da, axis=1)
        acc_dw += tl.sum(tl.where(mask, da * xh, 0.0), axis=1)
        acc_gh += tl.sum(tl.where(mask, gy * h, 0.0), axis=1)
    tl.store(P_DB + rows, acc_db, mask=rmask)
    tl.store(P_DW + rows, acc_dw, mask=rmask)
    tl.store(P_GH + rows, acc_gh, mask=rmask)


@triton.jit
def _bn_gate_bwd_rows_kernel(
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
    C,
    ROWS_PER_PROG,
    HAS_G: tl.constexpr,
    HAS_R: tl.constexpr,
    RELU: tl.constexpr,
    WGR: tl.constexpr,
    FP64: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """channels_last / 2-D: program (i, j) sums rows [i*RPP, (i+1)*RPP) for a block of
    channels and writes one partial per (i, channel)."""
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    mu = tl.load(AFF + cols, mask=cmask, other=0)[None, :]
    istd = tl.load(AFF + C + cols, mask=cmask, other=0)[None, :]
    al = tl.load(AFF + 2 * C + cols, mask=cmask, other=0)[None, :]
    bb = tl.load(AFF + 3 * C + cols, mask=cmask, other=0)[None, :]
    g = istd
    if HAS_G:
        g = _cvt(tl.load(G + cols, mask=cmask, other=0), FP64)[None, :]
    acc_db = _cvt(tl.zeros([BLOCK_C], dtype=tl.float32), FP64)
    acc_dw = acc_db
    acc_gh = acc_db
    row0 = pid_r * ROWS_PER_PROG
    for start in range(0, ROWS_PER_PROG, BLOCK_R):
        local = start + tl.arange(0, BLOCK_R)
        rows = row0 + local
        rmask = (rows < n_rows) & (local < ROWS_PER_PROG)
        mask = rmask[:, None] & cmask[None, :]
        offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
        gy = _cvt(tl.load(GY + offs, mask=mask, other=0), FP64)
        z = _cvt(tl.load(Z + offs, mask=mask, other=0), FP64)
        r = z
        if HAS_R:
            r = _cvt(tl.load(R + offs, mask=mask, other=0), FP64)
        zc = z - mu
        da, h = _bn_gate_da(gy, zc, r, al, bb, g, HAS_G, HAS_R, RELU)
        if WGR:
            tl.store(GR + offs, da.to(GR.dtype.element_ty), mask=mask)
        xh = zc * istd
        acc_db += tl.sum(da, axis=0)
        acc_dw += tl.sum(tl.where(mask, da * xh, 0.0), axis=0)
        acc_gh += tl.sum(tl.where(mask, gy * h, 0.0), axis=0)
    pofs = pid_r * C + cols
    tl.store(P_DB + pofs, acc_db, mask=cmask)
    tl.store(P_DW + pofs, acc_dw, mask=cmask)
    tl.store(P_GH + pofs, acc_gh, mask=cmask)


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
    zero = _cvt(tl.zeros([BLOCK_C], dtype=tl.float32), FP64)
    db = zero
    dw = zero
    gh = zero
    for p0 in range(0, P, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P)
        m = (ps < P)[:, None] & cmask[None, :]
        offs = ps.to(tl.int64)[:, None] * C + cols[None, :]
        db += tl.sum(tl.load(P_DB + offs, mask=m, other=0), axis=0)
        dw += tl.sum(tl.load(P_DW + offs, mask=m, other=0), axis=0)
        gh += tl.sum(tl.load(P_GH + offs, mask=m, other=0), axis=0)
    if WGB:
        tl.store(GB + cols, db.to(GB.dtype.element_ty), mask=cmask)
    if WGW:
        tl.store(GW + cols, dw.to(GW.dtype.element_ty), mask=cmask)
    if WGE:
        if HAS_G:
            g = _cvt(tl.load(G + cols, mask=cmask, other=0), FP64)
            sv = _cvt(zero + s, FP64)
            ge = sv * (g * (1.0 - g)) * gh
        else:
            ge = zero
        tl.store(GE + cols, ge.to(GE.dtype.element_ty), mask=cmask)
    if TRAINING:
        w = _cvt(tl.load(W + cols, mask=cmask, other=0), FP64)
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
    pid_r = tl.program_id(0)
    pid_l = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    rmask = rows < n_rows
    cmask = cols < L
    mask = rmask[:, None] & cmask[None, :]
    offs = rows.to(tl.int64)[:, None] * L + cols[None, :]
    if CHANNEL_IS_COL:
        cidx = cols[None, :]
        cm = cmask[None, :]
    else:
        cidx = (rows % C)[:, None]
        cm = rmask[:, None]
    mu = tl.load(AFF + cidx, mask=cm, other=0)
    istd = tl.load(AFF + C + cidx, mask=cm, other=0)
    al = tl.load(AFF + 2 * C + cidx, mask=cm, other=0)
    bb = tl.load(AFF + 3 * C + cidx, mask=cm, other=0)
    if USE_DA:
        da = _cvt(tl.load(DA + offs, mask=mask, other=0), FP64)
        if TRAINING:
            z = _cvt(tl.load(Z + offs, mask=mask, other=0), FP64)
    else:
        gy = _cvt(tl.load(GY + offs, mask=mask, other=0), FP64)
        z = _cvt(tl.load(Z + offs, mask=mask, other=0), FP64)
        r = z
        if HAS_R:
            r = _cvt(tl.load(R + offs, mask=mask, other=0), FP64)
        g = istd
        if HAS_G:
            g = _cvt(tl.load(G + cidx, mask=cm, other=0), FP64)
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


# No fused multiply-adds: a = (z - mean) * alpha + bias rounds the same way in every kernel.
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


def _planes_blocks(L: int) -> tuple[int, int]:
    block_l = min(triton.next_power_of_2(max(L, 1)), 1024)
    return max(1, min(16, 2048 // block_l)), block_l


def _rows_blocks(n_rows: int, C: int) -> tuple[int, int, int, int]:
    """channels_last reductions -> (block_r, block_c, rows_per_prog, n_chunks)."""
    block_c = min(triton.next_power_of_2(C), 128)
    block_r = max(1, min(64, 4096 // block_c))
    rows_per_prog = max(block_r, triton.cdiv(n_rows, 256))
    rows_per_prog = triton.cdiv(rows_per_prog, block_r) * block_r
    return block_r, block_c, rows_per_prog, triton.cdiv(n_rows, rows_per_prog)


def _channel_blocks(P: int, C: int) -> tuple[int, int]:
    """per-channel finalize kernels -> (block_p, block_c)."""
    block_c = min(triton.next_power_of_2(C), 64)
    block_p = min(triton.next_power_of_2(max(P, 1)), max(1, 2048 // block_c))
    return block_p, block_c


def _affine(z, fmt, weight, bias, mean_src, var_src, eps, training, mean_out, var_out):
    """Runs the statistics (training) and the finalize kernel -> AFF [4, C] (mean, invstd,
    alpha, bias in the compute dtype). mean_out / var_out (or None) receive mean and var."""
    cdt = _compute_dtype(z.dtype)
    fp64 = cdt == torch.float64
    C = z.shape[1]
    M = z.numel() // C
    aff = torch.empty((4, C), dtype=cdt, device=z.device)
    P, cnt, kstride = 0, 1, 1
    p_mean = p_m2 = aff
    if training and M > 0:
        col, n_rows, L, _ = _geometry(z, fmt)
        if col:
            block_r, block_c, rpp, P = _rows_blocks(n_rows, C)
            part = torch.empty((2, P, C), dtype=cdt, device=z.device)
            _bn_stats_rows_kernel[(P, triton.cdiv(C, block_c))](
                z, part[0], part[1], n_rows, C, rpp,
                FP64=fp64, BLOCK_R=block_r, BLOCK_C=block_c, **_NO_FMA,
            )
            cnt = rpp
        else:
            block_r, block_l = _planes_blocks(L)
            part = torch.empty((2, n_rows), dtype=cdt, device=z.device)
            _bn_stats_planes_kernel[(triton.cdiv(n_rows, block_r),)](
                z, part[0], part[1], n_rows, L, C,
                FP64=fp64, BLOCK_R=block_r, BLOCK_L=block_l, **_NO_FMA,
            )
            P, cnt, kstride = z.shape[0], L, L
        p_mean, p_m2 = part[0], part[1]
    store = mean_out is not None
    if not training:
        mean_src = mean_src.contiguous()
        var_src = var_src.contiguous()
    block_p, block_c = _channel_blocks(P, C)
    _bn_stats_finalize_kernel[(triton.cdiv(C, block_c),)](
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
        TRAINING=bool(training) and M > 0,
        STORE_STATS=store,
        FP64=fp64,
        BLOCK_P=block_p,
        BLOCK_C=block_c,
        **_NO_FMA,
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
    fmt = _format(z)
    z = _dense(z, fmt)
    r = _dense(residual, fmt) if residual is not None else None
    cdt = _compute_dtype(z.dtype)
    C = z.shape[1]
    y = torch.empty_like(z, memory_format=fmt)
    mean = torch.empty((C,), dtype=cdt, device=z.device)
    var = torch.empty((C,), dtype=cdt, device=z.device)
    if C == 0:
        return y, mean, var
    aff = _affine(z, fmt, weight, bias, mean_in, var_in, eps, training, mean, var)
    if z.numel() == 0:
        return y, mean, var
    g = _gate(e, s, cdt)
    col, n_rows, L, _ = _geometry(z, fmt)
    block_r, block_l = _blocks_2d(L, col)
    grid = (triton.cdiv(n_rows, block_r), triton.cdiv(L, block_l))
    _bn_gate_fwd_kernel[grid](
        z,
        r if r is not None else z,
        y,
        aff,
        g if g is not None else aff,
        n_rows,
        L,
        C,
        HAS_G=g is not None,
        HAS_R=r is not None,
        RELU=bool(relu),
        CHANNEL_IS_COL=col,
        FP64=cdt == torch.float64,
        BLOCK_R=block_r,
        BLOCK_L=block_l,
        **_NO_FMA,
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
    fmt = _format(z)
    z = _dense(z, fmt)
    gy = _dense(grad_y, fmt)
    r = _dense(residual, fmt) if residual is not None else None
    cdt = _compute_dtype(z.dtype)
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
    g = _gate(e, s, cdt)
    col, n_rows, L, _ = _geometry(z, fmt)
    flags = {"HAS_G": g is not None, "HAS_R": r is not None, "RELU": bool(relu), "FP64": fp64}
    gptr = g if g is not None else aff
    P, part = 0, aff.new_zeros((3, 1))
    if (need_sums or want_r) and M > 0:
        args = (gy, z, r if r is not None else z, gr if want_r else z, aff, gptr)
        if col:
            block_r, block_c, rpp, P = _rows_blocks(n_rows, C)
            part = torch.empty((3, P, C), dtype=cdt, device=z.device)
            _bn_gate_bwd_rows_kernel[(P, triton.cdiv(C, block_c))](
                *args, part[0], part[1], part[2], n_rows, C, rpp,
                WGR=want_r, BLOCK_R=block_r, BLOCK_C=block_c, **flags, **_NO_FMA,
            )
        else:
            block_r, block_l = _planes_blocks(L)
            part = torch.empty((3, n_rows), dtype=cdt, device=z.device)
            _bn_gate_bwd_planes_kernel[(triton.cdiv(n_rows, block_r),)](
                *args, part[0], part[1], part[2], n_rows, L, C,
                WGR=want_r, BLOCK_R=block_r, BLOCK_L=block_l, **flags, **_NO_FMA,
            )
            P = z.shape[0]
    coef = aff  # unused unless training
    if need_sums:
        coef = torch.empty((3, C), dtype=cdt, device=z.device)
        block_p, block_c = _channel_blocks(P, C)
        _bn_gate_bwd_finalize_kernel[(triton.cdiv(C, block_c),)](
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
            HAS_G=g is not None,
            TRAINING=training,
            WGW=want_w,
            WGB=want_b,
            WGE=want_e,
            FP64=fp64,
            BLOCK_P=block_p,
            BLOCK_C=block_c,
            **_NO_FMA,
        )
    if want_z and z.numel() > 0:
        # da is re-read from grad_residual when that holds it exactly
        use_da = want_r and z.dtype in (torch.float32, torch.float64) and gr.dtype == z.dtype
        block_r, block_l = _blocks_2d(L, col)
        grid = (triton.cdiv(n_rows, block_r), triton.cdiv(L, block_l))
        _bn_gate_bwd_input_kernel[grid](
            gy,
            z,
            r if r is not None else z,
            gr if use_da else z,
            gz,
            aff,
            gptr,
            coef,
            n_rows,
            L,
            C,
            USE_DA=use_da,
            TRAINING=training,
            CHANNEL_IS_COL=col,
            BLOCK_R=block_r,
            BLOCK_L=block_l,
            **flags,
            **_NO_FMA,
        )
    return gz, gw, gb, ge, gr
