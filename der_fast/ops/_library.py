"""Loading the compiled parts of der_fast's ops, and choosing a backend.

Imports der_fast._C (C++ CPU kernels and the operator schemas) and der_fast._C_cuda (CUDA C++
kernels) if they can be imported, notes whether Triton is there, and defines the schemas from
Python (``SCHEMAS``) when der_fast._C is missing, so that the op modules can register their
PyTorch fallbacks. Importing this never fails because a compiled part is missing.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import torch

from .. import _backend

# Copy of the schemas in csrc/der_fast.cpp, used only when der_fast._C is missing (they cannot
# be read from the extension exactly when they are needed, and csrc/ is not installed).
# tests/test_build.py checks that both agree. conv3x3_isa and bordered_resnet are defined only
# by the extension (csrc/conv3x3.cpp) and have no fallback.
SCHEMAS = {
    "masked_gate": (
        "masked_gate(Tensor x, Tensor scale, Tensor shift, Tensor? e=None, float s=1.0, "
        "Tensor? residual=None) -> Tensor"
    ),
    "masked_gate_backward": (
        "masked_gate_backward(Tensor grad_y, Tensor y, Tensor? x, Tensor scale, Tensor? e, "
        "float s, bool[5] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)"
    ),
    "bn_gate": (
        "bn_gate(Tensor z, Tensor weight, Tensor bias, Tensor? mean_in, Tensor? var_in, "
        "Tensor? e, float s, Tensor? residual, bool training, float eps, bool relu) "
        "-> (Tensor, Tensor, Tensor)"
    ),
    "bn_gate_backward": (
        "bn_gate_backward(Tensor grad_y, Tensor z, Tensor weight, Tensor bias, Tensor mean, "
        "Tensor var, Tensor? e, float s, Tensor? residual, bool training, float eps, bool relu, "
        "bool[5] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)"
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

#: The der_fast library fragment the op modules register their Python kernels with.
lib = torch.library.Library("der_fast", "FRAGMENT")


def op_defined(name: str) -> bool:
    """Whether ``der_fast::<name>`` has a schema (from der_fast._C or from SCHEMAS)."""
    try:
        getattr(torch.ops.der_fast, name)
        return True
    except (AttributeError, RuntimeError):
        return False


if not HAS_CPU_EXT:
    for _name, _schema in SCHEMAS.items():
        if not op_defined(_name):
            lib.define(_schema)


def register_no_double_backward(backward_op: str, opname: str) -> None:
    """Make differentiating ``der_fast::<backward_op>`` (a second derivative) raise."""

    def backward(ctx, *grads):
        raise NotImplementedError(f"der_fast.{opname}: double backward is not supported")

    torch.library.register_autograd(
        f"der_fast::{backward_op}", backward, setup_context=lambda ctx, inputs, output: None
    )


# ==============================================================================================
# backend selection

BACKENDS = ("auto", "ref", "cpp", "cuda", "triton")

_OP_BACKENDS = {
    # op: {device type: backend name of the compiled implementation}
    "masked_gate": {"cpu": "cpp", "cuda": "triton"},
    "bn_gate": {"cpu": "cpp", "cuda": "triton"},
    "concat_linear_head": {"cpu": "cpp", "cuda": "cuda"},
}


def available_backends() -> dict[str, bool]:
    return {"cpp": HAS_CPU_EXT, "cuda": HAS_CUDA_EXT, "triton": HAS_TRITON, "ref": True}


def triton_kernel_file(name: str) -> bool:
    """Whether der_fast.kernels.<name> (a Triton kernel file) exists; does not import it."""
    try:
        if importlib.util.find_spec(f"der_fast.kernels.{name}") is not None:
            return True
    except ModuleNotFoundError:
        pass
    return (Path(__file__).resolve().parents[2] / "kernels" / f"{name}.py").is_file()


def implementation(op: str, device: str | torch.device) -> str:
    """Which implementation ``op`` ("masked_gate", "bn_gate", "concat_linear_head" or
    "conv3x3_bordered") uses on ``device``."""
    dev = torch.device(device).type
    if op not in ("masked_gate", "bn_gate", "concat_linear_head", "conv3x3_bordered"):
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
        if op == "bn_gate":
            if HAS_TRITON and triton_kernel_file("bn_gate"):
                return "triton (der_fast.kernels.bn_gate)"
            if HAS_TRITON:
                return "ref (PyTorch fallback; der_fast.kernels.bn_gate missing)"
            return "ref (PyTorch fallback; triton not installed)"
        if HAS_CUDA_EXT and torch.cuda.is_available():
            covered, why = _backend.cuda_ext_status()
            if not covered:
                return f"ref (PyTorch fallback; {why})"
        if HAS_CUDA_EXT:
            return "cuda (der_fast._C_cuda)"
        return f"ref (PyTorch fallback; der_fast._C_cuda missing: {CUDA_EXT_ERROR})"
    return "ref (PyTorch fallback)"


def conv3x3_isa() -> str:
    """The instruction set the compiled conv3x3_bordered kernel (and bordered_resnet) runs
    with: "avx512", "avx2", "baseline" (x86-64 without AVX), or "unavailable" without the
    compiled extension. ``DER_FAST_CONV_ISA=avx2|baseline`` (read when der_fast._C loads)
    caps it."""
    if not HAS_CPU_EXT or not op_defined("conv3x3_isa"):
        return "unavailable"
    return {0: "baseline", 1: "avx2", 2: "avx512"}.get(int(torch.ops.der_fast.conv3x3_isa()),
                                                          "unknown")


def _resolve_backend(op: str, backend: str, device: torch.device) -> str:
    """-> "op" (call the registered op) or "ref". Explicit requests are checked loudly. An op
    of der_fast._C_cuda on a GPU the build has no code for runs "ref" (see
    ``_backend.use_cuda_ext``)."""
    cuda_ext_op = device.type == "cuda" and HAS_CUDA_EXT and _OP_BACKENDS[op]["cuda"] == "cuda"
    if backend in ("auto", None):
        return "ref" if cuda_ext_op and not _backend.use_cuda_ext(device.index) else "op"
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
    if backend == "cuda" and cuda_ext_op and not _backend.cuda_ext_status(device.index)[0]:
        why = _backend.cuda_ext_status(device.index)[1]
        raise RuntimeError(f"der_fast.{op}: backend='cuda' was requested but {why}")
    if not available_backends()[backend]:
        why = {"cpp": CPU_EXT_ERROR, "cuda": CUDA_EXT_ERROR, "triton": "triton not installed"}[
            backend
        ]
        raise RuntimeError(
            f"der_fast.{op}: backend={backend!r} was requested but is not available ({why}). "
            "Rebuild der_fast (see setup.py / `python -m der_fast.info`) or use backend='auto'."
        )
    return "op"
