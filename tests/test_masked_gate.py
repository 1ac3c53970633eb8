"""der_fast.masked_gate (the masked channel gating op) against masked_gate_ref.

Forward and backward, random data (seeded per test), float32/float64 (and bfloat16 on CPU
with loose tolerances), odd and prime channel counts, N=1, H=W=1, 2-D inputs, contiguous /
channels_last / non-contiguous, with and without e and residual; opcheck; bad-input errors.
The Triton kernels: tests/test_masked_gate_triton.py.
"""

from __future__ import annotations

import pytest
import torch

from der_fast import ops
from helpers import assert_close, node_generator, to_layout

# (dtype, forward atol/rtol, gradient atol/rtol); tolerances are scaled by max(1, max|expected|)
DTYPES = {
    "fp32": (torch.float32, 2e-6, 2e-6, 2e-5, 2e-5),
    "fp64": (torch.float64, 1e-12, 1e-12, 1e-11, 1e-11),
    "bf16": (torch.bfloat16, 1e-2, 1e-2, 3e-2, 3e-2),
}
# (N, C, H, W) or (N, C)
SHAPES = [(1, 1, 1, 1), (2, 3, 5, 5), (3, 7, 4, 6), (1, 13, 1, 1), (2, 67, 3, 3), (5, 13), (1, 7)]
LAYOUTS = ["contiguous", "channels_last", "strided"]


def _inputs(gen, shape, dtype, layout, with_e, with_r, s=2.5):
    C = shape[1]
    x = to_layout(torch.randn(shape, generator=gen).to(dtype), layout)
    scale = (torch.rand(C, generator=gen) * 2 - 0.5).to(dtype)  # some negative scales too
    shift = torch.randn(C, generator=gen).to(dtype)
    e = torch.randn(C, generator=gen).to(dtype) if with_e else None
    r = to_layout(torch.randn(shape, generator=gen).to(dtype), layout) if with_r else None
    return x, scale, shift, e, s, r


def _ref64(x, scale, shift, e, s, r):
    up = lambda t: None if t is None else t.detach().double().requires_grad_(t.requires_grad)
    args = [up(x), up(scale), up(shift), up(e), s, up(r)]
    return args, ops.masked_gate_ref(*args)


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize(
    "with_e,with_r", [(True, True), (True, False), (False, True), (False, False)]
)
def test_masked_gate_matches_ref(request, shape, layout, dtype_name, with_e, with_r):
    dtype, fa, fr, ga, gr = DTYPES[dtype_name]
    gen = node_generator(request)
    x, scale, shift, e, s, r = _inputs(gen, shape, dtype, layout, with_e, with_r)
    leaves = [t for t in (x, scale, shift, e, r) if t is not None]
    for t in leaves:
        t.requires_grad_(True)
    y = ops.masked_gate(x, scale, shift, e, s, r)
    args64, y64 = _ref64(x, scale, shift, e, s, r)
    assert y.dtype == dtype and y.shape == x.shape
    if layout == "channels_last" and x.dim() == 4 and not x.is_contiguous():
        assert y.is_contiguous(memory_format=torch.channels_last)
    assert_close(y, y64, fa, fr, f"y ({dtype_name}, {layout})")

    gy = torch.randn(y.shape, generator=gen).to(dtype)
    grads = torch.autograd.grad(y, leaves, gy)
    leaves64 = [t for t in args64 if isinstance(t, torch.Tensor)]
    grads64 = torch.autograd.grad(y64, leaves64, gy.double())
    names = [
        n
        for n, t in zip(("x", "scale", "shift", "e", "residual"), (x, scale, shift, e, r))
        if t is not None
    ]
    for name, g, g64 in zip(names, grads, grads64):
        assert g.dtype == dtype
        assert_close(g, g64, ga, gr, f"grad_{name} ({dtype_name}, {layout})")


@pytest.mark.parametrize("requires", ["x", "scale", "e", "residual", "x+e", "shift+residual"])
def test_masked_gate_partial_grads(request, requires):
    """Only the inputs that require grad get one (frozen BN / fixed masks cost nothing)."""
    gen = node_generator(request)
    x, scale, shift, e, s, r = _inputs(gen, (3, 13, 4, 4), torch.float64, "contiguous", True, True)
    gy = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    want = requires.split("+")
    names = ("x", "scale", "shift", "e", "residual")
    ours = [t.clone().requires_grad_(n in want) for n, t in zip(names, (x, scale, shift, e, r))]
    refs = [t.clone().requires_grad_(n in want) for n, t in zip(names, (x, scale, shift, e, r))]
    ops.masked_gate(ours[0], ours[1], ours[2], ours[3], s, ours[4]).backward(gy)
    ops.masked_gate_ref(refs[0], refs[1], refs[2], refs[3], s, refs[4]).backward(gy)
    for n, a, b in zip(names, ours, refs):
        if n in want:
            assert_close(a.grad, b.grad, 1e-11, 1e-11, f"grad_{n}")
        else:
            assert a.grad is None, n


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_masked_gate_forward_bitwise_equal_to_ref(request, dtype, layout):
    """Same roundings as the reference (no fused multiply-adds, same sigmoid): the fast
    forward is bit-identical to masked_gate_ref in float32/float64, so a ReLU input within
    rounding of 0 lands on the same side in both."""
    gen = node_generator(request)
    for shape in [(3, 67, 5, 7), (2, 13, 1, 1), (9, 33)]:
        x, scale, shift, e, _, r = _inputs(gen, shape, dtype, layout, True, True)
        y, yr = (
            ops.masked_gate(x, scale, shift, e, 3.7, r),
            ops.masked_gate_ref(x, scale, shift, e, 3.7, r),
        )
        assert torch.equal(y, yr), f"{shape}: max |diff| {(y - yr).abs().max().item():.3g}"
        y, yr = ops.masked_gate(x, scale, shift), ops.masked_gate_ref(x, scale, shift)
        assert torch.equal(y, yr), f"{shape} (no e, no residual)"


