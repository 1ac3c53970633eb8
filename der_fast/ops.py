"""der_fast custom operators (torch.library, namespace ``der_fast``).

Two ops, each with a typed wrapper, a pure-PyTorch ``<op>_ref`` (ground truth for tests and
benchmarks, and readable documentation of what the op computes), a fake (meta) kernel and an
autograd formula:

  masked_gate(x, scale, shift, e=None, s=1.0, residual=None) -> y
  concat_linear_head(feats, weight, bias, aux_weight=None, aux_bias=None)
      -> (logits, aux_logits | None, features)

Where each op runs (see ``implementation()`` and ``python -m der_fast.info``):

  ===================  ===========================  ==========================================
  op                   CPU                          CUDA
  ===================  ===========================  ==========================================
  masked_gate          C++ (der_fast._C)            Triton (der_fast.kernels.masked_gate)
  concat_linear_head   C++ (der_fast._C)            CUDA C++ (der_fast._C_cuda) + cuBLAS
  ===================  ===========================  ==========================================

The schemas are defined once, in C++ (csrc/der_fast.cpp); CPU and CUDA kernels are registered
per dispatch key. Importing this module never fails because a compiled part is missing: if
der_fast._C cannot be imported, the schemas below are defined from Python and the ops run the
PyTorch fallback (quietly; see ``HAS_CPU_EXT``, ``HAS_CUDA_EXT``, ``HAS_TRITON``). Asking for a
backend explicitly (``backend="cpp" | "cuda" | "triton"``) raises if it is not available.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _backend

__all__ = [
    "HAS_CPU_EXT",
    "HAS_CUDA_EXT",
    "HAS_TRITON",
    "available_backends",
    "concat_linear_head",
    "concat_linear_head_ref",
    "conv3x3_bordered",
    "conv3x3_bordered_ref",
    "conv3x3_isa",
    "border",
    "implementation",
    "masked_gate",
    "masked_gate_ref",
]

# Copy of the schemas in csrc/der_fast.cpp, used only when der_fast._C is missing.
# tests/test_build.py checks that both agree.
SCHEMAS = {
    "masked_gate": (
        "masked_gate(Tensor x, Tensor scale, Tensor shift, Tensor? e=None, float s=1.0, "
        "Tensor? residual=None) -> Tensor"
    ),
    "masked_gate_backward": (
        "masked_gate_backward(Tensor grad_y, Tensor y, Tensor? x, Tensor scale, Tensor? e, "
        "float s, bool[5] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)"
    ),
    "concat_linear_head": (
        "concat_linear_head(Tensor[] feats, Tensor weight, Tensor? bias, "
        "Tensor? aux_weight=None, Tensor? aux_bias=None) -> (Tensor, Tensor, Tensor)"
    ),
    "concat_linear_head_backward": (
        "concat_linear_head_backward(Tensor? grad_logits, Tensor? grad_aux, "
        "Tensor? grad_features, Tensor features, Tensor weight, Tensor? aux_weight, "
        "Tensor?[] feats, int[] widths, bool[4] output_mask) "
        "-> (Tensor[], Tensor, Tensor, Tensor, Tensor)"
    ),
    "conv3x3_bordered": (
        "conv3x3_bordered(Tensor x, Tensor weight, Tensor bias, Tensor? residual=None, "
        "Tensor? gate=None, bool relu=True, int stride=1) -> Tensor"
    ),
}


def _try_import(name: str) -> tuple[bool, str | None]:
    try:
        importlib.import_module(name)
        return True, None
    except (ImportError, OSError) as err:  # missing, or built against another torch
        return False, f"{type(err).__name__}: {err}"


#: der_fast._C (C++ CPU kernels + schemas) is importable.
HAS_CPU_EXT, CPU_EXT_ERROR = _try_import("der_fast._C")
#: der_fast._C_cuda (CUDA C++ kernels) is importable.
HAS_CUDA_EXT, CUDA_EXT_ERROR = (
    _try_import("der_fast._C_cuda") if torch.version.cuda else (False, "torch has no CUDA")
)
#: triton is installed (and torch has CUDA), so masked_gate uses the Triton kernels on CUDA.
HAS_TRITON = bool(torch.version.cuda) and importlib.util.find_spec("triton") is not None

_lib = torch.library.Library("der_fast", "FRAGMENT")


def _op_defined(name: str) -> bool:
    try:
        getattr(torch.ops.der_fast, name)
        return True
    except (AttributeError, RuntimeError):
        return False


if not HAS_CPU_EXT:
    for _name, _schema in SCHEMAS.items():
        if not _op_defined(_name):
            _lib.define(_schema)


# ==============================================================================================
# argument checks (same messages and exception types as csrc/common.h)


def _kernel_format(x: Tensor) -> torch.memory_format:
    """Layout the kernels use and produce: channels_last for a 4-D tensor that is dense in
    channels_last but not NCHW-contiguous, else contiguous (same rule as csrc/common.h)."""
    if (
        x.dim() == 4
        and not x.is_contiguous()
        and x.is_contiguous(memory_format=torch.channels_last)
    ):
        return torch.channels_last
    return torch.contiguous_format


def _check_like(t: Tensor, ref: Tensor, op: str, name: str, ref_name: str) -> None:
    if t.dtype != ref.dtype:
        raise TypeError(
            f"{op}: {name} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype} "
            "(all tensor arguments must have the same dtype)"
        )
    if t.device != ref.device:
        raise ValueError(
            f"{op}: {name} is on device {t.device} but {ref_name} is on device {ref.device}"
        )


def _check_masked_gate(x, scale, shift, e=None, residual=None) -> None:
    op = "der_fast.masked_gate"
    if x.dim() not in (2, 4):
        raise ValueError(
            f"{op}: x must be 2-D [N, C] or 4-D [N, C, H, W], got a {x.dim()}-D tensor of "
            f"shape {list(x.shape)}"
        )
    if not x.is_floating_point():
        raise TypeError(f"{op}: x must be a floating point tensor, got dtype {x.dtype}")
    C = x.shape[1]
    for name, t in (("scale", scale), ("shift", shift), ("e", e)):
        if t is None:
            continue
        if t.dim() != 1:
            raise ValueError(f"{op}: {name} must be 1-D [C] with C={C}, got shape {list(t.shape)}")
        _check_like(t, x, op, name, "x")
        if t.shape[0] != C:
            raise ValueError(
                f"{op}: {name} has {t.shape[0]} channels but x has C={C} (x.shape={list(x.shape)})"
            )
    if residual is not None:
        _check_like(residual, x, op, "residual", "x")
        if residual.shape != x.shape:
            raise ValueError(
                f"{op}: residual has shape {list(residual.shape)} but x has shape "
                f"{list(x.shape)} (they must be equal)"
            )


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


# ==============================================================================================
# pure-PyTorch references


def masked_gate_ref(
    x: Tensor,
    scale: Tensor,
    shift: Tensor,
    e: Tensor | None = None,
    s: float = 1.0,
    residual: Tensor | None = None,
) -> Tensor:
    """Reference for :func:`masked_gate`: ``g * relu(scale * x + shift [+ residual])`` with
    ``g = sigmoid(s * e)`` (per channel), written as plain PyTorch ops (autograd by PyTorch)."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    z = x * scale.view(shape) + shift.view(shape)
    if residual is not None:
        z = z + residual
    y = torch.relu(z)
    if e is not None:
        y = y * torch.sigmoid(s * e).view(shape)
    return y


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


