"""conv3x3_bordered (the frozen path's direct 3x3 conv) vs oneDNN, side by side, CPU.

    DER_FAST_BENCH_THREADS=1 pytest benchmarks/bench_conv3x3_bordered.py --benchmark-only

Providers (one benchmark group per shape, so they line up):
  op          der_fast.ops.conv3x3_bordered: zero-bordered NCHW in and out, bias + residual +
              ReLU fused (what FastDERNet's "direct" frozen plan runs)
  onednn      torch.ops.mkldnn._convolution_pointwise.binary, channels_last, the same fusion
              (what the "loop" plan runs)
  aten        F.conv2d + add + relu, NCHW (what an eager nn.Module stack runs)
Shapes: ResNet-32 layers at batch 128: pruned to ~30 % of the channels (5 / 10 / 19 at 32 /
16 / 8 px, the benchmark's "30 %" extractors) and full width (16 / 32 / 64). The ratio table
after the run (benchmarks/conftest.py) gives op / provider: below 1, the op is faster.
Every provider's output is checked against a float64 convolution first. The stride-2 group
compares the op with the direct plan's alternative for such a conv (oneDNN + padding copy).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from benchmarks.harness.op_bench import bench_op  # the harness applies DER_FAST_BENCH_THREADS
from der_fast import ops

DEVICE = torch.device("cpu")  # a CPU kernel

SHAPES = [  # (N, C_in, C_out, HW)
    (128, 3, 5, 32),  # pruned stem
    (128, 5, 5, 32),
    (128, 10, 10, 16),
    (128, 19, 19, 8),
    (128, 16, 16, 32),  # full width
    (128, 32, 32, 16),
    (128, 64, 64, 8),
]
PROVIDERS = ["op", "onednn", "aten"]


def _inputs(N, ci, co, hw):
    g = torch.Generator().manual_seed(N + 100 * ci + 10 * co + hw)
    x = torch.randn(N, ci, hw, hw, generator=g)
    w = torch.randn(co, ci, 3, 3, generator=g) / (3 * ci ** 0.5)
    b = torch.randn(co, generator=g)
    r = torch.randn(N, co, hw, hw, generator=g)
    return x, w, b, r


def _fn(provider, x, w, b, r):
    if provider == "op":
        xb, rb = ops.border(x), ops.border(r)
        return lambda: ops.conv3x3_bordered(xb, w, b, rb, None, True)[:, :, 1:-1, 1:-1]
    if provider == "onednn":
        cl = torch.channels_last
        xc, wc, rc = (t.contiguous(memory_format=cl) for t in (x, w, r))
        return lambda: torch.ops.mkldnn._convolution_pointwise.binary(
            xc, rc, wc, b, [1, 1], [1, 1], [1, 1], 1, "add", None, "relu", [], "")
    return lambda: F.conv2d(x, w, b, padding=1).add_(r).relu_()


@pytest.mark.skipif(not ops.HAS_CPU_EXT, reason="der_fast._C not built")
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"N{s[0]}-{s[1]}to{s[2]}-HW{s[3]}")
def test_conv3x3(benchmark, shape, provider):
    if provider == "onednn" and not hasattr(torch.ops.mkldnn, "_convolution_pointwise"):
        pytest.skip("this torch has no oneDNN fused convolution")
    N, ci, co, hw = shape
    x, w, b, r = _inputs(N, ci, co, hw)
    fn = _fn(provider, x, w, b, r)
    want = F.relu(F.conv2d(x.double(), w.double(), b.double(), padding=1) + r.double())
    with torch.no_grad():
        torch.testing.assert_close(fn().double(), want, rtol=1e-4, atol=1e-4)
    bench_op(benchmark, "conv3x3_bordered", provider,
             f"conv3x3 N={N} {ci}->{co} {hw}x{hw} +bias+residual+relu", DEVICE, fn,
             shape=list(shape))


S2_SHAPES = [  # (N, C_in, C_out, HW in): pruned ResNet-32 downsampling convs
    (128, 5, 10, 32),
    (128, 10, 19, 16),
]
S2_PROVIDERS = ["op", "fallback"]


@pytest.mark.skipif(not ops.HAS_CPU_EXT, reason="der_fast._C not built")
@pytest.mark.parametrize("provider", S2_PROVIDERS)
@pytest.mark.parametrize("shape", S2_SHAPES, ids=lambda s: f"N{s[0]}-{s[1]}to{s[2]}-HW{s[3]}")
def test_conv3x3_stride2(benchmark, shape, provider):
    """Stride 2 + bias + ReLU, bordered in and out: the op vs what the direct plan otherwise
    runs for such a conv (oneDNN on the bordered input, then a padding copy)."""
    N, ci, co, hw = shape
    x, w, b, _ = _inputs(N, ci, co, hw)
    xb = ops.border(x)
    if provider == "op":
        fn = lambda: ops.conv3x3_bordered(xb, w, b, None, None, True, 2)  # noqa: E731
    else:
        fn = lambda: F.pad(F.conv2d(xb, w, b, 2, 0).relu_(), (1, 1, 1, 1)).contiguous()  # noqa
    want = F.relu(F.conv2d(x.double(), w.double(), b.double(), stride=2, padding=1))
    with torch.no_grad():
        torch.testing.assert_close(fn()[:, :, 1:-1, 1:-1].double(), want, rtol=1e-4, atol=1e-4)
    bench_op(benchmark, "conv3x3_bordered", provider,
             f"conv3x3 stride 2 N={N} {ci}->{co} {hw}x{hw} +bias+relu, bordered", DEVICE, fn,
             shape=list(shape), stride=2)


BORDERED_SHAPES = [  # (C_in, C_out, HW in, stride): where the executor's per-conv rule switches
    (19, 19, 8, 1),
    (40, 40, 8, 1),
    (48, 48, 8, 1),
    (64, 64, 8, 1),
    (32, 32, 16, 1),
    (64, 64, 16, 1),
    (10, 19, 16, 2),
    (19, 38, 16, 2),
    (32, 64, 16, 2),
]


@pytest.mark.skipif(not ops.HAS_CPU_EXT, reason="der_fast._C not built")
@pytest.mark.parametrize("provider", S2_PROVIDERS)
@pytest.mark.parametrize("shape", BORDERED_SHAPES,
                         ids=lambda s: f"{s[0]}to{s[1]}-HW{s[2]}-s{s[3]}")
def test_conv3x3_bordered_choice(benchmark, shape, provider):
    """Inside the bordered executor (der_fast::bordered_resnet) a conv runs either the op or
    oneDNN on the bordered NCHW planes with the folded channels_last weight, then the residual,
    ReLU and a padding copy; at the executor's batch chunk (activations of ~1 MiB). These
    groups set fast._BORDERED_S1_MAX / _BORDERED_S2_MAX."""
    ci, co, hw, stride = shape
    ho = (hw - 1) // stride + 1
    N = max(8, (1 << 20) // (4 * co * (ho + 2) ** 2))
    x, w, b, _ = _inputs(N, ci, co, hw)
    r = torch.randn(N, co, ho, ho, generator=torch.Generator().manual_seed(hw))
    xb, rb = ops.border(x), ops.border(r)
    if provider == "op":
        fn = lambda: ops.conv3x3_bordered(xb, w, b, rb, None, True, stride)  # noqa: E731
    else:
        wc = w.contiguous(memory_format=torch.channels_last)

        def fn():
            y = F.conv2d(xb, wc, b, stride, 0).add_(rb[:, :, 1:-1, 1:-1]).relu_()
            return F.pad(y, (1, 1, 1, 1)).contiguous()
    want = F.relu(F.conv2d(x.double(), w.double(), b.double(), stride=stride, padding=1)
                  + r.double())
    with torch.no_grad():
        torch.testing.assert_close(fn()[:, :, 1:-1, 1:-1].double(), want, rtol=1e-4, atol=1e-4)
    bench_op(benchmark, "conv3x3_bordered", provider,
             f"conv3x3 in the bordered executor N={N} {ci}->{co} {hw}x{hw} "
             f"stride {stride} +bias+residual+relu", DEVICE, fn,
             shape=[N, ci, co, hw], stride=stride)
