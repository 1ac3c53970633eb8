"""``der_fast::concat_linear_head``: DER's head (pool, concat, classifier, auxiliary classifier).

Checks, the pure-PyTorch reference, the PyTorch fallback kernels, fake kernels, the autograd
formula and the public wrapper. CPU kernels: csrc/concat_linear_head.cpp (der_fast._C); CUDA:
csrc/cuda/concat_linear_head.cu (der_fast._C_cuda, cuBLAS).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import _check_like, _kernel_format
from ._library import (
    CPU_EXT_OPS,
    CUDA_EXT_OPS,
    _resolve_backend,
    lib,
    register_autograd,
)

# ==============================================================================================
# checks and reference


def _check_head(feats, weight, bias=None, aux_weight=None, aux_bias=None) -> list[int]:
    op = "der_fast.concat_linear_head"
    if len(feats) == 0:
        raise ValueError(f"{op}: feats must be a non-empty list of tensors")
    f0 = feats[0]
    if not f0.is_floating_point():
        raise TypeError(f"{op}: feats[0] must be a floating point tensor, got dtype {f0.dtype}")
    widths = []
    for i, f in enumerate(feats):
        name = f"feats[{i}]"
        if f.dim() not in (2, 4):
            raise ValueError(
                f"{op}: {name} must be 4-D [N, C_i, H, W] or pooled 2-D [N, C_i], got shape "
                f"{list(f.shape)}"
            )
        if i > 0:
            _check_like(f, f0, op, name, "feats[0]")
        if f.shape[0] != f0.shape[0]:
            raise ValueError(
                f"{op}: {name} has batch size {f.shape[0]} but feats[0] has {f0.shape[0]}"
            )
        widths.append(f.shape[1])
    D = sum(widths)
    if weight.dim() != 2:
        raise ValueError(f"{op}: weight must be 2-D [K, sum C_i], got shape {list(weight.shape)}")
    _check_like(weight, f0, op, "weight", "feats[0]")
    if weight.shape[1] != D:
        raise ValueError(
            f"{op}: weight has {weight.shape[1]} input columns but the features have "
            f"sum C_i = {D} (C_i = {list(widths)})"
        )
    if bias is not None:
        _check_like(bias, f0, op, "bias", "feats[0]")
        if bias.dim() != 1 or bias.shape[0] != weight.shape[0]:
            raise ValueError(
                f"{op}: bias must have shape [K] = [{weight.shape[0]}], got {list(bias.shape)}"
            )
    if aux_weight is not None:
        if aux_weight.dim() != 2:
            raise ValueError(
                f"{op}: aux_weight must be 2-D [K_aux, C_t], got shape {list(aux_weight.shape)}"
            )
        _check_like(aux_weight, f0, op, "aux_weight", "feats[0]")
        if aux_weight.shape[1] != widths[-1]:
            raise ValueError(
                f"{op}: aux_weight has {aux_weight.shape[1]} input columns but the last feature "
                f"map feats[-1] has C_t = {widths[-1]}"
            )
    if aux_bias is not None:
        if aux_weight is None:
            raise ValueError(f"{op}: aux_bias given without aux_weight")
        _check_like(aux_bias, f0, op, "aux_bias", "feats[0]")
        if aux_bias.dim() != 1 or aux_bias.shape[0] != aux_weight.shape[0]:
            raise ValueError(
                f"{op}: aux_bias must have shape [K_aux] = [{aux_weight.shape[0]}], got "
                f"{list(aux_bias.shape)}"
            )
    return widths


def _pool(f: Tensor) -> Tensor:
    return f.mean(dim=(2, 3)) if f.dim() == 4 else f


def concat_linear_head_ref(
    feats: Sequence[Tensor],
    weight: Tensor,
    bias: Tensor | None,
    aux_weight: Tensor | None = None,
    aux_bias: Tensor | None = None,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """Reference for :func:`concat_linear_head`: global average pool each feature map, concat,
    then the classifier on everything and the auxiliary classifier on the newest extractor."""
    pooled = [_pool(f) for f in feats]
    features = torch.cat(pooled, dim=1)
    logits = F.linear(features, weight, bias)
    aux = F.linear(pooled[-1], aux_weight, aux_bias) if aux_weight is not None else None
    return logits, aux, features


# ==============================================================================================
# PyTorch fallback kernels (registered only for a dispatch key whose compiled kernel is missing)


def _head_fallback(feats, weight, bias=None, aux_weight=None, aux_bias=None):
    _check_head(feats, weight, bias, aux_weight, aux_bias)
    logits, aux, features = concat_linear_head_ref(feats, weight, bias, aux_weight, aux_bias)
    if aux is None:
        aux = features.new_empty((0,))
    return logits.contiguous(), aux.contiguous(), features.contiguous()


def _head_backward_fallback(
    grad_logits, grad_aux, grad_features, features, weight, aux_weight, feats, widths, output_mask
):
    want_w, want_b, want_aw, want_ab = (bool(m) for m in output_mask)
    D = features.shape[1]
    empty = lambda: features.new_empty((0,))
    last = features[:, D - widths[-1] :]
    gl, ga = grad_logits, grad_aux
    gw = (
        empty()
        if not want_w
        else (gl.t() @ features if gl is not None else torch.zeros_like(weight))
    )
    gb = (
        empty()
        if not want_b
        else (gl.sum(0) if gl is not None else weight.new_zeros(weight.shape[0]))
    )
    gaw = (
        empty()
        if not want_aw
        else (ga.t() @ last if ga is not None else torch.zeros_like(aux_weight))
    )
    gab = (
        empty()
        if not want_ab
        else (ga.sum(0) if ga is not None else aux_weight.new_zeros(aux_weight.shape[0]))
    )
    gfeats = []
    off = 0
    for i, (f, c) in enumerate(zip(feats, widths)):
        if f is None:
            gfeats.append(empty())
            off += c
            continue
        dp = features.new_zeros((features.shape[0], c))
        if grad_logits is not None:
            dp = dp + grad_logits @ weight[:, off : off + c]
        if i == len(widths) - 1 and grad_aux is not None:
            dp = dp + grad_aux @ aux_weight
        if grad_features is not None:
            dp = dp + grad_features[:, off : off + c]
        if f.dim() == 4:
            hw = f.shape[2] * f.shape[3]
            dp = (
                (dp / hw)[:, :, None, None]
                .expand(f.shape)
                .contiguous(memory_format=_kernel_format(f))
            )
        gfeats.append(dp.contiguous() if f.dim() == 2 else dp)
        off += c
    return gfeats, gw, gb, gaw, gab


if "concat_linear_head" not in CPU_EXT_OPS:
    lib.impl("concat_linear_head", _head_fallback, "CPU")
    lib.impl("concat_linear_head_backward", _head_backward_fallback, "CPU")
if torch.version.cuda and "concat_linear_head" not in CUDA_EXT_OPS:
    lib.impl("concat_linear_head", _head_fallback, "CUDA")
    lib.impl("concat_linear_head_backward", _head_backward_fallback, "CUDA")


# ==============================================================================================
# fake (meta) kernels


@torch.library.register_fake("der_fast::concat_linear_head")
def _head_fake(feats, weight, bias=None, aux_weight=None, aux_bias=None):
    widths = _check_head(feats, weight, bias, aux_weight, aux_bias)
    N = feats[0].shape[0]
    features = feats[0].new_empty((N, sum(widths)))
    logits = feats[0].new_empty((N, weight.shape[0]))
    aux = feats[0].new_empty((N, aux_weight.shape[0]) if aux_weight is not None else (0,))
    return logits, aux, features


@torch.library.register_fake("der_fast::concat_linear_head_backward")
def _head_backward_fake(
    grad_logits, grad_aux, grad_features, features, weight, aux_weight, feats, widths, output_mask
):
    m = [bool(v) for v in output_mask]
    e = lambda: features.new_empty((0,))
    gfeats = [
        e() if f is None else torch.empty_like(f, memory_format=_kernel_format(f)) for f in feats
    ]
    gw = torch.empty_like(weight) if m[0] else e()
    gb = weight.new_empty((weight.shape[0],)) if m[1] else e()
    gaw = torch.empty_like(aux_weight) if m[2] else e()
    gab = aux_weight.new_empty((aux_weight.shape[0],)) if m[3] else e()
    return gfeats, gw, gb, gaw, gab


# ==============================================================================================
# autograd


def _head_setup_context(ctx, inputs, output):
    feats, weight, _bias, aux_weight, _aux_bias = (list(inputs) + [None] * 5)[:5]
    _, _, features = output
    ctx.widths = [int(f.shape[1]) for f in feats]
    ctx.has_aux = aux_weight is not None
    ctx.set_materialize_grads(False)  # unused outputs give None grads, not zero tensors
    # Only trainable feature maps are saved (for their shape/layout); frozen ones are not kept.
    kept = [f if f.requires_grad else None for f in feats]
    ctx.save_for_backward(features, weight, aux_weight, *kept)


def _head_backward(ctx, grad_logits, grad_aux, grad_features):
    features, weight, aux_weight, *kept = ctx.saved_tensors
    n = ctx.needs_input_grad  # (list[bool] for feats, weight, bias[, aux_weight, aux_bias])
    feat_need = [bool(v) for v in n[0]]
    flag = lambda i: bool(len(n) > i and n[i])
    mask = [flag(1), flag(2), ctx.has_aux and flag(3), ctx.has_aux and flag(4)]
    if not ctx.has_aux or (grad_aux is not None and grad_aux.numel() == 0):
        grad_aux = None
    feats_arg = [f if need else None for f, need in zip(kept, feat_need)]
    if not any(mask) and not any(feat_need):
        return (None,) * len(n)
    gfeats, gw, gb, gaw, gab = torch.ops.der_fast.concat_linear_head_backward(
        grad_logits,
        grad_aux,
        grad_features,
        features,
        weight,
        aux_weight if ctx.has_aux else None,
        feats_arg,
        ctx.widths,
        mask,
    )
    out = [
        [g if need else None for g, need in zip(gfeats, feat_need)],
        gw if mask[0] else None,
        gb if mask[1] else None,
        gaw if mask[2] else None,
        gab if mask[3] else None,
    ]
    return tuple(out[: len(n)])


register_autograd("concat_linear_head", _head_backward, _head_setup_context)


# ==============================================================================================
# public wrapper


def concat_linear_head(
    feats: Sequence[Tensor],
    weight: Tensor,
    bias: Tensor | None,
    aux_weight: Tensor | None = None,
    aux_bias: Tensor | None = None,
    *,
    backend: str = "auto",
) -> tuple[Tensor, Tensor | None, Tensor]:
    """DER's head in one op: pool, concat, classifier and auxiliary classifier.

    ``feats``: the t extractors' outputs, ``[N, C_i, H, W]`` (global-average pooled inside) or
    already pooled ``[N, C_i]``. Returns ``(logits, aux_logits, features)`` with
    ``features = concat_i mean_hw(feats[i])`` (``[N, sum C_i]``),
    ``logits = features @ weight.T + bias`` and
    ``aux_logits = mean_hw(feats[-1]) @ aux_weight.T + aux_bias`` (``None`` without
    ``aux_weight``). No concatenated copy is made for the aux classifier.

    Backward produces gradients for weight/bias/aux_weight/aux_bias and only for the feature
    maps that require grad: frozen extractors cost nothing (no GEMM, no broadcast, not saved).

    backend: "auto", "ref" (:func:`concat_linear_head_ref`), "cpp" (CPU) or "cuda" (CUDA C++).
    """
    feats = list(feats)
    dev = feats[0].device if feats else weight.device
    if _resolve_backend("concat_linear_head", backend, dev) == "ref":
        return concat_linear_head_ref(feats, weight, bias, aux_weight, aux_bias)
    logits, aux, features = torch.ops.der_fast.concat_linear_head(
        feats, weight, bias, aux_weight, aux_bias
    )
    return logits, (aux if aux_weight is not None else None), features
