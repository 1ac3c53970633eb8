"""``der_fast::bn_gate``: BatchNorm (train or eval) and the masked gate in one op,
``y = sigmoid(s * e) * relu(bn(z) [+ residual])``.

Checks, the pure-PyTorch reference, the PyTorch fallback kernels, the Triton (CUDA) kernel
registration, fake kernels, the autograd formula and the public wrapper (which takes the
``nn.BatchNorm2d`` and updates its running statistics). CPU kernels: csrc/bn_gate.cpp
(der_fast._C); CUDA: kernels/bn_gate.py (Triton).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import _backend
from ._checks import _check_like, _kernel_format
from ._library import CPU_EXT_OPS, HAS_TRITON, _resolve_backend, lib, register_autograd

# ==============================================================================================
# checks and reference


def _check_vec(t: Tensor, z: Tensor, op: str, name: str) -> None:
    C = z.shape[1]
    if t.dim() != 1:
        raise ValueError(f"{op}: {name} must be 1-D [C] with C={C}, got shape {list(t.shape)}")
    _check_like(t, z, op, name, "z")
    if t.shape[0] != C:
        raise ValueError(
            f"{op}: {name} has {t.shape[0]} channels but z has C={C} (z.shape={list(z.shape)})"
        )


_REDUCED = (torch.float16, torch.bfloat16)


def _check_stat(t: Tensor, z: Tensor, op: str, name: str) -> None:
    """Statistics have z's dtype, or float32 when z is float16 / bfloat16 (the forward returns
    a reduced-precision z's batch statistics in float32, so that the backward recomputes the
    forward's pre-activation from the same numbers)."""
    if z.dtype in _REDUCED and t.dtype == torch.float32:
        t = t.to(z.dtype)  # the dtype is accepted; check the rest
    _check_vec(t, z, op, name)


def _check_bn_gate(z, weight, bias, mean_in=None, var_in=None, e=None, residual=None,
                   training=True, op="der_fast.bn_gate", names=("mean_in", "var_in")) -> None:
    """The op's argument checks (same messages and exception types as csrc/bn_gate.cpp)."""
    if z.dim() != 4:
        raise ValueError(
            f"{op}: z must be 4-D [N, C, H, W], got a {z.dim()}-D tensor of shape "
            f"{list(z.shape)}"
        )
    if not z.is_floating_point():
        raise TypeError(f"{op}: z must be a floating point tensor, got dtype {z.dtype}")
    _check_vec(weight, z, op, "weight")
    _check_vec(bias, z, op, "bias")
    if not training and (mean_in is None or var_in is None):
        raise ValueError(
            f"{op}: {names[0]} and {names[1]} (the running statistics) are required when "
            "training=False"
        )
    for name, t in ((names[0], mean_in), (names[1], var_in)):
        if t is not None:
            _check_stat(t, z, op, name)
    if e is not None:
        _check_vec(e, z, op, "e")
    if residual is not None:
        _check_like(residual, z, op, "residual", "z")
        if residual.shape != z.shape:
            raise ValueError(
                f"{op}: residual has shape {list(residual.shape)} but z has shape "
                f"{list(z.shape)} (they must be equal)"
            )


def _statistics(z, mean_in, var_in, training) -> tuple[Tensor, Tensor]:
    """Training: the batch mean and biased variance of ``z`` over (N, H, W) (0 for an empty
    batch; with autograd); eval: the given running statistics (detached)."""
    if not training:
        return mean_in.detach(), var_in.detach()
    M = max(z.shape[0] * z.shape[2] * z.shape[3], 1)
    mean = z.sum((0, 2, 3)) / M
    return mean, (z - mean.view(1, -1, 1, 1)).square().sum((0, 2, 3)) / M


