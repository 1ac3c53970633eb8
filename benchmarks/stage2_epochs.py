"""Stage 2 of a finished run's last step, re-run with other epoch counts and stage-2 seeds.

    python benchmarks/stage2_epochs.py RUN_DIR [RUN_DIR ...] --epochs 4 10 20 30 --seeds 1 2

RUN_DIR is the ``--out`` folder of a finished ``python -m der_fast.train`` run. Its checkpoint
holds the trained extractors after the last step; this script re-initialises and re-trains the
classifier (the trainer's own ``stages.stage2``) for every (epochs, seed) pair and prints the
last step's top-1 and top-1 per task. Stage 2 reads the data the trainer's stage 2 read, except
that the memory is the one after the last step's herding, less the new classes' exemplars (so
each old class has memory / classes-after of them, not memory / classes-before): a diagnostic
of how far stage 2 is from converging, not a replay of the run.
Results go to stdout and, with ``--json FILE``, to a JSON list.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from der_fast import DERNet, FastDERNet
from der_fast.data import IncrementalData, Memory
from der_fast.train.config import Config
from der_fast.train.evaluate import evaluate
from der_fast.train.stages import stage2


def load_run(run: Path):
    cfg = Config.from_dict(json.loads((run / "config.json").read_text()))
    state = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=False)
    data = IncrementalData(cfg.dataset, cfg.init_cls, cfg.increment, root=cfg.data_root,
                           download=False, seed=cfg.class_seed,
                           max_train_per_class=cfg.train_per_class)
    if tuple(state["next"]) != (data.num_steps, 0):
        raise SystemExit(f"{run}: the run has not finished (position {state['next']})")
    Net = DERNet if cfg.impl == "reference" else FastDERNet
    model = Net(cfg.backbone, in_channels=data.info.channels, use_masks=cfg.masks,
                mask_init=cfg.mask_init)
    model.load_state_dict(state["model"])
    memory = Memory(total=cfg.memory_total, per_class=cfg.memory_per_class)
    memory.load_state_dict(state["memory"])
    return cfg, data, model, memory


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--epochs", nargs="+", type=int, default=[4, 10, 15, 20, 30])
    ap.add_argument("--seeds", nargs="+", type=int, default=[1, 2],
                    help="stage-2 seeds (the run's --seed is replaced by each)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    rows = []
    for run in args.runs:
        cfg, data, model, memory = load_run(run)
        t = data.num_steps - 1
        labels = data.labels("train")
        new = np.isin(labels[memory.indices()], data.new_classes(t))
        pool = np.concatenate([data.train_indices(t), memory.indices()[~new]])
        device = torch.device("cpu")
        for epochs in args.epochs:
            for seed in args.seeds:
                c = dataclasses.replace(cfg, epochs_stage2=epochs, milestones_stage2=[],
                                        seed=seed)
                loss = stage2(model, data, pool, c, t, device)
                r = evaluate(model, data, t, c, device)
                row = {"run": str(run), "epochs": epochs, "seed": seed, "loss_stage2": loss,
                       "top1": r["top1"], "per_task_top1": r["per_task_top1"]}
                rows.append(row)
                print(f"{run} epochs {epochs:3d} seed {seed}: loss {loss:.3f} top-1 "
                      f"{r['top1']:.2f} per task "
                      + " / ".join(f"{a:.1f}" for a in r["per_task_top1"]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
