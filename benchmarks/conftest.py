"""Benchmark suite glue: repository root on sys.path, isolation between cases, and two tables
after the run.

Every case starts fresh (benchmarks/harness/isolation.py: no compile workers, no compiled
graphs or garbage from earlier cases, the configured thread count); the harness is imported
here, before any benchmark module, so inductor compiles in-process from the first case on.

Tables: for every benchmark group that has an ``op`` provider, the op's time divided by each
other provider's (``op/ref``, ``op/unfused``: below 1 means the op is faster), from the medians
and, in brackets, from the minima (less sensitive to other load on a shared machine); and for
the model workloads (bench_model.py) the median of every provider per workload and t with its
speedup over the reference and over torch.compile (harness/report.py's format_summary).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# The repository root goes last on sys.path: `benchmarks` is imported from it, `der_fast` is
# the installed package with its compiled kernels (`python -m pytest` from a checkout would
# otherwise time the source tree's PyTorch fallbacks).
ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT] + [str(ROOT)]

from benchmarks import harness as H  # noqa: E402
from benchmarks.harness import report  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_case():
    """Each case starts with nothing left over from the earlier ones."""
    H.fresh_case(H.bench_device())
    yield


def _session_benchmarks(config) -> list:
    session = getattr(config, "_benchmarksession", None)
    if session is None:
        return []
    return [b for b in getattr(session, "benchmarks", None) or [] if b.stats]


def _op_ratios(tr, benchmarks) -> None:
    groups: dict[str, dict[str, tuple[float, float]]] = {}
    for bench in benchmarks:
        provider = (bench.extra_info or {}).get("provider")
        if provider is None:
            continue
        stats = getattr(bench.stats, "stats", bench.stats)  # Metadata or Stats, by version
        groups.setdefault(bench.group, {})[provider] = (stats.median, stats.min)
    rows = [(g, p) for g, p in sorted(groups.items()) if "op" in p and len(p) > 1]
    if not rows:
        return
    tr.section("der_fast op ratios: op time / provider time, median [min]; < 1: op is faster")
    others = sorted({k for _, p in rows for k in p if k != "op"})
    tr.write_line(f"{'group':<72} {'op ms':>8} " + " ".join(f"{'op/' + o:>16}" for o in others))
    for group, p in rows:
        cells = []
        for o in others:
            if o in p:
                cells.append(f"{p['op'][0] / p[o][0]:>6.2f} [{p['op'][1] / p[o][1]:>5.2f}]   ")
            else:
                cells.append(f"{'-':>16}")
        tr.write_line(f"{group:<72} {p['op'][0] * 1e3:>8.3f} " + " ".join(cells))


def _model_summary(tr, benchmarks) -> None:
    records = [b.as_dict(include_data=False) for b in benchmarks]
    results, _ = report.load({"benchmarks": records})
    text = report.format_summary(results)
    if text:
        tr.section("der_fast model workloads: median ms per provider, speedup over the "
                   "reference (b) and torch.compile (c)")
        for line in text.splitlines():
            tr.write_line(line)


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's own tables: the run ends with ours
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    benchmarks = _session_benchmarks(config)
    if benchmarks:
        _op_ratios(terminalreporter, benchmarks)
        _model_summary(terminalreporter, benchmarks)
