"""Inputs that once crashed the interpreter inside the compiled ops: each runs in its own
subprocess, so a crash (SIGFPE, SIGSEGV) fails its test instead of killing the test run.
Every case must end in a Python exception with a clear message, or in the ``_ref``'s result."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from der_fast import ops
from helpers import needs_cpu_ext

pytestmark = needs_cpu_ext("the compiled CPU ops are what these cases exercise")

PRELUDE = """
import torch
from der_fast import ops
torch.manual_seed(0)
def expect_error(fn, exc, text):
    try:
        fn()
    except exc as err:
        assert text in str(err), str(err)
        print("RAISED")
        return
    raise AssertionError("no error")
"""

CASES = {
    # integer division by H*W = 0 in the pooling: SIGFPE
    "head_empty_feature_map": """
feats = [torch.randn(2, 4, 0, 0)]
w, b = torch.randn(5, 4), torch.randn(5)
logits, aux, features = ops.concat_linear_head(feats, w, b)
ref_logits, _, ref_features = ops.concat_linear_head_ref(feats, w, b)
assert torch.equal(torch.isnan(features), torch.isnan(ref_features))
assert torch.equal(torch.isnan(logits), torch.isnan(ref_logits))
print("SAME")
""",
    # x smaller than y: read past x's end
    "gate_backward_x_smaller": """
y, gy = torch.rand(4, 8, 6, 6), torch.randn(4, 8, 6, 6)
x = torch.randn(2, 8, 6, 6)
scale, e = torch.rand(8) + 0.5, torch.randn(8)
expect_error(lambda: torch.ops.der_fast.masked_gate_backward(
    gy, y, x, scale, e, 2.0, [True, True, True, True, False]), ValueError, "x shape")
""",
    # same element count, another shape: garbage
    "gate_backward_x_reshaped": """
y, gy = torch.rand(4, 8, 6, 6), torch.randn(4, 8, 6, 6)
x = torch.randn(4, 8, 36, 1)
scale, e = torch.rand(8) + 0.5, torch.randn(8)
expect_error(lambda: torch.ops.der_fast.masked_gate_backward(
    gy, y, x, scale, e, 2.0, [True, True, True, True, False]), ValueError, "x shape")
""",
    # grad_y of another dtype
    "gate_backward_grad_dtype": """
y, gy = torch.rand(4, 8, 6, 6), torch.randn(4, 8, 6, 6, dtype=torch.float64)
expect_error(lambda: torch.ops.der_fast.masked_gate_backward(
    gy, y, None, torch.rand(8), None, 1.0, [True, False, False, False, False]), TypeError,
    "grad_y")
""",
    # a 1-row grad_features for N = 64: read out of bounds
    "head_backward_short_grad_features": """
N = 64
feats = [torch.randn(N, 4, 3, 3), torch.randn(N, 6, 3, 3)]
features = torch.randn(N, 10)
w = torch.randn(5, 10)
expect_error(lambda: torch.ops.der_fast.concat_linear_head_backward(
    None, None, torch.randn(1, 10), features, w, None, feats, [4, 6],
    [True, True, False, False]), ValueError, "grad_features")
""",
    # grad_logits with the wrong class count
    "head_backward_bad_grad_logits": """
N = 8
feats = [torch.randn(N, 4, 3, 3)]
expect_error(lambda: torch.ops.der_fast.concat_linear_head_backward(
    torch.randn(N, 3), None, None, torch.randn(N, 4), torch.randn(5, 4), None, feats, [4],
    [True, True, False, False]), ValueError, "grad_logits")
""",
}


@pytest.mark.parametrize("case", list(CASES))
def test_no_crash(case):
    code = PRELUDE + textwrap.dedent(CASES[case])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=120, cwd="/")
    how = (f"killed by signal {-proc.returncode}" if proc.returncode < 0
           else f"exit {proc.returncode}")
    assert proc.returncode == 0, f"{case}: {how}\n{proc.stderr[-2000:]}"
    assert proc.stdout.strip().splitlines()[-1] in ("RAISED", "SAME"), proc.stdout
