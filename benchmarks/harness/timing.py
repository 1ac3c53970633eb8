"""Timing the providers of one case outside pytest-benchmark (benchmarks/scaling.py,
compile_grid.py, case_order.py): every provider checked and warmed up, then timed in
interleaved rounds."""

from __future__ import annotations

import statistics
import time

import torch

from .check import prepare
from .grid import Case
from .isolation import fresh_case
from .providers import ProviderUnavailable


def stats(times: list) -> dict:
    """Median, quartiles and minimum of a list of seconds (and the list)."""
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return {"median": statistics.median(times), "q1": q[0], "q3": q[2], "min": min(times),
            "times": times}


def measure(case: Case, providers, device: torch.device, rounds: int,
            fresh: bool = True, strict: bool = True) -> dict:
    """{provider: timing} for one case. The case starts fresh (:func:`fresh_case`: a
    torch.compile provider compiles cold; ``fresh=False`` skips that, to show what is left
    over from earlier cases otherwise); every provider is prepared (checked against the
    reference, which is also its first call: the compile of torch.compile, recorded as
    ``compile_s``), warmed up by one step, then timed in interleaved rounds (p1, p2, p1, p2,
    ...) so that a change in the machine's load hits all of them alike. A provider that cannot
    run gives ``{"skipped": reason}``; ``strict=False``: see :func:`check.prepare`."""
    if fresh:
        fresh_case(device)
    ready, out = {}, {}
    for p in providers:
        try:
            wl, info = prepare(case, p, device, grid_skips=False, strict=strict)
        except ProviderUnavailable as exc:
            out[p] = {"skipped": str(exc)}
            continue
        wl.step()  # warm-up: optimizer state, caches
        ready[p] = (wl, info, [])
    for _ in range(rounds):
        for wl, _, times in ready.values():
            t0 = time.perf_counter()
            wl.step()  # synchronises on CUDA
            times.append(time.perf_counter() - t0)
    for p, (_, info, times) in ready.items():
        out[p] = dict(stats(times), params=info["params"],
                      check_max_rel_err=info["check_max_rel_err"],
                      first_call_s=info["first_call_s"])
        for k in ("compile_s", "check_failed"):
            if k in info:
                out[p][k] = info[k]
    return out
