"""Accuracy parity with PyCIL's DER, side by side: the same images, class order, schedule and
seeds through PyCIL's learner and through der_fast, one table of the results.

    python benchmarks/parity/parity.py --pycil PATH/TO/PyCIL --out parity/ --seeds 1 2 3 4 5

PyCIL is run from the user's checkout (never copied here): this script imports its
``utils.data_manager`` / ``utils.factory`` / ``models.der`` and changes only what a protocol
must change, from the outside: the dataset (an ``iData``-like object holding the arrays
below), the schedule (``models.der``'s module constants), the torch seed (PyCIL's trainer
always seeds 1; here every seed is a run), ``num_workers`` = 0 and top-k = 1 (two classes
at step 0).

The protocol (defaults; every value a flag): Fashion-MNIST (the full set if installed, else
the subset shipped in der_fast), the first ``--train-per-class`` training and
``--test-per-class`` test images of each class, zero-padded to 32x32 and repeated to 3
channels (PyCIL's ResNet-32 ends in an 8x8 average pool and has a 3-channel stem), random
crop (padding 4) + horizontal flip, class order seeded 1993, ``--init-cls`` classes then
``--increment`` per step (2 + 2 + 2 + 2 + 2), ResNet-32, memory 200 with herding, SGD
(momentum 0.9), step 0 with PyCIL's own weight decay 5e-4, later steps 2e-4, the same epochs
and decays at every step, weight aligning after every incremental step, no masks. der_fast
runs its default ``--impl fast``.

The defaults are a protocol that runs in minutes on one CPU core, yet learns: 200 training
and 100 test images per class, 6 epochs per step (lr x0.1 after 4 and 5) at batch 32 and
lr 0.05 (at batch 128 these few images give step 0, Coat vs Pullover, too few SGD steps to
leave chance level). PyCIL's own CIFAR-100 recipe: ``--preset pycil-cifar100-b0-10`` in
der_fast, its ``exps/der.json`` in PyCIL.

The recipe differences that remain, all outside DER's definition: PyCIL augments each image
with PIL on the CPU, der_fast whole batches with tensors (the same distribution, other
random numbers); PyCIL evaluates the test set every 5 epochs during training (it changes no
weight); der_fast recalibrates nothing and re-draws nothing here (no masks, no stage 2).
``benchmarks/parity/parity_lockstep.py`` checks that the rest is the same without the seed noise:
both trainers stepped from one state on PyCIL's recorded batches, in float64.

``--last-step T`` stops both systems after step T: ``--last-step 0`` compares the base
training alone (two classes from scratch, where a run can stay at chance), many seeds
cheaply. Each run records its last epoch's training loss at every step (der_fast's mean
over the epoch's images; PyCIL's, from the line its learner logs, the mean of its batch
means, a short last batch counting as a full one), and the table counts the seeds whose step
0 stayed near chance (top-1 under 100 / classes + 5 points).

Each run is a subprocess (``--jobs`` at a time, ``--threads`` intra-op threads each) that
writes ``OUT/runs/<system>_<seed>.json``; runs whose file exists are not repeated, so an
interrupted comparison continues where it stopped. The table is ``OUT/parity.md`` (and
``OUT/parity.json``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

SYSTEMS = ("der_fast", "pycil")


# ----------------------------------------------------------------------------------------------
# the data both systems see
# ----------------------------------------------------------------------------------------------

def protocol_images(train_per_class: int, test_per_class: int):
    """Fashion-MNIST, the first N images of each class, as uint8 [N, 32, 32, 3] arrays (zero
    border of 2 pixels, the grey channel repeated) with their labels."""
    import numpy as np

    from der_fast.data import limit_per_class, load_fashion_mnist

    ds = limit_per_class(load_fashion_mnist(), train_per_class)
    out = {}
    for split, n in (("train", None), ("test", test_per_class)):
        x, y = ds.images(split).numpy(), ds.labels(split)
        if n:
            keep = np.concatenate([np.flatnonzero(y == c)[:n] for c in np.unique(y)])
            keep.sort()
            x, y = x[keep], y[keep]
        x = np.pad(x[:, 0], ((0, 0), (2, 2), (2, 2)))
        out[split] = (np.repeat(x[..., None], 3, axis=3), np.asarray(y, dtype=np.int64))
    return out, ds.source


_MEAN, _STD = (0.2860,) * 3, (0.3530,) * 3  # Fashion-MNIST's grey statistics, per channel


# ----------------------------------------------------------------------------------------------
# one run of each system
# ----------------------------------------------------------------------------------------------

def run_der_fast(p, seed: int, images, workdir: Path) -> dict:
    import torch

    from der_fast.data import ClassDataset, dataset_info
    from der_fast.train import run

    info = dataset_info("fashion_mnist", image_size=32, channels=3, mean=_MEAN, std=_STD,
                        crop_padding=4)
    (tx, ty), (vx, vy) = images["train"], images["test"]
    ds = ClassDataset(info=info, train_y=ty, test_y=vy,
                      train_x=torch.from_numpy(tx).permute(0, 3, 1, 2).contiguous(),
                      test_x=torch.from_numpy(vx).permute(0, 3, 1, 2).contiguous())
    metrics = run(der_fast_config(p, seed, workdir), overwrite=True,
                  log=lambda *a, **k: None, dataset=ds)
    return {"top1": [s["top1"] for s in metrics["steps"]],
            "nme_top1": [s.get("nme_top1") for s in metrics["steps"]],
            "loss": [s["loss_stage1"] for s in metrics["steps"]],
            "class_order": metrics["class_order"]}


def der_fast_config(p, seed: int, workdir: Path):
    """der_fast's ``Config`` for the protocol."""
    from der_fast.train import Config

    return Config(dataset="fashion_mnist", train_per_class=None, test_per_class=None,
                  backbone="resnet32", init_cls=p.init_cls, increment=p.increment,
                  class_seed=p.class_seed, memory_total=p.memory, epochs=p.epochs,
                  milestones=p.milestones, batch_size=p.batch_size, lr=p.lr,
                  weight_decay=p.weight_decay, init_weight_decay=p.init_weight_decay,
                  masks=False, prune=False, keep=None, lambda_s=0.0, stage2="weight_align",
                  seed=seed, impl=p.impl, device="cpu", out=str(workdir), progress=False,
                  plots=False, last_step=p.last_step)


