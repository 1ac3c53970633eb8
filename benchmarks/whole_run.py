"""Whole default runs (``python -m der_fast.train``) of several implementations, alternated
round by round, with their wall times, stage times, accuracy and final size.

    python benchmarks/whole_run.py --rounds 3 --out DIR
    python benchmarks/whole_run.py --rounds 3 --out DIR --also start=/path/to/old/checkout
    python benchmarks/whole_run.py --rounds 1 --out DIR --bf16   # + fast_bf16, reference_bf16

Each round runs every variant once, in turn (fast, reference, then any ``--also`` ones):
``fast`` and ``reference`` are ``--impl fast`` / ``--impl reference`` of the installed
der_fast; ``--also NAME=PATH`` runs ``--impl reference`` of the der_fast source tree at PATH
(``PYTHONPATH=PATH``; the reference needs no compiled kernels), e.g. a checkout of the commit
an optimisation started from. ``--bf16`` adds ``fast_bf16`` and ``reference_bf16``
(``--precision bf16``). Extra trainer flags follow ``--``. Every run writes its own
output folder under DIR; DIR/whole_run.json and DIR/whole_run.md are rewritten after each run
(medians, min-max, ratios of the medians against ``fast``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def run_once(name: str, impl: str, tree, out: Path, extra: list, flags=()) -> dict:
    env = dict(os.environ)
    if tree:
        env["PYTHONPATH"] = str(tree)
    cmd = [sys.executable, "-m", "der_fast.train", "--impl", impl, "--out", str(out),
           "--overwrite", "--no-plots", "--no-progress", *flags, *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd="/")
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{name}: exit {proc.returncode}\n{proc.stderr[-2000:]}")
    m = json.loads((out / "metrics.json").read_text())
    steps = m["steps"]
    return {"wall_s": wall,
            "stage1_s": sum(s["time_stage1_s"] for s in steps),
            "stage2_s": sum(s.get("time_stage2_s", 0.0) for s in steps),
            "avg_incremental_top1": m["summary"]["avg_incremental_top1"],
            "last_top1": steps[-1]["top1"],
            "params": steps[-1]["params"],
            "extractor_params": sum(steps[-1]["extractor_params"])}


def summarise(runs: dict) -> dict:
    out = {}
    for name, rs in runs.items():
        out[name] = {k: {"median": statistics.median(r[k] for r in rs),
                         "min": min(r[k] for r in rs), "max": max(r[k] for r in rs)}
                     for k in rs[0]}
    return out


def markdown(summary: dict, n: dict) -> str:
    lines = ["| variant | runs | wall s (min-max) | stage 1 s | stage 2 s | avg inc. top-1 | "
             "extractor params | wall / fast's |", "|---|---:|---|---:|---:|---:|---:|---:|"]
    fast = summary.get("fast", {}).get("wall_s", {}).get("median")
    for name, s in summary.items():
        w = s["wall_s"]
        ratio = f"{w['median'] / fast:.2f}x" if fast else "-"
        lines.append(f"| {name} | {n[name]} | {w['median']:.1f} ({w['min']:.1f}-{w['max']:.1f}) | "
                     f"{s['stage1_s']['median']:.1f} | {s['stage2_s']['median']:.1f} | "
                     f"{s['avg_incremental_top1']['median']:.2f} | "
                     f"{s['extractor_params']['median']:.0f} | {ratio} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--also", action="append", default=[], metavar="NAME=PATH",
                    help="--impl reference of the source tree at PATH")
    ap.add_argument("--bf16", action="store_true",
                    help="also both implementations with --precision bf16")
    ap.add_argument("extra", nargs="*", help="trainer flags (after --)")
    a = ap.parse_args(argv)
    variants = [("fast", "fast", None), ("reference", "reference", None)]
    if a.bf16:
        variants += [("fast_bf16", "fast", None), ("reference_bf16", "reference", None)]
    flags = {name: ["--precision", "bf16"] if name.endswith("_bf16") else [] for name, _, _
             in variants}
    for item in a.also:
        name, _, path = item.partition("=")
        if not path or not (Path(path) / "der_fast").is_dir():
            ap.error(f"--also {item!r}: want NAME=PATH with PATH/der_fast")
        variants.append((name, "reference", Path(path).resolve()))
    a.out.mkdir(parents=True, exist_ok=True)
    runs = {name: [] for name, _, _ in variants}
    for r in range(a.rounds):
        for name, impl, tree in variants:
            res = run_once(name, impl, tree, a.out / f"{name}_{r}", a.extra, flags[name])
            runs[name].append(res)
            print(f"round {r} {name}: {res['wall_s']:.1f} s, stage 1 {res['stage1_s']:.1f} s, "
                  f"top-1 {res['avg_incremental_top1']:.2f}", file=sys.stderr, flush=True)
            done = {k: v for k, v in runs.items() if v}
            summary = summarise(done)
            (a.out / "whole_run.json").write_text(json.dumps(
                {"argv": sys.argv[1:], "runs": runs, "summary": summary}, indent=1))
            (a.out / "whole_run.md").write_text(
                markdown(summary, {k: len(v) for k, v in done.items()}) + "\n")
    print(markdown(summarise(runs), {k: len(v) for k, v in runs.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
