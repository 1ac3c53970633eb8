"""Random arguments for every compiled op and backward op (torch.ops.der_fast.*): shapes with
zero-sized dimensions, mismatched shapes, other dtypes, non-contiguous strides, missing
optionals. Each case must raise a Python exception, or return what the op's PyTorch fallback
returns (the fallbacks check less than the compiled ops; where a fallback raises, the compiled
op must raise too).
The cases run in a subprocess per op, which prints each case before running it: a crash of
the interpreter fails the test and names the case."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from der_fast import ops
from helpers import needs_cpu_ext

pytestmark = needs_cpu_ext("the compiled CPU ops are what the fuzzing exercises")

CASES = 150

SCRIPT = textwrap.dedent(r"""
    import importlib, random, sys
    import torch
    BG, CH, CB, MG = (importlib.import_module(f"der_fast.ops.{m}") for m in (
        "bn_gate", "concat_linear_head", "conv3x3_bordered", "masked_gate"))

    OP, SEED, CASES = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    rng = random.Random(SEED)
    torch.manual_seed(SEED)
    DIMS = (0, 1, 2, 3, 5)

    def t(*shape, dtype=torch.float32):
        return torch.randn(*shape, dtype=torch.float64).to(dtype)

    def spoil(args, names):
        # one argument made wrong (or non-contiguous, which is valid), or none
        k = rng.random()
        i = rng.randrange(len(args))
        a = args[i]
        if not isinstance(a, torch.Tensor) or k < 0.3:
            return args, "as built"
        args = list(args)
        if k < 0.45:
            args[i] = a.double() if a.dtype != torch.float64 else a.float()
            what = "dtype"
        elif k < 0.55:
            args[i] = a.to(rng.choice((torch.int64, torch.bfloat16, torch.float16)))
            what = "dtype2"
        elif k < 0.7 and a.dim() > 0:
            shape = list(a.shape)
            j = rng.randrange(len(shape))
            shape[j] = rng.choice([d for d in DIMS if d != shape[j]] or [1])
            args[i] = t(*shape, dtype=a.dtype) if a.is_floating_point() else a.new_zeros(shape)
            what = "shape"
        elif k < 0.8:
            args[i] = a.reshape(-1) if a.dim() > 1 else a.reshape(1, *a.shape)
            what = "rank"
        elif a.dim() >= 2 and a.numel() > 0:
            args[i] = a.transpose(-1, -2).contiguous().transpose(-1, -2) if a.shape[-1] != \
                a.shape[-2] else torch.cat([a, a], -1)[..., ::2]
            what = "strides"
        else:
            return args, "as built"
        return args, f"{what} of {names[i]}"

    def same(a, b):
        if isinstance(a, (list, tuple)):
            return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
        if a is None or b is None:
            return a is None and b is None
        if a.numel() == 0 and b.numel() == 0:
            return a.shape == b.shape
        return (a.shape == b.shape and a.dtype == b.dtype
                and torch.allclose(a.double(), b.double(), rtol=1e-4, atol=1e-4,
                                   equal_nan=True))

    def case():
        N, C, H, W = (rng.choice(DIMS) for _ in range(4))
        C = C or rng.choice((0, 1, 4))
        dt = rng.choice((torch.float32, torch.float32, torch.float64))
        s = rng.choice((0.5, 3.0, 50.0))
        opt = lambda x: x if rng.random() < 0.7 else None
        if OP == "masked_gate":
            names = ("x", "scale", "shift", "e", "s", "residual")
            args = [t(N, C, H, W, dtype=dt), t(C, dtype=dt), t(C, dtype=dt), opt(t(C, dtype=dt)),
                    s, opt(t(N, C, H, W, dtype=dt))]
            return names, args, torch.ops.der_fast.masked_gate, MG._masked_gate_fallback
        if OP == "masked_gate_backward":
            names = ("grad_y", "y", "x", "scale", "e", "s", "output_mask")
            mask = [rng.random() < 0.7 for _ in range(5)]
            args = [t(N, C, H, W, dtype=dt), t(N, C, H, W, dtype=dt).abs(),
                    opt(t(N, C, H, W, dtype=dt)), t(C, dtype=dt), opt(t(C, dtype=dt)), s, mask]
            return (names, args, torch.ops.der_fast.masked_gate_backward,
                    MG._masked_gate_backward_fallback)
        if OP in ("bn_gate", "bn_gate_backward"):
            training = rng.random() < 0.6
            relu = rng.random() < 0.8
            stats = [t(C, dtype=dt), t(C, dtype=dt).abs() + 0.5]
            if OP == "bn_gate":
                names = ("z", "weight", "bias", "mean_in", "var_in", "e", "s", "residual",
                         "training", "eps", "relu")
                if training and rng.random() < 0.7:
                    stats = [None, None]
                args = [t(N, C, H, W, dtype=dt), t(C, dtype=dt), t(C, dtype=dt), *stats,
                        opt(t(C, dtype=dt)), s, opt(t(N, C, H, W, dtype=dt)), training, 1e-5,
                        relu]
                return names, args, torch.ops.der_fast.bn_gate, BG._bn_gate_fallback
            names = ("grad_y", "z", "weight", "bias", "mean", "var", "e", "s", "residual",
                     "training", "eps", "relu", "output_mask")
            mask = [rng.random() < 0.7 for _ in range(5)]
            z = t(N, C, H, W, dtype=dt)
            if training:  # the backward takes the forward's batch statistics
                stats = [z.mean((0, 2, 3)), z.var((0, 2, 3), unbiased=False)] if z.numel() \
                    else [z.new_zeros(C), z.new_zeros(C)]
            args = [t(N, C, H, W, dtype=dt), z, t(C, dtype=dt), t(C, dtype=dt), *stats,
                    opt(t(C, dtype=dt)), s, opt(t(N, C, H, W, dtype=dt)), training, 1e-5, relu,
                    mask]
            return (names, args, torch.ops.der_fast.bn_gate_backward,
                    BG._bn_gate_backward_fallback)
        if OP in ("concat_linear_head", "concat_linear_head_backward"):
            K, Ka = rng.choice((1, 3)), rng.choice((1, 2))
            widths = [rng.choice((1, 2, 4)) for _ in range(rng.choice((1, 2)))]
            pooled = rng.random() < 0.3
            feats = [t(N, c, dtype=dt) if pooled else t(N, c, H, W, dtype=dt) for c in widths]
            aux = rng.random() < 0.6
            if OP == "concat_linear_head":
                names = ("feats", "weight", "bias", "aux_weight", "aux_bias")
                args = [feats, t(K, sum(widths), dtype=dt), opt(t(K, dtype=dt)),
                        t(Ka, widths[-1], dtype=dt) if aux else None,
                        t(Ka, dtype=dt) if aux and rng.random() < 0.7 else None]
                return names, args, torch.ops.der_fast.concat_linear_head, CH._head_fallback
            names = ("grad_logits", "grad_aux", "grad_features", "features", "weight",
                     "aux_weight", "feats", "widths", "output_mask")
            mask = [rng.random() < 0.7 for _ in range(4)]
            args = [opt(t(N, K, dtype=dt)), t(N, Ka, dtype=dt) if aux else None,
                    opt(t(N, sum(widths), dtype=dt)), t(N, sum(widths), dtype=dt),
                    t(K, sum(widths), dtype=dt), t(Ka, widths[-1], dtype=dt) if aux else None,
                    feats, widths, mask]
            return (names, args, torch.ops.der_fast.concat_linear_head_backward,
                    CH._head_backward_fallback)
        if OP == "conv3x3_bordered":
            Co = rng.choice((1, 3, 8))
            stride = rng.choice((1, 2))
            Ho, Wo = (H - 1) // stride + 1 if H else 0, (W - 1) // stride + 1 if W else 0
            names = ("x", "weight", "bias", "residual", "gate", "relu", "stride")
            x = torch.nn.functional.pad(t(N, C, H, W), (1, 1, 1, 1))
            r = torch.nn.functional.pad(t(N, Co, Ho, Wo), (1, 1, 1, 1))
            args = [x, t(Co, C, 3, 3), t(Co), opt(r), opt(t(Co)), rng.random() < 0.8, stride]
            return names, args, torch.ops.der_fast.conv3x3_bordered, CB._conv3x3_fallback
        raise SystemExit(f"unknown op {OP}")

    bad = []
    for i in range(CASES):
        names, args, op, fallback = case()
        args, what = spoil(args, names)
        desc = f"case {i}: {what}; " + ", ".join(
            f"{n}={tuple(a.shape) if isinstance(a, torch.Tensor) else a}"
            for n, a in zip(names, args) if not isinstance(a, list) or n != "feats")
        print(desc, flush=True)
        try:
            want, want_err = fallback(*args), None
        except Exception as exc:
            want, want_err = None, exc
        try:
            got, got_err = op(*args), None
        except Exception as exc:
            got, got_err = None, exc
        if got_err is None and want_err is not None:
            bad.append(f"{desc}: the fallback raised {want_err!r:.160}, the compiled op ran")
        elif got_err is None and not same(got, want):
            bad.append(f"{desc}: results differ from the fallback")
    print("RESULT", len(bad))
    for b in bad[:15]:
        print("BAD", b)
