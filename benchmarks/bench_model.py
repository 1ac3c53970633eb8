"""Whole-model benchmarks of DER: providers side by side per workload, backbone, t, density.

    pytest benchmarks/bench_model.py --benchmark-only --benchmark-json out.json
    python benchmarks/harness/report.py out.json

Providers (benchmarks/harness/constants.py: DEFAULT_PROVIDERS): DERNet eager, DERNet
channels_last, torch.compile(DERNet), a torch.func ensemble of the frozen extractors,
FastDERNet (each frozen plan); on request (DER_FAST_BENCH_PROVIDERS) also ``fast_cl``,
FastDERNet with its opt-in channels_last trainable extractor. Workloads: inference, a stage-1
step, a stage-2 step, the stage-1 floor (one trainable extractor + head) and, in the full grid,
a stage-1 epoch. Every provider's outputs (logits, aux logits, loss, gradients of every
trainable parameter) are checked against the reference before it is timed: a wrong answer fails
the case instead of producing a number.

DER_FAST_BENCH=quick (default, ~10 min on a 2-core CPU) | full | compile (torch.compile against
fast and the reference at t = 1, 2, 5, 10, opt-in: hours on a 2-core CPU; compile_grid.py runs
the same cases piecewise); see benchmarks/harness/env.py for the other switches. torch.compile's
compile time (its first call, from a cold start) is recorded apart from the step time, as
``extra_info["compile_s"]``. Cases a provider cannot run (not importable yet, compile skipped
by the quick grid, ...) are skipped with the reason, and the reasons go into the JSON
(``der_fast.skipped``) so the report lists them.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # appended: an installed der_fast (run_gpu.sh) stays first

from benchmarks import harness as H  # noqa: E402

DEVICE = H.bench_device()
CASES = H.grid()
PAIRS = [(case, p) for case in CASES for p in H.providers_for(case)]


class _JsonRecorder:
    """Puts the environment and the skipped cases (with reasons) into pytest-benchmark's JSON
    under ``der_fast`` (registered as a plugin by the session fixture below)."""

    def __init__(self):
        self.skipped = []
        self.failed = []

    @pytest.hookimpl(optionalhook=True)
    def pytest_benchmark_update_json(self, config, benchmarks, output_json):
        info = output_json.setdefault("der_fast", {})
        info["env"] = H.env_info(DEVICE)
        info["skipped"] = list(self.skipped)
        info["failed_checks"] = list(self.failed)
        info["workloads"] = H.WORKLOAD_DOC
        info["providers"] = H.PROVIDER_DOC
        info["memory"] = H.MEMORY_DOC


@pytest.fixture(scope="session")
def recorder(request):
    pm = request.config.pluginmanager
    rec = pm.get_plugin("der_fast_bench_model")
    if rec is None:
        rec = _JsonRecorder()
        pm.register(rec, "der_fast_bench_model")
    return rec


def _interleaved_floor(benchmark, case, provider):
    """A pytest-benchmark ``setup`` (untimed by it) that times one floor step of the same
    provider before every round of a stage-1 case: step and floor then see the same load.
    None if the provider cannot run the floor (the report then uses the floor case)."""
    try:
        # the grid's skip rules are for separate cases; here every provider gets its floor
        # (func and the fast plans run their floor code), except a cold compile (minutes)
        floor, _ = H.prepare(H.floor_case(case), provider, DEVICE,
                             grid_skips=provider == "compile")
    except (H.ProviderUnavailable, AssertionError) as exc:
        benchmark.extra_info["floor_interleaved_skipped"] = str(exc).split("\n")[0]
        return None
    floor.step()  # warm-up

    def setup():
        t0 = time.perf_counter()
        floor.step()  # synchronises on CUDA
        setup.times.append(time.perf_counter() - t0)

    setup.times = []
    return setup


@pytest.mark.parametrize("case,provider", PAIRS, ids=[f"{c.id}-{p}" for c, p in PAIRS])
def test_model(benchmark, recorder, case, provider):
    benchmark.group = case.group
    benchmark.extra_info.update(H.extra_info(case, provider, DEVICE))
    try:
        wl, info = H.prepare(case, provider, DEVICE)
    except H.ProviderUnavailable as exc:
        recorder.skipped.append({"case": case.id, "provider": provider, "reason": str(exc)})
        pytest.skip(str(exc))
    except AssertionError as exc:  # a wrong answer: not timed, the case fails
        recorder.failed.append({"case": case.id, "provider": provider, "reason": str(exc)})
        raise
    benchmark.extra_info.update(info)
    wl.step()  # warm-up (optimizer state, caches), so memory and timing see the steady state
    if H.memory_enabled():
        peak = H.peak_memory_bytes(wl.step, DEVICE)
        benchmark.extra_info["peak_mem_bytes"] = peak
    n, warmup = H.rounds()
    setup = None
    if case.workload == "stage1" and H.interleaved_floor_enabled():
        setup = _interleaved_floor(benchmark, case, provider)
    benchmark.pedantic(wl.step, setup=setup, rounds=n, iterations=1, warmup_rounds=warmup)
    if setup is not None:
        times = sorted(setup.times[warmup:] or setup.times)
        benchmark.extra_info["floor_interleaved_s"] = {
            "median": statistics.median(times), "min": times[0], "rounds": len(times)}
    if wl.last_loss is not None:  # a diverged step (NaN/inf) would time something else
        assert math.isfinite(float(wl.last_loss)), f"{provider}: non-finite loss while timing"
