"""Where a default run's time goes: the trainer's parts (cProfile over a whole run) and the
operators of a stage-1 step (torch.profiler), as markdown tables.

    python benchmarks/profile_run.py --impl fast --out DIR [-- trainer flags]
    python benchmarks/profile_run.py --impl fast --steps-only --out DIR

Part 1 runs ``der_fast.train.run`` in this process under cProfile and reports the cumulative
time of the trainer's functions: stage 1 split into data and augmentation, forward + loss,
backward, the optimiser step, the mask bookkeeping after each step (clamp, budget controller
and its keep-ratio read, the prune when the ramp ends), HAT's compensation and the BatchNorm
re-estimation; stage 2, herding, evaluation and the checkpoint writes. cProfile adds a cost
per Python call, so Python-heavy parts read a little high.

Part 2 profiles stage-1 steps (benchmarks/stage1_step.py's, t = 1, soft and fine-tune phases)
with torch.profiler and sums the operators' self CPU time by kind: convolutions (forward and
backward), BatchNorm, the gate ops, the head, the optimiser, the rest.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

import torch  # noqa: E402

# (label, file suffix, function name): cumulative time of that function
PARTS = [
    ("stage 1", "train/stages.py", "stage1"),
    ("  data + augmentation", "train/batches.py", "train_batches"),
    ("  forward + loss", "train/stages.py", "loss_fn"),
    ("  backward", "torch/_tensor.py", "backward"),
    ("  optimiser step", "torch/optim/sgd.py", "step"),
    ("  after each step: clamp, budget, keep ratio, prune", "train/stages.py", "after_step"),
    ("  HAT's gradient compensation", "der_fast/masks.py", "compensate_grads"),
    ("  BatchNorm re-estimation", "train/stages.py", "recalibrate_bn"),
    ("stage 2", "train/stages.py", "stage2"),
    ("herding", "data/memory.py", "update"),
    ("evaluation", "train/evaluate.py", "step_row"),
    ("checkpoints", "train/outputs.py", "save_ckpt"),
]

KINDS = [  # (label, substrings of an operator's name), first match wins
    ("convolution forward + backward", ("conv", "mkldnn")),
    ("BatchNorm", ("batch_norm",)),
    ("bn_gate", ("bn_gate",)),
    ("masked_gate", ("masked_gate",)),
    ("head", ("concat_linear_head", "addmm", "linear", "mm")),
    ("optimiser", ("_foreach", "sgd")),
]


def trainer_profile(impl: str, extra: list, out: Path) -> tuple:
    from der_fast import train as T

    cfg, _ = T.config_from_args(["--impl", impl, "--out", str(out / f"run_{impl}"),
                                 "--no-plots", "--no-progress", *extra])
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    T.run(cfg, overwrite=True, log=lambda *a: None)
    prof.disable()
    wall = time.perf_counter() - t0
    st = pstats.Stats(prof)
    rows = []
    for label, suffix, fn in PARTS:
        cum = sum(v[3] for (f, _, name), v in st.stats.items()
                  if name == fn and f.replace("\\", "/").endswith(suffix))
        rows.append((label, cum))
    return wall, rows


def op_profile(phase: str, steps: int = 3) -> list:
    from benchmarks.stage1_step import providers

    step = providers(1, phase, 0.2, False)["fast"]
    step()
    step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as p:
        for _ in range(steps):
            step()
    totals = {label: 0.0 for label, _ in KINDS}
    totals["other"] = 0.0
    for ev in p.key_averages():
        name = ev.key.lower()
        label = next((lab for lab, keys in KINDS if any(k in name for k in keys)), "other")
        totals[label] += ev.self_cpu_time_total / 1e3 / steps  # ms per step
    return sorted(totals.items(), key=lambda kv: -kv[1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--impl", default="fast", choices=["fast", "reference"])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps-only", action="store_true")
    ap.add_argument("extra", nargs="*", help="trainer flags (after --)")
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    md, rec = [], {"impl": a.impl, "threads": torch.get_num_threads()}
    if not a.steps_only:
        wall, rows = trainer_profile(a.impl, a.extra, a.out)
        rec.update(wall_s=wall, parts=rows)
        md += [f"Whole run, --impl {a.impl}: {wall:.1f} s under cProfile", "",
               "| part | s | % of the run |", "|---|---:|---:|"]
        md += [f"| {label} | {s:.1f} | {100 * s / wall:.1f} |" for label, s in rows]
        md.append("")
    for phase in ("soft", "finetune"):
        ops = op_profile(phase)
        rec[f"ops_{phase}"] = ops
        total = sum(ms for _, ms in ops)
        md += [f"Stage-1 step, fast path, t = 1, {phase}: {total:.0f} ms of operator self "
               "time per step", "", "| kind | ms / step | % |", "|---|---:|---:|"]
        md += [f"| {label} | {ms:.1f} | {100 * ms / total:.1f} |" for label, ms in ops]
        md.append("")
    (a.out / f"profile_{a.impl}.json").write_text(json.dumps(rec, indent=1))
    (a.out / f"profile_{a.impl}.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
