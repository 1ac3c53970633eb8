"""How DER's cost grows with the number of extractors t: time per step and parameter count,
reference vs fast, as markdown.

    python benchmarks/scaling.py                      # stage 1, resnet32, t = 1 2 5 10 20
    python benchmarks/scaling.py --workload infer --density 1.0 --batch 128 --rounds 5
    python benchmarks/scaling.py --device cuda --out scaling_gpu.md --json scaling_gpu.json

Every provider is checked against the reference (benchmarks/harness/check.py: prepare) before
it is timed; providers are timed in interleaved rounds, so a change in the machine's load hits
all of them alike. The default batch (32) keeps a run at t = 20 within a few minutes on a 2-core
CPU; the suite's stage-1 batch is 128 (pass --batch 128 on a faster machine).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

import torch  # noqa: E402

from benchmarks import harness as H  # noqa: E402
from der_fast import masks as M  # noqa: E402


def frozen_params(model) -> int:
    return sum(M.count_params(n) for n in model.convnets[:-1])


def run(args) -> tuple:
    device = H.bench_device() if args.device == "auto" else torch.device(args.device)
    batch = args.batch or H.backbone_shape(args.backbone, device)[0]
    hw = H.backbone_shape(args.backbone, device)[1]
    rows = []
    for t in args.ts:
        case = H.Case(args.workload, args.backbone, t, args.density, batch, hw)
        row = {"t": t, "providers": H.measure(case, args.providers, device, args.rounds)}
        for p, m in row["providers"].items():
            print(f"t={t} {p}: median {m.get('median', 'skipped')} min {m.get('min', '-')}",
                  file=sys.stderr, flush=True)
        row["params"] = next((v["params"] for v in row["providers"].values() if "params" in v),
                             None)
        model = H.reference_model(case)
        row["frozen_params"] = frozen_params(model) if args.workload in ("stage1", "epoch") \
            else M.count_params(model.convnets)
        rows.append(row)
    return rows, device, batch, hw


def markdown(rows, args, device, batch, hw) -> str:
    provs = args.providers
    base = provs[0]
    env = H.env_info(device)
    lines = [f"Scaling with t: `{args.workload}` ({H.WORKLOAD_DOC[args.workload]}), "
             f"{args.backbone}, batch {batch}, {hw}x{hw}, frozen-extractor density "
             f"{args.density:.0%}; {env['device_name']}, torch {env['torch']}, der_fast "
             f"{env['der_fast']}, {env['threads']} torch thread(s); median of {args.rounds} "
             f"interleaved rounds, ± IQR as % of the median, (min); ratios and per-extractor "
             f"costs from medians.", ""]
    head = "| t | parameters | frozen-extractor parameters |"
    head += "".join(f" {p} ms (min) |" for p in provs)
    head += "".join(f" {p}/{q} |" for p in provs[:1] for q in provs[1:])
    head += "".join(f" {p} ms per extra extractor |" for p in provs)
    lines += [head, "|" + "---:|" * (head.count("|") - 1)]
    first = {p: next((r["providers"][p].get("median") for r in rows
                      if "median" in r["providers"].get(p, {})), None) for p in provs}
    t0 = rows[0]["t"] if rows else 1
    for r in rows:
        cells = [str(r["t"]), f"{r['params']:,}" if r["params"] else "-",
                 f"{r['frozen_params']:,}"]
        for p in provs:
            m = r["providers"].get(p, {})
            if "median" in m:
                iqr = 100 * (m["q3"] - m["q1"]) / m["median"]
                cells.append(f"{m['median'] * 1e3:.0f} ±{iqr:.0f}% ({m['min'] * 1e3:.0f})")
            else:
                cells.append("skipped")
        mb = r["providers"].get(base, {})
        for q in provs[1:]:
            mq = r["providers"].get(q, {})
            cells.append(f"{mb['median'] / mq['median']:.2f}x"
                         if "median" in mb and "median" in mq else "-")
        for p in provs:
            m = r["providers"].get(p, {})
            if "median" in m and first[p] is not None and r["t"] > t0:
                cells.append(f"{(m['median'] - first[p]) * 1e3 / (r['t'] - t0):.0f}")
            else:
                cells.append("-")
        lines.append("| " + " | ".join(cells) + " |")
    skipped = [f"- t={r['t']} {p}: {m['skipped']}" for r in rows
               for p, m in r["providers"].items() if "skipped" in m]
    if skipped:
        lines += ["", "Skipped:"] + skipped
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workload", default="stage1", choices=("infer", "stage1", "stage2"))
    ap.add_argument("--backbone", default="resnet32", choices=sorted(H.BACKBONES))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--density", type=float, default=0.3)
    ap.add_argument("--ts", type=int, nargs="+", default=[1, 2, 5, 10, 20])
    ap.add_argument("--providers", default="reference,fast",
                    help="comma-separated, the first is the baseline of the ratio columns")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", help="write the markdown here too")
    ap.add_argument("--json", help="write the raw numbers here")
    args = ap.parse_args(argv)
    args.providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    rows, device, batch, hw = run(args)
    text = markdown(rows, args, device, batch, hw)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "env": H.env_info(device),
                                               "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
