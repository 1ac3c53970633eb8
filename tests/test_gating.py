"""der_fast.masked_gate (the masked channel gating op) against masked_gate_ref.

Forward and backward, random data (seeded per test), float32/float64 (and bfloat16 on CPU
with loose tolerances), odd and prime channel counts, N=1, H=W=1, 2-D inputs, contiguous /
channels_last / non-contiguous, with and without e and residual; opcheck; bad-input errors;
the Triton kernels under the Triton interpreter (subprocess with TRITON_INTERPRET=1).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import zlib

import pytest
import torch

from der_fast import ops
from helpers import assert_close

# (dtype, forward atol/rtol, gradient atol/rtol); tolerances are scaled by max(1, max|expected|)
DTYPES = {
    "fp32": (torch.float32, 2e-6, 2e-6, 2e-5, 2e-5),
    "fp64": (torch.float64, 1e-12, 1e-12, 1e-11, 1e-11),
    "bf16": (torch.bfloat16, 1e-2, 1e-2, 3e-2, 3e-2),
}
# (N, C, H, W) or (N, C)
SHAPES = [(1, 1, 1, 1), (2, 3, 5, 5), (3, 7, 4, 6), (1, 13, 1, 1), (2, 67, 3, 3), (5, 13), (1, 7)]
LAYOUTS = ["contiguous", "channels_last", "strided"]


def _gen(request) -> torch.Generator:
    """A generator seeded from the test id: fresh, reproducible random data per test."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last" and t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # same values, non-contiguous storage
        big = torch.empty(t.shape[:-1] + (2 * t.shape[-1],), dtype=t.dtype)
        big[..., ::2] = t
        return big[..., ::2]
    return t.contiguous()


def _inputs(gen, shape, dtype, layout, with_e, with_r, s=2.5):
    C = shape[1]
    x = _layout(torch.randn(shape, generator=gen).to(dtype), layout)
    scale = (torch.rand(C, generator=gen) * 2 - 0.5).to(dtype)  # some negative scales too
    shift = torch.randn(C, generator=gen).to(dtype)
    e = torch.randn(C, generator=gen).to(dtype) if with_e else None
    r = _layout(torch.randn(shape, generator=gen).to(dtype), layout) if with_r else None
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
    gen = _gen(request)
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
    gen = _gen(request)
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
    gen = _gen(request)
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
    gen = _gen(request)
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
    gen = _gen(request)
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
    gen = _gen(request)
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
    x, scale, shift, e, s, r = _ok(_gen(request))
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
    for args in _opcheck_samples(_gen(request)):
        torch.library.opcheck(torch.ops.der_fast.masked_gate.default, tuple(args))


def test_opcheck_masked_gate_backward_cpu(request):
    gen = _gen(request)
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
    gen = _gen(request)
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
    for args in _opcheck_samples(_gen(request), "cuda"):
        torch.library.opcheck(torch.ops.der_fast.masked_gate.default, tuple(args))


# ----------------------------------------------------------------- Triton under the interpreter

_TRITON_SCRIPT = textwrap.dedent(
    r"""
    import json, os, sys
    assert os.environ.get("TRITON_INTERPRET") == "1"
    import torch
    import triton  # noqa: F401  (imported after TRITON_INTERPRET is set)
    from der_fast import _backend, ops
    mg = _backend.load_kernel_module("masked_gate")

    def worst(a, b):
        a, b = a.double(), b.double()
        if a.shape != b.shape:
            return {"shape": [list(a.shape), list(b.shape)]}
        if a.numel() == 0:
            return None
        err = (a - b).abs()
        tol = 1e-5 * max(1.0, b.abs().max().item()) + 1e-5 * b.abs()
        if (err <= tol).all():
            return None
        i = int(torch.argmax(err - tol))
        idx = [int(v) for v in torch.unravel_index(torch.tensor(i), a.shape)]
        return {"index": idx, "actual": a.flatten()[i].item(), "expected": b.flatten()[i].item()}

    gen = torch.Generator().manual_seed(int(sys.argv[1]))
    results = []
    cases = [
        ((2, 3, 5, 5), "contiguous", torch.float32, True, True, [1, 1, 1, 1, 1]),
        ((2, 13, 3, 3), "channels_last", torch.float32, True, False, [1, 1, 1, 1, 0]),
        ((3, 67, 2, 2), "contiguous", torch.float64, False, True, [1, 0, 1, 0, 1]),
        ((1, 7, 1, 1), "contiguous", torch.float32, True, True, [0, 1, 0, 1, 1]),
        ((5, 67), "contiguous", torch.float64, True, True, [1, 1, 1, 1, 1]),
        ((300, 3), "contiguous", torch.float32, True, False, [1, 1, 1, 1, 0]),
    ]
    for shape, layout, dtype, with_e, with_r, mask in cases:
        C = shape[1]
        x = torch.randn(shape, generator=gen, dtype=dtype)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        scale = torch.rand(C, generator=gen, dtype=dtype) * 2 - 0.5
        shift = torch.randn(C, generator=gen, dtype=dtype)
        e = torch.randn(C, generator=gen, dtype=dtype) if with_e else None
        r = torch.randn(shape, generator=gen, dtype=dtype) if with_r else None
        s = 3.0
        y = mg.masked_gate_fwd(x, scale, shift, e, s, r)
        leaves = [t.detach().clone().requires_grad_(True) if t is not None else None
                  for t in (x, scale, shift, e, r)]
        yr = ops.masked_gate_ref(leaves[0], leaves[1], leaves[2], leaves[3], s, leaves[4])
        gy = torch.randn(shape, generator=gen, dtype=dtype)
        want = [bool(m) and t is not None for m, t in zip(mask, (x, scale, shift, e, r))]
        got = mg.masked_gate_bwd(gy, y, x, scale, e, s, want)
        refs = torch.autograd.grad(yr, [l for l, w in zip(leaves, want) if w], gy)
        res = {"case": f"{shape} {layout} {dtype}", "y": worst(y, yr.detach()),
               "y_bitwise": torch.equal(y, yr.detach()),
               "layout_ok": (not (layout == "channels_last")) or y.is_contiguous(memory_format=torch.channels_last)}
        it = iter(refs)
        for name, w, g in zip(("x", "scale", "shift", "e", "residual"), want, got):
            res["grad_" + name] = worst(g, next(it)) if w else (None if g.numel() == 0 else "not empty")
        results.append(res)
    print("RESULTS" + json.dumps(results))
    """
)