def pycil_learner(p, seed: int, images, pycil: Path):
    """PyCIL's DER learner and data manager for the protocol (``models.der`` patched from the
    outside as the module docstring says), torch seeded with ``seed``. Returns
    ``(learner, data_manager, models.der)``."""
    import torch
    from torch.utils.data import DataLoader
    from torchvision import transforms

    sys.path.insert(0, str(pycil))
    import models.base as pycil_base
    import models.der as pycil_der
    import utils.data_manager as pycil_data
    from utils import factory

    class FashionMNIST32:  # the interface of PyCIL's utils.data.iData
        use_path = False
        train_trsf = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                      transforms.ToTensor()]
        test_trsf = [transforms.ToTensor()]
        common_trsf = [transforms.Normalize(mean=_MEAN, std=_STD)]
        class_order = list(range(10))

        def download_data(self):
            self.train_data, self.train_targets = images["train"]
            self.test_data, self.test_targets = images["test"]

    def loader(*args, **kwargs):  # worker processes would take cores the threads count on
        kwargs["num_workers"] = 0
        return DataLoader(*args, **kwargs)

    pycil_data._get_idata = lambda name: FashionMNIST32()
    pycil_base.DataLoader = pycil_der.DataLoader = loader
    schedule = dict(init_epoch=p.epochs, init_lr=p.lr, init_milestones=p.milestones,
                    init_weight_decay=p.init_weight_decay, epochs=p.epochs, lrate=p.lr,
                    milestones=p.milestones, weight_decay=p.weight_decay,
                    batch_size=p.batch_size, num_workers=0)
    for name, value in schedule.items():
        if not hasattr(pycil_der, name):
            raise RuntimeError(f"this PyCIL checkout's models/der.py has no {name!r}")
        setattr(pycil_der, name, value)

    data = pycil_data.DataManager("fashion_mnist32", True, p.class_seed, p.init_cls,
                                  p.increment)
    torch.manual_seed(seed)
    args = {"model_name": "der", "convnet_type": "resnet32", "dataset": "fashion_mnist32",
            "memory_size": p.memory, "memory_per_class": None, "fixed_memory": False,
            "device": [torch.device("cpu")], "seed": seed, "init_cls": p.init_cls,
            "increment": p.increment, "shuffle": True, "prefix": "parity"}
    learner = factory.get_model("der", args)
    learner.topk = 1
    return learner, data, pycil_der


