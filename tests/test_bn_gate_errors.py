"""der_fast.bn_gate's errors: bad inputs to the raw op (the C++ checks and the Python ones of
the fake kernel / fallback say the same), to the nn.BatchNorm2d wrapper, and double backward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from der_fast import ops
from helpers import bn_gate_data, node_generator, random_bn

pytestmark = pytest.mark.usefixtures("one_thread")

S = 2.5


def _ok_args(gen):
    z, e, r, _ = bn_gate_data(gen, (2, 5, 3, 3), "contiguous", True, True, torch.float32)
    w, b = torch.rand(5, generator=gen) + 0.5, torch.randn(5, generator=gen)
    rm, rv = torch.randn(5, generator=gen), torch.rand(5, generator=gen) + 0.5
    return dict(z=z, weight=w, bias=b, mean_in=rm, var_in=rv, e=e, residual=r)


@pytest.mark.parametrize(
    "case,exc,pattern",
    [
        ("rank3", ValueError, r"z must be 4-D \[N, C, H, W\], got a 3-D tensor"),
        ("int_z", TypeError, r"z must be a floating point tensor"),
        ("weight_channels", ValueError, r"weight has 4 channels but z has C=5"),
        ("bias_dtype", TypeError, r"bias has dtype torch.float64 but z has dtype torch.float32"),
        ("e_channels", ValueError, r"e has 6 channels but z has C=5"),
        ("var_rank", ValueError, r"var_in must be 1-D"),
        ("no_running", ValueError, r"mean_in and var_in \(the running statistics\) are required"),
        ("residual_shape", ValueError,
         r"residual has shape \[2, 5, 3, 4\] but z has shape \[2, 5, 3, 3\]"),
        ("residual_dtype", TypeError, r"residual has dtype"),
        ("e_device", ValueError, r"e is on device meta but z is on device cpu"),
    ],
)
def test_bad_input_errors(request, case, exc, pattern):
    a = _ok_args(node_generator(request))
    training = False
    if case == "rank3":
        a["z"] = a["z"][0]
    elif case == "int_z":
        a["z"] = a["z"].to(torch.int32)
    elif case == "weight_channels":
        a["weight"] = a["weight"][:4]
    elif case == "bias_dtype":
        a["bias"] = a["bias"].double()
    elif case == "e_channels":
        a["e"] = torch.randn(6)
    elif case == "var_rank":
        a["var_in"] = a["var_in"][None]
    elif case == "no_running":
        a["mean_in"] = None
    elif case == "residual_shape":
        a["residual"] = torch.randn(2, 5, 3, 4)
    elif case == "residual_dtype":
        a["residual"] = a["residual"].double()
    elif case == "e_device":
        a["e"] = torch.empty(5, device="meta")
    with pytest.raises(exc, match=pattern):
        torch.ops.der_fast.bn_gate(a["z"], a["weight"], a["bias"], a["mean_in"], a["var_in"],
                                   a["e"], S, a["residual"], training, 1e-5, True)
    # the Python checks (fake kernel, PyTorch fallback) say the same as the C++ ones
    with pytest.raises(exc, match=pattern):
        ops._check_bn_gate(a["z"], a["weight"], a["bias"], a["mean_in"], a["var_in"], a["e"],
                           a["residual"], training)


def test_wrapper_errors(request):
    gen = node_generator(request)
    z, e, r, _ = bn_gate_data(gen, (2, 5, 3, 3), "contiguous", True, True, torch.float32)
    with pytest.raises(ValueError, match=r"the BatchNorm has 4 channels but z has C=5"):
        ops.bn_gate(z, nn.BatchNorm2d(4), e, S, r)
    with pytest.raises(ValueError, match=r"z must be 4-D"):
        ops.bn_gate(z[0], nn.BatchNorm2d(5), e, S, r)
    with pytest.raises(TypeError, match=r"weight has dtype torch.float64"):
        ops.bn_gate(z, nn.BatchNorm2d(5).double(), e, S, r)
    with pytest.raises(ValueError, match=r"residual has shape"):
        ops.bn_gate(z, nn.BatchNorm2d(5), e, S, r[:, :, :2])
    with pytest.raises(RuntimeError, match="triton"):  # triton is the CUDA implementation
        ops.bn_gate(z, nn.BatchNorm2d(5), e, S, r, backend="triton")


def test_double_backward_raises(request):
    gen = node_generator(request)
    z, e, r, gy = bn_gate_data(gen, (2, 3, 4, 4), "contiguous", True, True)
    z.requires_grad_(True)
    y = ops.bn_gate(z, random_bn(3, gen), e, S, r)
    (gz,) = torch.autograd.grad(y, [z], gy, create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward"):
        gz.sum().backward()
