"""Peak memory of one call of a workload (CUDA allocator statistics, or the CPU profiler's
allocation events)."""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .env import sync


def _profiler_peak_bytes(fn: Callable) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = []  # (time, bytes allocated (+) or freed (-), allocator's running total)

    def walk(nodes):
        for node in nodes:
            ef = node.extra_fields
            if type(ef).__name__ == "_ExtraFields_Allocation" and ef.device.type == "cpu":
                events.append((node.start_time_ns, int(ef.alloc_size), int(ef.total_allocated)))
            walk(node.children)

    walk(prof.profiler.kineto_results.experimental_event_tree())
    if not events:
        return 0
    events.sort()
    # The running total is process-wide and drifts (tensors allocated under an earlier profiler
    # session and freed outside one are never subtracted): measure from this session's start.
    base = events[0][2] - events[0][1]
    return max(0, max(total for _, _, total in events) - base)


MEMORY_DOC = (
    "peak bytes of torch tensor allocations live during one steady-state call of the workload "
    "(after a warm-up call), above what was live when it started. CUDA: "
    "torch.cuda.max_memory_allocated() minus memory_allocated() before the call. CPU: from the "
    "torch profiler's allocation events (profile_memory=True) in a separate untimed call; it "
    "does not see oneDNN's private scratchpads, so it is the tensor working set, not the "
    "process RSS.")


def peak_memory_bytes(fn: Callable, device: torch.device) -> Optional[int]:
    """See MEMORY_DOC. None if it cannot be measured here."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return int(torch.cuda.max_memory_allocated(device) - before)
    try:
        return _profiler_peak_bytes(fn)
    except Exception:  # noqa: BLE001 - profiler internals differ between torch versions
        return None