def _masked_gate_fallback(x, scale, shift, e=None, s=1.0, residual=None):
    _check_masked_gate(x, scale, shift, e, residual)
    return masked_gate_ref(x, scale, shift, e, s, residual).contiguous(
        memory_format=_kernel_format(x)
    )


def _masked_gate_backward_fallback(grad_y, y, x, scale, e, s, output_mask):
    want_x, want_scale, want_shift, want_e, want_r = (bool(m) for m in output_mask)
    fmt = _kernel_format(y)
    C = y.shape[1]
    shape = (1, C) + (1,) * (y.dim() - 2)
    dims = (0, 2, 3) if y.dim() == 4 else (0,)
    empty = lambda: y.new_empty((0,))
    dz = torch.where(y > 0, grad_y, torch.zeros((), dtype=y.dtype, device=y.device))
    g = torch.sigmoid(s * e) if e is not None else None
    if g is not None:
        dz = dz * g.view(shape)
    gx = (dz * scale.view(shape)).contiguous(memory_format=fmt) if want_x else empty()
    gscale = (dz * x).sum(dims) if want_scale else empty()
    gshift = dz.sum(dims) if want_shift else empty()
    ge = (s * (1 - g) * (grad_y * y).sum(dims)) if want_e else empty()
    gr = dz.contiguous(memory_format=fmt).clone() if want_r else empty()
    return gx, gscale, gshift, ge, gr


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


