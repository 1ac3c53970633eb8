"""Environment switches of the benchmark suite, the device, and the environment recorded in the
JSON.

Environment:
  DER_FAST_BENCH=quick|full|smoke|compile  grid (default quick: about 10 minutes on a 2-core
                                    CPU; smoke: tiny shapes, checks the plumbing in a minute;
                                    compile: resnet32 infer/stage1/stage2 at t = 1, 2, 5, 10,
                                    full width and pruned, torch.compile in every case: hours
                                    on a 2-core CPU, opt-in)
  DER_FAST_BENCH_DEVICE=auto|cpu|cuda   device (auto: cuda when available)
  DER_FAST_BENCH_PROVIDERS=a,b,...  run only these providers (default: all)
  DER_FAST_BENCH_ROUNDS=N           timed rounds per case (default: 5 quick, 7 full/compile)
  DER_FAST_BENCH_MEMORY=0|1         measure peak memory per case (default 1)
  DER_FAST_BENCH_COMPILE=auto|all|small|quick|none   which cases torch.compile runs (quick:
                                    resnet32 stage1 t<=2 only; small: t<=2; auto: quick for the
                                    quick and smoke grids, all for the full and compile grids)
  DER_FAST_BENCH_FLOOR=0|1          time the floor step between the rounds of every stage-1
                                    case (default 1), so step / floor compares runs made at
                                    the same time (the machine's load drifts between cases)
  DER_FAST_BENCH_THREADS=N          torch intra-op threads (default: torch's default; reset
                                    to this before every case). On a
                                    CPU shared with other busy processes, 1 thread gives far
                                    steadier numbers (a parallel region waits for its slowest
                                    thread).
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

import der_fast

from .constants import (ALL_PROVIDERS, CHECK_ATOL, CHECK_FACTOR, COMPILE_GRID_PROVIDERS,
                        COMPILE_THREADS_ENV, DEFAULT_PROVIDERS)

GRIDS = ("quick", "full", "smoke", "compile")
# torch's intra-op thread count when the harness was imported: what "the configured value" is
# without DER_FAST_BENCH_THREADS
_TORCH_DEFAULT_THREADS = torch.get_num_threads()


def grid_name() -> str:
    g = os.environ.get("DER_FAST_BENCH", "quick").strip().lower() or "quick"
    if g not in GRIDS:
        raise ValueError(f"DER_FAST_BENCH must be one of {', '.join(GRIDS)}, got {g!r}")
    return g


def bench_device() -> torch.device:
    d = os.environ.get("DER_FAST_BENCH_DEVICE", "auto").strip().lower() or "auto"
    if d == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(d)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("DER_FAST_BENCH_DEVICE=cuda but CUDA is not available")
    return dev


def rounds() -> tuple[int, int]:
    """(timed rounds, warm-up rounds) per case."""
    n = os.environ.get("DER_FAST_BENCH_ROUNDS")
    if n:
        return max(1, int(n)), 1
    return (7, 1) if grid_name() in ("full", "compile") else (5, 0)


def memory_enabled() -> bool:
    return os.environ.get("DER_FAST_BENCH_MEMORY", "1") != "0"


def selected_providers() -> tuple:
    """DER_FAST_BENCH_PROVIDERS, else the grid's default providers."""
    env = os.environ.get("DER_FAST_BENCH_PROVIDERS", "").strip()
    if not env:
        return COMPILE_GRID_PROVIDERS if grid_name() == "compile" else DEFAULT_PROVIDERS
    names = tuple(p.strip() for p in env.split(",") if p.strip())
    bad = [p for p in names if p not in ALL_PROVIDERS]
    if bad:
        raise ValueError(f"unknown providers {bad}; choose from {ALL_PROVIDERS}")
    return names


def compile_policy() -> str:
    """DER_FAST_BENCH_COMPILE, with ``auto`` resolved (quick for the quick and smoke grids, all
    for the full and compile grids)."""
    policy = os.environ.get("DER_FAST_BENCH_COMPILE", "auto").strip().lower() or "auto"
    if policy not in ("auto", "all", "small", "quick", "none"):
        raise ValueError(f"DER_FAST_BENCH_COMPILE must be auto, all, small, quick or none, "
                         f"got {policy!r}")
    if policy == "auto":
        policy = "all" if grid_name() in ("full", "compile") else "quick"
    return policy


def interleaved_floor_enabled() -> bool:
    return os.environ.get("DER_FAST_BENCH_FLOOR", "1") != "0"


def configured_threads() -> int:
    """DER_FAST_BENCH_THREADS, else torch's default thread count."""
    n = os.environ.get("DER_FAST_BENCH_THREADS", "").strip()
    return max(1, int(n)) if n else _TORCH_DEFAULT_THREADS


def apply_threads() -> None:
    """Set torch's intra-op threads to the configured count (a case may have changed it)."""
    if torch.get_num_threads() != configured_threads():
        torch.set_num_threads(configured_threads())


apply_threads()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} cpus, {torch.get_num_threads()} torch threads)"


def env_info(device: torch.device) -> dict:
    return {"device": str(device), "device_name": device_name(device),
            "torch": torch.__version__, "der_fast": der_fast.__version__,
            "python": platform.python_version(), "grid": grid_name(),
            "threads": torch.get_num_threads(),
            "compile_threads": os.environ.get(COMPILE_THREADS_ENV, "torch default"),
            "tf32": bool(device.type == "cuda" and torch.backends.cudnn.allow_tf32),
            "check": f"max|provider - ref64| <= {CHECK_FACTOR} x max|ref32 - ref64| (worse of "
                     f"NCHW / channels_last fp32 reference) + {CHECK_ATOL} x max|ref64|, per "
                     f"output and gradient",
            "der_fast_path": str(Path(der_fast.__file__).parent)}


def sync(device: torch.device) -> None:
    """Wait for the device (CUDA kernels are asynchronous: time them to completion)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
