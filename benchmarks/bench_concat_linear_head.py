"""concat_linear_head: the op vs concat_linear_head_ref vs the unfused nn-style sequence.

    pytest benchmarks/bench_concat_linear_head.py --benchmark-only [--benchmark-min-rounds=5]

Providers (one benchmark group per net x t x mode):
  op       der_fast.ops.concat_linear_head (C++ on CPU, CUDA C++ + cuBLAS on CUDA)
  ref      der_fast.ops.concat_linear_head_ref (mean over H, W; cat; linear; linear)
  unfused  PyCIL-style: adaptive_avg_pool2d + flatten per extractor, cat, fc, and the aux
           classifier on a slice of the concatenated features
Modes: fwd (no grad) and fwdbwd (stage-1 training: gradients for the newest extractor's
feature map and all four classifier tensors; the t-1 older extractors are frozen).
Shapes: ResNet-32 (N=128, 64 channels per extractor at 8x8) and ResNet-18-CIFAR (N=32, 512
channels at 4x4), t = 1, 5, 10 extractors, 10 classes per task, aux head 10 + 1 classes.
Outputs and gradients are checked against the reference before timing.
DER_FAST_BENCH_DEVICE=auto|cpu|cuda, DER_FAST_BENCH_THREADS=N as in bench_masked_gate.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from benchmarks.harness.env import bench_device  # also applies DER_FAST_BENCH_THREADS
from benchmarks.harness.op_bench import assert_grads_close, bench_op
from der_fast import ops

DEVICE = bench_device()
NETS = {"resnet32": (128, 64, 8), "resnet18": (32, 512, 4)}  # N, C per extractor, H=W
TS = [1, 5, 10]
MODES = ["fwd", "fwdbwd"]
PROVIDERS = ["op", "ref", "unfused"]


def unfused(feats, weight, bias, aux_weight=None, aux_bias=None):
    features = torch.cat([F.adaptive_avg_pool2d(f, 1).flatten(1) for f in feats], 1)
    logits = F.linear(features, weight, bias)
    aux = None
    if aux_weight is not None:
        aux = F.linear(features[:, -feats[-1].shape[1] :], aux_weight, aux_bias)
    return logits, aux, features


FNS = {"op": ops.concat_linear_head, "ref": ops.concat_linear_head_ref, "unfused": unfused}


def _inputs(net, t, requires_grad):
    N, C, HW = NETS[net]
    g = torch.Generator().manual_seed(t * 100 + C)
    feats = [torch.relu(torch.randn(N, C, HW, HW, generator=g)) for _ in range(t)]
    K, K_aux = 10 * t, 11
    W = torch.randn(K, C * t, generator=g) / (C * t) ** 0.5
    b = torch.randn(K, generator=g)
    Wa = torch.randn(K_aux, C, generator=g) / C**0.5
    ba = torch.randn(K_aux, generator=g)
    g_logits, g_aux = torch.randn(N, K, generator=g), torch.randn(N, K_aux, generator=g)
    feats = [f.to(DEVICE) for f in feats]
    W, b, Wa, ba, g_logits, g_aux = (x.to(DEVICE) for x in (W, b, Wa, ba, g_logits, g_aux))
    leaves = [feats[-1], W, b, Wa, ba]
    if requires_grad:
        for x in leaves:
            x.requires_grad_(True)
    return (feats, W, b, Wa, ba), leaves, (g_logits, g_aux)


def _check(fn, args, leaves, grads, mode):
    out = fn(*args)
    ref = ops.concat_linear_head_ref(*args)
    for name, a, r in zip(("logits", "aux", "features"), out, ref):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    if mode == "fwdbwd":
        assert_grads_close(torch.autograd.grad(out[:2], leaves, grads),
                           torch.autograd.grad(ref[:2], leaves, grads), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("t", TS)
@pytest.mark.parametrize("net", list(NETS))
def test_concat_linear_head(benchmark, net, t, mode, provider):
    fn = FNS[provider]
    args, leaves, grads = _inputs(net, t, requires_grad=mode == "fwdbwd")
    N, C, HW = NETS[net]
    _check(fn, args, leaves, grads, mode)
    bench_op(benchmark, "concat_linear_head", provider,
             f"concat_linear_head {mode} {net} N={N} C={C}x{t} HW={HW}x{HW} t={t}", DEVICE,
             lambda: fn(*args),
             (lambda out: torch.autograd.grad(out[:2], leaves, grads)) if mode == "fwdbwd"
             else None,
             mode=mode, net=net, t=t, shape=[N, C, HW, HW])
