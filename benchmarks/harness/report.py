"""Readable tables from a pytest-benchmark JSON of the der_fast suite.

    python benchmarks/harness/report.py FILE.json [FILE2.json ...] [--fast fast]
                                        [--stat median|min] [--out REPORT.md]

Prints markdown:

* **speedup of the fast provider over each other provider**, per workload, backbone, batch,
  t and frozen-extractor density: ``speedup = provider median / fast median``, with a spread
  ``[provider q1 / fast q3, provider q3 / fast q1]`` from the interquartile ranges (a ratio
  whose spread straddles 1.0 is not a measured difference);
* **median times** (ms) with the IQR as a percentage of the median;
* **share of the floor**: a stage-1 step cannot cost less than a forward + backward of the one
  trainable extractor and the head; ``step median / floor median`` of the same provider
  (backbone, batch, image size; the floor timed between the step's rounds when the suite did
  so) says how much the t-1 frozen extractors still cost;
* **peak memory** per case (what it measures is written in the JSON, ``der_fast.memory``);
* **parameters** as t grows, the fast plans used, and every skipped case with its reason.

``--stat min`` takes every ratio and time from the fastest round instead of the median (the
spread is then [other min / fast median, other median / fast min]): on a machine shared with
other busy processes the fastest round is the least disturbed one.

Standard library only (run as a script, it imports nothing else of the harness): reads the
JSON written by ``pytest benchmarks/ --benchmark-only --benchmark-json FILE.json``
(benchmarks/bench_model.py puts provider, workload, backbone, t, density, ... into each
benchmark's ``extra_info``).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

__all__ = ["Result", "load", "speedup", "ratio_table", "floor_shares", "format_report",
           "format_summary", "main"]

WORKLOAD_ORDER = ("infer", "stage1", "stage2", "epoch", "floor")
PROVIDER_ORDER = ("fast", "fast_loop", "fast_grouped", "reference", "reference_cl", "compile",
                  "func")


@dataclass(frozen=True)
class Result:
    provider: str
    workload: str
    backbone: str
    batch: int
    hw: int
    t: int
    density: Optional[float]
    median: float  # seconds
    q1: float
    q3: float
    mean: float = float("nan")
    stddev: float = float("nan")
    rounds: int = 0
    peak_mem: Optional[int] = None  # bytes
    params: Optional[int] = None
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def key(self) -> tuple:
        """The case (everything but the provider)."""
        return (self.workload, self.backbone, self.batch, self.hw, self.t, self.density)

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1


def _order(seq, value) -> int:
    return seq.index(value) if value in seq else len(seq)


def case_sort_key(key: tuple) -> tuple:
    w, bb, b, hw, t, d = key
    return (_order(WORKLOAD_ORDER, w), bb, b, hw, t, -(d if d is not None else 2.0))


def provider_sort_key(p: str) -> tuple:
    return (_order(PROVIDER_ORDER, p), p)


def case_label(key: tuple) -> str:
    w, bb, b, hw, t, d = key
    dens = "-" if d is None else f"{round(d * 100):d}%"
    return f"| {w} | {bb} b{b} {hw}px | {t} | {dens} "


def merge(datas: list) -> dict:
    """Several runs' JSON as one (benchmarks, skipped and failed cases concatenated; the
    environment of the first)."""
    if len(datas) == 1:
        return datas[0]
    out = dict(datas[0])
    out["benchmarks"] = [b for d in datas for b in d.get("benchmarks", [])]
    meta = dict(datas[0].get("der_fast", {}))
    for k in ("skipped", "failed_checks"):
        meta[k] = [s for d in datas for s in d.get("der_fast", {}).get(k, [])]
    out["der_fast"] = meta
    return out


def load(src, stat: str = "median") -> tuple:
    """(results, the JSON dict) from a path, an already parsed dict, or a list of those (merged).
    Benchmarks without the suite's extra_info (another suite's) are ignored. ``stat="min"``:
    the result's ``median`` is the fastest round and its quartiles are [min, median]."""
    if stat not in ("median", "min"):
        raise ValueError(f"stat must be median or min, got {stat!r}")
    if isinstance(src, (list, tuple)):
        data = merge([load(s)[1] for s in src])
    elif isinstance(src, dict):
        data = src
    else:
        data = json.loads(Path(src).read_text())
    out = []
    for b in data.get("benchmarks", []):
        ex = b.get("extra_info") or {}
        if "provider" not in ex or "workload" not in ex:
            continue
        st = b["stats"]
        d = ex.get("density")
        med = float(st["median"])
        q1, q3 = float(st.get("q1", med)), float(st.get("q3", med))
        if stat == "min":
            med, q1, q3 = float(st.get("min", med)), float(st.get("min", med)), med
        out.append(Result(
            provider=ex["provider"], workload=ex["workload"], backbone=ex.get("backbone", "?"),
            batch=int(ex.get("batch", 0)), hw=int(ex.get("hw", 0)), t=int(ex.get("t", 0)),
            density=None if d is None else float(d), median=med, q1=q1, q3=q3,
            mean=float(st.get("mean", float("nan"))),
            stddev=float(st.get("stddev", float("nan"))), rounds=int(st.get("rounds", 0)),
            peak_mem=ex.get("peak_mem_bytes"), params=ex.get("params"), extra=ex))
    return out, data


