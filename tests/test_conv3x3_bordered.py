"""der_fast.ops.conv3x3_bordered (the frozen path's direct 3x3 conv kernel) against a float64
convolution, on random data, for every code path of the kernel: vector runs of 32 positions
(W >= 16) and of 16, a plane exactly one run long, the scalar path for tiny planes,
output-channel blocks of several sizes (1 .. 16, uneven splits), with and without residual,
gate and ReLU; stride 2; and the AVX2 and baseline variants of the kernel
(DER_FAST_CONV_ISA)."""

from __future__ import annotations

import os
import textwrap

import pytest
import torch
import torch.nn.functional as F

from der_fast import ops
from helpers import needs_cpu_ext, run_python

pytestmark = needs_cpu_ext()


def _case(n, ci, co, h, w, seed, residual=True, gate=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, ci, h, w, generator=g)
    wt = torch.randn(co, ci, 3, 3, generator=g)
    b = torch.randn(co, generator=g)
    r = torch.randn(n, co, h, w, generator=g) if residual else None
    gt = torch.rand(co, generator=g) if gate else None
    return x, wt, b, r, gt


def _expected(x, wt, b, r, gt, relu):
    y = F.conv2d(x.double(), wt.double(), b.double(), padding=1)
    if r is not None:
        y = y + r.double()
    if relu:
        y = F.relu(y)
    if gt is not None:
        y = y * gt.double().view(1, -1, 1, 1)
    return y


SHAPES = [  # (N, C_in, C_out, H, W)
    (3, 5, 5, 32, 32),  # V = 2 runs, one block of 5
    (2, 3, 17, 16, 16),  # V = 2, blocks 8 + 9 -> 5 + 6 + 6 (uneven split)
    (2, 19, 21, 8, 8),  # V = 1, blocks 10 + 11
    (2, 7, 33, 5, 9),  # V = 1, non-square, 3 blocks
    (1, 1, 16, 4, 4),  # one block of 16
    (2, 4, 3, 2, 2),  # scalar path (plane too small for a vector run)
    (2, 2, 1, 1, 7),  # scalar path, one row
    (2, 6, 9, 13, 31),  # odd sizes, last run shifted back
    (1, 2, 3, 2, 7),  # the plane is exactly one run of 16
    (1, 1, 2, 1, 32),  # exactly one run of 32
    (1, 2, 2, 1, 20),  # one row, W >= 16 but shorter than a run of 32: runs of 16
    (2, 3, 12, 6, 6),  # 12 channels: one block (AVX-512) or 2 blocks (AVX2, baseline)
]


@pytest.mark.parametrize("n,ci,co,h,w", SHAPES)
@pytest.mark.parametrize("residual,gate,relu", [(True, True, True), (False, False, True),
                                                (True, False, False), (False, True, False)])
def test_matches_float64_conv(n, ci, co, h, w, residual, gate, relu):
    x, wt, b, r, gt = _case(n, ci, co, h, w, seed=n * 1000 + ci * 10 + co, residual=residual,
                            gate=gate)
    got = ops.conv3x3_bordered(ops.border(x), wt, b, None if r is None else ops.border(r), gt,
                               relu)
    assert got.shape == (n, co, h + 2, w + 2)
    # the border is exactly zero (the next layer reads it as padding)
    assert got[:, :, 0].abs().max() == 0 and got[:, :, -1].abs().max() == 0
    assert got[:, :, :, 0].abs().max() == 0 and got[:, :, :, -1].abs().max() == 0
    want = _expected(x, wt, b, r, gt, relu)
    ref32 = ops.conv3x3_bordered_ref(ops.border(x), wt, b,
                                     None if r is None else ops.border(r), gt, relu)
    inner = got[:, :, 1:-1, 1:-1].double()
    err = float((inner - want).abs().max())
    err_ref = float((ref32[:, :, 1:-1, 1:-1].double() - want).abs().max())
    scale = float(want.abs().max())
    # as accurate as PyTorch's own float32 conv, up to summation order
    assert err <= 4 * err_ref + 1e-6 * max(scale, 1.0), (err, err_ref, scale)
    if relu:
        assert float(inner.min()) >= 0.0


S2_SHAPES = [  # (N, C_in, C_out, H, W): stride 2
    (3, 5, 10, 32, 32),  # runs of 16 output columns
    (2, 10, 19, 16, 16),  # 8 output columns: two output rows per vector
    (2, 6, 7, 13, 16),  # 8 columns, an odd number of rows (the last vector half stored)
    (3, 3, 5, 5, 4),  # rows of 6 bordered floats: one 16-float load spans 3 rows
    (1, 3, 20, 9, 10),  # 5 columns, odd rows, 2 channel blocks
    (2, 3, 4, 7, 9),  # odd sizes
    (1, 2, 3, 1, 1),  # one pixel: the loads pass the end of the tensor (zero-filled buffer)
    (2, 4, 17, 2, 3),  # 2 channel blocks
    (1, 3, 5, 16, 40),  # 20 output columns: a full run and a partial one
]