def test_masked_gate_mixed_layouts(request):
    """x channels_last, residual NCHW-contiguous, grad_y contiguous."""
    gen = node_generator(request)
    x, scale, shift, e, s, _ = _inputs(
        gen, (2, 7, 5, 3), torch.float32, "channels_last", True, False
    )
    r = torch.randn(x.shape, generator=gen)
    leaves = [t.requires_grad_(True) for t in (x, scale, shift, e, r)]
    y = ops.masked_gate(x, scale, shift, e, s, r)
    args64, y64 = _ref64(x, scale, shift, e, s, r)
    assert_close(y, y64, 2e-6, 2e-6, "y")
    gy = torch.randn(y.shape, generator=gen)
    for name, g, g64 in zip(
        ["x", "scale", "shift", "e", "r"],
        torch.autograd.grad(y, leaves, gy),
        torch.autograd.grad(y64, [a for a in args64 if isinstance(a, torch.Tensor)], gy.double()),
    ):
        assert_close(g, g64, 2e-5, 2e-5, f"grad_{name}")


def test_masked_gate_large_temperature(request):
    """s*e far in the sigmoid's tails (s up to 400 in DER's annealing): g saturates to 0/1."""
    gen = node_generator(request)
    x, scale, shift, e, _, r = _inputs(gen, (4, 13, 3, 3), torch.float32, "contiguous", True, True)
    s = 400.0
    leaves = [t.requires_grad_(True) for t in (x, scale, shift, e, r)]
    y = ops.masked_gate(x, scale, shift, e, s, r)
    yr = ops.masked_gate_ref(x, scale, shift, e, s, r)
    assert_close(y, yr, 1e-6, 1e-6, "y")
    gy = torch.randn(y.shape, generator=gen)
    for name, a, b in zip(
        ["x", "scale", "shift", "e", "r"],
        torch.autograd.grad(y, leaves, gy),
        torch.autograd.grad(yr, leaves, gy),
    ):
        assert_close(a, b, 1e-5, 1e-5, f"grad_{name}")


def test_masked_gate_backends(request):
    gen = node_generator(request)
    x, scale, shift, e, s, r = _inputs(gen, (2, 3, 2, 2), torch.float32, "contiguous", True, True)
    ref = ops.masked_gate(x, scale, shift, e, s, r, backend="ref")
    assert_close(ops.masked_gate(x, scale, shift, e, s, r), ref, 1e-6, 1e-6, "auto")
    if ops.HAS_CPU_EXT:
        assert_close(
            ops.masked_gate(x, scale, shift, e, s, r, backend="cpp"), ref, 1e-6, 1e-6, "cpp"
        )
    else:
        with pytest.raises(RuntimeError, match="cpp"):
            ops.masked_gate(x, scale, shift, e, s, r, backend="cpp")
    with pytest.raises(RuntimeError, match="triton"):  # triton is the CUDA implementation
        ops.masked_gate(x, scale, shift, e, s, r, backend="triton")
    with pytest.raises(ValueError, match="unknown backend"):
        ops.masked_gate(x, scale, shift, e, s, r, backend="fortran")


def test_masked_gate_uses_cpp_kernel():
    """The CPU op is the C++ kernel whenever der_fast._C was built."""
    expected = "cpp" if ops.HAS_CPU_EXT else "ref"
    assert ops.implementation("masked_gate", "cpu").startswith(expected)


# ---------------------------------------------------------------------------------- errors


def _ok(gen):
    return _inputs(gen, (2, 5, 3, 3), torch.float32, "contiguous", True, True)


