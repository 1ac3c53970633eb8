"""masked_gate: the op vs masked_gate_ref vs the unfused PyTorch sequence, side by side.

    pytest benchmarks/bench_masked_gate.py --benchmark-only [--benchmark-min-rounds=5]

Providers (one benchmark group per shape x variant x mode, so they line up):
  op       der_fast.ops.masked_gate (C++ on CPU, Triton on CUDA)
  ref      der_fast.ops.masked_gate_ref (mul, add, [add], relu, mul by sigmoid gate)
  unfused  what an nn.Module stack does: eval-mode F.batch_norm with the affine (running
           mean 0, var 1, eps 0, so exactly scale*x + shift), [+ residual], F.relu, * sigmoid(s*e)
Modes: fwd (no grad) and fwdbwd (forward + backward for x, scale, shift, e [, residual]).
Variants: inner (no residual), stream (residual), stream_cl (residual, channels_last).
Shapes: ResNet-32 layers (N=128, C=16/32/64 at 32/16/8 px) and ResNet-18-CIFAR layers
(N=32, C=64/128/256/512 at 32/16/8/4 px). Every provider's outputs (and gradients) are
checked against the reference before timing. benchmarks/conftest.py prints the ratio table
(op/ref, op/unfused per group) after the run.

DER_FAST_BENCH_DEVICE=auto|cpu|cuda picks the device (auto: CUDA when available);
DER_FAST_BENCH_THREADS=N sets torch's CPU threads (on a shared, oversubscribed machine 1 thread
gives stable numbers: OpenMP barriers otherwise wait for descheduled threads).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.harness.env import bench_device  # also applies DER_FAST_BENCH_THREADS
from benchmarks.harness.op_bench import (MASK_S, assert_grads_close, bench_mask_point,
                                         mask_point_cases)
from der_fast import ops

DEVICE = bench_device()
VARIANTS = ["inner", "stream", "stream_cl"]
MODES = ["fwd", "fwdbwd"]
PROVIDERS = ["op", "ref", "unfused"]


def unfused(x, scale, shift, e=None, s=1.0, residual=None):
    """BN affine + residual + relu + sigmoid gate as separate PyTorch ops."""
    C = x.shape[1]
    zeros = torch.zeros(C, dtype=x.dtype, device=x.device)
    ones = torch.ones(C, dtype=x.dtype, device=x.device)
    z = F.batch_norm(x, zeros, ones, weight=scale, bias=shift, training=False, eps=0.0)
    if residual is not None:
        z = z + residual
    y = F.relu(z)
    if e is not None:
        y = y * torch.sigmoid(s * e).view(1, C, 1, 1)
    return y


FNS = {"op": ops.masked_gate, "ref": ops.masked_gate_ref, "unfused": unfused}


def _inputs(N, C, HW, variant, requires_grad):
    g = torch.Generator().manual_seed(N * 1000 + C * 10 + HW)
    x = torch.randn(N, C, HW, HW, generator=g)
    r = torch.randn(N, C, HW, HW, generator=g) if variant != "inner" else None
    scale = torch.rand(C, generator=g) + 0.5
    shift = torch.randn(C, generator=g) * 0.1
    e = torch.randn(C, generator=g)
    gy = torch.randn(N, C, HW, HW, generator=g)
    fmt = torch.channels_last if variant == "stream_cl" else torch.contiguous_format
    ts = [
        t.to(DEVICE).contiguous(memory_format=fmt)
        if t is not None and t.dim() == 4
        else (t.to(DEVICE) if t is not None else None)
        for t in (x, scale, shift, e, r, gy)
    ]
    x, scale, shift, e, r, gy = ts
    leaves = [t for t in (x, scale, shift, e, r) if t is not None]
    if requires_grad:
        for t in leaves:
            t.requires_grad_(True)
    return (x, scale, shift, e, MASK_S, r), leaves, gy


def _check(fn, args, leaves, gy, mode):
    """Outputs (and gradients) of fn must equal the reference before it is timed."""
    y = fn(*args)
    y_ref = ops.masked_gate_ref(*args)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5, msg=lambda m: f"forward: {m}")
    if mode == "fwdbwd":
        assert_grads_close(torch.autograd.grad(y, leaves, gy),
                           torch.autograd.grad(y_ref, leaves, gy), rtol=1e-4, atol=1e-3)


@mask_point_cases(VARIANTS, MODES, PROVIDERS)
def test_masked_gate(benchmark, shape, variant, mode, provider):
    _, N, C, HW = shape
    fn = FNS[provider]
    args, leaves, gy = _inputs(N, C, HW, variant, requires_grad=mode == "fwdbwd")
    _check(fn, args, leaves, gy, mode)
    bench_mask_point(benchmark, "masked_gate", provider, shape, variant, mode, DEVICE,
                     lambda: fn(*args),
                     (lambda y: torch.autograd.grad(y, leaves, gy)) if mode == "fwdbwd" else None)
