"""Argument-check helpers shared by the ops (same messages and exception types as
csrc/common.h)."""

from __future__ import annotations

import torch
from torch import Tensor


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
