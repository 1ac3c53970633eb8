"""The Triton kernels of der_fast::bn_gate (kernels/bn_gate.py) without a GPU.

BatchNorm2d (train / eval) + optional residual + ReLU (or none) + per-channel gate, forward and
backward. The kernels run on CPU tensors under the Triton interpreter, in one subprocess with
TRITON_INTERPRET=1 set before triton is imported (as tests/test_masked_gate_triton.py does), so
this module works under plain ``pytest`` too. Every output (y, mean, var) and every gradient is
compared with plain PyTorch maths: torch autograd of F.batch_norm(training=...) + residual +
relu + gate.

- float64 inputs: within 1e-10 (scaled by max(1, max|expected|)) of the float64 reference.
- float32 (and bfloat16 / float16) inputs: compared with the float64 reference evaluated on the
  same (upcast) input values; the error may be at most 4x the error of the PyTorch reference run
  in the input dtype (its own rounding error on that data), plus 8 units in the last place of
  the output's scale. Two cases have a large common offset (z = 100 + noise), where E[z^2] -
  mean^2 in float32 would be off by far more than that (checked on var separately).
- NCHW and channels_last (outputs keep z's memory format), 2-D [N, C], with/without residual and
  e, relu False, training and eval, output_mask subsets (None where not asked), H*W = 1 with
  C = 1, M = 1 in eval, M = 0 (NaN statistics, zero gradient sums, empty outputs) and C = 0.
- The kernels also compile for sm_90 ahead of time (no GPU needed), as in
  tests/test_masked_gate_triton.py.
"""

from __future__ import annotations

import importlib.util
import json
import os
import textwrap
from pathlib import Path

import pytest

from helpers import run_python, triton_interpreter_results

if importlib.util.find_spec("triton") is None:  # pragma: no cover - CPU-only installs
    pytest.skip("triton is not installed", allow_module_level=True)

KERNEL_FILE = Path(__file__).resolve().parents[1] / "kernels" / "bn_gate.py"

ALL = [1, 1, 1, 1, 1]


def _case(shape, layout="nchw", dtype="fp64", training=True, e=True, r=True, relu=True,
          mask=ALL, offset=0.0, name=""):
    cid = f"{name or 'x'.join(map(str, shape))}-{layout}-{dtype}-{'train' if training else 'eval'}"
    cid += f"{'-e' if e else ''}{'-r' if r else ''}{'' if relu else '-norelu'}"
    cid += "" if mask == ALL else "-m" + "".join(map(str, mask))
    return {"id": cid, "shape": list(shape), "layout": layout, "dtype": dtype,
            "training": training, "e": e, "r": r, "relu": relu, "mask": list(mask),
            "offset": offset}


S = (3, 5, 7, 7)
CASES = [
    # float64: every layout / mode / option
    _case(S, "nchw", "fp64", True),
    _case(S, "cl", "fp64", True),
    _case(S, "nchw", "fp64", False),
    _case(S, "cl", "fp64", False),
    _case(S, "nchw", "fp64", True, e=False, r=False),
    _case(S, "cl", "fp64", False, e=False, r=False),
    _case(S, "nchw", "fp64", True, relu=False),
    _case(S, "cl", "fp64", True, e=True, r=False, relu=False),
    _case(S, "nchw", "fp64", False, e=False, r=True, relu=False),
    _case((4, 1, 1, 1), "nchw", "fp64", True),  # H*W = 1, C = 1
    _case((4, 1, 1, 1), "nchw", "fp64", False, r=False),
    _case((1, 3, 1, 1), "nchw", "fp64", False),  # M = 1 (eval only: batch stats need M > 1)
    _case((2, 2, 1, 1), "cl", "fp64", True),  # M = 2
    _case((6, 5), "nchw", "fp64", True),  # 2-D [N, C] (BatchNorm1d-like)
    # several tiles per plane (Chan merges in the planes kernel), several row chunks per
    # program with an empty last tile (channels_last)
    _case((2, 2, 40, 40), "nchw", "fp64", True, name="tiles"),
    _case((1, 2, 130, 130), "cl", "fp64", True, name="chunks"),
    # output_mask subsets
    _case(S, "nchw", "fp64", True, mask=[1, 0, 0, 0, 0]),
    _case(S, "nchw", "fp64", True, mask=[1, 1, 1, 1, 0]),  # grad_z recomputes da (residual)
    _case(S, "cl", "fp64", True, mask=[0, 1, 0, 1, 0]),
    _case(S, "cl", "fp64", True, mask=[0, 0, 0, 0, 1]),
    _case(S, "nchw", "fp64", True, mask=[0, 0, 1, 0, 0]),
    _case(S, "nchw", "fp64", False, mask=[1, 0, 0, 0, 0]),  # eval grad_z alone: no reduction
    _case(S, "cl", "fp64", False, mask=[1, 0, 0, 0, 1]),
    _case(S, "nchw", "fp64", True, mask=[0, 0, 0, 0, 0]),
    # float32 (tolerance from the float32 reference's own error)
    _case(S, "nchw", "fp32", True),
    _case(S, "cl", "fp32", True),
    _case(S, "nchw", "fp32", False),
    _case(S, "cl", "fp32", False, e=False, relu=False),
    _case(S, "nchw", "fp32", True, e=False, r=False, relu=False, mask=[1, 1, 1, 0, 0]),
    _case((4, 1, 1, 1), "nchw", "fp32", True),
    # |mean| >> std; 8 channels, so that the reference's error is not one or two lucky roundings
    _case((2, 8, 40, 40), "nchw", "fp32", True, offset=100.0, name="offset-tiles"),
    _case((1, 8, 130, 130), "cl", "fp32", True, offset=100.0, name="offset-chunks"),
    # half precision inputs, float32 statistics
    _case(S, "nchw", "bf16", True),
    _case(S, "cl", "fp16", True),
]
# empty inputs: M = 0 (N = 0 or H*W = 0) and C = 0
EMPTY_CASES = [
    _case((0, 5, 7, 7), "nchw", "fp32", True),
    _case((2, 3, 0, 4), "nchw", "fp64", True),
    _case((0, 5, 3, 3), "cl", "fp64", False),
    _case((2, 0, 3, 3), "nchw", "fp32", True),
]

