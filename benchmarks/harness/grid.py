"""The grid of benchmark cases: :class:`Case` (workload, backbone, t, density, batch, image
side) and the quick, full and smoke grids."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch

from .constants import (BACKBONES, BACKBONES_CUDA, CLASSES_PER_TASK, COMPILE_GRID_DENSITIES,
                        COMPILE_GRID_TS, COMPILE_GRID_WORKLOADS)
from .env import bench_device, env_info, grid_name, selected_providers


@dataclass(frozen=True)
class Case:
    workload: str
    backbone: str
    t: int
    density: float  # channel density of the frozen extractors (1.0 = unpruned)
    batch: int
    hw: int

    @property
    def id(self) -> str:
        d = "-" if self.workload == "floor" else f"d{int(round(self.density * 100))}"
        return f"{self.workload}-{self.backbone}-b{self.batch}-t{self.t}-{d}"

    @property
    def group(self) -> str:
        return self.id

    @property
    def n_classes(self) -> int:
        return CLASSES_PER_TASK * self.t


def backbone_shape(backbone: str, device: Optional[torch.device] = None) -> tuple:
    """(batch, image side) of a backbone's cases on ``device`` (default: the bench device)."""
    device = device or bench_device()
    return (BACKBONES_CUDA if device.type == "cuda" else BACKBONES)[backbone]


def _cases(workloads, backbone, ts, densities, batch=None, hw=None):
    b, s = backbone_shape(backbone)
    return [Case(w, backbone, t, d, batch or b, hw or s) for w in workloads for t in ts
            for d in densities]


def grid(name: Optional[str] = None) -> list:
    """The benchmark cases. ``quick`` (default) fits in about 10 minutes on a 2-core CPU;
    ``full`` is the whole grid of the issue (hours on a 2-core CPU, minutes on a GPU);
    ``compile``: resnet32 at every t and density of :func:`compile_cases`."""
    name = name or grid_name()
    if name == "compile":
        return compile_cases()
    if name == "smoke":
        cases = _cases(("floor",), "resnet32", (1,), (1.0,), batch=4, hw=16)
        cases += _cases(("infer", "stage1", "stage2", "epoch"), "resnet32", (3,), (0.3,),
                        batch=4, hw=16)
        return cases
    if name == "full":
        cases = []
        for bb in BACKBONES:
            cases += _cases(("floor",), bb, (1,), (1.0,))
            cases += _cases(("infer", "stage1", "stage2"), bb, (1, 2, 5, 10), (1.0, 0.3))
            cases += _cases(("epoch",), bb, (2, 10), (0.3,))
        return cases
    cases = _cases(("floor",), "resnet32", (1,), (1.0,))
    cases += _cases(("stage1",), "resnet32", (2, 5), (0.3,))
    cases += _cases(("stage1",), "resnet32", (5,), (1.0,))
    cases += _cases(("infer", "stage2"), "resnet32", (5,), (0.3,))
    cases += _cases(("floor",), "resnet18_cifar", (1,), (1.0,))
    cases += _cases(("stage1", "infer"), "resnet18_cifar", (5,), (0.3,))
    return cases


def compile_cases(workloads=COMPILE_GRID_WORKLOADS, ts=COMPILE_GRID_TS,
                  densities=COMPILE_GRID_DENSITIES, backbone: str = "resnet32") -> list:
    """The cases of the torch.compile comparison (DER_FAST_BENCH=compile and
    benchmarks/compile_grid.py), or a subset of them. Stage 1 at t = 1 has no frozen
    extractor, so the density does not matter there: one case, at 100 %."""
    cases = []
    for c in _cases(workloads, backbone, ts, densities):
        if c.workload == "stage1" and c.t == 1:
            c = replace(c, density=1.0)
        if c not in cases:
            cases.append(c)
    return cases


def providers_for(case: Case) -> tuple:
    """The providers of a case (DER_FAST_BENCH_PROVIDERS, default all). Cases a provider
    cannot or need not run are skipped inside the test with the reason (skip_reason)."""
    return selected_providers()


def floor_case(case: Case) -> Case:
    """The floor of a stage-1 case: one trainable extractor + head, same backbone and batch."""
    return Case("floor", case.backbone, 1, 1.0, case.batch, case.hw)


def extra_info(case: Case, provider: str, device: torch.device) -> dict:
    """What pytest-benchmark records with a case's timing (extra_info): the case and the
    environment."""
    d = {"provider": provider, "workload": case.workload, "backbone": case.backbone,
         "t": case.t, "density": None if case.workload == "floor" else case.density,
         "batch": case.batch, "hw": case.hw}
    d.update(env_info(device))
    return d
