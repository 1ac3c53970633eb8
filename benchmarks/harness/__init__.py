"""The der_fast benchmark harness: the grid of cases, seeded DER models in a given state, the
providers (reference, channels_last, torch.compile, torch.func ensemble, FastDERNet plans), the
workloads (inference, stage-1 step, stage-2 step, floor, epoch), the equivalence check that
runs before any timing, and the peak-memory measurement; the run of the op benchmarks and the
report of a benchmark JSON.

Used by ``benchmarks/bench_model.py`` (pytest-benchmark), ``benchmarks/scaling.py`` and
``tests/test_bench_report.py`` as ``from benchmarks import harness``, with the repository root
on ``sys.path`` (the users put it there; importing this package appends it too, so der_fast
resolves to an installed copy first when there is one). Environment switches: ``env``.

* ``constants``: hyperparameters of the timed steps, backbones, workload/provider descriptions,
  the check's tolerance.
* ``env``: DER_FAST_BENCH* switches, the device, the environment recorded in the JSON.
* ``grid``: :class:`Case` and the quick / full / smoke grids.
* ``models``: seeded reference models per case, the case's batches.
* ``ensemble``: the torch.func ensemble of the frozen extractors (provider ``func``).
* ``providers``: :func:`build_provider`, which provider runs which case (:func:`skip_reason`).
* ``workloads``: :class:`Workload`, the timed step and the outputs it is checked on.
* ``check``: reference outputs, :func:`compare`, :func:`prepare` (build + check one case).
* ``peak_memory``: :func:`peak_memory_bytes`.
* ``isolation``: :func:`fresh_case` (run between cases), :func:`set_compile_threads`
  (in-process inductor compiles, set on import of this package).
* ``timing``: :func:`measure` (providers of one case in interleaved rounds), :func:`stats`.
* ``op_bench``: :func:`bench_op` (one provider of an op case under pytest-benchmark), the mask
  points' cases (imported by the op benchmarks, not re-exported here).
* ``report``: tables from a pytest-benchmark JSON (``python benchmarks/harness/report.py``;
  imported as ``from benchmarks.harness import report``).
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # pragma: no cover - depends on how we were started
    sys.path.append(str(ROOT))  # appended: an installed der_fast (run_gpu.sh) stays first

from .check import RefOutputs, compare, prepare, reference_outputs  # noqa: E402
from .constants import (ALL_PROVIDERS, BACKBONES, BACKBONES_CUDA, CHECK_ATOL,  # noqa: E402
                        CHECK_FACTOR, CLASSES_PER_TASK, COMPILE_GRID_DENSITIES,
                        COMPILE_GRID_PROVIDERS, COMPILE_GRID_TS, COMPILE_GRID_WORKLOADS,
                        EPOCH_BATCHES, LAMBDA_A, LAMBDA_S, LR,
                        MOMENTUM, PROVIDER_DOC, S_MAX, S_TRAIN, TEMPERATURE, WEIGHT_DECAY,
                        WORKLOAD_DOC, WORKLOADS)
from .ensemble import FuncEnsemble  # noqa: E402
from .env import (apply_threads, bench_device, compile_policy, configured_threads,  # noqa: E402
                  device_name, env_info, grid_name, interleaved_floor_enabled, memory_enabled,
                  rounds, selected_providers, sync)
from .grid import (Case, backbone_shape, compile_cases, extra_info, floor_case, grid,  # noqa: E402
                   providers_for)
from .isolation import fresh_case, set_compile_threads  # noqa: E402
from .models import build_reference, make_data, reference_model  # noqa: E402
from .peak_memory import MEMORY_DOC, peak_memory_bytes  # noqa: E402
from .providers import (FAST_PLANS, Built, ProviderUnavailable, build_provider,  # noqa: E402
                        fast_class, plan_of, skip_reason)
from .timing import measure, stats  # noqa: E402
from .workloads import Workload  # noqa: E402

set_compile_threads()  # in-process compiles unless TORCHINDUCTOR_COMPILE_THREADS is set

__all__ = [
    "ROOT",
    # constants
    "ALL_PROVIDERS", "BACKBONES", "BACKBONES_CUDA", "CHECK_ATOL", "CHECK_FACTOR",
    "CLASSES_PER_TASK", "COMPILE_GRID_DENSITIES", "COMPILE_GRID_PROVIDERS", "COMPILE_GRID_TS",
    "COMPILE_GRID_WORKLOADS", "EPOCH_BATCHES", "LAMBDA_A", "LAMBDA_S", "LR", "MOMENTUM",
    "PROVIDER_DOC", "S_MAX", "S_TRAIN", "TEMPERATURE", "WEIGHT_DECAY", "WORKLOAD_DOC",
    "WORKLOADS", "MEMORY_DOC", "FAST_PLANS",
    # environment
    "apply_threads", "bench_device", "compile_policy", "configured_threads", "device_name",
    "env_info", "grid_name", "interleaved_floor_enabled", "memory_enabled", "rounds",
    "selected_providers", "sync", "fresh_case", "set_compile_threads",
    # grid, models, providers, workloads, check, memory, timing
    "Case", "backbone_shape", "compile_cases", "extra_info", "floor_case", "grid",
    "providers_for", "measure", "stats",
    "build_reference", "make_data", "reference_model", "FuncEnsemble",
    "Built", "ProviderUnavailable", "build_provider", "fast_class", "plan_of", "skip_reason",
    "Workload", "RefOutputs", "compare", "prepare", "reference_outputs", "peak_memory_bytes",
]
