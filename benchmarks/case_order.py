"""Does the order of the benchmark cases change a result? One fixed case timed first, then the
torch.compile cases the quick suite runs, then the fixed case again.

    python benchmarks/case_order.py                  # cases isolated as in the suite
    python benchmarks/case_order.py --no-isolation   # as before isolation: compile workers,
                                                     # compiled graphs and garbage left over

The fixed case is the fast provider's stage-1 step at t = 2 (resnet32, 30 % channels, the
suite's batch); the compile cases are torch.compile's stage-1 steps at t = 1 and 2 (each
compiled cold, then timed). With isolation (benchmarks/harness/isolation.py) every case starts
fresh and inductor compiles in-process, and the two medians of the fixed case should agree
within the machine's noise; ``--no-isolation`` gives inductor its default worker pool (one
process per CPU) and skips the reset between cases.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))


def _parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--no-isolation", dest="isolation", action="store_false",
                    help="no reset between cases, inductor's default worker pool")
    ap.add_argument("--provider", default="fast", help="provider of the fixed case")
    ap.add_argument("--t", type=int, default=2, help="t of the fixed case")
    ap.add_argument("--compile-t", type=int, nargs="*", default=[1, 2],
                    help="t of the torch.compile stage-1 cases run in between")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--batch", type=int, help="batch size (default: the suite's)")
    ap.add_argument("--hw", type=int, help="image side (default: the suite's)")
    ap.add_argument("--json", help="write the numbers here too")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = _parse(argv)
    from benchmarks import harness as H

    if not args.isolation:  # inductor's default: a pool of one worker process per CPU
        H.set_compile_threads(os.cpu_count() or 1)

    device = H.bench_device()
    batch, hw = H.backbone_shape("resnet32", device)
    batch, hw = args.batch or batch, args.hw or hw

    def case(t):
        return H.Case("stage1", "resnet32", t, 0.3, batch, hw)

    def timed(c, provider, strict=True):
        m = H.measure(c, [provider], device, args.rounds, fresh=args.isolation,
                      strict=strict)[provider]
        if "median" not in m:
            raise SystemExit(f"{c.id} {provider}: skipped: {m['skipped']}")
        extra = f", compile {m['compile_s']:.1f} s" if "compile_s" in m else ""
        if "check_failed" in m:
            extra += f"; fails the equivalence check: {m['check_failed']}"
        print(f"{c.id} {provider}: median {m['median'] * 1e3:.1f} ms "
              f"(IQR {(m['q3'] - m['q1']) * 1e3:.1f} ms){extra}", file=sys.stderr, flush=True)
        return m

    first = timed(case(args.t), args.provider)
    # the cases in between run for what they leave behind: timed even where torch.compile's
    # gradients miss the equivalence bound (they do in stage 1 on this CPU: RESULTS.md,
    # "FastDERNet vs torch.compile of the reference")
    between = {f"compile t={t}": timed(case(t), "compile", strict=False)
               for t in args.compile_t}
    last = timed(case(args.t), args.provider)
    ratio = last["median"] / first["median"]
    env = H.env_info(device)
    print(f"case order ({'isolated' if args.isolation else 'not isolated'}; "
          f"{env['device_name']}, inductor compile threads {env['compile_threads']}): "
          f"{case(args.t).id} {args.provider}, median of {args.rounds} rounds: first "
          f"{first['median'] * 1e3:.1f} ms (IQR {(first['q3'] - first['q1']) * 1e3:.1f}), "
          f"after {len(between)} torch.compile case(s) {last['median'] * 1e3:.1f} ms "
          f"(IQR {(last['q3'] - last['q1']) * 1e3:.1f}); last / first = {ratio:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"isolation": args.isolation, "env": env, "case": case(args.t).id,
             "provider": args.provider, "first": first, "between": between, "last": last,
             "last_over_first": ratio}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
