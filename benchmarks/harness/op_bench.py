"""The run of an op benchmark under pytest-benchmark (bench_masked_gate.py, bench_bn_gate.py,
bench_concat_linear_head.py, bench_conv3x3_bordered.py): :func:`bench_op` names the case's
group (every provider of a case shares it, so benchmarks/conftest.py's ratio table lines them
up), records the case and the environment in ``extra_info`` and times the call;
:func:`assert_grads_close` for the check before it; and the cases at the mask points, where
both gate ops run (:func:`mask_point_cases`, :func:`bench_mask_point`).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import pytest
import torch

import der_fast
from der_fast import ops

from .env import sync

MASK_S = 5.0  # mask temperature mid-anneal
MASK_SHAPES = [  # (net, N, C, HW): the trainable extractor's mask points
    ("resnet32", 128, 16, 32),
    ("resnet32", 128, 32, 16),
    ("resnet32", 128, 64, 8),
    ("resnet18", 32, 64, 32),
    ("resnet18", 32, 128, 16),
    ("resnet18", 32, 256, 8),
    ("resnet18", 32, 512, 4),
]


def mask_shape_id(shape) -> str:
    """pytest id of a :data:`MASK_SHAPES` entry."""
    net, N, C, HW = shape
    return f"{net}-N{N}-C{C}-HW{HW}"


def mask_point_cases(variants, modes, providers) -> Callable:
    """Parametrizes a gate op's benchmark ``test(benchmark, shape, variant, mode, provider)``
    over :data:`MASK_SHAPES` x variants x modes x providers (ids in that order)."""
    def parametrize(test):
        test = pytest.mark.parametrize("shape", MASK_SHAPES, ids=mask_shape_id)(test)
        for name, values in (("variant", variants), ("mode", modes), ("provider", providers)):
            test = pytest.mark.parametrize(name, values)(test)
        return test
    return parametrize


def bench_mask_point(benchmark, op: str, provider: str, shape, variant: str, mode: str,
                     device: torch.device, forward: Callable[[], Any],
                     backward: Optional[Callable[[Any], Any]] = None) -> None:
    """:func:`bench_op` for a case of :func:`mask_point_cases`, grouped by op, mode, shape and
    variant."""
    net, N, C, HW = shape
    bench_op(benchmark, op, provider, f"{op} {mode} {net} N={N} C={C} HW={HW}x{HW} {variant}",
             device, forward, backward, mode=mode, variant=variant, net=net, shape=[N, C, HW, HW])


def assert_grads_close(grads, ref_grads, rtol: float, atol: float) -> None:
    """A provider's gradients equal the reference's, input by input (the message names the
    input's position)."""
    for i, (a, b) in enumerate(zip(grads, ref_grads)):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol,
                                   msg=lambda m, i=i: f"grad {i}: {m}")


def bench_op(benchmark, op: str, provider: str, group: str, device: torch.device,
             forward: Callable[[], Any], backward: Optional[Callable[[Any], Any]] = None,
             **case) -> None:
    """Time one provider of one op case: ``forward()`` under ``torch.no_grad``, or, with
    ``backward``, ``backward(forward())`` (the forward then records the graph), each call
    waiting for the device; one untimed call first (allocator, Triton compile). ``extra_info``
    gets op, provider, ``case`` (mode, shape, ...), the device, the implementation the op
    runs there (for the other providers their name) and the versions."""
    benchmark.group = group
    benchmark.extra_info.update(
        op=op,
        provider=provider,
        **case,
        device=str(device),
        dtype="float32",
        implementation=ops.implementation(op, device) if provider == "op" else provider,
        threads=torch.get_num_threads(),
        der_fast=der_fast.__version__,
        torch=torch.__version__,
    )

    def run():
        if backward is None:
            with torch.no_grad():
                forward()
        else:
            backward(forward())
        sync(device)

    run()
    benchmark(run)
