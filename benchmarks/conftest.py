"""Benchmark suite glue: repository root on sys.path, and a ratio table after the run.

For every benchmark group that has an ``op`` provider, the table gives the op's time divided by
each other provider's (``op/ref``, ``op/unfused``: below 1 means the op is faster), from the
medians and, in brackets, from the minima (less sensitive to other load on a shared machine).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or not getattr(session, "benchmarks", None):
        return
    groups: dict[str, dict[str, tuple[float, float]]] = {}
    for bench in session.benchmarks:
        provider = (bench.extra_info or {}).get("provider")
        if provider is None or not bench.stats:
            continue
        stats = getattr(bench.stats, "stats", bench.stats)  # Metadata or Stats, by version
        groups.setdefault(bench.group, {})[provider] = (stats.median, stats.min)
    rows = [(g, p) for g, p in sorted(groups.items()) if "op" in p and len(p) > 1]
    if not rows:
        return
    tr = terminalreporter
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
