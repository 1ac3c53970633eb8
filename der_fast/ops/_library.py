"""The der_fast operator library: the schemas of all der_fast ops, the compiled kernels, and
choosing a backend.

Defines every ``der_fast::`` schema (``SCHEMAS``) from Python, then imports der_fast._C (C++ CPU
kernels) and der_fast._C_cuda (CUDA C++ kernels) if they can be imported: these only register
kernels for the schemas defined here. ``CPU_EXT_OPS`` / ``CUDA_EXT_OPS`` record which ops they
gave kernels to, before the op modules register their PyTorch fallbacks for the others. Importing
this never fails because a compiled part is missing.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import torch

from .. import _backend

#: Every der_fast operator, by name: its schema. The C++ / CUDA / Triton and PyTorch kernels,
#: fake kernels and autograd formulas are registered for these (der_fast/ops/<op>.py, csrc/).
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
    # A whole folded extractor (der_fast/fast/run_bordered.py); C++ only (no fallback).
    "bordered_resnet": (
        "bordered_resnet(Tensor x, Tensor[] weights, Tensor[] biases, int[] conv_meta, "
        "int[] block_meta, Tensor[] sc_index, Tensor[] gates, Tensor? out_index, int out_dim, "
        "bool maxpool, int chunk) -> Tensor"
    ),
    # Which instruction set the compiled conv3x3_bordered kernel runs with; C++ only.
    "conv3x3_isa": "conv3x3_isa() -> int",
}

#: The der_fast library: defines the schemas, and the op modules register their Python kernels
#: with it. Defined before the compiled extensions are imported, which register kernels for it.
lib = torch.library.Library("der_fast", "DEF")
for _schema in SCHEMAS.values():
    lib.define(_schema)
del _schema


def _try_import(name: str) -> tuple[bool, str | None]:
    try:
        importlib.import_module(name)
        return True, None
    except (ImportError, OSError) as err:  # missing, or built against another torch
        return False, f"{type(err).__name__}: {err}"


#: der_fast._C (C++ CPU kernels) is importable.
HAS_CPU_EXT, CPU_EXT_ERROR = _try_import("der_fast._C")
#: der_fast._C_cuda (CUDA C++ kernels) is importable.
HAS_CUDA_EXT, CUDA_EXT_ERROR = (
    _try_import("der_fast._C_cuda") if torch.version.cuda else (False, "torch has no CUDA")
)
#: triton is installed (and torch has CUDA), so masked_gate uses the Triton kernels on CUDA.
HAS_TRITON = bool(torch.version.cuda) and importlib.util.find_spec("triton") is not None


def has_kernel(name: str, dispatch_key: str) -> bool:
    """Whether a kernel (compiled or Python) is registered for ``der_fast::<name>`` on
    ``dispatch_key`` ("CPU", "CUDA", ...)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"der_fast::{name}", dispatch_key)


# Read here, before the op modules register Python kernels. conv3x3_isa takes no tensor, so its
# kernel is registered for every backend at once (CompositeExplicitAutograd).
#: The ops der_fast._C registered a kernel for.
CPU_EXT_OPS = frozenset(
    name for name in SCHEMAS
    if has_kernel(name, "CPU") or has_kernel(name, "CompositeExplicitAutograd")
)
#: The ops der_fast._C_cuda registered a kernel for.
CUDA_EXT_OPS = frozenset(name for name in SCHEMAS if has_kernel(name, "CUDA"))


def _register_raising_backward(op: str, error: type[Exception], message: str) -> None:
    """Make differentiating ``der_fast::<op>`` raise ``error(message)``."""

    def backward(ctx, *grads):
        raise error(message)

    torch.library.register_autograd(
        f"der_fast::{op}", backward, setup_context=lambda ctx, inputs, output: None
    )


def register_autograd(opname: str, backward, setup_context) -> None:
    """The autograd formula of ``der_fast::<opname>`` (its backward calls
    ``der_fast::<opname>_backward``); differentiating that backward op (a second derivative)
    raises NotImplementedError."""
    torch.library.register_autograd(f"der_fast::{opname}", backward, setup_context=setup_context)
    _register_raising_backward(f"{opname}_backward", NotImplementedError,
                               f"der_fast.{opname}: double backward is not supported")


def register_no_backward(opname: str, hint: str = "") -> None:
    """Make differentiating the inference-only ``der_fast::<opname>`` raise RuntimeError
    (``hint`` ends the message)."""
    _register_raising_backward(opname, RuntimeError,
                               f"der_fast.{opname} is inference-only (FastDERNet's frozen "
                               f"extractors): it has no gradient{hint}")


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
        if op in CPU_EXT_OPS:
            return f"cpp (der_fast._C, {conv3x3_isa()})"
        return f"ref (PyTorch fallback; {_no_cpu_kernel_why()})"
    if dev == "cpu":
        if op in CPU_EXT_OPS:
            return "cpp (der_fast._C)"
        return f"ref (PyTorch fallback; {_no_cpu_kernel_why()})"
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


def _no_cpu_kernel_why() -> str:
    """Why an op has no kernel of der_fast._C."""
    if not HAS_CPU_EXT:
        return f"der_fast._C missing: {CPU_EXT_ERROR}"
    return "der_fast._C has no kernel for it: rebuild der_fast"


def conv3x3_isa() -> str:
    """The instruction set the compiled conv3x3_bordered kernel (and bordered_resnet) runs
    with: "avx512", "avx2", "baseline" (x86-64 without AVX), or "unavailable" without the
    compiled extension. ``DER_FAST_CONV_ISA=avx2|baseline`` (read when der_fast._C loads)
    caps it."""
    if "conv3x3_isa" not in CPU_EXT_OPS:
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
    if backend == "cpp" and HAS_CPU_EXT and op not in CPU_EXT_OPS:
        raise RuntimeError(f"der_fast.{op}: backend='cpp' was requested but "
                           f"{_no_cpu_kernel_why()}")
    if not available_backends()[backend]:
        why = {"cpp": CPU_EXT_ERROR, "cuda": CUDA_EXT_ERROR, "triton": "triton not installed"}[
            backend
        ]
        raise RuntimeError(
            f"der_fast.{op}: backend={backend!r} was requested but is not available ({why}). "
            "Rebuild der_fast (see setup.py / `python -m der_fast.info`) or use backend='auto'."
        )
    return "op"
