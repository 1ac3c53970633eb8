"""The Triton kernels of der_fast::masked_gate (kernels/masked_gate.py) without a GPU: run on
CPU tensors under the Triton interpreter (a subprocess with TRITON_INTERPRET=1 set before
triton is imported), forward and backward against masked_gate_ref, every output_mask subset
(None where not asked), NCHW / channels_last / 2-D; and compiled ahead of time for sm_90.
"""

from __future__ import annotations

import textwrap

import pytest

from helpers import node_seed, triton_interpreter_results

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
        for channel_is_col, blocks in ((False, (2, 1024)), (True, (32, 128))):
            sums = build(
                mg._masked_gate_bwd_kernel,
                {
                    **common,
                    "n_rows": "i32",
                    "L": "i32",
                    "C": "i32",
                    "SPAN": "i32",
                    **flag_sig,
                    "CHANNEL_IS_COL": "constexpr",
                    "BLOCK_R": "constexpr",
                    "BLOCK_L": "constexpr",
                },
                {**flags, "CHANNEL_IS_COL": channel_is_col, "BLOCK_R": blocks[0],
                 "BLOCK_L": blocks[1]},
            )
            assert sums.asm["cubin"]


def test_triton_kernels_under_interpreter(request):
    pytest.importorskip("triton")
    results = triton_interpreter_results(_TRITON_SCRIPT, str(node_seed(request)), timeout=300)
    assert len(results) == 6
    for res in results:
        bad = {k: v for k, v in res.items() if k != "case" and v not in (None, True)}
        assert not bad, f"Triton kernel mismatch for {res['case']}: {bad}"
