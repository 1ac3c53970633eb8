"""PyCIL's DER and der_fast in lockstep: every incremental step trained by both from the same
state on the same batches, so that any difference in the recipe shows without seed noise.

    python benchmarks/parity/parity_lockstep.py --pycil PATH/TO/PyCIL --seed 1 --out lockstep.json

The protocol is ``benchmarks/parity/parity.py``'s (the same flags). PyCIL runs its whole learner as
usual, in float64 (its modules and, through ``ToTensor``, its images); at every compared step
this script records the state PyCIL's ``_train`` starts from (after ``update_fc``: the new
extractor copied from the last one, the new classifier rows drawn) and every augmented batch
PyCIL's train loader yields, epoch by epoch. der_fast then loads that state
(``der_fast.compat``) and trains the same step with its own trainer (``der_fast.train.stage1``,
its lr schedule, optimiser, losses and frozen extractors), fed the recorded batches in place of
its own draws, and aligns the weights (``weight_align``). ``--first-step`` / ``--last-step``
choose the compared steps; PyCIL alone trains the steps before them.

Rounding makes any two float32 trainings drift apart over the step's SGD iterations, so each
result is measured against the same step trained by der_fast's reference in float64 (after
k = 1, 2, 4, ..., 64 iterations and at the end): PyCIL (float64), der_fast's ``--impl fast``
(float64) and ``--impl reference`` in float32 (the size of float32 rounding). If the recipes
are the same, PyCIL lands on that float64 trajectory up to the order of float64 sums. A
control shows how far a small change of recipe moves it: the reference in float64 with 2.5x
the step's weight decay.

It also checks the two other things a step does: the exemplars (der_fast's ``herding`` on the
features PyCIL computed for each new class must pick PyCIL's exemplars, in PyCIL's order) and
the test accuracy (der_fast's model with PyCIL's final state must predict what PyCIL does).
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
from pathlib import Path

if __package__:  # imported (benchmarks.parity.parity_lockstep) or run with python -m
    from . import parity
else:  # run as a script: its folder is first on sys.path
    import parity


class _Recorder:
    """Wraps PyCIL's shuffled train loader: yields what it yields and keeps every
    ``(inputs, targets)`` batch, one list per pass (epoch)."""

    def __init__(self):
        self.epochs = []

    def wrap(self, loader):
        rec = self

        class Recording:
            def __len__(self):
                return len(loader)

            def __iter__(self):
                batches = []
                rec.epochs.append(batches)
                for item in loader:
                    batches.append((item[1].clone(), item[2].clone()))
                    yield item

        return Recording()


CHECKPOINTS = (1, 2, 4, 8, 16, 32, 64)  # SGD iterations after which the states are compared


class _Trace:
    """The states of ``module`` after k SGD iterations (k in ``CHECKPOINTS``), taken by a
    forward pre-hook at its (k+1)-th training-mode forward (evaluation passes are skipped)."""

    def __init__(self, module):
        self.n = 0
        self.states = {}
        self._handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        if module.training:
            if self.n in CHECKPOINTS:
                self.states[self.n] = copy.deepcopy(module.state_dict())
            self.n += 1

    def close(self) -> dict:
        self._handle.remove()
        return self.states


def _distance(state, truth, keys) -> float:
    """Relative L2 distance over ``keys``: ||state - truth|| / ||truth||."""
    num = sum(float(((state[k].double() - truth[k].double()) ** 2).sum()) for k in keys)
    den = sum(float((truth[k].double() ** 2).sum()) for k in keys)
    return math.sqrt(num / den)


def _der_fast_model(impl, task_sizes, dtype, state=None):
    """der_fast's model (``impl``) with ``task_sizes``' extractors, in ``dtype``, holding a
    PyCIL ``state`` if given."""
    from der_fast import DERNet
    from der_fast.compat import from_pycil_state_dict

    cls = DERNet
    if impl == "fast":
        from der_fast import FastDERNet as cls
    model = cls("resnet32", use_masks=False)
    seen = 0
    for size in task_sizes:
        seen += size
        model.update_fc(seen)
    model.to(dtype)  # before loading: a float64 state must not pass through float32
    if state is not None:
        model.load_state_dict(from_pycil_state_dict(state, "resnet32", task_sizes=task_sizes))
    return model


def der_fast_step(p, seed, start_state, task_sizes, epochs, *, impl, dtype, weight_decay=None):
    """der_fast's step ``t = len(task_sizes) - 1`` (stage 1, then weight aligning if t > 0)
    from PyCIL's ``start_state``, fed ``epochs`` (PyCIL's recorded batches). Returns the
    model; ``model.trace`` holds its states at the ``CHECKPOINTS``."""
    import numpy as np

    import der_fast.train.loop as loop
    from der_fast.train import stage1

    model = _der_fast_model(impl, task_sizes, dtype, start_state)
    cfg = parity.der_fast_config(p, seed, Path("."))
    t = len(task_sizes) - 1
    if weight_decay is not None:
        cfg.weight_decay = cfg.init_weight_decay = weight_decay
    feed = iter(epochs)

    def recorded_batches(data, indices, cfg, gen, device, chunks=1, mine=(0,)):
        for x, y in next(feed):
            yield [(x.to(dtype), y)], len(y)

    saved = loop.train_batches
    loop.train_batches = recorded_batches
    trace = _Trace(model)
    try:
        n = sum(len(y) for _, y in epochs[0])
        stage1(model, None, np.arange(n), cfg, t, sum(task_sizes[:-1]), "cpu")
    finally:
        loop.train_batches = saved
        trace.close()
    if t > 0:
        model.weight_align(task_sizes[-1])
    model.freeze_conv()
    model.trace = trace.states
    return model


def lockstep(p, seed: int, log=print, out=None) -> dict:
    """The lockstep of one seed, steps ``p.first_step`` to ``p.last_step`` (default: all);
    the result so far is written to ``out`` (JSON) after every step."""
    import numpy as np
    import torch
    from torch.utils.data import DataLoader

    from der_fast.compat import from_pycil_state_dict
    from der_fast.data import herding

    images, source = parity.protocol_images(p.train_per_class, p.test_per_class)
    # PyCIL in float64 (its modules and, through ToTensor, its images): two float64 runs of
    # one recipe agree to ~1e-12 after a step, where float32 rounding alone grows to ~1e-2
    torch.set_default_dtype(torch.float64)
    learner, data, pycil_der = parity.pycil_learner(p, seed, images, Path(p.pycil))
    rec = _Recorder()
    plain_loader = pycil_der.DataLoader
    pycil_der.DataLoader = lambda ds, *a, **kw: (rec.wrap(plain_loader(ds, *a, **kw))
                                                 if kw.get("shuffle") else
                                                 plain_loader(ds, *a, **kw))
    snaps = {}
    pycil_train = learner._train

    def recording_train(train_loader, test_loader):
        snaps["start"] = copy.deepcopy(learner._network.state_dict())
        rec.epochs.clear()
        trace = _Trace(learner._network)
        try:
            pycil_train(train_loader, test_loader)
        finally:
            snaps["trace"] = trace.close()
        snaps["end"] = copy.deepcopy(learner._network.state_dict())

    learner._train = recording_train
    steps = []
    task_sizes = []
    f64, f32 = torch.float64, torch.float32
    variants = {"der_fast fast, float64": dict(impl="fast", dtype=f64),
                "der_fast reference, float32": dict(impl="reference", dtype=f32),
                "control: reference, float64, weight decay x2.5":
                    dict(impl="reference", dtype=f64)}
    res = {"seed": seed, "data_source": source, "pycil_commit": _commit(p.pycil),
           "threads": torch.get_num_threads(), "steps": steps}
    last = data.nb_tasks - 1 if p.last_step is None else min(p.last_step, data.nb_tasks - 1)
    for t in range(last + 1):
        t0 = time.perf_counter()
        learner.incremental_train(data)
        task_sizes.append(data.get_task_size(t))
        if t < p.first_step:  # PyCIL only: the state the compared steps start from
            learner.after_task()
            continue
        cnn, _ = learner.eval_task()
        seen = sum(task_sizes)
        epochs = [list(e) for e in rec.epochs]
        labels = torch.cat([y for _, y in epochs[0]])
        row = {"step": t, "pycil_top1": float(cnn["top1"]), "epochs": len(epochs),
               "batches_per_epoch": len(epochs[0]),
               "train_images_per_class": np.bincount(labels.numpy()).tolist()}
        truth_model = der_fast_step(p, seed, snaps["start"], task_sizes, epochs,
                                    impl="reference", dtype=f64)
        truth = truth_model.state_dict()
        pycil_end = from_pycil_state_dict(snaps["end"], "resnet32", task_sizes=task_sizes)
        start = from_pycil_state_dict(snaps["start"], "resnet32", task_sizes=task_sizes)
        floats = [k for k, v in truth.items() if isinstance(v, torch.Tensor)
                  and v.is_floating_point() and k in pycil_end]
        bn_keys = [k for k in floats if k.endswith(("running_mean", "running_var"))]
        keys = [k for k in floats if k not in bn_keys]  # the parameters
        runs = {"pycil, float64": pycil_end}
        traces = {"pycil, float64": {k: from_pycil_state_dict(v, "resnet32",
                                                              task_sizes=task_sizes)
                                     for k, v in snaps["trace"].items()}}
        for name, kw in variants.items():
            if name.startswith("control"):
                wd = p.init_weight_decay if t == 0 else p.weight_decay
                kw = dict(kw, weight_decay=2.5 * wd)
            model = der_fast_step(p, seed, snaps["start"], task_sizes, epochs, **kw)
            runs[name], traces[name] = model.state_dict(), model.trace
        n_iter = sum(len(e) for e in epochs)
        row["iterations"] = n_iter
        row["step_size"] = _distance(start, truth, keys)
        # after k iterations: distance to the float64 reference's state after k iterations
        row["distance_after"] = {
            n: {k: _distance(tr[k], truth_model.trace[k], keys)
                for k in CHECKPOINTS if k in tr and k in truth_model.trace}
            for n, tr in traces.items()}
        row["distance_to_float64"] = {n: _distance(s, truth, keys) for n, s in runs.items()}
        row["bn_stats_distance_to_float64"] = {n: _distance(s, truth, bn_keys)
                                               for n, s in runs.items()}

        # the test set through der_fast's model holding PyCIL's final state
        model = _der_fast_model("reference", task_sizes, f64, snaps["end"]).eval()
        learner._network.eval()
        agree = total = 0
        with torch.no_grad():
            for _, x, y in learner.test_loader:
                a = model(x)["logits"].argmax(1)
                b = learner._network(x)["logits"].argmax(1)
                agree += int((a == b).sum())
                total += len(y)
        row["test_predictions_equal"] = agree / total

        # herding: der_fast's selection on PyCIL's features of each new class
        m = learner.samples_per_class
        same = []
        for c in range(seen - task_sizes[-1], seen):
            x, _, ds = data.get_dataset(np.arange(c, c + 1), source="train", mode="test",
                                        ret_data=True)
            vectors, _ = learner._extract_vectors(
                DataLoader(ds, batch_size=p.batch_size, shuffle=False, num_workers=0))
            ours = x[herding(vectors, m)]
            theirs = learner._data_memory[learner._targets_memory == c]
            same.append(len(ours) == len(theirs) and bool((ours == theirs).all()))
        row["herding_same_exemplars_in_order"] = same
        row["exemplars_per_class"] = m
        row["wall_s"] = time.perf_counter() - t0
        log(json.dumps(row))
        steps.append(row)
        if out is not None:
            tmp = Path(out).with_suffix(".tmp")
            tmp.write_text(json.dumps(res, indent=1))
            tmp.replace(out)
        learner.after_task()
    torch.set_default_dtype(torch.float32)
    return res


def _commit(path) -> str:
    import subprocess

    try:
        return subprocess.run(["git", "-C", str(path), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def table(res: dict) -> str:
    """One row per step and run: the relative distance to der_fast's float64 reference after
    k SGD iterations and at the end of the step."""
    names = list(res["steps"][0]["distance_to_float64"])
    # iteration counts are the keys (strings once read back from JSON)
    after_k = [{n: {int(k): v for k, v in r["distance_after"][n].items()} for n in names}
               for r in res["steps"]]
    ks = [k for k in CHECKPOINTS if any(k in a[names[0]] for a in after_k)]
    lines = ["| step | run | " + " | ".join(f"after {k}" for k in ks)
             + " | end of step | test predictions equal | herding equal |",
             "|---:|---|" + "---:|" * (len(ks) + 3)]
    for r, a in zip(res["steps"], after_k):
        for n in names:
            after = a[n]
            cells = [f"{after[k]:.1e}" if k in after else "" for k in ks]
            if n == names[0]:
                extra = (f" | {100 * r['test_predictions_equal']:.1f} % | "
                         f"{sum(r['herding_same_exemplars_in_order'])}/"
                         f"{len(r['herding_same_exemplars_in_order'])} classes |")
                head = f"| {r['step']} ({r['iterations']} it., moved {r['step_size']:.2f}) | "
            else:
                extra, head = " | | |", "| | "
            lines.append(head + n + " | " + " | ".join(cells)
                         + f" | {r['distance_to_float64'][n]:.1e}" + extra)
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = parity._parser()
    ap.description = __doc__.split("\n\n")[0]
    ap.add_argument("--first-step", type=int, default=0,
                    help="compare from this step on (default 0); PyCIL alone trains the "
                         "steps before it")
    # parity.py's --last-step (here each compared step costs about five trainings of it, in
    # float64), --seed (the torch seed) and --out (here: the JSON file written)
    ap.set_defaults(seed=1, out="lockstep.json")
    p = ap.parse_args(argv)
    if p.first_step < 0 or p.last_step is not None and p.last_step < p.first_step:
        ap.error(f"need 0 <= --first-step ({p.first_step}) <= --last-step ({p.last_step})")
    if not (Path(p.pycil) / "models" / "der.py").is_file():
        sys.exit(f"--pycil {p.pycil!r}: not a PyCIL checkout (no models/der.py)")
    import torch

    torch.set_num_threads(p.threads)
    res = lockstep(p, p.seed, log=lambda s: print(s, flush=True), out=p.out)
    print(table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