def _triton_mg_fwd(x, scale, shift, e=None, s=1.0, residual=None):
    _check_masked_gate(x, scale, shift, e, residual)
    with torch.cuda.device(x.device):  # Triton launches on the current device
        return _backend.load_kernel_module("masked_gate").masked_gate_fwd(
            x, scale, shift, e, s, residual
        )


def _triton_mg_bwd(grad_y, y, x, scale, e, s, output_mask):
    with torch.cuda.device(y.device):
        return _backend.load_kernel_module("masked_gate").masked_gate_bwd(
            grad_y, y, x, scale, e, s, output_mask
        )


def _conv3x3_out_hw(x, stride):
    return (x.shape[2] - 3) // stride + 3, (x.shape[3] - 3) // stride + 3


def _check_conv3x3(x, weight, bias, residual=None, gate=None, stride=1) -> None:
    """Same checks and messages as csrc/conv3x3.cpp."""
    if x.dim() != 4:
        raise RuntimeError(f"conv3x3_bordered: x must be [N, C_in, H + 2, W + 2], got {list(x.shape)}")
    if x.dtype != torch.float32:
        raise RuntimeError(f"conv3x3_bordered: only float32 is supported, got {x.dtype}")
    if x.shape[2] < 3 or x.shape[3] < 3:
        raise RuntimeError("conv3x3_bordered: each plane needs a 1-pixel zero border around at "
                           f"least 1x1 pixels, got planes of {x.shape[2]}x{x.shape[3]}")
    if weight.dim() != 4 or tuple(weight.shape[1:]) != (x.shape[1], 3, 3) or weight.shape[0] < 1:
        raise RuntimeError(f"conv3x3_bordered: weight must be [C_out, {x.shape[1]}, 3, 3], got "
                           f"{list(weight.shape)}")
    if stride not in (1, 2):
        raise RuntimeError(f"conv3x3_bordered: stride must be 1 or 2, got {stride}")
    co = weight.shape[0]
    if bias.dim() != 1 or bias.shape[0] != co:
        raise RuntimeError(f"conv3x3_bordered: bias must be [{co}], got {list(bias.shape)}")
    for t in (weight, bias):
        if t.dtype != torch.float32 or t.device != x.device:
            raise RuntimeError(f"conv3x3_bordered: weight and bias must be float32 on {x.device}")
    if residual is not None:
        want = (x.shape[0], co, *_conv3x3_out_hw(x, stride))
        if tuple(residual.shape) != want:
            raise RuntimeError(f"conv3x3_bordered: residual must be {list(want)}, got "
                               f"{list(residual.shape)}")
        if residual.dtype != torch.float32 or residual.device != x.device:
            raise RuntimeError(f"conv3x3_bordered: residual must be float32 on {x.device}")
    if gate is not None and (gate.dim() != 1 or gate.shape[0] != co
                             or gate.dtype != torch.float32 or gate.device != x.device):
        raise RuntimeError(f"conv3x3_bordered: gate must be a float32 [{co}] tensor on "
                           f"{x.device}")
    if x.device.type != "cpu" and x.device.type != "meta":
        raise RuntimeError(f"conv3x3_bordered: CPU tensors only, got {x.device}")


def border(x: Tensor) -> Tensor:
    """``x`` [N, C, H, W] with a 1-pixel zero border: the layout of :func:`conv3x3_bordered`."""
    return F.pad(x, (1, 1, 1, 1)).contiguous()


def conv3x3_bordered_ref(x, weight, bias, residual=None, gate=None, relu=True, stride=1):
    """Reference for :func:`conv3x3_bordered` (PyTorch ops, any dtype)."""
    y = F.conv2d(x[:, :, 1:-1, 1:-1], weight, bias, stride=stride, padding=1)
    if residual is not None:
        y = y + residual[:, :, 1:-1, 1:-1]
    if relu:
        y = F.relu(y)
    if gate is not None:
        y = y * gate.view(1, -1, 1, 1)
    return border(y)


def _conv3x3_fallback(x, weight, bias, residual=None, gate=None, relu=True, stride=1):
    _check_conv3x3(x, weight, bias, residual, gate, stride)
    return conv3x3_bordered_ref(x, weight, bias, residual, gate, relu, stride)


