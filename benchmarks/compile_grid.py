"""FastDERNet against torch.compile of the reference (and the reference eager): step time and
compile time per stage, t and width, as JSON and a markdown table.

    python benchmarks/compile_grid.py --out DIR                      # every case
    python benchmarks/compile_grid.py --t 10 --stages stage1 --out DIR   # a subset
    python benchmarks/compile_grid.py --report DIR                   # the table from DIR

Cases: resnet32 at the suite's batch, stage 1 / stage 2 / inference, t = 1, 2, 5, 10, frozen
extractors at full width (100 %) and pruned to 30 % of their channels (benchmarks/harness:
``compile_cases``; the same cases as ``DER_FAST_BENCH=compile pytest benchmarks/bench_model.py``).
Per case, every provider is checked against the float64 reference, then timed in interleaved
rounds (harness ``measure``). torch.compile starts cold (``torch._dynamo.reset()``, compiles in
this process): its compile time is the wall time of its first call (forward, and backward for
the training stages), reported apart from the step time.

Each case is written to DIR/<case>.json as soon as it is measured, and DIR/compile_grid.md /
DIR/compile_grid.json are rewritten from every case file in DIR, so runs of subsets into the
same DIR add up to the whole table.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

import torch  # noqa: E402

from benchmarks import harness as H  # noqa: E402

PROVIDERS = H.COMPILE_GRID_PROVIDERS  # reference, compile, fast
TABLE, MERGED = "compile_grid.md", "compile_grid.json"


def run_case(case, device, rounds: int, out: Path, strict: bool = True) -> dict:
    """Measure one case and write it to ``out/<case id>.json``. ``strict=False`` also times
    a provider that fails the equivalence check (its record keeps ``check_failed``)."""
    print(f"{case.id}: measuring {', '.join(PROVIDERS)} ...", file=sys.stderr, flush=True)
    rec = {"case": asdict(case), "rounds": rounds, "env": H.env_info(device),
           "providers": H.measure(case, PROVIDERS, device, rounds, strict=strict)}
    (out / f"{case.id}.json").write_text(json.dumps(rec, indent=1))
    for p, m in rec["providers"].items():
        extra = f", compile {m['compile_s']:.1f} s" if "compile_s" in m else ""
        print(f"  {p}: {m['median'] * 1e3:.1f} ms{extra}" if "median" in m
              else f"  {p}: skipped ({m['skipped']})", file=sys.stderr, flush=True)
    return rec


def load_records(out: Path) -> list:
    """Every case record in ``out``, in table order."""
    order = {w: i for i, w in enumerate(H.COMPILE_GRID_WORKLOADS)}
    recs = [json.loads(f.read_text()) for f in out.glob("*.json") if f.name != MERGED]
    recs = [r for r in recs if "case" in r and "providers" in r]
    return sorted(recs, key=lambda r: (order.get(r["case"]["workload"], 9), r["case"]["t"],
                                       -r["case"]["density"]))


def _ratio(rec: dict, num: str, den: str) -> str:
    a, b = rec["providers"].get(num, {}), rec["providers"].get(den, {})
    if "median" not in a or "median" not in b:
        return "-"
    return f"{a['median'] / b['median']:.2f}x"


def _time(m: dict) -> str:
    if "median" not in m:
        return "skipped"
    iqr = 100 * (m["q3"] - m["q1"]) / m["median"]
    return f"{m['median'] * 1e3:.0f} ±{iqr:.0f}%" + (" (!)" if "check_failed" in m else "")


def markdown(recs: list) -> str:
    """The table: step medians (± IQR as % of the median), torch.compile's cold compile time,
    and fast's speedups (compile / fast, reference / fast: > 1 means fast is faster)."""
    if not recs:
        return "(no cases measured)"
    env = recs[0]["env"]
    rounds = sorted({r["rounds"] for r in recs})
    lines = [f"FastDERNet vs torch.compile(DERNet) vs DERNet eager; {env['device_name']}, torch "
             f"{env['torch']}, der_fast {env['der_fast']}, {env['threads']} torch thread(s), "
             f"inductor compile threads {env.get('compile_threads', '?')}; median of "
             f"{'/'.join(map(str, rounds))} interleaved rounds ± IQR as % of the median. "
             "compile s: first call of torch.compile from a cold start (forward, and backward "
             "for the training stages). compile/fast and reference/fast: > 1 means fast is "
             "faster.", "",
             "| workload | t | density | batch | reference ms | compile ms | fast ms "
             "| compile s | compile/fast | reference/fast |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in recs:
        c, p = r["case"], r["providers"]
        comp = p.get("compile", {})
        cells = [c["workload"], str(c["t"]), f"{round(c['density'] * 100)}%", str(c["batch"]),
                 _time(p.get("reference", {})), _time(comp), _time(p.get("fast", {})),
                 f"{comp['compile_s']:.1f}" if "compile_s" in comp else "-",
                 _ratio(r, "compile", "fast"), _ratio(r, "reference", "fast")]
        lines.append("| " + " | ".join(cells) + " |")
    skipped = [f"- {r['case']['workload']} t={r['case']['t']} d={r['case']['density']} {p}: "
               f"{m['skipped']}" for r in recs for p, m in r["providers"].items()
               if "skipped" in m]
    failed = [f"- {r['case']['workload']} t={r['case']['t']} d={r['case']['density']} {p}: "
              f"{m['check_failed']}" for r in recs for p, m in r["providers"].items()
              if "check_failed" in m]
    return "\n".join(lines + (["", "Skipped:"] + skipped if skipped else [])
                     + (["", "(!) failed the equivalence check, timed with --time-failing:"]
                        + failed if failed else []))


def write_table(out: Path) -> str:
    recs = load_records(out)
    text = markdown(recs)
    (out / TABLE).write_text(text + "\n")
    (out / MERGED).write_text(json.dumps(recs, indent=1))
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="directory of the case files and the table")
    ap.add_argument("--t", type=int, nargs="+", default=list(H.COMPILE_GRID_TS))
    ap.add_argument("--stages", nargs="+", default=list(H.COMPILE_GRID_WORKLOADS),
                    choices=H.COMPILE_GRID_WORKLOADS)
    ap.add_argument("--density", type=float, nargs="+", default=list(H.COMPILE_GRID_DENSITIES),
                    help="channel density of the frozen extractors (1.0 = full width)")
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds per provider")
    ap.add_argument("--batch", type=int, help="batch size (default: the suite's)")
    ap.add_argument("--hw", type=int, help="image side (default: the suite's)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--time-failing", action="store_true",
                    help="time a provider even if it fails the equivalence check (marked (!))")
    ap.add_argument("--report", type=Path, metavar="DIR",
                    help="only rewrite DIR's table from its case files")
    args = ap.parse_args(argv)
    if args.report:
        print(write_table(args.report))
        return 0
    if args.out is None:
        ap.error("--out DIR is required (or --report DIR)")
    args.out.mkdir(parents=True, exist_ok=True)
    device = H.bench_device() if args.device == "auto" else torch.device(args.device)
    for case in H.compile_cases(tuple(args.stages), tuple(args.t), tuple(args.density)):
        if args.batch or args.hw:
            case = H.Case(case.workload, case.backbone, case.t, case.density,
                          args.batch or case.batch, args.hw or case.hw)
        run_case(case, device, args.rounds, args.out, strict=not args.time_failing)
        write_table(args.out)
    print(write_table(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