def speedup(other: Result, fast: Result) -> tuple:
    """(ratio, low, high): ``other.median / fast.median`` and the spread from the quartiles:
    ``[other.q1 / fast.q3, other.q3 / fast.q1]``."""
    if fast.median <= 0:
        raise ValueError("fast median must be > 0")
    ratio = other.median / fast.median
    lo = other.q1 / fast.q3 if fast.q3 > 0 else float("nan")
    hi = other.q3 / fast.q1 if fast.q1 > 0 else float("inf")
    return ratio, lo, hi


def _by_case(results) -> dict:
    cases: dict = {}
    for r in results:
        cases.setdefault(r.key, {})[r.provider] = r
    return dict(sorted(cases.items(), key=lambda kv: case_sort_key(kv[0])))


def providers_in(results) -> list:
    return sorted({r.provider for r in results}, key=provider_sort_key)


def ratio_table(results, fast: str = "fast") -> list:
    """One row per case that has the ``fast`` provider: ``(key, fast_result, {provider:
    (ratio, lo, hi)})`` for every other provider measured in that case."""
    rows = []
    for key, provs in _by_case(results).items():
        f = provs.get(fast)
        if f is None:
            continue
        rows.append((key, f, {p: speedup(r, f) for p, r in provs.items() if p != fast}))
    return rows


def floor_shares(results, stat: str = "median") -> list:
    """For every stage-1 case: ``(key, {provider: (share, source)})`` where share = step time /
    floor time. The floor is, by preference: the same provider's floor timed between the
    rounds of that very case (``extra_info["floor_interleaved_s"]``, source ``"interleaved"``),
    the same provider's ``floor`` case for that backbone, batch and image size (source: the
    provider), or the reference's floor case (source ``"reference"``)."""
    floors = {(r.backbone, r.batch, r.hw, r.provider): r for r in results if r.workload == "floor"}
    rows = []
    for key, provs in _by_case(results).items():
        if key[0] != "stage1":
            continue
        _, bb, b, hw, _, _ = key
        cells = {}
        for p, r in provs.items():
            inter = r.extra.get("floor_interleaved_s") or {}
            if inter.get(stat, 0) > 0:
                cells[p] = (r.median / inter[stat], "interleaved")
                continue
            fl = floors.get((bb, b, hw, p)) or floors.get((bb, b, hw, "reference"))
            if fl is not None and fl.median > 0:
                cells[p] = (r.median / fl.median, fl.provider)
        rows.append((key, cells))
    return rows


# ------------------------------------------------------------------------------ formatting
def _ms(s: float) -> str:
    ms = s * 1e3
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 1 else f"{ms:.3f}"


def _ratio_cell(r: tuple) -> str:
    ratio, lo, hi = r
    return f"{ratio:.2f}x ({lo:.2f}-{hi:.2f})"


HEAD_COLS = "| workload | backbone | t | density "


def _table(cols: list, rows: list) -> list:
    head = HEAD_COLS + "".join(f"| {c} " for c in cols) + "|"
    sep = "|---|---|---:|---:" + "|---:" * len(cols) + "|"
    return [head, sep] + rows


def format_ratio_table(results, fast: str = "fast") -> str:
    rows = ratio_table(results, fast)
    if not rows:
        return f"(no case has the `{fast}` provider: no ratios)"
    others = [p for p in providers_in(results) if p != fast]
    lines = []
    for key, f, cells in rows:
        line = case_label(key) + f"| {_ms(f.median)} ms "
        line += "".join(f"| {_ratio_cell(cells[p])} " if p in cells else "| - " for p in others)
        lines.append(line + "|")
    return "\n".join(_table([f"{fast} (time)"] + [f"{p}/{fast}" for p in others], lines))