if not HAS_CPU_EXT:
    _lib.impl("conv3x3_bordered", _conv3x3_fallback, "CPU")
    _lib.impl("masked_gate", _masked_gate_fallback, "CPU")
    _lib.impl("masked_gate_backward", _masked_gate_backward_fallback, "CPU")
    _lib.impl("concat_linear_head", _head_fallback, "CPU")
    _lib.impl("concat_linear_head_backward", _head_backward_fallback, "CPU")
if torch.version.cuda:
    if HAS_TRITON:
        _lib.impl("masked_gate", _triton_mg_fwd, "CUDA")
        _lib.impl("masked_gate_backward", _triton_mg_bwd, "CUDA")
    else:
        _lib.impl("masked_gate", _masked_gate_fallback, "CUDA")
        _lib.impl("masked_gate_backward", _masked_gate_backward_fallback, "CUDA")
    if not HAS_CUDA_EXT:
        _lib.impl("concat_linear_head", _head_fallback, "CUDA")
        _lib.impl("concat_linear_head_backward", _head_backward_fallback, "CUDA")


# ==============================================================================================
# fake (meta) kernels


@torch.library.register_fake("der_fast::conv3x3_bordered")
def _conv3x3_fake(x, weight, bias, residual=None, gate=None, relu=True, stride=1):
    _check_conv3x3(x, weight, bias, residual, gate, stride)
    return x.new_empty((x.shape[0], weight.shape[0], *_conv3x3_out_hw(x, stride)))


def _conv3x3_no_backward(ctx, grad):
    raise RuntimeError("der_fast.conv3x3_bordered is inference-only (FastDERNet's frozen "
                       "extractors): it has no gradient; use F.conv2d where one is needed")


def _conv3x3_setup_context(ctx, inputs, output):
    pass


torch.library.register_autograd("der_fast::conv3x3_bordered", _conv3x3_no_backward,
                                setup_context=_conv3x3_setup_context)


if HAS_CPU_EXT and hasattr(torch.ops.der_fast, "bordered_resnet"):
    # the compiled whole-extractor executor (csrc/conv3x3.cpp; exists only with der_fast._C)
    @torch.library.register_fake("der_fast::bordered_resnet")
    def _bordered_resnet_fake(x, weights, biases, conv_meta, block_meta, sc_index, gates,
                              out_index, out_dim, maxpool, chunk):
        return x.new_empty((x.shape[0], out_dim))

    def _bordered_resnet_no_backward(ctx, grad):
        raise RuntimeError("der_fast.bordered_resnet is inference-only (FastDERNet's frozen "
                           "extractors): it has no gradient")

    torch.library.register_autograd("der_fast::bordered_resnet", _bordered_resnet_no_backward,
                                    setup_context=_conv3x3_setup_context)


@torch.library.register_fake("der_fast::masked_gate")
def _masked_gate_fake(x, scale, shift, e=None, s=1.0, residual=None):
    _check_masked_gate(x, scale, shift, e, residual)
    return torch.empty_like(x, memory_format=_kernel_format(x))


@torch.library.register_fake("der_fast::masked_gate_backward")
def _masked_gate_backward_fake(grad_y, y, x, scale, e, s, output_mask):
    fmt = _kernel_format(y)
    C = y.shape[1]
    m = [bool(v) for v in output_mask]
    full = lambda ok: torch.empty_like(y, memory_format=fmt) if ok else y.new_empty((0,))
    vec = lambda ok: y.new_empty((C,)) if ok else y.new_empty((0,))
    return full(m[0]), vec(m[1]), vec(m[2]), vec(m[3]), full(m[4])


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


def _masked_gate_setup_context(ctx, inputs, output):
    x, scale, _shift, e, s, residual = inputs
    ctx.s = float(s)
    ctx.has_e = e is not None
    ctx.has_r = residual is not None
    # Saved: y (the output; kept alive anyway as the next layer's input), x only when the
    # scale gradient is needed (in training BN's batch statistics keep it alive anyway),
    # scale and e (per-channel). The pre-activation z is never stored: relu'(z) = [y > 0]
    # (g > 0), and grad_e uses sum(grad_y * y) = g * sum(grad_y * relu(z)).
    ctx.save_for_backward(output, x if scale.requires_grad else None, scale, e)