_SCRIPT = textwrap.dedent(
    r"""
    import importlib.util, json, math, os, sys, zlib
    assert os.environ.get("TRITON_INTERPRET") == "1"
    import torch
    import torch.nn.functional as F
    import triton  # noqa: F401  (imported after TRITON_INTERPRET is set)

    why = ""
    try:  # the installed package's copy (der_fast.kernels), as test_masked_gate_triton does ...
        from der_fast import _backend
        bg = _backend.load_kernel_module("bn_gate")
    except Exception as err:  # ... or the checkout's kernels/bn_gate.py (needs only triton)
        why = f" (der_fast.kernels.bn_gate: {type(err).__name__}: {err})"
        spec = importlib.util.spec_from_file_location("bn_gate_kernels", sys.argv[1])
        bg = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bg)
    print("KERNELS " + bg.__file__ + why)

    DT = {"fp64": torch.float64, "fp32": torch.float32, "bf16": torch.bfloat16,
          "fp16": torch.float16}
    NAMES = ("y", "mean", "var", "grad_z", "grad_weight", "grad_bias", "grad_e", "grad_residual")
    S, EPS = 3.7, 1e-5

    def reference(z, w, b, mi, vi, e, r, training, relu, gy):
        leaves = [t.detach().clone().requires_grad_(True) if t is not None else None
                  for t in (z, w, b, e, r)]
        zz, ww, bb, ee, rr = leaves
        a = F.batch_norm(zz, None if training else mi, None if training else vi, ww, bb,
                         training=training, eps=EPS)
        if rr is not None:
            a = a + rr
        h = torch.relu(a) if relu else a
        y = h if ee is None else torch.sigmoid(S * ee).view(1, -1, *[1] * (z.dim() - 2)) * h
        used = [l for l in leaves if l is not None]
        it = iter(torch.autograd.grad(y, used, gy))
        grads = [next(it) if l is not None else None for l in leaves]
        if training:
            dims = [0] + list(range(2, z.dim()))
            mean, var = z.mean(dims), z.var(dims, unbiased=False)
        else:
            mean, var = mi, vi
        return [y.detach(), mean, var] + grads

    def inputs(case):
        gen = torch.Generator().manual_seed(zlib.crc32(case["id"].encode()))
        shape, C = case["shape"], case["shape"][1]
        rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)
        z = rnd(shape) * 1.5 + 0.3 + case["offset"]
        w = torch.rand(C, generator=gen, dtype=torch.float64) * 1.5 + 0.25
        b = rnd(C) * 0.5
        mi = rnd(C) * 0.3 + 0.2 + case["offset"]
        vi = torch.rand(C, generator=gen, dtype=torch.float64) * 2 + 0.5
        e = rnd(C) * 0.3 if case["e"] else None
        r = rnd(shape) if case["r"] else None
        gy = rnd(shape)
        dt = DT[case["dtype"]]
        t = [None if x is None else x.to(dt) for x in (z, w, b, mi, vi, e, r, gy)]
        if case["layout"] == "cl" and len(shape) == 4:
            for i in (0, 6, 7):
                if t[i] is not None:
                    t[i] = t[i].contiguous(memory_format=torch.channels_last)
        return t

    def err(a, b):
        a, b = a.double(), b.double()
        if a.numel() == 0:
            return 0.0
        both_nan = torch.isnan(a) & torch.isnan(b)
        d = torch.where(both_nan, 0.0, (a - b).abs())
        return float("inf") if torch.isnan(d).any() else d.max().item()

    def run_case(case):
        z, w, b, mi, vi, e, r, gy = inputs(case)
        training, relu, mask = case["training"], case["relu"], case["mask"]
        y, mean, var = bg.bn_gate_fwd(z, w, b, None if training else mi, None if training else vi,
                                      e, S, r, training, EPS, relu)
        got = [y, mean, var] + list(bg.bn_gate_bwd(gy, z, w, b, mean, var, e, S, r, training,
                                                   EPS, relu, [bool(m) for m in mask]))
        up = [None if x is None else x.double() for x in (z, w, b, mi, vi, e, r, gy)]
        ref64 = reference(*up[:7], training, relu, up[7]) if z.numel() and z.shape[1] else None
        own = None
        if ref64 is not None and z.dtype != torch.float64:
            own = reference(z, w, b, mi, vi, e, r, training, relu, gy)
        wanted = [True, True, True] + [bool(m) for m in mask]
        wanted[6] = wanted[6] and e is not None
        wanted[7] = wanted[7] and r is not None
        like = [z, None, None, z, w, b, e, r]
        cl = case["layout"] == "cl" and z.dim() == 4 and not z.is_contiguous()
        res = {}
        for i, name in enumerate(NAMES):
            g = got[i]
            out = {"wanted": wanted[i], "is_none": g is None}
            if g is not None and wanted[i]:
                out["shape_ok"] = list(g.shape) == (list(like[i].shape) if like[i] is not None
                                                    else [z.shape[1]])
                stat_dt = torch.float64 if z.dtype == torch.float64 else torch.float32
                out["dtype_ok"] = g.dtype == (like[i].dtype if like[i] is not None else stat_dt)
                if name in ("y", "grad_z", "grad_residual"):
                    out["format_ok"] = (g.is_contiguous(memory_format=torch.channels_last)
                                        if cl else g.is_contiguous())
                if ref64 is not None:
                    out["err"] = err(g, ref64[i])
                    out["scale"] = ref64[i].abs().max().item() if ref64[i].numel() else 0.0
                    if own is not None:
                        out["ref_err"] = err(own[i], ref64[i])
                else:  # empty input: plain maths
                    out["values"] = [None if math.isnan(v) else v
                                     for v in g.double().flatten().tolist()]
                    if name in ("mean", "var") and not training:
                        src = mi if name == "mean" else vi
                        out["values_expected"] = src.double().tolist()
            res[name] = out
        return res

    cases = json.loads(sys.argv[2])
    results = {}
    for case in cases:
        try:
            results[case["id"]] = run_case(case)
        except Exception as exc:  # report, keep going
            import traceback
            results[case["id"]] = {"error": traceback.format_exc()[-3000:]}
    print("RESULTS" + json.dumps(results))
    """
)


