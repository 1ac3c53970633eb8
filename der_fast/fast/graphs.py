"""CUDA graphs of the frozen path: the frozen extractors' forward captured once per input
shape, then replayed (one launch instead of one per conv, add and ReLU).

A :class:`FrozenGraph` owns a static input buffer and the output the capture produced; each
call copies the batch into the buffer, replays, and returns a clone of the output (the buffer
is overwritten by the next replay). FastDERNet keeps its graphs in its plan cache, so a model
change (``invalidate_plan``, a refolded extractor) or another batch shape captures anew.

All frozen graphs on a device allocate from one shared memory pool (``pool``): safe because
they replay one after the other on the stream of the caller, and each keeps its own output
alive, so no graph's replay writes memory another graph's output still uses.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

WARMUP_CALLS = 2  # on a side stream before capture: cuDNN / cuBLAS pick and cache algorithms

_POOLS: dict = {}  # device index -> graph memory pool handle


def available(x: torch.Tensor) -> bool:
    """Whether the frozen path for ``x`` can be captured: a CUDA tensor and no autograd."""
    return x.is_cuda and not (torch.is_grad_enabled() and x.requires_grad)


def pool(device: torch.device):
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _POOLS:
        _POOLS[index] = torch.cuda.graph_pool_handle()
    return _POOLS[index]


class FrozenGraph:
    """``run(x)`` captured for inputs shaped like ``x`` (same shape, dtype, device, strides).

    ``run`` must only launch device work on tensors it reads from its argument or holds
    (folded weights): no host synchronization, no allocation it keeps between calls."""

    def __init__(self, run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor):
        self.shape, self.stride, self.dtype = tuple(x.shape), x.stride(), x.dtype
        self.static_x = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
        self.static_x.copy_(x)
        side = torch.cuda.Stream(device=x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.no_grad(), torch.cuda.stream(side):
            for _ in range(WARMUP_CALLS):
                run(self.static_x)
        torch.cuda.current_stream(x.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(self.graph, pool=pool(x.device)):
            self.static_out = run(self.static_x)

    def matches(self, x: torch.Tensor) -> bool:
        return (tuple(x.shape) == self.shape and x.stride() == self.stride
                and x.dtype == self.dtype and x.device == self.static_x.device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.matches(x):
            raise ValueError(f"FrozenGraph captured for {self.shape} {self.dtype}, got "
                             f"{tuple(x.shape)} {x.dtype}")
        self.static_x.copy_(x)
        self.graph.replay()
        return self.static_out.clone()
