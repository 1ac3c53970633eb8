"""What the Triton kernel files share: @triton.jit helpers (Triton inlines them into the kernels
that call them) and the host side's layout, dtype and launch logic.

Layouts. An input is made dense in its kernel format (der_fast.ops._checks._kernel_format) and
seen as a matrix: NCHW as [N*C, HW] whose rows are (n, c) planes (channel = row % C),
channels_last and 2-D [N, C] as [N*HW, C] (channel = column). Elementwise kernels run on 2-D
tiles of that matrix (``tile_2d``). Per-channel reductions write partial sums, one per row
(NCHW: a "planes" kernel) or per (chunk of rows, channel) (channel columns: a "rows" kernel),
in the compute dtype (``reduce_by_layout``); no atomics, so the sums are deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from der_fast.ops._checks import _kernel_format

# ------------------------------------------------------------------------------ device helpers


@triton.jit
def cvt(x, FP64: tl.constexpr):
    """x in the compute dtype (float64 when FP64, else float32)."""
    if FP64:
        r = x.to(tl.float64)
    else:
        r = x.to(tl.float32)
    return r


@triton.jit
def tile_2d(n_rows, L, C, CHANNEL_IS_COL: tl.constexpr, BLOCK_R: tl.constexpr,
            BLOCK_L: tl.constexpr):
    """This program's [BLOCK_R, BLOCK_L] tile (grid axis 0 over rows, 1 over columns) of the
    dense [n_rows, L] view -> (offs, mask, cidx, cm): element offsets and mask, and the
    channel index of each element broadcastable to the tile ([1, BLOCK_L] or [BLOCK_R, 1])
    with its mask."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
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
    return offs, mask, cidx, cm


@triton.jit
def plane_tile(rows, rmask, start, L, BLOCK_L: tl.constexpr):
    """Columns [start, start + BLOCK_L) of the NCHW planes ``rows`` (valid where rmask) of the
    [n_rows, L] view -> (offs, mask)."""
    cols = start + tl.arange(0, BLOCK_L)
    mask = rmask[:, None] & (cols < L)[None, :]
    offs = rows.to(tl.int64)[:, None] * L + cols[None, :]
    return offs, mask


@triton.jit
def chunk_tile(row0, start, n_rows, ROWS_PER_PROG, cols, cmask, C, BLOCK_R: tl.constexpr):
    """Rows row0 + [start, start + BLOCK_R) of a program's ROWS_PER_PROG rows, channels cols
    (valid where cmask), of the [n_rows, C] view -> (offs, mask)."""
    local = start + tl.arange(0, BLOCK_R)
    rows = row0 + local
    rmask = (rows < n_rows) & (local < ROWS_PER_PROG)
    mask = rmask[:, None] & cmask[None, :]
    offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
    return offs, mask


# --------------------------------------------------------------------------------- host side

# No fused multiply-adds: every product is rounded before it is added, as in the PyTorch
# references, and a value formed in several kernels rounds the same way in each.
NO_FMA = {"enable_fp_fusion": False}


def dense(t: torch.Tensor | None, fmt: torch.memory_format) -> torch.Tensor | None:
    """t dense in fmt (4-D) or contiguous; None stays None."""
    if t is None:
        return None
    if t.dim() != 4:
        return t.contiguous()
    return t if t.is_contiguous(memory_format=fmt) else t.contiguous(memory_format=fmt)


def layout(x: torch.Tensor) -> tuple[torch.memory_format, torch.Tensor]:
    """-> (x's kernel format, x dense in it)."""
    fmt = _kernel_format(x)
    return fmt, dense(x, fmt)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def gate(e, s, cdt):
    # exactly the reference's `torch.sigmoid(s * e)` (in e's dtype), then the compute dtype
    return None if e is None else torch.sigmoid(s * e).to(cdt).contiguous()


def geometry(x: torch.Tensor, fmt) -> tuple[bool, int, int, int]:
    """-> (channel_is_col, n_rows, L, C) of the dense 2-D view."""
    N, C = x.shape[0], x.shape[1]
    HW = x.shape[2] * x.shape[3] if x.dim() == 4 else 1
    if fmt == torch.channels_last or x.dim() == 2:
        return True, N * HW, C, C
    return False, N * C, HW, C


def launch_elementwise(kernel, *args, n_rows: int, L: int, C: int, col: bool, **consts) -> None:
    """Launches an elementwise kernel over the dense [n_rows, L] view: kernel(*args, n_rows, L,
    C, CHANNEL_IS_COL, BLOCK_R, BLOCK_L, **consts), tiled as ``tile_2d`` expects."""
    block_l = min(triton.next_power_of_2(max(L, 1)), 128 if col else 1024)
    block_r = max(1, min(64, 2048 // block_l))
    grid = (triton.cdiv(n_rows, block_r), triton.cdiv(L, block_l))
    kernel[grid](
        *args, n_rows, L, C,
        CHANNEL_IS_COL=col, BLOCK_R=block_r, BLOCK_L=block_l, **consts, **NO_FMA,
    )


def reduce_by_layout(rows_kernel, planes_kernel, *args, n_sums: int, col: bool, n_rows: int,
                     L: int, C: int, cdt: torch.dtype, **consts) -> tuple[torch.Tensor, int]:
    """Launches a per-channel reduction over the dense view -> (part, count): part
    [n_sums, P, C] (compute dtype) holds P partials of each of n_sums sums per channel, each
    over count values of its channel.

    Channel columns: rows_kernel(*args, *part, n_rows, C, ROWS_PER_PROG, BLOCK_R, BLOCK_C,
    **consts) on a grid (P chunks of ROWS_PER_PROG rows, blocks of BLOCK_C channels). NCHW:
    planes_kernel(*args, *part, n_rows, L, C, BLOCK_R, BLOCK_L, **consts), one partial per
    (n, c) row (P = N, count = L)."""
    if col:
        block_c = min(triton.next_power_of_2(C), 128)
        block_r = max(1, min(64, 4096 // block_c))
        rows_per_prog = max(block_r, triton.cdiv(n_rows, 256))
        rows_per_prog = triton.cdiv(rows_per_prog, block_r) * block_r
        P = triton.cdiv(n_rows, rows_per_prog)
        part = torch.empty((n_sums, P, C), dtype=cdt, device=args[0].device)
        rows_kernel[(P, triton.cdiv(C, block_c))](
            *args, *part, n_rows, C, rows_per_prog,
            BLOCK_R=block_r, BLOCK_C=block_c, **consts, **NO_FMA,
        )
        return part, rows_per_prog
    block_l = min(triton.next_power_of_2(max(L, 1)), 1024)
    block_r = max(1, min(16, 2048 // block_l))
    part = torch.empty((n_sums, n_rows), dtype=cdt, device=args[0].device)
    planes_kernel[(triton.cdiv(n_rows, block_r),)](
        *args, *part, n_rows, L, C,
        BLOCK_R=block_r, BLOCK_L=block_l, **consts, **NO_FMA,
    )
    return part.view(n_sums, -1, C), L