@pytest.mark.parametrize("n,ci,co,h,w", S2_SHAPES)
@pytest.mark.parametrize("extras", [False, True])
def test_stride2_matches_float64_conv(n, ci, co, h, w, extras):
    ho, wo = (h - 1) // 2 + 1, (w - 1) // 2 + 1
    x, wt, b, _, gt = _case(n, ci, co, h, w, seed=ci * 100 + co + h, residual=False)
    r = torch.randn(n, co, ho, wo, generator=torch.Generator().manual_seed(3)) if extras \
        else None
    gt = gt if extras else None
    got = ops.conv3x3_bordered(ops.border(x), wt, b, None if r is None else ops.border(r), gt,
                               True, 2)
    assert got.shape == (n, co, ho + 2, wo + 2)
    assert got[:, :, 0].eq(0).all() and got[:, :, -1].eq(0).all()
    assert got[:, :, :, 0].eq(0).all() and got[:, :, :, -1].eq(0).all()
    want = F.conv2d(x.double(), wt.double(), b.double(), stride=2, padding=1)
    if r is not None:
        want = want + r.double()
    want = F.relu(want)
    if gt is not None:
        want = want * gt.double().view(1, -1, 1, 1)
    err = float((got[:, :, 1:-1, 1:-1].double() - want).abs().max())
    assert err <= 1e-5 * max(1.0, float(want.abs().max())), err
    ref = ops.conv3x3_bordered_ref(ops.border(x), wt, b, None if r is None else ops.border(r),
                                   gt, True, 2)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_chained_layers_and_noncontiguous_inputs():
    """Two layers chained on the bordered layout equal two padded convs; non-contiguous
    weight / input views are accepted."""
    x, w1, b1, _, _ = _case(2, 4, 6, 12, 20, seed=7, residual=False, gate=False)
    _, w2, b2, _, _ = _case(2, 6, 6, 12, 20, seed=8, residual=False, gate=False)
    xb = ops.border(x)
    w1_cl = w1.contiguous(memory_format=torch.channels_last)  # strides differ, values equal
    h = ops.conv3x3_bordered(xb, w1_cl, b1)
    y = ops.conv3x3_bordered(h, w2, b2, residual=h)
    want = F.relu(F.conv2d(F.relu(F.conv2d(x.double(), w1.double(), b1.double(), padding=1)),
                           w2.double(), b2.double(), padding=1)
                  + F.relu(F.conv2d(x.double(), w1.double(), b1.double(), padding=1)))
    torch.testing.assert_close(y[:, :, 1:-1, 1:-1].double(), want, rtol=1e-5, atol=1e-4)
    xt = ops.border(x).transpose(2, 3).contiguous().transpose(2, 3)  # same values, other strides
    torch.testing.assert_close(ops.conv3x3_bordered(xt, w1, b1), h)


def test_threads_give_identical_results():
    x, wt, b, r, gt = _case(6, 5, 7, 16, 16, seed=9)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.conv3x3_bordered(ops.border(x), wt, b, ops.border(r), gt)
        torch.set_num_threads(2)
        two = ops.conv3x3_bordered(ops.border(x), wt, b, ops.border(r), gt)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(one, two)


def test_errors():
    x, wt, b, r, gt = _case(2, 3, 4, 8, 8, seed=10)
    xb, rb = ops.border(x), ops.border(r)
    with pytest.raises(RuntimeError, match="float32"):
        ops.conv3x3_bordered(xb.double(), wt.double(), b.double())
    with pytest.raises(RuntimeError, match=r"x must be \[N, C_in"):
        ops.conv3x3_bordered(xb[0], wt, b)
    with pytest.raises(RuntimeError, match="weight must be"):
        ops.conv3x3_bordered(xb, wt[:, :2], b)
    with pytest.raises(RuntimeError, match="weight must be"):
        ops.conv3x3_bordered(xb, torch.randn(4, 3, 5, 5), b)
    with pytest.raises(RuntimeError, match="bias must be"):
        ops.conv3x3_bordered(xb, wt, b[:3])
    with pytest.raises(RuntimeError, match="residual must be"):
        ops.conv3x3_bordered(xb, wt, b, residual=rb[:, :3])
    with pytest.raises(RuntimeError, match="gate must be"):
        ops.conv3x3_bordered(xb, wt, b, gate=gt[:2])
    with pytest.raises(RuntimeError, match="zero border"):
        ops.conv3x3_bordered(torch.randn(1, 3, 2, 5), wt, b)
    with pytest.raises(RuntimeError, match="gate must be"):
        ops.conv3x3_bordered(xb, wt, b, gate=gt.double())
    with pytest.raises(RuntimeError, match="residual must be"):
        ops.conv3x3_bordered(xb, wt, b, residual=rb.double())
    with pytest.raises(RuntimeError, match="stride must be 1 or 2"):
        ops.conv3x3_bordered(xb, wt, b, stride=3)
    with pytest.raises(RuntimeError, match="residual must be"):
        ops.conv3x3_bordered(xb, wt, b, residual=rb, stride=2)  # stride 2: [2, 4, 6, 6]
    assert ops.conv3x3_bordered(xb[:0], wt, b).shape == (0, 4, 10, 10)
    assert ops.conv3x3_bordered(xb[:0], wt, b, stride=2).shape == (0, 4, 6, 6)