class _EpochLog(logging.Handler):
    """Collects the training loss PyCIL logs after each step's last epoch ("... => Loss
    0.693, ..."): the mean loss of that epoch's batches."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.losses = []

    def emit(self, record):
        m = re.search(r"=> Loss ([0-9.]+|nan|inf)", record.getMessage())
        if m:
            self.losses.append(float(m.group(1)))


def run_pycil(p, seed: int, images, pycil: Path) -> dict:
    learner, data, _ = pycil_learner(p, seed, images, pycil)
    top1, nme = [], []
    root, epoch_log = logging.getLogger(), _EpochLog()
    level = root.level
    root.setLevel(logging.INFO)
    root.addHandler(epoch_log)
    try:
        n = data.nb_tasks if p.last_step is None else p.last_step + 1
        for _ in range(n):
            learner.incremental_train(data)
            cnn_accy, nme_accy = learner.eval_task()
            learner.after_task()
            top1.append(float(cnn_accy["top1"]))
            nme.append(float(nme_accy["top1"]) if nme_accy is not None else None)
    finally:
        root.removeHandler(epoch_log)
        root.setLevel(level)
    if len(epoch_log.losses) != n:
        raise RuntimeError(f"expected PyCIL to log {n} last-epoch losses, found "
                           f"{len(epoch_log.losses)}: has its models/der.py's log line changed?")
    return {"top1": top1, "nme_top1": nme, "loss": epoch_log.losses,
            "class_order": list(map(int, data._class_order))}


def _one(p) -> int:
    """The child process: one run, its JSON written atomically."""
    import torch

    torch.set_num_threads(p.threads)
    images, source = protocol_images(p.train_per_class, p.test_per_class)
    t0 = time.perf_counter()
    if p.system == "der_fast":
        res = run_der_fast(p, p.seed, images, Path(p.json).with_suffix(".run"))
    else:
        res = run_pycil(p, p.seed, images, Path(p.pycil))
    res.update(system=p.system, seed=p.seed, threads=p.threads, init_cls=p.init_cls,
               wall_s=time.perf_counter() - t0, data_source=source,
               n_train=int(len(images["train"][1])), n_test=int(len(images["test"][1])))
    tmp = Path(p.json).with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=1))
    os.replace(tmp, p.json)
    return 0


# ----------------------------------------------------------------------------------------------
# the comparison: runs, then one table
# ----------------------------------------------------------------------------------------------

def _mean_sd(v):
    n = len(v)
    m = sum(v) / n
    sd = math.sqrt(sum((x - m) ** 2 for x in v) / (n - 1)) if n > 1 else float("nan")
    return m, sd


def summarise(runs: list) -> dict:
    """Per system: per-step top-1 mean / sd, average incremental accuracy mean / sd, wall
    time; and der_fast - PyCIL with its standard error."""
    out = {}
    for system in SYSTEMS:
        rs = [r for r in runs if r["system"] == system]
        if not rs:
            continue
        steps = list(zip(*[r["top1"] for r in rs]))
        avg = [sum(r["top1"]) / len(r["top1"]) for r in rs]
        out[system] = {"seeds": [r["seed"] for r in rs],
                       "threads": sorted({r["threads"] for r in rs}),
                       "step_top1": [_mean_sd(list(s)) for s in steps],
                       "avg_inc": _mean_sd(avg), "avg_inc_runs": avg,
                       "last": _mean_sd([r["top1"][-1] for r in rs]),
                       "nme_last": _mean_sd([r["nme_top1"][-1] for r in rs])
                       if all(r.get("nme_top1") for r in rs) else None,
                       # the last epoch's training loss per step (runs from before the
                       # losses were recorded have none), and the seeds whose step 0 stayed
                       # near chance: top-1 under 100 / classes + 5 points
                       "step_loss": [_mean_sd(list(s)) for s in zip(*[r["loss"] for r in rs])]
                       if all("loss" in r for r in rs) else None,
                       "stalled": [r["seed"] for r in rs
                                   if r["top1"][0] < 100 / r["init_cls"] + 5]
                       if all("init_cls" in r for r in rs) else None,
                       # per thread count: (mean, sd, number of runs)
                       "wall_s": {th: (*_mean_sd(w), len(w)) for th, w in (
                           (th, [r["wall_s"] for r in rs if r["threads"] == th])
                           for th in sorted({r["threads"] for r in rs}))}}
    if len(out) == 2:
        a, b = out["der_fast"], out["pycil"]
        na, nb = len(a["seeds"]), len(b["seeds"])
        se = math.sqrt(a["avg_inc"][1] ** 2 / na + b["avg_inc"][1] ** 2 / nb) \
            if na > 1 and nb > 1 else float("nan")
        diff = a["avg_inc"][0] - b["avg_inc"][0]
        out["difference"] = {"avg_inc": diff, "se": se, "within_se": diff >= -se,
                             "wall_ratio": {th: b["wall_s"][th][0] / a["wall_s"][th][0]
                                            for th in a["wall_s"] if th in b["wall_s"]}}
    return out


def table(s: dict, p) -> str:
    f = lambda ms: f"{ms[0]:.2f} ± {ms[1]:.2f}"  # noqa: E731
    lines = [f"Protocol: Fashion-MNIST 32x32x3, {p.train_per_class} train / {p.test_per_class} "
             f"test images per class, {p.init_cls} + {p.increment}/step, class seed "
             f"{p.class_seed}, ResNet-32, memory {p.memory}, batch {p.batch_size}, lr {p.lr}, "
             f"{p.epochs} epochs per step (x0.1 at {p.milestones}), weight decay "
             f"{p.init_weight_decay} (step 0) / {p.weight_decay}, weight aligning, no masks"
             + ("." if p.last_step is None else f"; stopped after step {p.last_step}."), ""]
    systems = [k for k in SYSTEMS if k in s]
    n_steps = len(s[systems[0]]["step_top1"])
    lines.append("| | " + " | ".join(systems) + " |")
    lines.append("|---|" + "---:|" * len(systems))
    lines.append("| seeds | " + " | ".join(" ".join(map(str, s[k]["seeds"])) for k in systems)
                 + " |")
    for t in range(n_steps):
        lines.append(f"| top-1 after step {t} | "
                     + " | ".join(f(s[k]["step_top1"][t]) for k in systems) + " |")
    lines.append("| **average incremental top-1** | "
                 + " | ".join(f(s[k]["avg_inc"]) for k in systems) + " |")
    lines.append("| per seed | " + " | ".join(
        " / ".join(f"{v:.1f}" for v in s[k]["avg_inc_runs"]) for k in systems) + " |")
    lines.append("| last top-1 | " + " | ".join(f(s[k]["last"]) for k in systems) + " |")
    if all(s[k]["step_loss"] for k in systems):
        for t in range(n_steps):
            lines.append(f"| last epoch's training loss, step {t} | "
                         + " | ".join(f(s[k]["step_loss"][t]) for k in systems) + " |")
    if all(s[k]["stalled"] is not None for k in systems):
        lines.append("| seeds whose step 0 stayed near chance (top-1 < 100 / classes + 5) | "
                     + " | ".join(f"{len(s[k]['stalled'])}: "
                                  + (" ".join(map(str, s[k]["stalled"])) or "-")
                                  for k in systems) + " |")
    lines.append("| last NME top-1 (class means of the exemplars) | " + " | ".join(
        f(s[k]["nme_last"]) if s[k]["nme_last"] else "-" for k in systems) + " |")
    for th in sorted({th for k in systems for th in s[k]["wall_s"]}):
        lines.append(f"| wall time per run, s, {th} thread(s) | " + " | ".join(
            "{:.0f} ± {:.0f} ({} runs)".format(*s[k]["wall_s"][th]) if th in s[k]["wall_s"]
            else "-"
            for k in systems) + " |")
    if "difference" in s:
        d = s["difference"]
        lines += ["", f"der_fast - PyCIL, average incremental top-1: {d['avg_inc']:+.2f} "
                      f"(standard error of the difference {d['se']:.2f}): "
                      + ("not below PyCIL by more than one standard error" if d["within_se"]
                         else "BELOW PyCIL by more than one standard error")
                      + ". Wall time PyCIL / der_fast: " + ", ".join(
                          f"{r:.2f}x at {th} thread(s)" for th, r in d["wall_ratio"].items())
                      + "."]
    return "\n".join(lines) + "\n"


def _child_argv(p, system: str, seed: int, path: Path) -> list:
    argv = [sys.executable, os.path.abspath(__file__), "--_one", "--system", system,
            "--seed", str(seed), "--json", str(path)]
    for name in ("pycil", "threads", "train_per_class", "test_per_class", "init_cls",
                 "increment", "class_seed", "memory", "epochs", "batch_size", "lr",
                 "weight_decay", "init_weight_decay", "impl"):
        argv += ["--" + name.replace("_", "-"), str(getattr(p, name))]
    if p.last_step is not None:
        argv += ["--last-step", str(p.last_step)]
    return argv + ["--milestones", *map(str, p.milestones)]


def compare(p) -> int:
    out = Path(p.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    if p.memory // p.init_cls > p.train_per_class:
        sys.exit(f"--memory {p.memory}: PyCIL's herding selects memory / init-cls = "
                 f"{p.memory // p.init_cls} exemplars per class at step 0, more than the "
                 f"{p.train_per_class} images a class has (lower --memory)")
    if "pycil" in p.systems and not (Path(p.pycil) / "models" / "der.py").is_file():
        sys.exit(f"--pycil {p.pycil}: not a PyCIL checkout (no models/der.py)")
    todo = [(sy, se) for se in p.seeds for sy in p.systems
            if not (out / "runs" / f"{sy}_{se}.json").exists()]
    env = dict(os.environ, OMP_NUM_THREADS=str(p.threads), MKL_NUM_THREADS=str(p.threads),
               TQDM_DISABLE="1")
    running = []
    print(f"{len(todo)} runs to do, {p.jobs} at a time, {p.threads} thread(s) each", flush=True)
    while todo or running:
        while todo and len(running) < p.jobs:
            sy, se = todo.pop(0)
            path = out / "runs" / f"{sy}_{se}.json"
            log = open(out / "runs" / f"{sy}_{se}.log", "w")
            running.append((sy, se, subprocess.Popen(_child_argv(p, sy, se, path), env=env,
                                                     stdout=log, stderr=subprocess.STDOUT),
                            log, time.time()))
            print(f"started {sy} seed {se}", flush=True)
        time.sleep(2)
        for job in list(running):
            sy, se, proc, log, t0 = job
            if proc.poll() is not None:
                running.remove(job)
                log.close()
                status = "done" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
                print(f"{sy} seed {se}: {status} in {time.time() - t0:.0f} s", flush=True)
    runs = [json.loads(f.read_text()) for f in sorted((out / "runs").glob("*.json"))]
    runs = sorted((r for r in runs if r["seed"] in p.seeds and r["system"] in p.systems),
                  key=lambda r: r["seed"])
    orders = {tuple(r["class_order"]) for r in runs}
    if len(orders) > 1:
        sys.exit(f"the systems used different class orders: {orders}")
    s = summarise(runs)
    (out / "parity.json").write_text(json.dumps({"summary": s, "runs": runs}, indent=1))
    text = table(s, p)
    (out / "parity.md").write_text(text)
    print(text)
    return 0


def _parser():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    a = ap.add_argument
    a("--pycil", default=os.environ.get("PYCIL_DIR", ""), help="a PyCIL checkout")
    a("--out", default="parity", help="output folder (parity/)")
    a("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    a("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    a("--jobs", type=int, default=1, help="runs at a time (1)")
    a("--threads", type=int, default=1, help="intra-op threads per run (1)")
    a("--train-per-class", type=int, default=200)
    a("--test-per-class", type=int, default=100)
    a("--init-cls", type=int, default=2)
    a("--increment", type=int, default=2)
    a("--class-seed", type=int, default=1993)
    a("--memory", type=int, default=200,
      help="exemplar memory in total (200); PyCIL's herding needs memory / init-cls <= "
           "train-per-class")
    a("--epochs", type=int, default=6)
    a("--milestones", type=int, nargs="*", default=[4, 5])
    a("--batch-size", type=int, default=32)
    a("--lr", type=float, default=0.05)
    a("--weight-decay", type=float, default=2e-4)
    a("--init-weight-decay", type=float, default=5e-4)
    a("--impl", default="fast", choices=("fast", "reference"))
    a("--last-step", type=int, default=None,
      help="stop both systems after this step (0-based; default: the last); step 0 alone "
           "compares the base training without the incremental steps' noise")
    a("--_one", action="store_true", help=argparse.SUPPRESS)
    a("--system", choices=SYSTEMS, help=argparse.SUPPRESS)
    a("--seed", type=int, help=argparse.SUPPRESS)
    a("--json", help=argparse.SUPPRESS)
    return ap


def main(argv=None) -> int:
    p = _parser().parse_args(argv)
    return _one(p) if p._one else compare(p)


if __name__ == "__main__":
    sys.exit(main())