@pytest.fixture(scope="module")
def interp_results():
    return triton_interpreter_results(_SCRIPT, str(KERNEL_FILE), json.dumps(CASES + EMPTY_CASES),
                                      timeout=600)


_ULP = {"fp64": 2.0**-52, "fp32": 2.0**-23, "bf16": 2.0**-7, "fp16": 2.0**-10}


def _check_common(case, res):
    assert "error" not in res, f"{case['id']} raised:\n{res['error']}"
    problems = []
    for name, out in res.items():
        if not out["wanted"]:
            # not asked for (or no e / no residual): None; y, mean, var are always returned
            if not out["is_none"]:
                problems.append(f"{name}: expected None")
            continue
        if out["is_none"]:
            problems.append(f"{name}: None but asked for")
            continue
        for flag in ("shape_ok", "dtype_ok", "format_ok"):
            if out.get(flag) is False:
                problems.append(f"{name}: {flag} is False")
    return problems


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_bn_gate_triton_matches_reference(interp_results, case):
    res = interp_results[case["id"]]
    problems = _check_common(case, res)
    ulp = _ULP[case["dtype"]]
    for name, out in res.items():
        if not out["wanted"] or out["is_none"]:
            continue
        scale = max(1.0, out["scale"])
        if case["dtype"] == "fp64":
            tol = 1e-10 * scale
        else:
            # 4x the PyTorch reference's own error in this dtype on this data, plus 8 ulps
            tol = 4.0 * out["ref_err"] + 8.0 * ulp * scale
        if not out["err"] <= tol:
            extra = f", reference's own error {out['ref_err']:.3g}" if "ref_err" in out else ""
            problems.append(f"{name}: max error {out['err']:.3g} > tol {tol:.3g}{extra}")
    assert not problems, f"{case['id']}: " + "; ".join(problems)