def _masked_gate_backward(ctx, grad_y):
    y, x, scale, e = ctx.saved_tensors
    n = ctx.needs_input_grad
    mask = [
        bool(n[0]),
        bool(n[1]) and x is not None,
        bool(n[2]),
        bool(ctx.has_e and n[3]),
        bool(ctx.has_r and len(n) > 5 and n[5]),
    ]
    if grad_y is None or not any(mask):
        return (None,) * len(n)
    gx, gscale, gshift, ge, gr = torch.ops.der_fast.masked_gate_backward(
        grad_y, y, x, scale, e, ctx.s, mask
    )
    out = [
        gx if mask[0] else None,
        gscale if mask[1] else None,
        gshift if mask[2] else None,
        ge if mask[3] else None,
        None,
        gr if mask[4] else None,
    ]
    return tuple(out[: len(n)])


torch.library.register_autograd(
    "der_fast::masked_gate", _masked_gate_backward, setup_context=_masked_gate_setup_context
)


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


torch.library.register_autograd(
    "der_fast::concat_linear_head", _head_backward, setup_context=_head_setup_context
)


def _no_double_backward(opname):
    def backward(ctx, *grads):
        raise NotImplementedError(f"der_fast.{opname}: double backward is not supported")

    return backward


torch.library.register_autograd(
    "der_fast::masked_gate_backward",
    _no_double_backward("masked_gate"),
    setup_context=lambda ctx, inputs, output: None,
)
torch.library.register_autograd(
    "der_fast::concat_linear_head_backward",
    _no_double_backward("concat_linear_head"),
    setup_context=lambda ctx, inputs, output: None,
)


# ==============================================================================================
# backend selection and typed wrappers

BACKENDS = ("auto", "ref", "cpp", "cuda", "triton")


def available_backends() -> dict[str, bool]:
    return {"cpp": HAS_CPU_EXT, "cuda": HAS_CUDA_EXT, "triton": HAS_TRITON, "ref": True}


def implementation(op: str, device: str | torch.device) -> str:
    """Which implementation ``op`` ("masked_gate" or "concat_linear_head") uses on ``device``."""
    dev = torch.device(device).type
    if op not in ("masked_gate", "concat_linear_head", "conv3x3_bordered"):
        raise ValueError(f"unknown op {op!r}")
    if op == "conv3x3_bordered":
        if dev != "cpu":
            return f"unavailable on {dev} (a CPU kernel: the GPU frozen path uses cuDNN)"
        if HAS_CPU_EXT:
            return f"cpp (der_fast._C, {conv3x3_isa()})"
        return f"ref (PyTorch fallback; der_fast._C missing: {CPU_EXT_ERROR})"
    if dev == "cpu":
        if HAS_CPU_EXT:
            return "cpp (der_fast._C)"
        return f"ref (PyTorch fallback; der_fast._C missing: {CPU_EXT_ERROR})"
    if dev == "cuda":
        if not torch.version.cuda:
            return "unavailable (torch built without CUDA)"
        if op == "masked_gate":
            if HAS_TRITON:
                return "triton (der_fast.kernels.masked_gate)"
            return "ref (PyTorch fallback; triton not installed)"
        if HAS_CUDA_EXT:
            return "cuda (der_fast._C_cuda)"
        return f"ref (PyTorch fallback; der_fast._C_cuda missing: {CUDA_EXT_ERROR})"
    return "ref (PyTorch fallback)"


_OP_BACKENDS = {
    # op: {device type: backend name of the compiled implementation}
    "masked_gate": {"cpu": "cpp", "cuda": "triton"},
    "concat_linear_head": {"cpu": "cpp", "cuda": "cuda"},
}


def _resolve_backend(op: str, backend: str, device: torch.device) -> str:
    """-> "op" (call the registered op) or "ref". Explicit requests are checked loudly."""
    if backend in ("auto", None):
        return "op"
    if backend == "ref":
        return "ref"
    if backend not in BACKENDS:
        raise ValueError(f"der_fast.{op}: unknown backend {backend!r}; choose from {BACKENDS}")
    native = _OP_BACKENDS[op].get(device.type)
    if native != backend:
        raise RuntimeError(
            f"der_fast.{op}: backend={backend!r} is not an implementation for {device.type} "
            f"tensors (available there: {native or 'none'}, 'ref')"
        )
    if not available_backends()[backend]:
        why = {"cpp": CPU_EXT_ERROR, "cuda": CUDA_EXT_ERROR, "triton": "triton not installed"}[
            backend
        ]
        raise RuntimeError(
            f"der_fast.{op}: backend={backend!r} was requested but is not available ({why}). "
            "Rebuild der_fast (see setup.py / `python -m der_fast.info`) or use backend='auto'."
        )
    return "op"


