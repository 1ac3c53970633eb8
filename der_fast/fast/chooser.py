"""The measured frozen plan (``frozen_plan="measure"``; ``"auto"`` on CUDA): on the first
frozen forward for a key (device, dtype, input shape and strides, oneDNN fusion, the frozen
extractors' structure), run every candidate plan once, drop any whose output disagrees with
``loop``, time the rest and keep the fastest for the process.

Cost of a first time, per candidate: one checked call (also the warm-up; for a CUDA graph,
its capture) and 1 to ``TIMED_CALLS`` timed calls: timing stops once a candidate has used
``BUDGET_S`` or its first timed call is ``GIVE_UP`` times the best so far. Later calls with
the same key only look the winner up.

The timer is injectable (``timer``, or the module attribute ``TIMER`` that FastDERNet uses):
``timer(name, call) -> seconds`` must run ``call()`` once and say how long it took.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

TIMED_CALLS = 3
BUDGET_S = 0.02
GIVE_UP = 2.0
REFERENCE = "loop"

Timer = Callable[[str, Callable[[], torch.Tensor]], float]


def wall_timer(name: str, call: Callable[[], torch.Tensor]) -> float:
    """Seconds one ``call()`` takes, including the device work it queued (CUDA: synchronized
    before and after)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t0 = time.perf_counter()
    call()
    sync()
    return time.perf_counter() - t0


TIMER: Timer = wall_timer


@dataclass
class Choice:
    """The outcome of measuring one key: the winner, the best time of every candidate that
    matched the reference, and why the others were dropped."""
    key: tuple
    label: str  # the key in words
    chosen: str
    seconds: dict = field(default_factory=dict)
    dropped: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"for": self.label, "chosen": self.chosen,
                "timings_ms": {k: round(v * 1e3, 4) for k, v in self.seconds.items()},
                "dropped": dict(self.dropped)}


#: the process-wide choices: key -> Choice
CHOICES: dict = {}


def tolerance(dtype: torch.dtype, device: torch.device) -> float:
    """Largest accepted ``max|candidate - loop| / (1 + max|loop|)``. Plans differ in summation
    order (grouped convs, other conv algorithms); float32 convs on CUDA may use TF32."""
    if dtype == torch.float64:
        return 1e-9
    if dtype == torch.float32:
        tf32 = device.type == "cuda" and torch.backends.cudnn.allow_tf32
        return 5e-3 if tf32 else 1e-4
    return 5e-2  # bfloat16 / float16


def agrees(out: torch.Tensor, ref: torch.Tensor, tol: float) -> tuple[bool, str]:
    if out.shape != ref.shape or out.dtype != ref.dtype:
        return False, (f"shape/dtype {tuple(out.shape)} {out.dtype} != "
                       f"{tuple(ref.shape)} {ref.dtype}")
    err = (out.double() - ref.double()).abs().max().item() if out.numel() else 0.0
    scale = 1.0 + (ref.double().abs().max().item() if ref.numel() else 0.0)
    if not err <= tol * scale:  # also catches NaN
        return False, f"max |diff| {err:.3g} > {tol:g} * {scale:.3g}"
    return True, ""


def choose(key: tuple, candidates: dict, x: torch.Tensor, label: str = "",
           timer: Timer | None = None,
           cache: dict | None = None) -> tuple[Choice, torch.Tensor | None]:
    """The plan for ``key`` (``label``: the key in words): the cached choice, or measure
    ``candidates`` (name -> callable ``x -> features``; must contain ``REFERENCE``) on ``x``
    now.

    Returns (choice, output of this call: the winner's checked output when measured now,
    ``None`` on a cache hit, for the caller to run the winner)."""
    cache = CHOICES if cache is None else cache
    hit = cache.get(key)
    if hit is not None and hit.chosen in candidates:
        return hit, None
    timer = TIMER if timer is None else timer
    tol = tolerance(x.dtype, x.device)
    ref = candidates[REFERENCE](x)
    outs, seconds, dropped = {REFERENCE: ref}, {}, {}
    for name, run in candidates.items():
        if name != REFERENCE:
            try:
                out = run(x)
            except Exception as err:  # noqa: BLE001 - a candidate that cannot run is dropped
                dropped[name] = f"failed: {type(err).__name__}: {err}"
                continue
            ok, why = agrees(out, ref, tol)
            if not ok:
                dropped[name] = f"output differs from {REFERENCE}: {why}"
                continue
            outs[name] = out
        best = min(seconds.values(), default=float("inf"))
        times = []
        for _ in range(TIMED_CALLS):
            times.append(timer(name, lambda run=run: run(x)))
            if sum(times) >= BUDGET_S or times[0] >= GIVE_UP * best:
                break
        seconds[name] = min(times)
    for name, why in dropped.items():
        warnings.warn(f"der_fast frozen plan {name!r} dropped for {label or key}: {why}",
                      RuntimeWarning, stacklevel=3)
    chosen = min(seconds, key=seconds.get)
    choice = Choice(key, label, chosen, seconds, dropped)
    cache[key] = choice
    return choice, outs[chosen]