def test_bn_gate_triton_offset_statistics(interp_results):
    """With z = 100 + noise the float32 variance stays accurate (no E[z^2] - mean^2):
    relative error of a few float32 ulps, not ~1e-3."""
    for cid in ("offset-tiles-nchw-fp32-train-e-r", "offset-chunks-cl-fp32-train-e-r"):
        out = interp_results[cid]["var"]
        assert out["err"] <= 1e-5 * out["scale"], (cid, out)


@pytest.mark.parametrize("case", EMPTY_CASES, ids=[c["id"] for c in EMPTY_CASES])
def test_bn_gate_triton_empty(interp_results, case):
    """M = 0: NaN batch statistics (the mean of no values), running buffers copied in eval
    mode, zero gradient sums, empty tensors of the right shapes; C = 0: all empty."""
    res = interp_results[case["id"]]
    problems = _check_common(case, res)
    C = case["shape"][1]
    for name, out in res.items():
        if not out["wanted"] or out["is_none"]:
            continue
        vals = out["values"]
        if name in ("y", "grad_z", "grad_residual"):
            ok = vals == []
        elif name in ("mean", "var"):
            ok = len(vals) == C and (
                all(v is None for v in vals) if case["training"]
                else vals == out["values_expected"]
            )
        else:
            ok = vals == [0.0] * C
        if not ok:
            problems.append(f"{name}: {vals}")
    assert not problems, f"{case['id']}: " + "; ".join(problems)


# ------------------------------------------------------------------ ahead-of-time compilation

_AOT_SCRIPT = textwrap.dedent(
    r"""
    import importlib.util, os, sys
    assert os.environ.get("TRITON_INTERPRET", "0") != "1"
    import triton
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as err:  # other triton versions
        print("SKIP triton AOT API not available:", err)
        sys.exit(0)
    spec = importlib.util.spec_from_file_location("bn_gate_kernels", sys.argv[1])
    bg = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bg)
    target = GPUTarget("cuda", 90, 32)
    ints = {"n_rows", "L", "C", "SPAN", "P", "CNT", "TOTAL", "KSTRIDE"}
    floats = {"eps", "s"}
    compute_ptrs = {"AFF", "G", "COEF", "MEAN", "VAR", "P_MEAN", "P_M2", "P_DB", "P_DW", "P_GH"}
    blocks = {"BLOCK_R": 16, "BLOCK_L": 64, "BLOCK_C": 16, "BLOCK_P": 16}
    kernels = [
        bg._bn_stats_kernel,
        bg._bn_stats_finalize_kernel,
        bg._bn_gate_fwd_kernel,
        bg._bn_gate_bwd_sums_kernel,
        bg._bn_gate_bwd_finalize_kernel,
        bg._bn_gate_bwd_input_kernel,
    ]
    n = 0
    for dt in ("fp32", "fp64", "bf16"):
        cdt = "fp64" if dt == "fp64" else "fp32"
        for fn in kernels:
            names = [p.name for p in fn.params]
            sig = {}
            for p in fn.params:
                if p.is_constexpr:
                    sig[p.name] = "constexpr"
                elif p.name in ints:
                    sig[p.name] = "i32"
                elif p.name in floats:
                    sig[p.name] = "fp64"
                else:
                    sig[p.name] = "*" + (cdt if p.name in compute_ptrs else dt)
            for flag in (True, False):  # every option on, then every option off
                consts = {
                    k: blocks[k] if k in blocks else (dt == "fp64" if k == "FP64" else flag)
                    for k, t in sig.items()
                    if t == "constexpr"
                }
                src = ASTSource(
                    fn=fn,
                    signature=sig,
                    constexprs={(names.index(k),): v for k, v in consts.items()},
                )
                compiled = triton.compile(src, target=target, options={"enable_fp_fusion": False})
                assert compiled.asm["cubin"], (fn.fn.__name__, dt, flag)
                n += 1
    print("COMPILED", n)
    """
)


def test_bn_gate_triton_kernels_compile_for_sm90():
    """Every kernel compiles to H100 machine code (cubin) without a GPU, for float32, float64
    and bfloat16 inputs, every option on and every option off, so code that only the
    interpreter has run is also valid for the real compiler (in a subprocess without
    TRITON_INTERPRET, so this runs under the interpreter's environment too)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = run_python(_AOT_SCRIPT, str(KERNEL_FILE), env=env, timeout=600)
    assert proc.returncode == 0, f"AOT compile failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    if proc.stdout.startswith("SKIP"):
        pytest.skip(proc.stdout.strip())
    assert "COMPILED 36" in proc.stdout, proc.stdout