def _provider_table(results, cell) -> str:
    """One row per case, one column per provider: ``cell(result)``, ``-`` where the provider
    has no result for the case (or ``cell`` returns None)."""
    provs = providers_in(results)
    lines = []
    for key, cases in _by_case(results).items():
        texts = [cell(cases[p]) if p in cases else None for p in provs]
        lines.append(case_label(key) + "".join(f"| {'-' if t is None else t} " for t in texts)
                     + "|")
    return "\n".join(_table(provs, lines))


def _time_cell(r: Result) -> str:
    spread = 100.0 * r.iqr / r.median if r.median > 0 else float("nan")
    return f"{_ms(r.median)} ±{spread:.0f}%"


def format_time_table(results) -> str:
    return _provider_table(results, _time_cell)


def format_floor_table(results, stat: str = "median") -> str:
    rows = floor_shares(results, stat)
    if not rows:
        return "(no stage-1 cases)"
    provs = providers_in(results)
    lines = []
    for key, cells in rows:
        out = []
        for p in provs:
            if p in cells:
                share, src = cells[p]
                mark = "" if src == "interleaved" else "†" if src == p else "*"
                out.append(f"| {share:.2f}{mark} ")
            else:
                out.append("| - ")
        lines.append(case_label(key) + "".join(out) + "|")
    return "\n".join(_table(provs, lines))


def _memory_cell(r: Result) -> Optional[str]:
    if r.peak_mem is None:
        return None
    mib = r.peak_mem / 2 ** 20
    return f"{mib:.1f}" if mib < 10 else f"{mib:.0f}"


def format_memory_table(results) -> str:
    if not any(r.peak_mem is not None for r in results):
        return "(no peak memory recorded)"
    return _provider_table(results, _memory_cell)


def format_params_table(results, fast: str = "fast") -> str:
    rows = {}
    for r in results:
        if r.params is None or r.workload not in ("stage1", "infer"):
            continue
        rows.setdefault((r.workload, r.backbone, r.density, r.t), r.params)
    if not rows:
        return "(no parameter counts recorded)"
    lines = ["| workload | backbone | density | t | parameters |", "|---|---|---:|---:|---:|"]
    for (w, bb, d, t), n in sorted(rows.items(), key=lambda kv: (
            _order(WORKLOAD_ORDER, kv[0][0]), kv[0][1], -(kv[0][2] or 0), kv[0][3])):
        dens = "-" if d is None else f"{round(d * 100)}%"
        lines.append(f"| {w} | {bb} | {dens} | {t} | {n:,} |")
    return "\n".join(lines)


def _summary_cell(r: Result, base: Optional[Result], compiled: Optional[Result]) -> str:
    """``median ms [b ratio | c ratio]``: the speedups over the baseline and the compiled
    provider (their median / this median), each where measured and not this provider."""
    marks = [f"{tag} {other.median / r.median:.2f}" for tag, other in (("b", base),
             ("c", compiled)) if other is not None and other is not r and r.median > 0]
    return _ms(r.median) + (f" [{' | '.join(marks)}]" if marks else "")


def format_summary(results, baseline: str = "reference", compiled: str = "compile") -> str:
    """A plain-text table for the end of a benchmark run: one row per case (workload,
    backbone, batch, t, density), the median ms of every provider, its speedup over
    ``baseline`` (``b``: baseline median / its median) and over ``compiled`` (``c``), and the
    compiled provider's compile time (first call, s). Empty when there are no results."""
    cases = _by_case(results)
    if not cases:
        return ""
    provs = providers_in(results)  # the baseline and the compiled provider first
    provs = [p for p in (baseline, compiled) if p in provs] + \
        [p for p in provs if p not in (baseline, compiled)]
    comp = any(r.extra.get("compile_s") is not None for r in results)
    head = ["workload", "backbone", "t", "density"] + [f"{p} ms" for p in provs]
    head += ["compile s"] if comp else []
    rows = [head]
    for key, by in cases.items():
        w, bb, b, hw, t, d = key
        row = [w, f"{bb} b{b} {hw}px", str(t), "-" if d is None else f"{round(d * 100)}%"]
        row += [_summary_cell(by[p], by.get(baseline), by.get(compiled)) if p in by else "-"
                for p in provs]
        if comp:
            cs = by[compiled].extra.get("compile_s") if compiled in by else None
            row.append("-" if cs is None else f"{cs:.1f}")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(wd) if i < 2 else c.rjust(wd)
                       for i, (c, wd) in enumerate(zip(r, widths))) for r in rows]
    legend = (f"median per call; [b x | c y]: speedup over {baseline} (x = {baseline} / "
              f"provider) and over {compiled} (y = {compiled} / provider), > 1 = faster")
    return "\n".join([legend, lines[0], "-" * len(lines[0])] + lines[1:])