def bn_gate_ref(
    z: Tensor,
    weight: Tensor,
    bias: Tensor,
    mean_in: Tensor | None = None,
    var_in: Tensor | None = None,
    e: Tensor | None = None,
    s: float = 1.0,
    residual: Tensor | None = None,
    training: bool = True,
    eps: float = 1e-5,
    relu: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """Reference for the op ``der_fast::bn_gate``, written as plain PyTorch ops (autograd by
    PyTorch): ``(y, mean, var)`` with ``y = g * relu(alpha * z + beta [+ residual])``
    (``relu=False``: no ReLU), ``g = sigmoid(s * e)`` (1 without ``e``), ``alpha = weight *
    invstd``, ``beta = bias - mean * alpha``, ``invstd = 1 / sqrt(var + eps)``; in training
    ``mean`` / ``var`` are the batch mean and biased variance of ``z`` over (N, H, W) (0 for an
    empty batch; gradients flow through them, as in ``F.batch_norm``), in eval the given
    running statistics (no gradient). The returned ``mean`` / ``var`` carry no gradient."""
    shape = (1, z.shape[1], 1, 1)
    mean, var = _statistics(z, mean_in, var_in, training)
    invstd = 1.0 / torch.sqrt(var + eps)
    alpha = weight * invstd
    beta = bias - mean * alpha
    a = z * alpha.view(shape) + beta.view(shape)
    if residual is not None:
        a = a + residual
    y = torch.relu(a) if relu else a
    if e is not None:
        y = y * torch.sigmoid(s * e).view(shape)
    return y, mean.detach().clone(), var.detach().clone()


# ==============================================================================================
# kernels registered from Python: PyTorch fallback (where no compiled kernel), Triton on CUDA


def _float(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.float()


def _bn_gate_fallback(z, weight, bias, mean_in, var_in, e, s, residual, training, eps, relu):
    _check_bn_gate(z, weight, bias, mean_in, var_in, e, residual, training)
    if z.dtype in _REDUCED:  # computed in float32, statistics returned in float32
        y, mean, var = _bn_gate_fallback(*map(_float, (z, weight, bias, mean_in, var_in, e)), s,
                                         _float(residual), training, eps, relu)
        return y.to(z.dtype), mean, var
    with torch.no_grad():
        mean, var = (t.clone() for t in _statistics(z, mean_in, var_in, training))
        a = _pre_activation(z, weight, bias, mean_in, var_in, residual, training, eps)
        y = torch.relu(a) if relu else a
        if e is not None:
            y = y * torch.sigmoid(s * e).view(1, -1, 1, 1)
    return y.contiguous(memory_format=_kernel_format(z)), mean, var


def _pre_activation(z, weight, bias, mean_in, var_in, residual, training, eps) -> Tensor:
    """``bn(z) [+ residual]`` computed by ATen's own BatchNorm, so that the fallback's ReLU
    masks are the module stack's (rounded otherwise, a pre-activation within an ulp of 0 lands
    on the other side and takes a whole element's gradient along; the compiled kernels round
    like ATen for the same reason)."""
    if z.numel() == 0:
        a = torch.zeros_like(z)
    else:
        a = torch.nn.functional.batch_norm(z, None if training else mean_in,
                                           None if training else var_in, weight, bias,
                                           training, 0.0, eps)
    return a + residual if residual is not None else a


def _invstd(var: Tensor, eps: float, training: bool) -> Tensor:
    """1 / sqrt(var + eps) as the kernels compute it (training: in float64, 0 where var and eps
    are both 0, like ATen)."""
    if training:
        inv = 1.0 / torch.sqrt(var.double() + eps)
        if eps == 0:
            inv = torch.where(var == 0, torch.zeros_like(inv), inv)
        return inv.to(var.dtype)
    return 1.0 / torch.sqrt(var + eps)


def _bn_gate_backward_fallback(grad_y, z, weight, bias, mean, var, e, s, residual, training,
                               eps, relu, output_mask):
    _check_bn_gate(z, weight, bias, mean, var, e, residual, False, "der_fast.bn_gate_backward",
                   ("mean", "var"))
    if z.dtype in _REDUCED:  # computed in float32
        outs = _bn_gate_backward_fallback(*map(_float, (grad_y, z, weight, bias, mean, var, e)),
                                          s, _float(residual), training, eps, relu, output_mask)
        return tuple(t.to(z.dtype) for t in outs)
    want = [bool(m) for m in output_mask]
    fmt = _kernel_format(z)
    C = z.shape[1]
    M = z.shape[0] * z.shape[2] * z.shape[3]
    shape = (1, C, 1, 1)
    dims = (0, 2, 3)
    empty = lambda: z.new_empty((0,))
    inv = _invstd(var, eps, training)
    alpha = inv * weight
    a = _pre_activation(z, weight, bias, mean, var, residual, training, eps)
    g = torch.sigmoid(s * e) if e is not None else torch.ones_like(weight)
    da = grad_y * g.view(shape)
    if relu:
        da = torch.where(a > 0, da, torch.zeros((), dtype=z.dtype, device=z.device))
    h = torch.relu(a) if relu else a
    xm = z - mean.view(shape)
    sum_da = da.sum(dims, dtype=torch.float64)
    sum_dax = (da * xm).sum(dims, dtype=torch.float64)
    gw = (sum_dax * inv.double()).to(z.dtype) if want[1] else empty()
    gb = sum_da.to(z.dtype) if want[2] else empty()
    if want[3]:
        gd = g.double()
        ge = (s * gd * (1 - gd) * (grad_y * h).sum(dims, dtype=torch.float64)).to(z.dtype)
    else:
        ge = empty()
    if want[0]:
        if training:
            k = (sum_dax * inv.double() ** 2 / max(M, 1)).to(z.dtype)
            gm = (sum_da / max(M, 1)).to(z.dtype)
            gz = (da - gm.view(shape) - xm * k.view(shape)) * (weight * inv).view(shape)
        else:
            gz = da * alpha.view(shape)
        gz = gz.contiguous(memory_format=fmt)
    else:
        gz = empty()
    gr = da.contiguous(memory_format=fmt).clone() if want[4] else empty()
    return gz, gw, gb, ge, gr


_TRITON_MODULE: list = []  # [module or None], filled on first use


def _triton_kernels():
    """der_fast.kernels.bn_gate, imported on first use (None if the file is missing: the
    PyTorch fallback runs instead)."""
    if not _TRITON_MODULE:
        try:
            _TRITON_MODULE.append(_backend.load_kernel_module("bn_gate"))
        except ModuleNotFoundError as err:
            if err.name not in ("der_fast.kernels.bn_gate", "der_fast.kernels"):
                raise
            _TRITON_MODULE.append(None)
    return _TRITON_MODULE[0]


def _not_alias(out: Tensor, inp: Tensor | None) -> Tensor:
    if inp is not None and out.data_ptr() == inp.data_ptr():
        return out.clone()
    return out


def _triton_bn_fwd(z, weight, bias, mean_in, var_in, e, s, residual, training, eps, relu):
    _check_bn_gate(z, weight, bias, mean_in, var_in, e, residual, training)
    mod = _triton_kernels()
    if mod is None:
        return _bn_gate_fallback(z, weight, bias, mean_in, var_in, e, s, residual, training, eps,
                                 relu)
    with torch.cuda.device(z.device):  # Triton launches on the current device
        y, mean, var = mod.bn_gate_fwd(z, weight, bias, mean_in, var_in, e, s, residual,
                                       training, eps, relu)
    return y, _not_alias(mean, mean_in), _not_alias(var, var_in)


def _triton_bn_bwd(grad_y, z, weight, bias, mean, var, e, s, residual, training, eps, relu,
                   output_mask):
    mod = _triton_kernels()
    if mod is None:
        return _bn_gate_backward_fallback(grad_y, z, weight, bias, mean, var, e, s, residual,
                                          training, eps, relu, output_mask)
    with torch.cuda.device(z.device):
        outs = mod.bn_gate_bwd(grad_y, z, weight, bias, mean, var, e, s, residual, training, eps,
                               relu, [bool(m) for m in output_mask])
    return tuple(z.new_empty((0,)) if t is None else t for t in outs)


if "bn_gate" not in CPU_EXT_OPS:
    lib.impl("bn_gate", _bn_gate_fallback, "CPU")
    lib.impl("bn_gate_backward", _bn_gate_backward_fallback, "CPU")
if torch.version.cuda:
    if HAS_TRITON:
        lib.impl("bn_gate", _triton_bn_fwd, "CUDA")
        lib.impl("bn_gate_backward", _triton_bn_bwd, "CUDA")
    else:
        lib.impl("bn_gate", _bn_gate_fallback, "CUDA")
        lib.impl("bn_gate_backward", _bn_gate_backward_fallback, "CUDA")


# ==============================================================================================
# fake (meta) kernels


@torch.library.register_fake("der_fast::bn_gate")
def _bn_gate_fake(z, weight, bias, mean_in, var_in, e, s, residual, training, eps, relu):
    _check_bn_gate(z, weight, bias, mean_in, var_in, e, residual, training)
    C = z.shape[1]
    stat = torch.float32 if z.dtype in _REDUCED else z.dtype
    return (torch.empty_like(z, memory_format=_kernel_format(z)), z.new_empty((C,), dtype=stat),
            z.new_empty((C,), dtype=stat))


@torch.library.register_fake("der_fast::bn_gate_backward")
def _bn_gate_backward_fake(grad_y, z, weight, bias, mean, var, e, s, residual, training, eps,
                           relu, output_mask):
    fmt = _kernel_format(z)
    C = z.shape[1]
    m = [bool(v) for v in output_mask]
    full = lambda ok: torch.empty_like(z, memory_format=fmt) if ok else z.new_empty((0,))
    vec = lambda ok: z.new_empty((C,)) if ok else z.new_empty((0,))
    return full(m[0]), vec(m[1]), vec(m[2]), vec(m[3]), full(m[4])


# ==============================================================================================
# autograd


def _bn_gate_setup_context(ctx, inputs, output):
    z, weight, bias, _mean_in, _var_in, e, s, residual, training, eps, relu = inputs
    _y, mean, var = output
    ctx.mark_non_differentiable(mean, var)
    ctx.s, ctx.training, ctx.eps, ctx.relu = float(s), bool(training), float(eps), bool(relu)
    ctx.has_e = e is not None
    ctx.has_r = residual is not None
    # Saved: z (BatchNorm's input, saved by nn.BatchNorm2d too), the residual, the statistics
    # the forward used (per channel), weight, bias and e. Neither the pre-activation nor y:
    # the backward recomputes a = alpha * z + beta (+ residual) with the forward's arithmetic.
    ctx.save_for_backward(z, residual, mean, var, weight, bias, e)


def _bn_gate_backward(ctx, grad_y, _grad_mean=None, _grad_var=None):
    z, residual, mean, var, weight, bias, e = ctx.saved_tensors
    n = ctx.needs_input_grad
    mask = [bool(n[0]), bool(n[1]), bool(n[2]), bool(ctx.has_e and n[5]),
            bool(ctx.has_r and n[7])]
    if grad_y is None or not any(mask):
        return (None,) * len(n)
    gz, gw, gb, ge, gr = torch.ops.der_fast.bn_gate_backward(
        grad_y, z, weight, bias, mean, var, e, ctx.s, residual, ctx.training, ctx.eps, ctx.relu,
        mask,
    )
    pick = lambda ok, t: t if ok else None
    return (pick(mask[0], gz), pick(mask[1], gw), pick(mask[2], gb), None, None,
            pick(mask[3], ge), None, pick(mask[4], gr), None, None, None)


register_autograd("bn_gate", _bn_gate_backward, _bn_gate_setup_context)


# ==============================================================================================
# public wrapper


def _momentum(bn: nn.Module) -> float | None:
    """nn.BatchNorm2d's running-average factor for this call (num_batches_tracked is bumped
    here, as nn.BatchNorm2d.forward does), or None when the running statistics stay as they
    are."""
    if not (bn.training and bn.track_running_stats):
        return None
    if bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:  # cumulative moving average
            return 1.0 / float(bn.num_batches_tracked)
    return 0.0 if bn.momentum is None else float(bn.momentum)


def bn_gate(
    z: Tensor,
    bn: nn.Module,
    e: Tensor | None = None,
    s: float = 1.0,
    residual: Tensor | None = None,
    relu: bool = True,
    *,
    backend: str = "auto",
) -> Tensor:
    """``y = g * relu(bn(z) [+ residual])`` in one op, with ``bn`` an ``nn.BatchNorm2d`` (its
    weight, bias, eps, momentum, train/eval mode and running statistics) and
    ``g = sigmoid(s * e)`` per channel (1 when ``e`` is None); ``relu=False`` drops the ReLU
    (a plain BatchNorm, e.g. a shortcut's).

    Same numbers and side effects as ``gated_relu(bn(z), g, residual)``: in training mode
    (or without running statistics) BatchNorm uses the batch mean and biased variance of ``z``
    over (N, H, W), and gradients flow through them; with ``track_running_stats`` the running
    statistics are updated like ``nn.BatchNorm2d`` does (``num_batches_tracked += 1``;
    ``momentum``, or ``1 / num_batches_tracked`` when it is None;
    ``running_var`` from the unbiased variance; unchanged for an empty batch); a batch with
    one value per channel raises ValueError, as in ``F.batch_norm``. In eval mode the running
    statistics are used. Gradients: z, weight, bias, e, residual (those that require grad).

    Layout: NCHW-contiguous and channels_last inputs are processed directly (the output has
    the same layout); other strides are copied first. float32 / float64 (float16 / bfloat16
    computed in float32 on CPU). With NCHW float32 input the forward rounds like ATen's CPU
    BatchNorm followed by the reference's gated ReLU (see csrc/bn_gate.cpp).

    backend: "auto" (the registered op: C++ on CPU, Triton on CUDA, PyTorch fallback where
    those are missing), "ref" (:func:`bn_gate_ref`), or "cpp"/"triton" to insist on a
    compiled implementation (raises if it is unavailable).
    """
    if z.dim() != 4:
        raise ValueError(
            f"der_fast.bn_gate: z must be 4-D [N, C, H, W], got a {z.dim()}-D tensor of shape "
            f"{list(z.shape)}"
        )
    C = z.shape[1]
    if getattr(bn, "num_features", C) != C:
        raise ValueError(
            f"der_fast.bn_gate: the BatchNorm has {bn.num_features} channels but z has C={C} "
            f"(z.shape={list(z.shape)})"
        )
    M = z.shape[0] * z.shape[2] * z.shape[3]
    batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    if batch_stats and M == 1:  # as F.batch_norm
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {z.size()}"
        )
    momentum = _momentum(bn)
    weight, bias = bn.weight, bn.bias
    if weight is None:  # affine=False
        weight = torch.ones(C, dtype=z.dtype, device=z.device)
    if bias is None:
        bias = torch.zeros(C, dtype=z.dtype, device=z.device)
    mean_in = None if batch_stats else bn.running_mean
    var_in = None if batch_stats else bn.running_var
    args = (z, weight, bias, mean_in, var_in, e, float(s), residual, bool(batch_stats),
            float(bn.eps), bool(relu))
    if _resolve_backend("bn_gate", backend, z.device) == "ref":
        y, mean, var = bn_gate_ref(*args)
    else:
        y, mean, var = torch.ops.der_fast.bn_gate(*args)
    if momentum is not None and batch_stats and M > 0 and bn.running_mean is not None:
        with torch.no_grad():  # ATen's arithmetic for the update (tests/test_bn_gate.py)
            m = momentum
            rm, rv = bn.running_mean, bn.running_var
            rm.mul_(1.0 - m).add_(mean * m)
            rv.mul_(1.0 - m).add_(var * M / (M - 1), alpha=m)
    return y
