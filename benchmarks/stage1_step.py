"""One stage-1 SGD step as the trainer runs it, reference against fast (and torch.compile),
in both phases of a budgeted stage 1, with the floor of each step.

    python benchmarks/stage1_step.py --t 1 2 5 10 --rounds 7 --out DIR
    python benchmarks/stage1_step.py --t 1 5 --compile --out DIR     # + torch.compile
    python benchmarks/stage1_step.py --t 1 5 --bf16 --out DIR        # + bfloat16 autocast
    python benchmarks/stage1_step.py --device cuda --t 1 5 --bf16 --fp16 --out DIR

Phases (ResNet-32, batch 128, 32x32x3, frozen extractors pruned to 30 % of their channels):

* ``soft``: the trainable extractor at full width with soft masks at s_max (the learn and
  ramp phases): forward, CE + aux CE + lambda_s * sparsity, backward, HAT's compensation,
  SGD step, clamp, keep ratio (the budget controller reads it after every step).
* ``finetune``: the masks binary at the budget (``--keep``, 0.2; ``shift_to_budget``).
  ``reference`` trains the binary-masked full-width extractor (what the trainer did before it
  pruned at binarisation, and does with ``--no-prune``); ``reference_pruned`` and ``fast``
  train the pruned one, as the trainer does now.

``--compile`` adds ``compile`` (torch.compile(reference)) and ``fast_compile``
(torch.compile(FastDERNet)); ``--bf16`` adds ``reference_bf16`` and ``fast_bf16`` (the step's
forward and loss under ``torch.autocast(device, bfloat16)``, as ``--precision bf16`` trains);
``--fp16`` (CUDA only) adds ``reference_fp16`` and ``fast_fp16`` (float16 autocast with the
trainer's GradScaler, as ``--precision 16`` trains). ``--device cuda`` runs every provider on
the GPU and synchronizes before reading the clock.
``--channels-last`` adds ``fast_cl`` (FastDERNet with ``trainable_channels_last=True``) and
``floor_cl`` (the same convolutions in channels_last).

``floor``: the trainable extractor's convolutions alone, forward and backward (input and
weight gradients), at the width the phase trains (full width for ``soft``, the kept channels
for ``finetune``): what no implementation of the rest can go below.

Providers are timed in interleaved rounds (one step each per round, after a warm-up step);
the table gives medians, the interquartile range as % of the median, and ratios against
``reference``. Results: DIR/stage1_step.json and DIR/stage1_step.md. Exactness of these paths
is the tests' business (tests/test_exactness.py, tests/test_fast.py, tests/test_prune_early.py).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks import harness as H  # noqa: E402
from benchmarks.harness.models import build_reference  # noqa: E402
from benchmarks.harness.timing import stats  # noqa: E402
from der_fast import FastDERNet  # noqa: E402
from der_fast import masks as M  # noqa: E402
from der_fast.backbones import conv_layers  # noqa: E402
from der_fast.objective import make_optimizer, stage1_loss  # noqa: E402
from der_fast.train.loop import autocast  # noqa: E402

BATCH, HW, S_MAX, LAMBDA_A, LAMBDA_S = 128, 32, 400.0, 1.0, 1e-3
LR, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 5e-4


def _model(t: int, phase: str, keep: float):
    """The reference model of a case: t-1 frozen extractors pruned to 30 %, the newest
    trainable with soft masks at s_max, or (``finetune``) binary at the budget."""
    model = build_reference("resnet32", t, 0.3, "stage1")
    model.set_s(S_MAX)
    if phase == "finetune":
        M.shift_to_budget(model.convnets[-1], keep)
        model.convnets[-1].binary_masks = True
    return model


class _Step:
    """A trainer's stage-1 step on one provider's model."""

    def __init__(self, model, forward, x, y, precision="32"):
        self.model, self.forward, self.x, self.y = model, forward, x, y
        self.precision = precision
        self.device = x.device
        self.scaler = torch.amp.GradScaler(x.device.type) if precision == "16" else None
        self.t = len(model.convnets)
        self.n_old = model.n_classes - model.task_sizes[-1]
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad
                  and (self.t > 1 or not n.startswith("aux_fc."))]
        self.opt = make_optimizer(params, LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
        model.train()

    def __call__(self):
        m = self.model
        with autocast(self.precision, self.device):
            loss = stage1_loss(m, self.forward(self.x), self.y, self.n_old,
                               LAMBDA_A if self.t > 1 else 0.0, LAMBDA_S)
        self.opt.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            m.compensate_mask_grads(S_MAX, S_MAX)
            self.opt.step()
        else:  # the trainer's float16 step: unscale before HAT's compensation
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.opt)
            m.compensate_mask_grads(S_MAX, S_MAX)
            self.scaler.step(self.opt)
            self.scaler.update()
        m.clamp_masks(S_MAX)
        if not m.convnets[-1].binary_masks:
            m.keep_ratio()  # the budget controller's read
        return float(loss.detach())


class _Floor:
    """The trainable extractor's convolutions alone: forward + backward of each, on random
    inputs of its shapes."""

    def __init__(self, net, x, fmt=torch.contiguous_format):
        self.convs = []
        shapes = {}

        def hook(mod, inp, out):
            shapes[mod] = inp[0].shape

        handles = [net.get_submodule(path).register_forward_hook(hook)
                   for path, *_ in conv_layers(net.arch)]
        with torch.no_grad():
            net.eval()(x)
        for h in handles:
            h.remove()
        for mod, shape in shapes.items():
            w = mod.weight.detach().clone().contiguous(memory_format=fmt).requires_grad_(True)
            xi = torch.randn(shape, device=x.device).contiguous(memory_format=fmt)
            xi.requires_grad_(True)
            self.convs.append((xi, w, mod.stride, mod.padding))

    def __call__(self):
        for xi, w, stride, pad in self.convs:
            y = F.conv2d(xi, w, None, stride, pad)
            xi.grad = w.grad = None
            y.backward(torch.ones_like(y))
        return 0.0


def providers(t: int, phase: str, keep: float, compile_too: bool, cl_too: bool = False,
              bf16_too: bool = False, fp16_too: bool = False, device="cpu") -> dict:
    gen = torch.Generator().manual_seed(t)
    x = torch.randn(BATCH, 3, HW, HW, generator=gen).to(device)
    base = _model(t, phase, keep).to(device)
    y = torch.randint(0, base.n_classes, (BATCH,), generator=gen).to(device)
    out = {"reference": _Step(copy.deepcopy(base), None, x, y)}
    out["reference"].forward = out["reference"].model
    pruned = copy.deepcopy(base)
    if phase == "finetune":
        pruned.prune()
        ref_p = copy.deepcopy(pruned)
        out["reference_pruned"] = _Step(ref_p, ref_p, x, y)
    fast = FastDERNet.from_reference(pruned)
    out["fast"] = _Step(fast, fast, x, y)
    if compile_too:
        ref_c = copy.deepcopy(base)
        out["compile"] = _Step(ref_c, torch.compile(ref_c), x, y)
        fast_c = FastDERNet.from_reference(pruned)
        out["fast_compile"] = _Step(fast_c, torch.compile(fast_c), x, y)
    if bf16_too:
        ref_b = copy.deepcopy(base)
        out["reference_bf16"] = _Step(ref_b, ref_b, x, y, "bf16")
        fast_b = FastDERNet.from_reference(pruned)
        out["fast_bf16"] = _Step(fast_b, fast_b, x, y, "bf16")
    if fp16_too:
        ref_h = copy.deepcopy(base)
        out["reference_fp16"] = _Step(ref_h, ref_h, x, y, "16")
        fast_h = FastDERNet.from_reference(pruned)
        out["fast_fp16"] = _Step(fast_h, fast_h, x, y, "16")
    out["floor"] = _Floor(pruned.convnets[-1], x)
    if cl_too:
        fast_cl = FastDERNet.from_reference(pruned)
        fast_cl.trainable_channels_last = True
        out["fast_cl"] = _Step(fast_cl, fast_cl, x, y)
        out["floor_cl"] = _Floor(pruned.convnets[-1], x, torch.channels_last)
    return out


def measure(t: int, phase: str, keep: float, rounds: int, compile_too: bool,
            cl_too: bool = False, bf16_too: bool = False, fp16_too: bool = False,
            device="cpu") -> dict:
    steps = providers(t, phase, keep, compile_too, cl_too, bf16_too, fp16_too, device)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)

    def timed(step) -> float:
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        return time.perf_counter() - t0

    first = {}
    for name, step in steps.items():  # warm-up (and torch.compile's compile)
        first[name] = timed(step)
        step()
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            times[name].append(timed(step))
    res = {name: dict(stats(ts), first_call_s=first[name]) for name, ts in times.items()}
    res["_widths"] = {"params_trainable": M.count_params(steps["fast"].model.convnets[-1]),
                      "macs_trainable": steps["fast"].model.extractor_macs((HW, HW))[-1]}
    return res


ORDER = ["reference", "reference_pruned", "compile", "fast", "fast_compile", "floor", "fast_cl",
         "floor_cl", "reference_bf16", "fast_bf16", "reference_fp16", "fast_fp16"]
RATIOS = [("reference", "fast"), ("compile", "fast"), ("fast", "floor"),
          ("fast", "fast_compile"), ("reference", "fast_cl"), ("fast", "fast_bf16"),
          ("reference_bf16", "fast_bf16"), ("reference", "fast_bf16"), ("fast", "fast_fp16"),
          ("reference_fp16", "fast_fp16"), ("reference", "fast_fp16")]


def markdown(recs: list) -> str:
    present = {n for r in recs for n in r["providers"]}
    names = [n for n in ORDER if n in present]
    ratios = [(a, b) for a, b in RATIOS if a in present and b in present]
    lines = ["| t | phase | " + " | ".join(names) + " | "
             + " | ".join(f"{a} / {b}" for a, b in ratios) + " |",
             "|---|---|" + "---:|" * (len(names) + len(ratios))]
    for r in recs:
        p = r["providers"]

        def cell(n):
            if n not in p:
                return "-"
            iqr = 100 * (p[n]["q3"] - p[n]["q1"]) / p[n]["median"]
            return f"{p[n]['median'] * 1e3:.0f} ±{iqr:.0f}%"

        def ratio(a, b):
            return f"{p[a]['median'] / p[b]['median']:.2f}x" if a in p and b in p else "-"

        lines.append(f"| {r['t']} | {r['phase']} | " + " | ".join(cell(n) for n in names)
                     + " | " + " | ".join(ratio(a, b) for a, b in ratios) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--t", type=int, nargs="+", default=[1, 2, 5, 10])
    ap.add_argument("--phases", nargs="+", default=["soft", "finetune"],
                    choices=["soft", "finetune"])
    ap.add_argument("--keep", type=float, default=0.2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--compile", action="store_true",
                    help="also torch.compile(reference) and torch.compile(FastDERNet)")
    ap.add_argument("--bf16", action="store_true",
                    help="also reference and FastDERNet under bfloat16 autocast")
    ap.add_argument("--fp16", action="store_true",
                    help="also reference and FastDERNet under float16 autocast with a "
                         "GradScaler (CUDA only)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--channels-last", action="store_true",
                    help="also FastDERNet(trainable_channels_last=True) and its floor "
                         "(channels_last convolutions)")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device visible to torch")
    if a.fp16 and a.device != "cuda":
        ap.error("--fp16 needs --device cuda (the trainer refuses float16 on the CPU)")
    a.out.mkdir(parents=True, exist_ok=True)
    recs = []
    for t in a.t:
        for phase in a.phases:
            torch.manual_seed(0)
            res = measure(t, phase, a.keep, a.rounds, a.compile, a.channels_last, a.bf16,
                          a.fp16, a.device)
            widths = res.pop("_widths")
            recs.append({"t": t, "phase": phase, "providers": res, **widths})
            print(markdown(recs[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
            env = H.env_info(torch.device(a.device))
            (a.out / "stage1_step.json").write_text(json.dumps(
                {"env": env, "rounds": a.rounds, "keep": a.keep, "cases": recs}, indent=1))
            (a.out / "stage1_step.md").write_text(markdown(recs) + "\n")
    print(markdown(recs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