def format_report(src, fast: str = "fast", stat: str = "median") -> str:
    results, data = load(src, stat)
    meta = data.get("der_fast", {})
    env = meta.get("env", {})
    if not env and results:
        env = {k: results[0].extra.get(k) for k in ("device", "device_name", "torch", "der_fast",
                                                      "grid", "threads")}
    mi = data.get("machine_info", {})
    out = ["# der_fast benchmark report", ""]
    out.append(f"- date: {data.get('datetime', '?')}")
    out.append(f"- device: {env.get('device', '?')} - {env.get('device_name', '?')}")
    out.append(f"- torch {env.get('torch', '?')}, der_fast {env.get('der_fast', '?')}, "
               f"python {mi.get('python_version', env.get('python', '?'))}, "
               f"grid `{env.get('grid', '?')}`, torch threads {env.get('threads', '?')}")
    rounds = sorted({r.rounds for r in results})
    out.append(f"- {len(results)} measurements, rounds per measurement: "
               f"{', '.join(map(str, rounds)) or '-'}")
    if stat == "min":
        out.append("- statistic: **min** (fastest round; spread [other min / fast median, "
                   "other median / fast min])")
        s_name, spread = "min", "[min/median, median/min]"
    else:
        s_name, spread = "median", "[q1/q3, q3/q1]"
    out += ["", f"## Speedup of `{fast}` (provider {s_name} / {fast} {s_name}; spread "
                f"{spread})", "", format_ratio_table(results, fast), "",
            f"## {s_name.capitalize()} time per call (ms, ± spread as % of it)", "",
            format_time_table(results), "",
            f"## Share of the floor (stage-1 step / floor step, {s_name}s; 1.00 = the frozen "
            "extractors cost nothing)", "",
            "Floor timed between the rounds of the same case; † = the provider's separate floor "
            "case, * = the reference's floor case (minutes apart: the load may have changed).",
            "", format_floor_table(results, stat), "",
            "## Peak memory (MiB)", "", format_memory_table(results), ""]
    if meta.get("memory"):
        out += [f"Peak memory: {meta['memory']}", ""]
    out += ["## Parameters", "", format_params_table(results, fast), ""]
    plans = {}
    for r in results:
        if r.extra.get("plan"):
            plans.setdefault(r.provider, set()).add(r.extra["plan"])
    if plans:
        out += ["## Plans of the fast providers", ""]
        for p in sorted(plans, key=provider_sort_key):
            for s in sorted(plans[p]):
                out.append(f"- `{p}`: {s}")
        out.append("")
    comp = [r for r in results if r.extra.get("compile_s") is not None]
    if comp:
        out += ["## torch.compile: time of the first call (compile + run)", ""]
        for r in sorted(comp, key=lambda r: case_sort_key(r.key)):
            out.append(f"- {case_label(r.key).strip(' |').replace(' | ', ', ')}: "
                       f"{r.extra['compile_s']:.1f} s")
        out.append("")
    failed = meta.get("failed_checks", [])
    if failed:
        out += ["## Failed the equivalence check (not timed)", ""]
        for s in failed:
            reason = str(s.get("reason", "")).replace("\n", " ")
            out.append(f"- {s.get('case')} / {s.get('provider')}: {reason}")
        out.append("")
    skipped = meta.get("skipped", [])
    if skipped:
        out += ["## Skipped", ""]
        for s in skipped:
            out.append(f"- {s.get('case')} / {s.get('provider')}: {s.get('reason')}")
        out.append("")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python benchmarks/harness/report.py",
                                 description="Ratio tables from a der_fast benchmark JSON.")
    ap.add_argument("json", nargs="+",
                    help="pytest-benchmark JSON (--benchmark-json FILE); several are merged")
    ap.add_argument("--fast", default="fast", help="provider the ratios are taken against")
    ap.add_argument("--stat", default="median", choices=("median", "min"),
                    help="statistic of the ratios and times (default median)")
    ap.add_argument("--out", help="also write the report to this file")
    args = ap.parse_args(argv)
    try:
        text = format_report(args.json, args.fast, args.stat)
    except (OSError, ValueError, KeyError) as exc:
        print(f"report: cannot read {args.json}: {exc}", file=sys.stderr)
        return 2
    try:
        print(text)
    except BrokenPipeError:  # `... | head`
        pass
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