def masked_gate(
    x: Tensor,
    scale: Tensor,
    shift: Tensor,
    e: Tensor | None = None,
    s: float = 1.0,
    residual: Tensor | None = None,
    *,
    backend: str = "auto",
) -> Tensor:
    """Fused masked channel gating: ``y = g * relu(scale * x + shift [+ residual])``.

    ``y[n,c,h,w] = g[c] * relu(scale[c] * x[n,c,h,w] + shift[c] + residual[n,c,h,w])`` with
    ``g = sigmoid(s * e)`` when ``e`` is given, else ``g = 1``. ``x`` may also be 2-D ``[N, C]``.

    This is where DER's channel masks sit (see DEVNOTES.md): after BatchNorm, around the
    residual add. ``scale``/``shift`` are BN's per-channel affine (in training computed from the
    batch statistics outside the op, so gradients flow on to gamma/beta/mean/var); ``e`` is the
    mask embedding and ``s`` the annealed temperature. Every masked point of the ResNet
    (stem, inner ``m * relu(bn1(conv1 x))``, stream ``m * relu(bn2(conv2 h) + shortcut)``) is
    one call. With ``e=None`` (g = 1) it serves the frozen / fused paths, e.g. BN folded into
    ``scale/shift`` and binary masks folded into the convs, applied over all ``t*c`` channels of
    a grouped tensor at once.

    Backward gives gradients for ``x``, ``scale``, ``shift``, ``e`` and ``residual`` (the ones
    that require grad; the per-channel ones are reductions over N, H, W). It saves ``y`` and
    per-channel ``scale``/``e`` (plus ``x`` only if ``scale`` requires grad), never the
    pre-activation: ``relu'(z) = [y > 0]`` since ``g > 0``, and
    ``dL/de = s * (1 - g) * sum(grad_y * y)``. (If ``sigmoid(s*e)`` underflows to exactly 0 the
    channel's gradients are 0, as they are in the reference up to rounding.)

    Layout: NCHW-contiguous and channels_last inputs are processed directly (the output has
    the same layout); other strides are copied to contiguous first. All tensors must share
    dtype (float32, float64, bfloat16; float16 is computed in float32 on CPU) and device.

    backend: "auto" (the registered op: C++ on CPU, Triton on CUDA, PyTorch fallback where
    those are missing), "ref" (:func:`masked_gate_ref`), or "cpp"/"triton" to insist on a
    compiled implementation (raises if it is unavailable).
    """
    if _resolve_backend("masked_gate", backend, x.device) == "ref":
        return masked_gate_ref(x, scale, shift, e, s, residual)
    return torch.ops.der_fast.masked_gate(x, scale, shift, e, float(s), residual)


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


def conv3x3_bordered(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    residual: Tensor | None = None,
    gate: Tensor | None = None,
    relu: bool = True,
    stride: int = 1,
) -> Tensor:
    """Inference-only direct 3x3 convolution (padding 1, stride 1 or 2) for narrow layers,
    CPU, float32, on zero-bordered planes:

    ``y = gate[c] * act(conv3x3(x, weight) + bias[c] (+ residual))``, act = ReLU if ``relu``.

    ``x``: ``[N, C_in, H + 2, W + 2]`` whose 1-pixel border is zero (see :func:`border`);
    ``residual`` (optional) ``[N, C_out, H + 2, W + 2]`` in the same layout; ``gate`` (optional)
    ``[C_out]``. Returns ``[N, C_out, H' + 2, W' + 2]`` (``H' = (H - 1) // stride + 1``; the
    residual has that shape too) with a zero border, so layers chain
    without padding copies. No autograd (FastDERNet's frozen extractors only). Faster than
    oneDNN for layers with few channels (pruned extractors), slower for wide ones: see
    ``benchmarks/bench_conv.py``.
    """
    return torch.ops.der_fast.conv3x3_bordered(x, weight, bias, residual, gate, bool(relu),
                                               int(stride))


def conv3x3_isa() -> str:
    """The instruction set :func:`conv3x3_bordered`'s kernel runs with: "avx512", "avx2",
    "baseline" (x86-64 without AVX), or "unavailable" without the compiled extension.
    ``DER_FAST_CONV_ISA=avx2|baseline`` (read when der_fast._C loads) caps it."""
    if not HAS_CPU_EXT or not hasattr(torch.ops.der_fast, "conv3x3_isa"):
        return "unavailable"
    return {0: "baseline", 1: "avx2", 2: "avx512"}.get(int(torch.ops.der_fast.conv3x3_isa()),
                                                          "unknown")
