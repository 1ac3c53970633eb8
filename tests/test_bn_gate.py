"""der_fast.bn_gate (BatchNorm in train / eval mode + the masked gate, one op) against
bn_gate_ref and against what it replaces, a real nn.BatchNorm2d followed by gated_relu.

Random data (seeded per test), odd sizes (H*W not a multiple of 16, C = 1, 3, 17, N = 1),
NCHW / channels_last / strided, with and without e and residual, relu False:
* float64: outputs, batch statistics, every gradient and the running statistics after several
  calls (momentum 0.1 and None) agree with nn.BatchNorm2d + gated_relu to ~1e-12;
* float32: the op's error against the float64 truth (max abs / max |truth|) of y and of every
  gradient is at most 2x the float32 reference's own error, no additive slack;
* opcheck, gradcheck, empty batches, one value per channel, determinism across thread
  counts, bit-identity with ATen's BatchNorm in eval mode.
Bad inputs and double backward: tests/test_bn_gate_errors.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from der_fast import _backend, ops
from der_fast.backbones import gated_relu
from helpers import assert_close, bn_gate_data, node_generator, random_bn

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPES = [(2, 3, 5, 7), (1, 17, 4, 5), (3, 1, 3, 3), (4, 17, 9, 11), (2, 16, 8, 8)]
LAYOUTS = ["contiguous", "channels_last"]
# (with_e, with_r, relu)
VARIANTS = {
    "e+r": (True, True, True),
    "e": (True, False, True),
    "r": (False, True, True),
    "plain": (False, False, True),
    "norelu+e+r": (True, True, False),
    "norelu": (False, False, False),
}
S = 2.5


def _module_ref(z, bn, e, s, r, relu):
    """What the reference model computes: nn.BatchNorm2d, then gated_relu (or no ReLU)."""
    a = bn(z)
    g = torch.sigmoid(s * e) if e is not None else None
    if relu:
        return gated_relu(a, g, r)
    y = a + r if r is not None else a
    return y * g.view(1, -1, 1, 1) if g is not None else y


def _run(fn, z, bn, e, r, relu, gy):
    """y and the gradients of (z, weight, bias, e, residual) (None where not an input)."""
    z = z.detach().clone().requires_grad_(True)
    e = None if e is None else e.detach().clone().requires_grad_(True)
    r = None if r is None else r.detach().clone().requires_grad_(True)
    y = fn(z, bn, e, S, r, relu)
    leaves = [t for t in (z, bn.weight, bn.bias, e, r) if t is not None]
    grads = iter(torch.autograd.grad(y, leaves, gy))
    out = [next(grads) if t is not None else None for t in (z, bn.weight, bn.bias, e, r)]
    return y.detach(), out


def _op(z, bn, e, s, r, relu):
    return ops.bn_gate(z, bn, e, s, r, relu)


def _ref_op(z, bn, e, s, r, relu):
    return ops.bn_gate(z, bn, e, s, r, relu, backend="ref")


GRAD_NAMES = ("z", "weight", "bias", "e", "residual")


# ------------------------------------------------------------------------------ float64
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_float64_matches_batchnorm_and_ref(request, shape, layout, train, variant):
    with_e, with_r, relu = VARIANTS[variant]
    gen = node_generator(request)
    z, e, r, gy = bn_gate_data(gen, shape, layout, with_e, with_r)
    bn = random_bn(shape[1], gen, train=train)
    runs = {}
    for name, fn in (("op", _op), ("module", _module_ref), ("ref", _ref_op)):
        m = copy.deepcopy(bn)
        y, grads = _run(fn, z, m, e, r, relu, gy)
        runs[name] = (y, grads, m)
    y, grads, m = runs["op"]
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)
    for other in ("module", "ref"):
        y2, grads2, m2 = runs[other]
        assert_close(y, y2, 1e-12, 1e-12, f"y vs {other}")
        for n, a, b in zip(GRAD_NAMES, grads, grads2):
            assert (a is None) == (b is None), n
            if a is not None:
                assert a.dtype == torch.float64
                assert_close(a, b, 1e-12, 1e-12, f"grad_{n} vs {other}")
        for buf in ("running_mean", "running_var"):
            assert_close(getattr(m, buf), getattr(m2, buf), 1e-13, 1e-13, f"{buf} vs {other}")
        assert int(m.num_batches_tracked) == int(m2.num_batches_tracked)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", LAYOUTS + ["strided"])
def test_op_statistics_match_ref(request, layout, train):
    """The raw op's (y, mean, var) against bn_gate_ref: batch mean / biased variance in
    training, the running statistics (copies, not aliases) in eval."""
    gen = node_generator(request)
    for shape in [(3, 17, 5, 7), (1, 3, 1, 9), (5, 1, 4, 4)]:
        z, e, r, _ = bn_gate_data(gen, shape, layout, True, True)
        bn = random_bn(shape[1], gen)
        args = (z, bn.weight.detach(), bn.bias.detach(), None if train else bn.running_mean,
                None if train else bn.running_var, e, S, r, train, bn.eps, True)
        y, mean, var = torch.ops.der_fast.bn_gate(*args)
        y2, mean2, var2 = ops.bn_gate_ref(*args)
        assert_close(y, y2, 1e-13, 1e-13, "y")
        assert_close(mean, mean2, 1e-14, 1e-14, "mean")
        assert_close(var, var2, 1e-14, 1e-14, "var")
        zd = z.double()
        if train:
            assert_close(mean, zd.mean((0, 2, 3)), 1e-14, 1e-14, "batch mean")
            assert_close(var, zd.var((0, 2, 3), unbiased=False), 1e-14, 1e-14, "batch var")
        else:
            assert torch.equal(mean, bn.running_mean) and torch.equal(var, bn.running_var)
            assert mean.data_ptr() != bn.running_mean.data_ptr()


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum0.1", "cumulative"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_running_statistics_over_calls(request, momentum, layout):
    """Several training calls, then eval: the running statistics (and num_batches_tracked)
    follow nn.BatchNorm2d's, so eval mode afterwards gives the same outputs."""
    gen = node_generator(request)
    C = 17
    bn = random_bn(C, gen, momentum=momentum)
    ref = copy.deepcopy(bn)
    for i, shape in enumerate([(4, C, 5, 7), (2, C, 3, 3), (1, C, 6, 5), (3, C, 4, 4)]):
        z, e, r, gy = bn_gate_data(gen, shape, layout, i % 2 == 0, i % 3 == 0)
        y, grads = _run(_op, z, bn, e, r, True, gy)
        y2, grads2 = _run(_module_ref, z, ref, e, r, True, gy)
        assert_close(y, y2, 1e-12, 1e-12, f"y call {i}")
        assert_close(bn.running_mean, ref.running_mean, 1e-13, 1e-13, f"running_mean call {i}")
        assert_close(bn.running_var, ref.running_var, 1e-13, 1e-13, f"running_var call {i}")
        assert int(bn.num_batches_tracked) == int(ref.num_batches_tracked) == i + 1
    bn.eval()
    ref.eval()
    z, e, r, gy = bn_gate_data(gen, (3, C, 5, 5), layout, True, True)
    y, _ = _run(_op, z, bn, e, r, True, gy)
    y2, _ = _run(_module_ref, z, ref, e, r, True, gy)
    assert_close(y, y2, 1e-12, 1e-12, "eval after training")
    assert int(bn.num_batches_tracked) == 4  # eval calls leave the buffers alone


