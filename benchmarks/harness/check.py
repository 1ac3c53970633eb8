"""The equivalence check run before any timing: the reference's outputs in float64 and float32,
the comparison of a provider's outputs against them, and :func:`prepare`, which builds a
provider for a case and checks it."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from der_fast import masks as M

from .constants import CHECK_ATOL, CHECK_FACTOR
from .grid import Case
from .models import lru_get, reference_model
from .providers import ProviderUnavailable, build_provider, plan_of, skip_reason
from .workloads import Workload


@dataclass
class RefOutputs:
    """The reference's check outputs in float64 (the truth) and in float32, NCHW and
    channels_last (its own rounding error)."""
    f64: dict
    f32: dict
    f32_cl: dict

    def noise(self, k: str) -> float:
        a = self.f64[k]
        return max(float((a - self.f32[k]).abs().max()), float((a - self.f32_cl[k]).abs().max()))


def compare(ref: RefOutputs, got: dict) -> dict:
    """Check every tensor of ``got`` against the float64 reference: ``max|got - ref64| <=
    CHECK_FACTOR * noise + CHECK_ATOL * max|ref64|`` per tensor, noise = max|ref32 - ref64|
    over the two fp32 reference runs (RefOutputs.noise). Returns
    {"err": worst provider error, "ref32_err": worst fp32-reference error} (both relative to
    the tensor's max |value|); raises AssertionError naming the tensor, the place and values
    of the worst mismatch."""
    if set(ref.f64) != set(got):
        raise AssertionError(f"outputs differ in keys: reference {sorted(ref.f64)}, "
                             f"provider {sorted(got)}")
    worst = worst32 = 0.0
    bad = []  # (error / allowed, message)
    for k, a in ref.f64.items():
        b = got[k].double()
        if a.shape != b.shape:
            raise AssertionError(f"{k}: shape {tuple(b.shape)} != reference {tuple(a.shape)}")
        if not bool(torch.isfinite(b).all()):
            raise AssertionError(f"{k}: provider output is not finite")
        if a.numel() == 0:
            continue
        scale = max(float(a.abs().max()), 1e-30)
        err = (a - b).abs()
        e_p = float(err.max())
        e_32 = ref.noise(k)
        allowed = CHECK_FACTOR * e_32 + CHECK_ATOL * scale
        worst, worst32 = max(worst, e_p / scale), max(worst32, e_32 / scale)
        if e_p > allowed:
            i = int(err.flatten().argmax())
            idx = tuple(int(v) for v in torch.unravel_index(torch.tensor(i), a.shape))
            bad.append((e_p / allowed, (
                f"{k}: differs from the float64 reference at {idx}: "
                f"{float(b.flatten()[i]):.6g} vs {float(a.flatten()[i]):.6g}; max error "
                f"{e_p:.3g} ({e_p / scale:.2g} of max|ref|) > allowed {allowed:.3g} = "
                f"{CHECK_FACTOR} x fp32 reference error {e_32:.3g} + {CHECK_ATOL} x max|ref| "
                f"{scale:.3g}")))
    if bad:
        bad.sort(key=lambda kv: -kv[0])
        lines = [m for _, m in bad[:3]]
        raise AssertionError(
            f"{len(bad)} of {len(ref.f64)} outputs/gradients fail the equivalence check "
            f"(worst {bad[0][0]:.1f}x the allowed error):\n  " + "\n  ".join(lines))
    return {"err": worst, "ref32_err": worst32}


_REF_OUT: dict = {}


def reference_outputs(case: Case, device: torch.device) -> RefOutputs:
    """The reference's check outputs for a case: float64, float32 NCHW and float32
    channels_last (computed once per case)."""
    def make():
        outs = []
        for name, dt in (("reference", torch.float64), ("reference", torch.float32),
                         ("reference_cl", torch.float32)):
            built = build_provider(name, reference_model(case).to(dt), device)
            outs.append(Workload(case, built, device, dtype=dt).check_outputs())
        return RefOutputs(*outs)

    return lru_get(_REF_OUT, (case, str(device)), make)


def prepare(case: Case, provider: str, device: torch.device, grid_skips: bool = True,
            strict: bool = True) -> tuple:
    """Build the provider for a case and run the equivalence check (which also warms it up,
    and compiles for torch.compile). Returns (workload, info dict). Raises
    ProviderUnavailable (skip) or AssertionError (wrong answer: the case fails).
    ``grid_skips=False`` ignores the grid's skip rules (skip_reason): the tests use it.
    ``strict=False`` records a failed check as ``info["check_failed"]`` instead of raising
    (benchmarks/case_order.py runs cases only for what they leave behind)."""
    reason = skip_reason(case, provider, device) if grid_skips else None
    if reason:
        raise ProviderUnavailable(reason)
    ref = reference_outputs(case, device)
    built = build_provider(provider, reference_model(case), device)
    wl = Workload(case, built, device)
    t0 = time.perf_counter()
    try:
        got = wl.check_outputs()
    except ProviderUnavailable:
        raise
    except Exception as exc:
        if provider == "compile":
            raise ProviderUnavailable(
                f"torch.compile failed here: {type(exc).__name__}: {str(exc)[:300]}") from exc
        raise
    first_call = time.perf_counter() - t0
    try:
        errs = compare(ref, got)
        failed = None
    except AssertionError as exc:
        if strict:
            raise
        errs, failed = {"err": float("nan"), "ref32_err": float("nan")}, str(exc).splitlines()[0]
    info = {"check_max_rel_err": errs["err"], "check_ref32_rel_err": errs["ref32_err"],
            "first_call_s": round(first_call, 3)}
    if failed:
        info["check_failed"] = failed
    if provider == "compile":
        info["compile_s"] = round(first_call, 3)
    info.update(built.info)
    plan = plan_of(built, grad_enabled=case.workload != "infer")
    if plan:
        info["plan"] = plan
    info["params"] = int(M.count_params(built.model))
    return wl, info
