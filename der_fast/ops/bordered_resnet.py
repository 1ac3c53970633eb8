"""``der_fast::bordered_resnet``: a whole folded extractor in one call (the compiled form of
der_fast.fast's bordered executor; inference only, CPU, float32).

Only the compiled extension has a kernel for it (csrc/conv3x3_bordered.cpp); there is no
PyTorch fallback: without it, der_fast.fast runs the same computation layer by layer from Python
(``run_bordered(..., executor=False)``). This module registers its fake kernel and its
no-gradient rule, and is the Python wrapper through which it is called.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._library import CPU_EXT_OPS, _no_cpu_kernel_why, register_no_backward

#: der_fast._C has the bordered_resnet kernel.
HAS_BORDERED_RESNET = "bordered_resnet" in CPU_EXT_OPS


@torch.library.register_fake("der_fast::bordered_resnet")
def _bordered_resnet_fake(x, weights, biases, conv_meta, block_meta, sc_index, gates,
                          out_index, out_dim, maxpool, chunk):
    return x.new_empty((x.shape[0], out_dim))


register_no_backward("bordered_resnet")


def bordered_resnet(
    x: Tensor,
    weights: list[Tensor],
    biases: list[Tensor],
    conv_meta: list[int],
    block_meta: list[int],
    sc_index: list[Tensor],
    gates: list[Tensor],
    out_index: Tensor | None,
    out_dim: int,
    maxpool: bool,
    chunk: int,
) -> Tensor:
    """Pooled features ``[N, out_dim]`` of a folded ResNet extractor run as one program.

    The program (built by ``der_fast.fast.run_bordered.bordered_program``): convs in the order
    stem, then per block conv1, conv2 [, shortcut conv], with ``weights[i]`` / ``biases[i]`` and
    ``conv_meta[4i:4i+4] = (stride, padding, groups, runs the conv3x3_bordered kernel)``;
    ``block_meta[2j:2j+2] = (shortcut kind 0 identity / 1 option A / 2 conv, shortcut
    stride)``, ``sc_index[j]`` the option-A gather index (empty otherwise), ``gates[j]`` the
    soft stream gate (empty for none); ``out_index`` gathers the pooled features into the
    unpruned width ``out_dim`` (``None``: identity); ``maxpool`` after the stem; ``chunk``
    images per pass (0: the whole batch). ``x``: ``[N, C_in, H, W]`` float32 CPU. Raises
    RuntimeError on an inconsistent program, or when the extension lacks the op.
    """
    if not HAS_BORDERED_RESNET:
        raise RuntimeError("der_fast.bordered_resnet has no PyTorch fallback and "
                           f"{_no_cpu_kernel_why()}")
    return torch.ops.der_fast.bordered_resnet(x, weights, biases, conv_meta, block_meta,
                                              sc_index, gates, out_index, out_dim, maxpool,
                                              chunk)