def test_module_variants(request):
    """affine=False, track_running_stats=False (batch statistics in eval too)."""
    gen = node_generator(request)
    z, e, r, gy = bn_gate_data(gen, (3, 5, 4, 6), "contiguous", True, True)
    for kw in ({"affine": False}, {"track_running_stats": False}):
        for train in (True, False):
            bn = nn.BatchNorm2d(5, **kw).double().train(train)
            ref = copy.deepcopy(bn)
            y, grads = _run(_op, z, bn, e, r, True, gy)
            y2, grads2 = _run(_module_ref, z, ref, e, r, True, gy)
            assert_close(y, y2, 1e-12, 1e-12, f"y {kw} train={train}")
            for n, a, b in zip(GRAD_NAMES, grads, grads2):
                assert (a is None) == (b is None), n
                if a is not None:
                    assert_close(a, b, 1e-12, 1e-12, f"grad_{n} {kw} train={train}")
            if bn.running_mean is not None:
                assert_close(bn.running_mean, ref.running_mean, 1e-13, 1e-13, "running_mean")


@pytest.mark.parametrize("requires", ["z", "weight", "e", "residual", "z+e", "bias+residual"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_partial_gradients(request, requires, train):
    """Only the inputs that require grad get one (frozen BN / fixed masks cost nothing)."""
    gen = node_generator(request)
    z, e, r, gy = bn_gate_data(gen, (3, 7, 5, 5), "contiguous", True, True)
    want = requires.split("+")
    results = []
    for fn in (_op, _module_ref):
        bn = random_bn(7, torch.Generator().manual_seed(5), train=train)
        zz = z.clone().requires_grad_("z" in want)
        ee = e.clone().requires_grad_("e" in want)
        rr = r.clone().requires_grad_("residual" in want)
        bn.weight.requires_grad_("weight" in want)
        bn.bias.requires_grad_("bias" in want)
        fn(zz, bn, ee, S, rr, True).backward(gy)
        results.append([t.grad for t in (zz, bn.weight, bn.bias, ee, rr)])
    for n, a, b in zip(GRAD_NAMES, *results):
        if n in want:
            assert_close(a, b, 1e-12, 1e-12, f"grad_{n}")
        else:
            assert a is None and b is None, n


# ------------------------------------------------------------------------------ float32
def _err(t: torch.Tensor, truth: torch.Tensor) -> float:
    return float((t.double() - truth).abs().max()) / max(float(truth.abs().max()), 1e-300)


@pytest.mark.parametrize("variant", ["e+r", "e", "plain", "norelu"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(
    "shape", [(8, 16, 16, 16), (16, 32, 8, 8), (4, 17, 9, 11), (1, 3, 13, 13)],
    ids=lambda s: "x".join(map(str, s)))
def test_float32_at_most_2x_reference_error(request, shape, layout, train, variant):
    """Judge: nn.BatchNorm2d + gated_relu in float64. Per tensor, the op's float32 error is at
    most 2x the float32 reference's (no additive slack)."""
    with_e, with_r, relu = VARIANTS[variant]
    gen = node_generator(request)
    z, e, r, gy = bn_gate_data(gen, shape, layout, with_e, with_r, torch.float32)
    bn = random_bn(shape[1], gen, dtype=torch.float32, train=train)
    bn64 = copy.deepcopy(bn).double()
    y64, g64 = _run(_module_ref, z.double(), bn64, None if e is None else e.double(),
                    None if r is None else r.double(), relu, gy.double())
    y32, g32 = _run(_module_ref, z, copy.deepcopy(bn), e, r, relu, gy)
    yf, gf = _run(_op, z, copy.deepcopy(bn), e, r, relu, gy)
    bad = []
    for name, f, ref, truth in [("y", yf, y32, y64)] + [
        (f"grad_{n}", a, b, c) for n, a, b, c in zip(GRAD_NAMES, gf, g32, g64) if c is not None
    ]:
        assert f.dtype == torch.float32, name
        ef, er = _err(f, truth), _err(ref, truth)
        if ef > 2 * er:
            bad.append(f"{name}: op {ef:.3e} > 2 x reference {er:.3e}")
    assert not bad, "; ".join(bad)


@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512")
                    or (not ops.HAS_CPU_EXT and not _backend.build_cpu_setting()),
                    reason="bit-identity holds where ATen's BatchNorm kernel uses FMA (x86 "
                           "AVX2 / AVX-512 builds) and the C++ op runs")
@pytest.mark.parametrize("with_r", [False, True], ids=["no_residual", "residual"])
def test_float32_bitwise_equal_to_batchnorm(request, with_r):
    """NCHW float32, train and eval mode: the op rounds like ATen's BatchNorm followed by
    gated_relu (same statistics arithmetic, same alpha / beta, same fused multiply-adds), bit
    for bit, so the fast model's ReLU masks are the reference's. The running mean is updated
    bit for bit too; the running variance where N*H*W is a power of two (the op returns the
    biased variance, and var * M recovers ATen's sum exactly only then)."""
    gen = node_generator(request)
    for shape in [(8, 16, 16, 16), (3, 17, 5, 7), (2, 64, 8, 8), (128, 16, 8, 8)]:
        z, e, r, _ = bn_gate_data(gen, shape, "contiguous", True, with_r, torch.float32)
        bn = random_bn(shape[1], gen, dtype=torch.float32, train=False)
        with torch.no_grad():
            y = ops.bn_gate(z, bn, e, S, r)
            y2 = _module_ref(z, bn, e, S, r, True)
        assert torch.equal(y, y2), f"{shape} eval: {(y - y2).abs().max().item():.3g}"
        bn.train()
        b1, b2 = copy.deepcopy(bn), copy.deepcopy(bn)
        with torch.no_grad():
            y = ops.bn_gate(z, b1, e, S, r)
            y2 = _module_ref(z, b2, e, S, r, True)
        assert torch.equal(y, y2), f"{shape} train: {(y - y2).abs().max().item():.3g}"
        assert torch.equal(b1.running_mean, b2.running_mean), shape
        M = shape[0] * shape[2] * shape[3]
        if M & (M - 1) == 0:
            assert torch.equal(b1.running_var, b2.running_var), shape
        else:
            assert_close(b1.running_var, b2.running_var, 1e-6, 0.0, f"{shape} running_var")


def test_deterministic_across_threads(request):
    gen = node_generator(request)
    outs = []
    for layout in LAYOUTS:
        z, e, r, gy = bn_gate_data(gen, (16, 16, 16, 16), layout, True, True, torch.float32)
        for threads in (1, 2):
            torch.set_num_threads(threads)
            try:
                bn = random_bn(16, torch.Generator().manual_seed(3), dtype=torch.float32)
                y, grads = _run(_op, z, bn, e, r, True, gy)
                outs.append((y, grads, bn.running_var.clone()))
            finally:
                torch.set_num_threads(1)
        (y1, g1, v1), (y2, g2, v2) = outs[-2:]
        assert torch.equal(y1, y2) and torch.equal(v1, v2), layout
        for n, a, b in zip(GRAD_NAMES, g1, g2):
            assert torch.equal(a, b), f"grad_{n} {layout}"


def test_other_layouts_and_bfloat16(request):
    """Strided input (copied to dense), mixed layouts (z channels_last, residual NCHW), and
    bfloat16 (computed in float32)."""
    gen = node_generator(request)
    z, e, r, gy = bn_gate_data(gen, (3, 7, 5, 6), "strided", True, True)
    bn = random_bn(7, gen)
    y, grads = _run(_op, z, copy.deepcopy(bn), e, r, True, gy)
    y2, grads2 = _run(_module_ref, z, copy.deepcopy(bn), e, r, True, gy)
    assert_close(y, y2, 1e-12, 1e-12, "strided y")
    for n, a, b in zip(GRAD_NAMES, grads, grads2):
        assert_close(a, b, 1e-12, 1e-12, f"strided grad_{n}")
    zc = z.contiguous(memory_format=torch.channels_last)
    y, grads = _run(_op, zc, copy.deepcopy(bn), e, r.contiguous(), True, gy.contiguous())
    assert_close(y, y2, 1e-12, 1e-12, "mixed y")
    for n, a, b in zip(GRAD_NAMES, grads, grads2):
        assert_close(a, b, 1e-12, 1e-12, f"mixed grad_{n}")
    # bfloat16 against float64 from the same (bfloat16-rounded) values
    bnb = copy.deepcopy(bn).to(torch.bfloat16)
    zb, eb, rb, gyb = z.bfloat16(), e.bfloat16(), r.bfloat16(), gy.bfloat16()
    yb, gb = _run(_op, zb, bnb, eb, rb, True, gyb)
    y64, g64 = _run(_module_ref, zb.double(), copy.deepcopy(bnb).double(), eb.double(),
                    rb.double(), True, gyb.double())
    assert yb.dtype == torch.bfloat16 and gb[0].dtype == torch.bfloat16
    assert_close(yb, y64, 2e-2, 2e-2, "bfloat16 y")
    for n, a, b in zip(GRAD_NAMES, gb, g64):
        assert_close(a, b, 5e-2, 5e-2, f"bfloat16 grad_{n}")


# ------------------------------------------------------------------------------ edge cases
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(0, 5, 4, 4), (3, 5, 0, 4)], ids=["N0", "H0"])
def test_empty_batch(request, shape, layout):
    """As nn.BatchNorm2d: empty output, running statistics unchanged (num_batches_tracked
    still counts the call), zero gradients for weight / bias / e."""
    gen = node_generator(request)
    z, e, r, gy = bn_gate_data(gen, shape, layout, True, True)
    for train in (True, False):
        bn = random_bn(5, gen, train=train)
        ref = copy.deepcopy(bn)
        y, grads = _run(_op, z, bn, e, r, True, gy)
        y2, grads2 = _run(_module_ref, z, ref, e, r, True, gy)
        assert y.shape == z.shape
        for n, a, b in zip(GRAD_NAMES, grads, grads2):
            assert a.shape == b.shape and not a.isnan().any(), n
            assert_close(a, b, 0, 0, f"grad_{n}")
        assert torch.equal(bn.running_mean, ref.running_mean)
        assert torch.equal(bn.running_var, ref.running_var)
        assert int(bn.num_batches_tracked) == int(ref.num_batches_tracked)
    y, mean, var = torch.ops.der_fast.bn_gate(z, bn.weight, bn.bias, None, None, e, S, r, True,
                                             1e-5, True)
    assert mean.shape == var.shape == (5,) and not mean.isnan().any()


def test_one_value_per_channel(request):
    """M = N*H*W = 1 in training: the wrapper raises ValueError like F.batch_norm; the raw op
    (var = 0) and its backward stay finite."""
    gen = node_generator(request)
    z, e, r, gy = bn_gate_data(gen, (1, 4, 1, 1), "contiguous", True, True)
    bn = random_bn(4, gen)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        ops.bn_gate(z, bn, e, S, r)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        bn(z)
    zz = z.clone().requires_grad_(True)
    w = bn.weight.detach().clone().requires_grad_(True)
    y, mean, var = torch.ops.der_fast.bn_gate(zz, w, bn.bias, None, None, e, S, r, True, 1e-5,
                                             True)
    assert torch.equal(var, torch.zeros_like(var)) and torch.equal(mean, z.flatten())
    gz, gw = torch.autograd.grad(y, [zz, w], gy)
    assert gz.isfinite().all() and gw.isfinite().all()
    bn.eval()  # eval mode has no such restriction
    assert ops.bn_gate(z, bn, e, S, r).isfinite().all()



def test_backends_and_implementation(request):
    gen = node_generator(request)
    z, e, r, _ = bn_gate_data(gen, (2, 3, 4, 4), "contiguous", True, True, torch.float32)
    bn = random_bn(3, gen, dtype=torch.float32)
    ref = ops.bn_gate(z, copy.deepcopy(bn), e, S, r, backend="ref")
    assert_close(ops.bn_gate(z, copy.deepcopy(bn), e, S, r), ref, 1e-6, 1e-6, "auto")
    expected = "cpp" if _backend.build_cpu_setting() else "ref"
    assert ops.implementation("bn_gate", "cpu").startswith(expected)
    if expected == "cpp":
        assert_close(ops.bn_gate(z, copy.deepcopy(bn), e, S, r, backend="cpp"), ref, 1e-6,
                     1e-6, "cpp")



# ------------------------------------------------------------------------------ opcheck etc.
def _opcheck_samples(gen):
    samples = []
    for shape, layout, with_e, with_r, train, relu in [
        ((2, 3, 4, 5), "contiguous", True, True, True, True),
        ((3, 7, 3, 3), "channels_last", True, False, True, True),
        ((2, 5, 3, 2), "contiguous", False, True, False, True),
        ((4, 2, 2, 3), "contiguous", False, False, True, False),
    ]:
        z, e, r, _ = bn_gate_data(gen, shape, layout, with_e, with_r, torch.float32)
        C = shape[1]
        w = (torch.rand(C, generator=gen) + 0.5).requires_grad_(True)
        b = torch.randn(C, generator=gen).requires_grad_(True)
        rm = None if train else torch.randn(C, generator=gen)
        rv = None if train else torch.rand(C, generator=gen) + 0.5
        for t in (z, e, r):
            if t is not None:
                t.requires_grad_(True)
        samples.append((z, w, b, rm, rv, e, S, r, train, 1e-5, relu))
    return samples


def test_opcheck_bn_gate(request):
    for args in _opcheck_samples(node_generator(request)):
        torch.library.opcheck(torch.ops.der_fast.bn_gate.default, args)


def test_opcheck_bn_gate_backward(request):
    gen = node_generator(request)
    z, e, r, gy = bn_gate_data(gen, (2, 5, 3, 3), "channels_last", True, True, torch.float32)
    w, b = torch.rand(5, generator=gen) + 0.5, torch.randn(5, generator=gen)
    _, mean, var = torch.ops.der_fast.bn_gate(z, w, b, None, None, e, S, r, True, 1e-5, True)
    for mask in ([True] * 5, [True, False, True, False, False], [False, True, False, True, True]):
        for train in (True, False):
            torch.library.opcheck(
                torch.ops.der_fast.bn_gate_backward.default,
                (gy, z, w, b, mean, var, e, S, r, train, 1e-5, True, mask),
                test_utils=("test_schema", "test_faketensor"),
            )


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "norelu"])
def test_gradcheck(request, train, relu):
    gen = node_generator(request)
    z, e, r, _ = bn_gate_data(gen, (2, 3, 3, 4), "contiguous", True, True)
    w = torch.rand(3, generator=gen, dtype=torch.float64) + 0.5
    b = torch.randn(3, generator=gen, dtype=torch.float64)
    rm, rv = (None, None) if train else (torch.randn(3, dtype=torch.float64, generator=gen),
                                         torch.rand(3, dtype=torch.float64, generator=gen) + 0.5)

    def f(z, w, b, e, r):
        return torch.ops.der_fast.bn_gate(z, w, b, rm, rv, e, S, r, train, 1e-5, relu)[0]

    inputs = [t.detach().clone().requires_grad_(True) for t in (z, w, b, e, r)]
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7)
