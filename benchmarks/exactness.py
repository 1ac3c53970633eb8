"""Float32 exactness of FastDERNet against float64, per trainable-extractor layout.

For N random draws per backbone and mode (train / eval) (weights, calibrated BN statistics,
frozen extractors pruned to random widths, soft gates at random s or binary masks on the
trainable one), runs the reference DERNet in float64 (the truth), the reference in float32
NCHW (its own error) and FastDERNet in float32 with each ``trainable_channels_last`` setting,
and prints per layout the worst ratio fast_err / ref_err over draws, for the logits and for
the worst gradient, with ``err = max|run - truth| / max|truth|`` per tensor (ref_err floored
at FLOOR, fp32's unit roundoff), the largest excess ``fast_err - 2 ref_err`` in float32 ulps
(2^-23 of max|truth|), and the tensors over the tests' bound ``fast_err <= 2 ref_err + 48
ulps`` (tests/test_exactness.py).

    python benchmarks/exactness.py [--draws N] [--backbones resnet32,...]

No timing (see RESULTS.md for speed).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

# the checkout last: benchmarks.harness from it, der_fast the installed package (with its
# compiled ops; the checkout's der_fast would run every op on its PyTorch fallback)
sys.path.append(str(Path(__file__).resolve().parents[1]))

from benchmarks.harness.exactness import LAYOUTS, measure, random_draw  # noqa: E402
from der_fast.backbones import ARCHS  # noqa: E402

FLOOR = 6e-8  # fp32 unit roundoff: a ref_err below it counts as this
ULP = 2.0 ** -23
ULPS = 48  # the tests' slack beyond 2x, in ulps of max|truth|


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--draws", type=int, default=10, help="random draws per backbone and mode")
    ap.add_argument("--backbones", default=",".join(ARCHS))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    worst = {}  # (layout, "logits" | "grads") -> (ratio, where)
    over = {name: 0 for name in LAYOUTS}
    excess = {name: (float("-inf"), "") for name in LAYOUTS}
    total = 0
    for backbone in args.backbones.split(","):
        for train in (True, False):
            for seed in range(args.draws):
                d = random_draw(backbone, seed)
                errs = measure(d, train)
                ref = errs["reference"]
                total += len(ref)
                for name in LAYOUTS:
                    for k, e in errs[name].items():
                        r = e / max(ref[k], FLOOR)
                        kind = "grads" if k.startswith("grad:") else k
                        where = (f"{backbone} {'train' if train else 'eval'} draw {d} {k}: "
                                 f"fast {e:.2e} ref {ref[k]:.2e}")
                        if r > worst.get((name, kind), (0.0, ""))[0]:
                            worst[(name, kind)] = (r, where)
                        over[name] += e > 2 * ref[k] + ULPS * ULP
                        if (e - 2 * ref[k]) / ULP > excess[name][0]:
                            excess[name] = ((e - 2 * ref[k]) / ULP, where)
    print(f"{total} tensors per layout ({args.draws} draws x {args.backbones} x train/eval)")
    for (name, kind), (r, where) in sorted(worst.items()):
        print(f"{name:>14} {kind:>10}: worst fast_err / ref_err = {r:7.2f}   ({where})")
    for name, n in over.items():
        x, where = excess[name]
        print(f"{name:>14}: largest fast_err - 2 ref_err = {x:.1f} ulps ({where}); "
              f"{n} tensors over 2 x ref_err + {ULPS} ulps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
