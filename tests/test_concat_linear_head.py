"""der_fast.concat_linear_head (pool + concat + classifier + aux classifier) against
concat_linear_head_ref.

Forward and backward for t = 1, 2, 5 extractors, 4-D and pooled 2-D features, contiguous /
channels_last / non-contiguous, odd and prime widths, N=1, H=W=1, with and without the aux
classifier and biases, frozen extractors (no grad, not even kept alive), opcheck, errors.
The pooling / broadcast index math (csrc/index_math.h) is shared with the CUDA kernels, so
these CPU tests also cover the GPU code's indexing.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from der_fast import ops
from helpers import assert_close, node_generator, node_seed


DTYPES = {
    "fp32": (torch.float32, 1e-5, 1e-5, 5e-5, 5e-5),
    "fp64": (torch.float64, 1e-12, 1e-12, 1e-11, 1e-11),
    "bf16": (torch.bfloat16, 3e-2, 3e-2, 5e-2, 5e-2),
}

# (widths C_i, spatial (H, W) or None for pooled 2-D inputs, per extractor)
CONFIGS = {
    "t1": ([7], [(3, 5)]),
    "t1_pooled": ([13], [None]),
    "t1_hw1": ([67], [(1, 1)]),
    "t2": ([3, 13], [(4, 4), (4, 4)]),
    "t2_mixed": ([1, 7], [None, (2, 3)]),
    "t5": ([1, 3, 7, 13, 67], [(2, 2)] * 5),
    "t5_mixed": ([3, 1, 13, 7, 5], [(3, 3), None, (1, 1), (5, 2), None]),
}


def _layout(t, layout):
    if t.dim() == 4 and layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "strided":
        big = torch.empty(t.shape[:-1] + (3 * t.shape[-1],), dtype=t.dtype)
        big[..., 1::3] = t
        return big[..., 1::3]
    return t.contiguous()


def _make(gen, widths, spatial, N, dtype, layout, aux=True, bias=True, K=11, K_aux=None):
    feats = []
    for c, hw in zip(widths, spatial):
        shape = (N, c) + (hw if hw is not None else ())
        feats.append(_layout(torch.randn(shape, generator=gen).to(dtype), layout))
    D = sum(widths)
    K_aux = K_aux or (K + 1 if aux else None)
    W = (torch.randn(K, D, generator=gen) / D**0.5).to(dtype)
    b = torch.randn(K, generator=gen).to(dtype) if bias else None
    Wa = (torch.randn(K_aux, widths[-1], generator=gen)).to(dtype) if aux else None
    ba = torch.randn(K_aux, generator=gen).to(dtype) if aux and bias else None
    return feats, W, b, Wa, ba


def _loss(out, gen_seed, use_aux=True, use_features=True):
    """A loss that uses every output with random weights (so every gradient path is hit)."""
    logits, aux, features = out
    g = torch.Generator().manual_seed(gen_seed)
    total = (logits * torch.randn(logits.shape, generator=g).to(logits)).sum()
    if use_aux and aux is not None:
        total = total + (aux * torch.randn(aux.shape, generator=g).to(aux)).sum()
    if use_features:
        total = (
            total
            + (features.square() * torch.randn(features.shape, generator=g).to(features)).sum()
        )
    return total


def _clone(ts, dtype=None, requires=None):
    out = []
    for i, t in enumerate(ts):
        if t is None:
            out.append(None)
            continue
        c = t.detach().clone() if dtype is None else t.detach().to(dtype)
        rg = t.requires_grad if requires is None else requires[i]
        out.append(c.requires_grad_(rg))
    return out


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("N", [1, 3])
def test_head_matches_ref(request, config, layout, dtype_name, N):
    dtype, fa, fr, ga, gr = DTYPES[dtype_name]
    widths, spatial = CONFIGS[config]
    gen = node_generator(request)
    feats, W, b, Wa, ba = _make(gen, widths, spatial, N, dtype, layout)
    # the newest extractor and the classifiers train; a random older one trains too
    for t in feats[-1:] + [W, b, Wa, ba]:
        t.requires_grad_(True)
    if len(feats) > 2:
        feats[1].requires_grad_(True)
    out = ops.concat_linear_head(feats, W, b, Wa, ba)
    feats64 = _clone(feats, torch.float64)
    params64 = _clone([W, b, Wa, ba], torch.float64)
    ref = ops.concat_linear_head_ref(feats64, *params64)
    for name, a, r in zip(("logits", "aux_logits", "features"), out, ref):
        assert a.dtype == dtype
        assert a.is_contiguous()
        assert_close(a, r, fa, fr, f"{name} ({config}, {layout}, {dtype_name})")

    seed = node_seed(request) + 1
    inputs = [f for f in feats if f.requires_grad] + [W, b, Wa, ba]
    inputs64 = [f for f in feats64 if f.requires_grad] + params64
    grads = torch.autograd.grad(_loss(out, seed), inputs)
    grads64 = torch.autograd.grad(_loss(ref, seed), inputs64)
    for i, (g, g64) in enumerate(zip(grads, grads64)):
        assert g.shape == inputs[i].shape and g.dtype == dtype
        assert_close(g, g64, ga, gr, f"grad input {i} ({config}, {layout}, {dtype_name})")


@pytest.mark.parametrize("aux,bias", [(False, True), (True, False), (False, False)])
@pytest.mark.parametrize("use", ["logits", "logits+aux", "features"])
def test_head_optional_parts(request, aux, bias, use):
    """No aux classifier / no biases / only some outputs used (None upstream gradients)."""
    gen = node_generator(request)
    feats, W, b, Wa, ba = _make(
        gen, [3, 7], [(2, 5), (2, 5)], 4, torch.float64, "contiguous", aux, bias
    )
    params = [W, b, Wa, ba]
    for t in [feats[1], *params]:
        if t is not None:
            t.requires_grad_(True)
    out = ops.concat_linear_head(feats, W, b, Wa, ba)
    ref = ops.concat_linear_head_ref(_clone(feats), *_clone(params))
    assert (out[1] is None) == (not aux)
    for a, r in zip(out, ref):
        if r is not None:
            assert_close(a, r, 1e-12, 1e-12, "forward")
    seed = 7
    flags = {"use_aux": "aux" in use, "use_features": use == "features"}
    ins = [t for t in [feats[1], *params] if t is not None]
    g = torch.autograd.grad(_loss(out, seed, **flags), ins, allow_unused=True)
    ref_feats = _clone(feats)
    ref_params = _clone(params)
    ins_r = [t for t in [ref_feats[1], *ref_params] if t is not None]
    ref = ops.concat_linear_head_ref(ref_feats, *ref_params)
    gr = torch.autograd.grad(_loss(ref, seed, **flags), ins_r, allow_unused=True)
    for i, (a, r) in enumerate(zip(g, gr)):
        if r is None:  # unused by the loss: the op may give None or zeros
            assert a is None or not a.any(), i
        else:
            assert_close(a, r, 1e-11, 1e-11, f"grad {i}")


def test_head_frozen_extractors_cost_nothing(request):
    """Frozen feature maps get no gradient and are not kept alive for the backward."""
    gen = node_generator(request)
    feats, W, b, Wa, ba = _make(gen, [5, 3, 7], [(4, 4)] * 3, 2, torch.float32, "contiguous")
    for t in (feats[2], W, b, Wa, ba):
        t.requires_grad_(True)
    frozen_ref = weakref.ref(feats[0])
    out = ops.concat_linear_head(feats, W, b, Wa, ba)
    del feats[0]
    gc.collect()
    assert frozen_ref() is None, "a frozen feature map was kept alive by the op"
    _loss(out, 3).backward()
    assert feats[0].grad is None  # frozen (was feats[1])
    assert feats[1].grad is not None and feats[1].grad.shape == feats[1].shape
    assert W.grad is not None and Wa.grad is not None


def test_head_grad_layout(request):
    """Gradients of channels_last feature maps come back channels_last (no layout churn)."""
    gen = node_generator(request)
    feats, W, b, Wa, ba = _make(gen, [3, 13], [(3, 3), (3, 3)], 2, torch.float32, "channels_last")
    feats[1].requires_grad_(True)
    out = ops.concat_linear_head(feats, W, b, Wa, ba)
    (g,) = torch.autograd.grad(_loss(out, 5), [feats[1]])
    assert g.is_contiguous(memory_format=torch.channels_last)
    (gr,) = torch.autograd.grad(
        _loss(ops.concat_linear_head_ref(feats, W, b, Wa, ba), 5), [feats[1]]
    )
    assert_close(g, gr, 1e-5, 1e-5, "grad channels_last")


def test_head_backends(request):
    gen = node_generator(request)
    feats, W, b, Wa, ba = _make(gen, [3, 4], [(2, 2), (2, 2)], 2, torch.float32, "contiguous")
    ref = ops.concat_linear_head(feats, W, b, Wa, ba, backend="ref")
    for a, r in zip(ops.concat_linear_head(feats, W, b, Wa, ba), ref):
        assert_close(a, r, 1e-5, 1e-5, "auto")
    if ops.HAS_CPU_EXT:
        for a, r in zip(ops.concat_linear_head(feats, W, b, Wa, ba, backend="cpp"), ref):
            assert_close(a, r, 1e-5, 1e-5, "cpp")
    with pytest.raises(RuntimeError, match="backend='cuda'"):
        ops.concat_linear_head(feats, W, b, Wa, ba, backend="cuda")
    assert ops.implementation("concat_linear_head", "cpu").startswith(
        "cpp" if ops.HAS_CPU_EXT else "ref"
    )


@pytest.mark.parametrize(
    "case,exc,pattern",
    [
        ("empty", ValueError, r"feats must be a non-empty list"),
        ("rank3", ValueError, r"feats\[1\] must be 4-D \[N, C_i, H, W\] or pooled 2-D"),
        ("width", ValueError, r"weight has 9 input columns but the features have sum C_i = 10"),
        (
            "aux_width",
            ValueError,
            r"aux_weight has 3 input columns but the last feature map feats\[-1\] has C_t = 7",
        ),
        ("batch", ValueError, r"feats\[1\] has batch size 3 but feats\[0\] has 2"),
        (
            "dtype",
            TypeError,
            r"feats\[1\] has dtype torch.float64 but feats\[0\] has dtype torch.float32",
        ),
        ("weight_dtype", TypeError, r"weight has dtype torch.float64"),
        ("bias_shape", ValueError, r"bias must have shape \[K\] = \[11\]"),
        ("aux_bias_shape", ValueError, r"aux_bias must have shape \[K_aux\] = \[12\]"),
        ("weight_device", ValueError, r"weight is on device meta but feats\[0\] is on device cpu"),
    ],
)
def test_head_errors(request, case, exc, pattern):
    gen = node_generator(request)
    feats, W, b, Wa, ba = _make(gen, [3, 7], [(2, 2), (2, 2)], 2, torch.float32, "contiguous")
    if case == "empty":
        feats = []
    elif case == "rank3":
        feats[1] = feats[1][:, :, 0]  # [N, C, W]
    elif case == "width":
        W = W[:, :9]
    elif case == "aux_width":
        Wa = Wa[:, :3]
    elif case == "batch":
        feats[1] = torch.randn(3, 7, 2, 2)
    elif case == "dtype":
        feats[1] = feats[1].double()
    elif case == "weight_dtype":
        W = W.double()
    elif case == "bias_shape":
        b = b[:5]
    elif case == "aux_bias_shape":
        ba = ba[:4]
    elif case == "weight_device":
        W = torch.empty(W.shape, device="meta")
    with pytest.raises(exc, match=pattern):
        ops.concat_linear_head(feats, W, b, Wa, ba)
    with pytest.raises(exc, match=pattern):
        ops._check_head(feats, W, b, Wa, ba)


def test_opcheck_head_cpu(request):
    gen = node_generator(request)
    samples = [
        ([7], [(3, 5)], "contiguous", True),
        ([3, 13], [(4, 4), (4, 4)], "channels_last", True),
        ([1, 3, 7], [None, (2, 2), (1, 1)], "contiguous", False),
    ]
    for widths, spatial, layout, aux in samples:
        feats, W, b, Wa, ba = _make(gen, widths, spatial, 3, torch.float32, layout, aux)
        for t in (feats[-1], W, b, Wa, ba):
            if t is not None:
                t.requires_grad_(True)
        torch.library.opcheck(torch.ops.der_fast.concat_linear_head.default, (feats, W, b, Wa, ba))


def test_opcheck_head_backward_cpu(request):
    gen = node_generator(request)
    feats, W, _, Wa, _ = _make(gen, [3, 5], [(2, 3), (2, 3)], 2, torch.float32, "channels_last")
    features = torch.cat([f.mean((2, 3)) for f in feats], 1)
    gl, ga, gf = torch.randn(2, 11), torch.randn(2, 12), torch.randn(2, 8)
    for fa, mask in [
        ([None, feats[1]], [True, True, True, True]),
        ([feats[0], None], [True, False, False, True]),
    ]:
        torch.library.opcheck(
            torch.ops.der_fast.concat_linear_head_backward.default,
            (gl, ga, gf, features, W, Wa, fa, [3, 5], mask),
            test_utils=("test_schema", "test_faketensor"),
        )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("config", ["t1", "t5", "t5_mixed", "t1_hw1"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_head_cuda(request, config, layout):
    widths, spatial = CONFIGS[config]
    gen = node_generator(request)
    for dtype_name in ("fp32", "fp64", "bf16"):
        dtype, fa, fr, ga, gr = DTYPES[dtype_name]
        feats, W, b, Wa, ba = _make(gen, widths, spatial, 5, dtype, layout)
        cuda = [t.cuda() for t in feats], *[t.cuda() for t in (W, b, Wa, ba)]
        cfeats, cW, cb, cWa, cba = cuda
        for t in (cfeats[-1], cW, cb, cWa, cba):
            t.requires_grad_(True)
        out = ops.concat_linear_head(cfeats, cW, cb, cWa, cba)
        feats64 = _clone(feats, torch.float64, [False] * (len(feats) - 1) + [True])
        params64 = _clone([W, b, Wa, ba], torch.float64, [True] * 4)
        ref = ops.concat_linear_head_ref(feats64, *params64)
        for name, a, r in zip(("logits", "aux", "features"), out, ref):
            assert_close(a, r, fa, fr, f"cuda {name} {dtype_name}")
        grads = torch.autograd.grad(_loss(out, 9), [cfeats[-1], cW, cb, cWa, cba])
        grads64 = torch.autograd.grad(_loss(ref, 9), [feats64[-1], *params64])
        for i, (a, r) in enumerate(zip(grads, grads64)):
            assert_close(a, r, ga, gr, f"cuda grad {i} {dtype_name}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_opcheck_head_cuda(request):
    gen = node_generator(request)
    feats, W, b, Wa, ba = _make(gen, [3, 13], [(4, 4), (4, 4)], 3, torch.float32, "channels_last")
    feats = [f.cuda() for f in feats]
    W, b, Wa, ba = (t.cuda().requires_grad_(True) for t in (W, b, Wa, ba))
    feats[-1].requires_grad_(True)
    torch.library.opcheck(torch.ops.der_fast.concat_linear_head.default, (feats, W, b, Wa, ba))


def test_concat_linear_head_double_backward_raises(request):
    gen = node_generator(request)
    feats = [torch.randn(4, c, 3, 3, generator=gen, requires_grad=True) for c in (5, 7)]
    W = torch.randn(6, 12, generator=gen, requires_grad=True)
    b = torch.randn(6, generator=gen)
    logits, _, _ = ops.concat_linear_head(feats, W, b)
    (gW,) = torch.autograd.grad(logits, [W], torch.randn(logits.shape, generator=gen),
                                create_graph=True)
    with pytest.raises(NotImplementedError, match="concat_linear_head: double backward"):
        gW.sum().backward()
