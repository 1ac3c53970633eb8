"""der_fast custom operators (torch.library, namespace ``der_fast``), one module per op.

  masked_gate(x, scale, shift, e=None, s=1.0, residual=None) -> y
  bn_gate(z, bn, e=None, s=1.0, residual=None, relu=True) -> y   (the op: der_fast::bn_gate
      (z, weight, bias, mean_in, var_in, e, s, residual, training, eps, relu) -> (y, mean, var))
  concat_linear_head(feats, weight, bias, aux_weight=None, aux_bias=None)
      -> (logits, aux_logits | None, features)
  conv3x3_bordered(x, weight, bias, residual=None, gate=None, relu=True, stride=1) -> y
  bordered_resnet(x, <program of a folded extractor>, chunk) -> features

Each op's module holds its checks, its pure-PyTorch reference (``<op>_ref``: ground truth for
tests and benchmarks), its PyTorch fallback, fake (meta) kernel, autograd registration and
typed wrapper; ``_library`` loads the compiled parts and picks backends. Where each op runs
(see ``implementation()`` and ``python -m der_fast.info``):

  ===================  ===========================  ==========================================
  op                   CPU                          CUDA
  ===================  ===========================  ==========================================
  masked_gate          C++ (der_fast._C)            Triton (der_fast.kernels.masked_gate)
  bn_gate              C++ (der_fast._C)            Triton (der_fast.kernels.bn_gate)
  concat_linear_head   C++ (der_fast._C)            CUDA C++ (der_fast._C_cuda) + cuBLAS
  conv3x3_bordered     C++ (der_fast._C)            -
  bordered_resnet      C++ (der_fast._C)            -
  ===================  ===========================  ==========================================

The schemas are defined once, in Python (``SCHEMAS``, in ``_library``); the compiled extensions
only register CPU and CUDA kernels for them, and each op module registers its PyTorch fallback
kernels (where no compiled kernel is registered), Triton kernels, fake kernel
(``torch.library.register_fake``) and autograd formula. Importing this package never fails
because a compiled part is missing: the ops then run the PyTorch fallback (quietly; see
``HAS_CPU_EXT``, ``CPU_EXT_OPS``, ``HAS_CUDA_EXT``, ``HAS_TRITON``; bordered_resnet has no
fallback). Asking for a backend explicitly (``backend="cpp" | "cuda" | "triton"``) raises if it
is not available.
"""

from __future__ import annotations

import torch

from ._library import lib as _lib
from ._library import (
    BACKENDS,
    CPU_EXT_ERROR,
    CPU_EXT_OPS,
    CUDA_EXT_ERROR,
    CUDA_EXT_OPS,
    HAS_CPU_EXT,
    HAS_CUDA_EXT,
    HAS_TRITON,
    SCHEMAS,
    available_backends,
    conv3x3_isa,
    implementation,
)
from .bn_gate import _check_bn_gate  # noqa: F401 (tests check its messages)
from .bn_gate import bn_gate, bn_gate_ref
from .bordered_resnet import HAS_BORDERED_RESNET, bordered_resnet
from .concat_linear_head import _check_head  # noqa: F401 (tests check its messages)
from .concat_linear_head import concat_linear_head, concat_linear_head_ref
from .conv3x3_bordered import border, conv3x3_bordered, conv3x3_bordered_ref
from .masked_gate import _check_masked_gate  # noqa: F401 (tests check its messages)
from .masked_gate import masked_gate, masked_gate_ref

# Under torch.autocast every op computes in float32 (its floating inputs are cast up, as
# autocast does for batch_norm): the mask logits sigmoid(s e) saturate and BatchNorm's
# statistics need float32 (bfloat16 has 8 bits of mantissa), and the ops are memory-bound,
# so low precision buys them little; the convolutions between them run in the autocast dtype.
AUTOCAST_DEVICES = ("cpu", "cuda")
for _name in SCHEMAS:
    if _name == "conv3x3_isa":  # takes no tensor
        continue
    for _device in AUTOCAST_DEVICES:
        torch.library.register_autocast(f"der_fast::{_name}", _device, torch.float32, lib=_lib)
del _name, _device

__all__ = [
    "BACKENDS",
    "CPU_EXT_ERROR",
    "CPU_EXT_OPS",
    "CUDA_EXT_ERROR",
    "CUDA_EXT_OPS",
    "HAS_BORDERED_RESNET",
    "HAS_CPU_EXT",
    "HAS_CUDA_EXT",
    "HAS_TRITON",
    "SCHEMAS",
    "available_backends",
    "bn_gate",
    "bn_gate_ref",
    "border",
    "bordered_resnet",
    "concat_linear_head",
    "concat_linear_head_ref",
    "conv3x3_bordered",
    "conv3x3_bordered_ref",
    "conv3x3_isa",
    "implementation",
    "masked_gate",
    "masked_gate_ref",
]