@pytest.mark.parametrize(
    "case,exc,pattern",
    [
        ("rank3", ValueError, r"x must be 2-D \[N, C\] or 4-D"),
        ("rank1", ValueError, r"x must be 2-D"),
        ("int_x", TypeError, r"floating point"),
        ("scale_dtype", TypeError, r"scale has dtype torch.float64 but x has dtype torch.float32"),
        ("shift_channels", ValueError, r"shift has 4 channels but x has C=5"),
        ("e_channels", ValueError, r"e has 6 channels but x has C=5"),
        ("scale_rank", ValueError, r"scale must be 1-D"),
        (
            "residual_shape",
            ValueError,
            r"residual has shape \[2, 5, 3, 4\] but x has shape \[2, 5, 3, 3\]",
        ),
        ("residual_dtype", TypeError, r"residual has dtype"),
        ("e_device", ValueError, r"e is on device meta but x is on device cpu"),
    ],
)
def test_masked_gate_errors(request, case, exc, pattern):
    x, scale, shift, e, s, r = _ok(node_generator(request))
    if case == "rank3":
        x = x[0]
    elif case == "rank1":
        x = x[0, 0, 0]
    elif case == "int_x":
        x = x.to(torch.int32)
    elif case == "scale_dtype":
        scale = scale.double()
    elif case == "shift_channels":
        shift = shift[:4]
    elif case == "e_channels":
        e = torch.randn(6)
    elif case == "scale_rank":
        scale = scale[None]
    elif case == "residual_shape":
        r = torch.randn(2, 5, 3, 4)
    elif case == "residual_dtype":
        r = r.double()
    elif case == "e_device":
        e = torch.empty(5, device="meta")
    with pytest.raises(exc, match=pattern):
        ops.masked_gate(x, scale, shift, e, s, r)
    # the Python checks (fake kernel, PyTorch fallback) say the same as the C++ ones
    with pytest.raises(exc, match=pattern):
        ops._check_masked_gate(x, scale, shift, e, r)


# ---------------------------------------------------------------------------------- opcheck


def _opcheck_samples(gen, device="cpu"):
    samples = []
    for shape, layout, with_e, with_r in [
        ((2, 3, 4, 5), "contiguous", True, True),
        ((3, 7, 3, 3), "channels_last", True, False),
        ((4, 5), "contiguous", False, True),
    ]:
        x, scale, shift, e, s, r = _inputs(gen, shape, torch.float32, layout, with_e, with_r)
        args = [
            t.to(device) if isinstance(t, torch.Tensor) else t for t in (x, scale, shift, e, s, r)
        ]
        for t in args:
            if isinstance(t, torch.Tensor):
                t.requires_grad_(True)
        samples.append(args)
    return samples


def test_opcheck_masked_gate_cpu(request):
    for args in _opcheck_samples(node_generator(request)):
        torch.library.opcheck(torch.ops.der_fast.masked_gate.default, tuple(args))


def test_opcheck_masked_gate_backward_cpu(request):
    gen = node_generator(request)
    x, scale, shift, e, s, r = _inputs(
        gen, (2, 5, 3, 3), torch.float32, "channels_last", True, True
    )
    y = ops.masked_gate(x, scale, shift, e, s, r)
    gy = torch.randn(y.shape, generator=gen)
    for mask in ([True] * 5, [True, False, True, False, False]):
        torch.library.opcheck(
            torch.ops.der_fast.masked_gate_backward.default,
            (gy, y, x, scale, e, s, mask),
            test_utils=("test_schema", "test_faketensor"),
        )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_masked_gate_cuda(request):
    gen = node_generator(request)
    for shape, layout in [
        ((4, 67, 7, 9), "contiguous"),
        ((3, 13, 5, 5), "channels_last"),
        ((8, 33), "contiguous"),
    ]:
        for dtype_name in ("fp32", "fp64", "bf16"):
            dtype, fa, fr, ga, gr = DTYPES[dtype_name]
            x, scale, shift, e, s, r = _inputs(gen, shape, dtype, layout, True, True)
            xs = [t.cuda().requires_grad_(True) for t in (x, scale, shift, e, r)]
            y = ops.masked_gate(xs[0], xs[1], xs[2], xs[3], s, xs[4])
            args64, y64 = _ref64(x, scale, shift, e, s, r)
            assert_close(y, y64, fa, fr, f"cuda y {dtype_name}")
            gy = torch.randn(y.shape, generator=gen).to(dtype)
            g = torch.autograd.grad(y, xs, gy.cuda())
            for t in args64:
                if isinstance(t, torch.Tensor):
                    t.requires_grad_(True)
            y64 = ops.masked_gate_ref(*args64)
            g64 = torch.autograd.grad(
                y64, [a for a in args64 if isinstance(a, torch.Tensor)], gy.double()
            )
            for name, a, b in zip(["x", "scale", "shift", "e", "r"], g, g64):
                assert_close(a, b, ga, gr, f"cuda grad_{name} {dtype_name}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_opcheck_masked_gate_cuda(request):
    for args in _opcheck_samples(node_generator(request), "cuda"):
        torch.library.opcheck(torch.ops.der_fast.masked_gate.default, tuple(args))


def test_masked_gate_double_backward_raises(request):
    gen = node_generator(request)
    x = torch.randn(2, 3, 4, 4, generator=gen, requires_grad=True)
    scale, shift, e = (torch.randn(3, generator=gen) for _ in range(3))
    y = ops.masked_gate(x, scale, shift, e, 2.0)
    (gx,) = torch.autograd.grad(y, [x], torch.randn(y.shape, generator=gen), create_graph=True)
    with pytest.raises(NotImplementedError, match="masked_gate: double backward"):
        gx.sum().backward()