def test_triton_kernels_compile_for_sm90():
    """The Triton kernels compile to H100 machine code (cubin) ahead of time, without a GPU, so
    code that only the interpreter has run is also valid for the real compiler."""
    triton = pytest.importorskip("triton")
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as err:  # pragma: no cover - other triton versions
        pytest.skip(f"triton AOT API not available: {err}")
    from der_fast import _backend

    mg = _backend.load_kernel_module("masked_gate")
    target = GPUTarget("cuda", 90, 32)

    def build(fn, sig, consts):
        keys = list(sig)
        src = ASTSource(
            fn=fn, signature=sig, constexprs={(keys.index(k),): v for k, v in consts.items()}
        )
        return triton.compile(src, target=target, options={"enable_fp_fusion": False})

    for dt in ("fp32", "bf16", "fp64"):
        p, cp = "*" + dt, ("*fp64" if dt == "fp64" else "*fp32")
        col = dt == "bf16"
        fwd = build(
            mg._masked_gate_fwd_kernel,
            {
                "X": p,
                "R": p,
                "Y": p,
                "SCALE": p,
                "SHIFT": p,
                "G": cp,
                "n_rows": "i32",
                "L": "i32",
                "C": "i32",
                "HAS_G": "constexpr",
                "HAS_R": "constexpr",
                "CHANNEL_IS_COL": "constexpr",
                "FP64": "constexpr",
                "BLOCK_R": "constexpr",
                "BLOCK_L": "constexpr",
            },
            {
                "HAS_G": True,
                "HAS_R": True,
                "CHANNEL_IS_COL": col,
                "FP64": dt == "fp64",
                "BLOCK_R": 2,
                "BLOCK_L": 1024,
            },
        )
        assert fwd.asm["cubin"]
        common = {
            "GY": p,
            "Y": p,
            "X": p,
            "GX": p,
            "GR": p,
            "SCALE": p,
            "G": cp,
            "P_DZ": cp,
            "P_DZX": cp,
            "P_GYY": cp,
        }
        flags = {"HAS_G": True, "HAS_X": True, "WGX": True, "WGR": True, "FP64": dt == "fp64"}
        flag_sig = {k: "constexpr" for k in flags}
        planes = build(
            mg._masked_gate_bwd_planes_kernel,
            {
                **common,
                "n_rows": "i32",
                "L": "i32",
                "C": "i32",
                **flag_sig,
                "BLOCK_R": "constexpr",
                "BLOCK_L": "constexpr",
            },
            {**flags, "BLOCK_R": 2, "BLOCK_L": 1024},
        )
        rows = build(
            mg._masked_gate_bwd_rows_kernel,
            {
                **common,
                "n_rows": "i32",
                "C": "i32",
                "ROWS_PER_PROG": "i32",
                **flag_sig,
                "BLOCK_R": "constexpr",
                "BLOCK_C": "constexpr",
            },
            {**flags, "BLOCK_R": 32, "BLOCK_C": 128},
        )
        assert planes.asm["cubin"] and rows.asm["cubin"]


def test_triton_kernels_under_interpreter(request):
    pytest.importorskip("triton")
    env = dict(
        os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(p for p in sys.path if p)
    )
    seed = str(zlib.crc32(request.node.nodeid.encode()))
    proc = subprocess.run(
        [sys.executable, "-c", _TRITON_SCRIPT, seed],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, f"interpreter run failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULTS"))
    results = json.loads(line[len("RESULTS") :])
    assert len(results) == 6
    for res in results:
        bad = {k: v for k, v in res.items() if k != "case" and v not in (None, True)}
        assert not bad, f"Triton kernel mismatch for {res['case']}: {bad}"