def test_no_gradient_is_an_error_not_a_silent_none():
    x, wt, b, _, _ = _case(2, 3, 4, 8, 8, seed=12, residual=False, gate=False)
    xb = ops.border(x).requires_grad_(True)
    y = ops.conv3x3_bordered(xb, wt, b)
    with pytest.raises(RuntimeError, match="inference-only"):
        y.sum().backward()


def test_nonfinite_values_propagate_like_torch():
    """NaN stays NaN through the ReLU (as torch.relu), and an inf next to the border does not
    turn the border into NaN (inf * 0)."""
    x, wt, b, _, _ = _case(1, 2, 3, 6, 6, seed=13, residual=False, gate=False)
    x[0, 0, 2, 3] = float("nan")
    x[0, 1, 0, 0] = float("inf")
    got = ops.conv3x3_bordered(ops.border(x), wt, b)
    want = ops.conv3x3_bordered_ref(ops.border(x), wt, b)
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert got[:, :, 0].eq(0).all() and got[:, :, :, 0].eq(0).all()


_ISA_SCRIPT = textwrap.dedent(
    r"""
    import sys, torch
    import torch.nn.functional as F
    from der_fast import ops
    want_isa = sys.argv[1]
    assert ops.conv3x3_isa() == want_isa, (ops.conv3x3_isa(), want_isa)
    g = torch.Generator().manual_seed(0)
    for n, ci, co, h, w in [(2, 5, 5, 32, 32), (2, 3, 17, 16, 16), (2, 19, 21, 8, 8),
                            (1, 7, 33, 5, 9), (1, 2, 3, 2, 7), (2, 4, 3, 2, 2)]:
        x = torch.randn(n, ci, h, w, generator=g)
        wt = torch.randn(co, ci, 3, 3, generator=g)
        b = torch.randn(co, generator=g)
        r = torch.randn(n, co, h, w, generator=g)
        gt = torch.rand(co, generator=g)
        got = ops.conv3x3_bordered(ops.border(x), wt, b, ops.border(r), gt)
        want = F.relu(F.conv2d(x.double(), wt.double(), b.double(), padding=1) + r.double())
        want = want * gt.double().view(1, -1, 1, 1)
        err = float((got[:, :, 1:-1, 1:-1].double() - want).abs().max())
        assert err <= 1e-5 * max(1.0, float(want.abs().max())), (n, ci, co, h, w, err)
        assert got[:, :, 0].eq(0).all() and got[:, :, :, -1].eq(0).all()
    for n, ci, co, h, w in [(2, 5, 10, 32, 32), (2, 10, 19, 16, 16), (1, 2, 3, 1, 1)]:
        x = torch.randn(n, ci, h, w, generator=g)
        wt = torch.randn(co, ci, 3, 3, generator=g)
        b = torch.randn(co, generator=g)
        got = ops.conv3x3_bordered(ops.border(x), wt, b, None, None, True, 2)
        want = F.relu(F.conv2d(x.double(), wt.double(), b.double(), stride=2, padding=1))
        err = float((got[:, :, 1:-1, 1:-1].double() - want).abs().max())
        assert err <= 1e-5 * max(1.0, float(want.abs().max())), ("s2", n, ci, co, h, w, err)
    print("ISA_OK", want_isa)
    """
)


@pytest.mark.parametrize("isa", ["avx2", "baseline"])
def test_other_instruction_sets(isa):
    """The kernel is compiled three times (AVX-512, AVX2+FMA, baseline x86-64); this machine
    picks the best, so the others run here only when capped with DER_FAST_CONV_ISA."""
    if isa == "avx2" and ops.conv3x3_isa() == "baseline":
        pytest.skip("this CPU has no AVX2")
    env = dict(os.environ, DER_FAST_CONV_ISA=isa, OMP_NUM_THREADS="1")
    proc = run_python(_ISA_SCRIPT, isa, env=env, timeout=300)
    assert proc.returncode == 0 and f"ISA_OK {isa}" in proc.stdout, proc.stderr[-3000:]


def test_opcheck_and_fake_shapes():
    x, wt, b, r, gt = _case(2, 3, 4, 8, 8, seed=11)
    args = (ops.border(x), wt, b, ops.border(r), gt, True)
    torch.library.opcheck(torch.ops.der_fast.conv3x3_bordered.default, args,
                          test_utils=("test_schema", "test_faketensor"))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fx = mode.from_tensor(args[0])
        out = torch.ops.der_fast.conv3x3_bordered(fx, mode.from_tensor(wt), mode.from_tensor(b))
        out2 = torch.ops.der_fast.conv3x3_bordered(fx, mode.from_tensor(wt), mode.from_tensor(b),
                                                   None, None, True, 2)
    assert tuple(out.shape) == (2, 4, 10, 10) and tuple(out2.shape) == (2, 4, 6, 6)
    torch.library.opcheck(torch.ops.der_fast.conv3x3_bordered.default,
                          (args[0], wt, b, None, gt, True, 2),
                          test_utils=("test_schema", "test_faketensor"))
