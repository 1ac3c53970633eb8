"""bn_gate: the fused op vs the path it replaces vs the plain module stack, side by side.

    pytest benchmarks/bench_bn_gate.py --benchmark-only [--benchmark-min-rounds=5]

Providers (one benchmark group per shape x variant x mode, so they line up):
  op       der_fast.ops.bn_gate (C++ on CPU, Triton on CUDA): BatchNorm + gate + ReLU
           [+ residual] in one op, forward and backward
  native   what the fast path ran before bn_gate: ATen's BatchNorm, then the masked_gate op
  unfused  the reference's module stack: nn.BatchNorm2d, [+ residual], ReLU, * sigmoid(s e)
Modes: train (batch statistics, running statistics updated; forward + backward for z, weight,
bias, e [, residual]) and eval_fwd (running statistics, no grad: the frozen path's arithmetic).
Variants: inner (no residual), stream (residual).
Shapes: the trainable ResNet-32's mask points (N=128, C=16/32/64 at 32/16/8 px) and
ResNet-18-CIFAR's (N=32, C=64/128/256/512 at 32/16/8/4 px). Every provider's outputs and
gradients are checked against the unfused stack before timing. benchmarks/conftest.py prints
the ratio table (op/native, op/unfused per group) after the run.

DER_FAST_BENCH_DEVICE=auto|cpu|cuda picks the device; DER_FAST_BENCH_THREADS=N sets torch's
CPU threads.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.harness.env import bench_device  # also applies DER_FAST_BENCH_THREADS
from benchmarks.harness.op_bench import (MASK_S, assert_grads_close, bench_mask_point,
                                         mask_point_cases)
from der_fast import ops

DEVICE = bench_device()
VARIANTS = ["inner", "stream"]
MODES = ["train", "eval_fwd"]
PROVIDERS = ["op", "native", "unfused"]


def unfused(z, bn, e, residual):
    a = bn(z)
    if residual is not None:
        a = a + residual
    return F.relu(a) * torch.sigmoid(MASK_S * e).view(1, -1, 1, 1)


def native(z, bn, e, residual):
    ones = torch.ones(z.shape[1], dtype=z.dtype, device=z.device)
    return ops.masked_gate(bn(z), ones, torch.zeros_like(ones), e=e, s=MASK_S, residual=residual)


def fused(z, bn, e, residual):
    return ops.bn_gate(z, bn, e=e, s=MASK_S, residual=residual)


FNS = {"op": fused, "native": native, "unfused": unfused}


def _inputs(N, C, HW, variant, train):
    g = torch.Generator().manual_seed(N * 1000 + C * 10 + HW)
    z = (torch.randn(N, C, HW, HW, generator=g) * 2 + 0.5).to(DEVICE)
    r = torch.randn(N, C, HW, HW, generator=g).to(DEVICE) if variant == "stream" else None
    e = torch.randn(C, generator=g).to(DEVICE)
    gy = torch.randn(N, C, HW, HW, generator=g).to(DEVICE)
    bn = nn.BatchNorm2d(C).to(DEVICE)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5, generator=None)
        bn.bias.normal_(0, 0.1)
        bn.running_mean.normal_(0, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    bn.train(train)
    leaves = []
    if train:
        for t in (z, e) + ((r,) if r is not None else ()):
            t.requires_grad_(True)
        leaves = [z, bn.weight, bn.bias, e] + ([r] if r is not None else [])
    return z, bn, e, r, gy, leaves


def _check(fn, z, bn, e, r, gy, leaves):
    """Outputs (and gradients) of fn must equal the module stack's before it is timed."""
    bn_ref = copy.deepcopy(bn)
    y = fn(z, copy.deepcopy(bn), e, r)
    y_ref = unfused(z, bn_ref, e, r)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5, msg=lambda m: f"forward: {m}")
    if leaves:
        leaves_ref = [z, bn_ref.weight, bn_ref.bias, e] + ([r] if r is not None else [])
        bn2 = copy.deepcopy(bn)
        leaves2 = [z, bn2.weight, bn2.bias, e] + ([r] if r is not None else [])
        assert_grads_close(torch.autograd.grad(fn(z, bn2, e, r), leaves2, gy),
                           torch.autograd.grad(unfused(z, bn_ref, e, r), leaves_ref, gy),
                           rtol=1e-4, atol=1e-3)


@mask_point_cases(VARIANTS, MODES, PROVIDERS)
def test_bn_gate(benchmark, shape, variant, mode, provider):
    _, N, C, HW = shape
    fn = FNS[provider]
    train = mode == "train"
    z, bn, e, r, gy, leaves = _inputs(N, C, HW, variant, train)
    _check(fn, z, bn, e, r, gy, leaves)
    bench_mask_point(benchmark, "bn_gate", provider, shape, variant, mode, DEVICE,
                     lambda: fn(z, bn, e, r),
                     (lambda y: torch.autograd.grad(y, leaves, gy)) if train else None)
