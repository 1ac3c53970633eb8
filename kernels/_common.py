"""What the Triton kernel files share: @triton.jit helpers (Triton inlines them into the kernels
that call them) and the host side's layout, dtype and launch logic.

Layouts. An input is made dense in its kernel format (der_fast.ops._checks._kernel_format) and
seen as a matrix: NCHW as [N*C, HW] whose rows are (n, c) planes (channel = row % C),
channels_last and 2-D [N, C] as [N*HW, C] (channel = column); ``geometry`` describes it
(``View``). Elementwise kernels run on 2-D tiles of that matrix (``tile_2d``). A per-channel
reduction kernel (``sums_lines``, ``sums_tile``; launched by ``reduce_by_layout``) writes
partial sums in the compute dtype, one per NCHW row, or, on channel columns, one per (chunk of
rows, channel); no atomics, so the sums are deterministic. The kernels take the layout as the
constexpr flag CHANNEL_IS_COL.
"""

from __future__ import annotations

from typing import NamedTuple

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
def sums_lines(n_rows, C, CHANNEL_IS_COL: tl.constexpr, BLOCK_R: tl.constexpr,
               BLOCK_L: tl.constexpr):
    """The lines this program of a per-channel reduction sums (grid as ``reduce_by_layout``
    launches it: NCHW, BLOCK_R rows of the [n_rows, L] view; channel columns, BLOCK_L columns
    over chunk ``program_id(0)`` of rows) -> (pofs, pmask, cidx, cm): the offsets of its
    partials, one per line (row, or chunk * C + channel), valid where pmask, and the channel of
    each line broadcastable to a tile ([BLOCK_R, 1] or [1, BLOCK_L]) with its mask."""
    if CHANNEL_IS_COL:
        cols = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
        pmask = cols < C
        pofs = tl.program_id(0) * C + cols
        cidx = cols[None, :]
        cm = pmask[None, :]
    else:
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        pmask = rows < n_rows
        pofs = rows
        cidx = (rows % C)[:, None]
        cm = pmask[:, None]
    return pofs, pmask, cidx, cm


@triton.jit
def sums_tile(start, n_rows, L, C, SPAN, CHANNEL_IS_COL: tl.constexpr, BLOCK_R: tl.constexpr,
              BLOCK_L: tl.constexpr):
    """Tile ``start`` of the SPAN values of each line of this program (``sums_lines``) in the
    dense [n_rows, L] view -> (offs, mask): NCHW, columns [start, start + BLOCK_L) of its rows
    (SPAN = L); channel columns, rows start + [0, BLOCK_R) of its chunk of SPAN rows (L = C)."""
    if CHANNEL_IS_COL:
        local = start + tl.arange(0, BLOCK_R)
        rows = tl.program_id(0) * SPAN + local
        cols = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
        rmask = (rows < n_rows) & (local < SPAN)
        cmask = cols < C
    else:
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = start + tl.arange(0, BLOCK_L)
        rmask = rows < n_rows
        cmask = cols < L
    mask = rmask[:, None] & cmask[None, :]
    offs = rows.to(tl.int64)[:, None] * L + cols[None, :]
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


class View(NamedTuple):
    """The dense 2-D view of an input (see the module docstring)."""

    col: bool  # channels are the columns (channels_last, 2-D); else NCHW planes
    n_rows: int
    L: int  # row length: C (channel columns) or H*W
    C: int


def geometry(x: torch.Tensor, fmt) -> View:
    """The dense 2-D view of x, dense in fmt."""
    N, C = x.shape[0], x.shape[1]
    HW = x.shape[2] * x.shape[3] if x.dim() == 4 else 1
    if fmt == torch.channels_last or x.dim() == 2:
        return View(True, N * HW, C, C)
    return View(False, N * C, HW, C)


def launch_elementwise(kernel, view: View, *args, **consts) -> None:
    """Launches an elementwise kernel over the dense [n_rows, L] view: kernel(*args, n_rows, L,
    C, CHANNEL_IS_COL, BLOCK_R, BLOCK_L, **consts), tiled as ``tile_2d`` expects."""
    col, n_rows, L, C = view
    block_l = min(triton.next_power_of_2(max(L, 1)), 128 if col else 1024)
    block_r = max(1, min(64, 2048 // block_l))
    grid = (triton.cdiv(n_rows, block_r), triton.cdiv(L, block_l))
    kernel[grid](
        *args, n_rows, L, C,
        CHANNEL_IS_COL=col, BLOCK_R=block_r, BLOCK_L=block_l, **consts, **NO_FMA,
    )


def reduce_by_layout(kernel, view: View, *args, n_sums: int, cdt: torch.dtype,
                     **consts) -> tuple[torch.Tensor, int]:
    """Launches a per-channel reduction over the dense view -> (part, count): part
    [n_sums, P, C] (compute dtype) holds P partials of each of n_sums sums per channel, each
    over count values of its channel.

    kernel(*args, *part, n_rows, L, C, SPAN, CHANNEL_IS_COL, BLOCK_R, BLOCK_L, **consts), each
    program summing SPAN values of each of its lines (``sums_lines``, ``sums_tile``). Channel
    columns: a grid (P chunks of SPAN rows, blocks of BLOCK_L channels). NCHW: blocks of
    BLOCK_R (n, c) rows, one partial per row (P = N, SPAN = count = L)."""
    col, n_rows, L, C = view
    if col:
        block_l = min(triton.next_power_of_2(C), 128)
        block_r = max(1, min(64, 4096 // block_l))
        span = max(block_r, triton.cdiv(n_rows, 256))
        span = triton.cdiv(span, block_r) * block_r
        grid = (triton.cdiv(n_rows, span), triton.cdiv(C, block_l))
        shape = (n_sums, grid[0], C)
    else:
        block_l = min(triton.next_power_of_2(max(L, 1)), 1024)
        block_r = max(1, min(16, 2048 // block_l))
        span = L
        grid = (triton.cdiv(n_rows, block_r),)
        shape = (n_sums, n_rows)
    part = torch.empty(shape, dtype=cdt, device=args[0].device)
    kernel[grid](
        *args, *part, n_rows, L, C, span,
        CHANNEL_IS_COL=col, BLOCK_R=block_r, BLOCK_L=block_l, **consts, **NO_FMA,
    )
    return part.view(n_sums, -1, C), span