""")

OPS = ["masked_gate", "masked_gate_backward", "bn_gate", "bn_gate_backward",
       "concat_linear_head", "concat_linear_head_backward", "conv3x3_bordered"]


@pytest.mark.parametrize("op,isa", [(op, None) for op in OPS]
                         + [("conv3x3_bordered", "avx2"), ("conv3x3_bordered", "baseline")])
def test_random_arguments_raise_or_equal_the_fallback(op, isa):
    """``isa``: the conv kernel's instruction set capped (DER_FAST_CONV_ISA), so that every
    build of it is fuzzed on a CPU that has the best one."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if isa is not None:
        env["DER_FAST_CONV_ISA"] = isa
    proc = subprocess.run([sys.executable, "-c", SCRIPT, op, str(OPS.index(op)), str(CASES)],
                          capture_output=True, text=True, timeout=600, env=env, cwd="/")
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0, (
        f"the interpreter died (status {proc.returncode}) at {lines[-1] if lines else '?'}\n"
        f"{proc.stderr[-2000:]}")
    result = [ln for ln in lines if ln.startswith("RESULT")]
    assert result, proc.stdout[-2000:]
    bad = [ln for ln in lines if ln.startswith("BAD")]
    assert result[0] == "RESULT 0", "\n".join(bad)
