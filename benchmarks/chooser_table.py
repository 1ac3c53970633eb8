"""The measured frozen plan's table: for each backbone, channel density and t, the timings the
chooser (der_fast.fast.chooser) chose from, its pick, what it dropped and what the first call
cost, as markdown (and JSON).

    python benchmarks/chooser_table.py --device cuda --out chooser.md --json chooser.json
    python benchmarks/chooser_table.py --device cpu --batch 4 --ts 1 2 --backbones resnet32

Each row is the inference / stage-2 frozen path: all t extractors pruned to the density and
frozen (benchmarks/harness build_reference, state "final"); stage 1 runs the same path on its
t - 1 frozen extractors, i.e. the row of t - 1. Every row starts from an empty choice cache.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

import torch  # noqa: E402

from benchmarks import harness as H  # noqa: E402
from der_fast.fast import FastDERNet, chooser  # noqa: E402


def measure_row(backbone: str, t: int, density: float, batch: int, device: torch.device) -> dict:
    hw = H.backbone_shape(backbone, device)[1]
    case = H.Case("infer", backbone, t, density, batch, hw)
    ref = H.reference_model(case).to(device).eval()
    fast = FastDERNet.from_reference(ref, frozen_plan="measure").eval()
    x = H.make_data(case, device)[0][0]
    chooser.CHOICES.clear()
    with torch.no_grad():
        H.sync(device)
        t0 = time.perf_counter()
        fast(x)
        H.sync(device)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        fast(x)
        H.sync(device)
        again = time.perf_counter() - t0
    choice = fast.plan()["frozen_choice"]
    return {"backbone": backbone, "t": t, "density": density, "batch": batch, **choice,
            "first_call_s": first, "second_call_s": again}


def markdown(rows: list, device: torch.device) -> str:
    names = []
    for r in rows:
        names += [n for n in r["timings_ms"] if n not in names]
    env = H.env_info(device)
    lines = [f"Frozen-plan chooser: {env['device_name']}, torch {env['torch']}, der_fast "
             f"{env['der_fast']}; ms per candidate (best timed call), the pick in bold; first "
             "call = measuring + the forward, second = the pick's forward + head.", ""]
    head = ("| backbone | density | t | batch |" + "".join(f" {n} |" for n in names)
            + " chosen | first call ms | second call ms | dropped |")
    lines += [head, "|" + "---|" * 4 + "---:|" * len(names) + "---|---:|---:|---|"]
    for r in rows:
        cells = [r["backbone"], f"{r['density']:.0%}", str(r["t"]), str(r["batch"])]
        for n in names:
            v = r["timings_ms"].get(n)
            cell = "-" if v is None else f"{v:.3f}"
            cells.append(f"**{cell}**" if n == r["chosen"] else cell)
        dropped = "; ".join(f"{k}: {v}" for k, v in r["dropped"].items()) or "-"
        cells += [r["chosen"], f"{r['first_call_s'] * 1e3:.1f}",
                  f"{r['second_call_s'] * 1e3:.2f}", dropped]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--backbones", nargs="+", default=["resnet32", "resnet18_cifar"],
                    choices=sorted(H.BACKBONES))
    ap.add_argument("--densities", type=float, nargs="+", default=[1.0, 0.3])
    ap.add_argument("--ts", type=int, nargs="+", default=[1, 5, 10])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--out", help="write the markdown here too")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    device = H.bench_device() if args.device == "auto" else torch.device(args.device)
    rows = []
    for backbone in args.backbones:
        for density in args.densities:
            for t in args.ts:
                rows.append(measure_row(backbone, t, density, args.batch, device))
                print(f"{backbone} d={density} t={t}: {rows[-1]['chosen']} "
                      f"{rows[-1]['timings_ms']}", file=sys.stderr, flush=True)
    text = markdown(rows, device)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps({"env": H.env_info(device), "rows": rows},
                                              indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
