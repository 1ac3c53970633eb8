"""Providers: one DER model wrapped as reference, channels_last, torch.compile, the torch.func
ensemble or a FastDERNet plan, and the grid's rules for which provider runs which case."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from der_fast.reference import DERNet

from .constants import ALL_PROVIDERS
from .ensemble import FuncEnsemble
from .env import compile_policy, grid_name
from .grid import Case
from .models import reference_model


class ProviderUnavailable(RuntimeError):
    """The provider cannot run here (reason in the message): the case is skipped, not failed."""


@dataclass
class Built:
    """A provider ready to run: ``forward(x) -> DERNet's output dict``; ``model`` holds the
    trainable parameters and DERNet's mask API (set_s, sparsity_loss, ...)."""
    name: str
    model: nn.Module
    forward: Callable
    to_input: Callable
    info: dict


def _identity(x):
    return x


def _channels_last(x):
    return x.contiguous(memory_format=torch.channels_last)


FAST_PLANS = {"fast": "auto", "fast_loop": "loop", "fast_grouped": "grouped", "fast_cl": "auto"}


def fast_class():
    """FastDERNet, or raise ProviderUnavailable with the reason."""
    try:
        from der_fast.fast import FastDERNet
    except Exception as exc:  # noqa: BLE001 - any import problem means "not available"
        raise ProviderUnavailable(
            f"der_fast.fast.FastDERNet is not importable ({type(exc).__name__}: {exc})") from exc
    return FastDERNet


def build_provider(name: str, model: DERNet, device: torch.device) -> Built:
    """Wrap ``model`` (consumed: moved to ``device``, maybe converted) as provider ``name``."""
    model = model.to(device)
    if name == "reference":
        return Built(name, model, model, _identity, {})
    if name == "reference_cl":
        model = model.to(memory_format=torch.channels_last)
        return Built(name, model, model, _channels_last, {"memory_format": "channels_last"})
    if name == "compile":
        if not hasattr(torch, "compile"):
            raise ProviderUnavailable("torch.compile is not available in this torch")
        return Built(name, model, torch.compile(model), _identity,
                     {"compile": "inductor, mode=default"})
    if name == "func":
        ens = FuncEnsemble(model)
        return Built(name, model, ens, _identity, {"func": "stack_module_state+vmap"})
    if name in FAST_PLANS:
        cls = fast_class()
        plan = FAST_PLANS[name]
        try:
            fast = cls.from_reference(model, frozen_plan=plan)
        except TypeError:
            fast = cls.from_reference(model)
            if plan != "auto":
                if not hasattr(fast, "frozen_plan"):
                    raise ProviderUnavailable(f"FastDERNet has no frozen_plan={plan!r}")
                fast.frozen_plan = plan
        except ValueError as exc:
            raise ProviderUnavailable(f"FastDERNet rejects frozen_plan={plan!r}: {exc}")
        fast = fast.to(device)
        info = {"frozen_plan": plan}
        if name == "fast_cl":  # the opt-in trainable layout (looser than 2x the reference)
            fast.trainable_channels_last = True
            info["trainable"] = "channels_last"
        resolved = getattr(fast, "resolved_frozen_plan", None)
        if callable(resolved):
            info["frozen_plan_resolved"] = resolved(device)
        return Built(name, fast, fast, _identity, info)
    raise ValueError(f"unknown provider {name!r}; choose from {ALL_PROVIDERS}")


def plan_of(built: Built, grad_enabled: bool) -> Optional[str]:
    """FastDERNet.plan() as a short string (None for other providers)."""
    fn = getattr(built.model, "plan", None)
    if not callable(fn):
        return None
    try:
        p = fn(grad_enabled=grad_enabled)
    except TypeError:
        p = fn()
    if isinstance(p, dict):
        return "; ".join(f"{k}: {v}" for k, v in p.items())
    return str(p)


def skip_reason(case: Case, provider: str, device: torch.device) -> Optional[str]:
    """Why ``provider`` does not run ``case`` (None: it runs)."""
    g = grid_name()
    quick = g != "full"
    t_frozen = 0 if case.workload == "floor" else (case.t - 1 if case.workload in (
        "stage1", "epoch") else case.t)
    if provider == "compile":
        policy = compile_policy()
        if policy == "none":
            return "DER_FAST_BENCH_COMPILE=none"
        if policy == "small" and case.t > 2:
            return "DER_FAST_BENCH_COMPILE=small: torch.compile only for t <= 2"
        if policy == "quick" and not (case.backbone == "resnet32"
                                      and case.workload == "stage1" and case.t <= 2):
            return (f"{g} grid: torch.compile only for resnet32 stage1 t<=2 (a cold compile of "
                    f"forward + backward takes minutes per case on a shared 2-core CPU); "
                    f"DER_FAST_BENCH_COMPILE=all compiles every case")
    if quick and provider == "func" and t_frozen == 0:
        return f"{g} grid: no frozen extractor in this case, func runs the reference's code"
    if quick and provider in ("fast_loop", "fast_grouped"):
        if t_frozen < 2:
            return f"{g} grid: {t_frozen} frozen extractor(s), every frozen plan is the same"
        try:
            auto = build_provider("fast", reference_model(case), device).info.get(
                "frozen_plan_resolved")
        except ProviderUnavailable as exc:
            return str(exc)
        if auto == FAST_PLANS[provider]:
            return f"{g} grid: same plan as `fast` (auto resolves to {auto!r} on {device.type})"
    return None
