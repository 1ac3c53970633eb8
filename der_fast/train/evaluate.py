"""Evaluation and metrics: accuracy (classifier and NME) on the seen classes, a step's metrics
row, the summary."""

from __future__ import annotations

import time

import numpy as np
import torch


@torch.no_grad()
def extract(model, data, split, indices, batch_size, device) -> torch.Tensor:
    """The feature vectors of ``indices`` (eval mode, on the CPU), for herding."""
    model.eval()
    feats = [model.extract_vector(x).float().cpu()
             for x, _ in data.batches(split, indices, batch_size, device=device)]
    return torch.cat(feats) if feats else torch.zeros(0, model.feature_dim)


EPS = 1e-8  # PyCIL's EPSILON in the feature normalisation


def _unit(f: torch.Tensor) -> torch.Tensor:
    return f / (f.norm(dim=1, keepdim=True) + EPS)


@torch.no_grad()
def exemplar_means(model, data, memory, batch_size, device):
    """PyCIL's class means for NME (``BaseLearner._construct_exemplar``): per class, the mean
    of the L2-normalised super-features of its exemplars (test transforms, no flip), itself
    normalised. Returns ``(classes, means [C, d])``, or None when some class has no
    exemplar."""
    classes = memory.classes
    if not classes or any(len(memory.exemplars[c]) == 0 for c in classes):
        return None
    means = []
    for c in classes:
        mu = _unit(extract(model, data, "train", memory.exemplars[c], batch_size,
                           device).double()).mean(0)
        means.append(mu / mu.norm())
    return torch.as_tensor(classes), torch.stack(means)


def nme_predict(features: torch.Tensor, classes: torch.Tensor, means: torch.Tensor):
    """Nearest mean of exemplars (PyCIL's ``_eval_nme``): the class whose mean is nearest in
    squared Euclidean distance to the L2-normalised feature."""
    f = _unit(features.double().cpu())
    d = torch.cdist(f, means.to(f)) ** 2
    return classes[d.argmin(1)]


def pycil_grouped(pred: torch.Tensor, y: torch.Tensor, block: int = 10) -> list:
    """Accuracy per block of ``block`` labels, PyCIL's grouping (``utils/toolkit.accuracy``:
    blocks starting at 0, 10, ... below the largest label)."""
    out = []
    for lo in range(0, int(y.max()), block):
        sel = (y >= lo) & (y < lo + block)
        out.append(100.0 * float((pred[sel] == y[sel]).float().mean()))
    return out


@torch.no_grad()
def evaluate(model, data, t, cfg, device, nme_means=None) -> dict:
    """Top-1 (and top-5) on the test images of all seen classes, plus accuracy per task; with
    ``nme_means`` (from :func:`exemplar_means`), the NME top-1 too. ``pycil_grouped_top1``
    (and ``nme_pycil_grouped_top1``): accuracy per block of 10 classes, PyCIL's grouping."""
    model.eval()
    idx = data.test_indices(t)
    if cfg.test_per_class is not None:  # the first N test images of each class
        y = data.labels("test")[idx]
        keep = np.concatenate([idx[y == c][: cfg.test_per_class] for c in np.unique(y)])
        idx = np.sort(keep)
    preds, top5_hits, ys, nme = [], [], [], []
    for x, y in data.batches("test", idx, 2 * cfg.batch_size, device=device):
        out = model(x)
        logits = out["logits"].float()
        if nme_means is not None:
            nme.append(nme_predict(out["features"], *nme_means))
        preds.append(logits.argmax(1).cpu())
        k = min(5, logits.shape[1])
        top5_hits.append((logits.topk(k, 1).indices == y[:, None]).any(1).cpu())
        ys.append(y.cpu())
    pred, y, hit5 = torch.cat(preds), torch.cat(ys), torch.cat(top5_hits)
    correct = pred == y
    per_task = []
    lo = 0
    for cls in data.steps[: t + 1]:
        hi = lo + len(cls)
        sel = (y >= lo) & (y < hi)
        per_task.append(100.0 * float(correct[sel].float().mean()) if sel.any() else float("nan"))
        lo = hi
    res = {"top1": 100.0 * float(correct.float().mean()), "per_task_top1": per_task,
           "n_test": int(len(y)), "pycil_grouped_top1": pycil_grouped(pred, y)}
    if nme_means is not None:
        pred_nme = torch.cat(nme)
        res["nme_top1"] = 100.0 * float((pred_nme == y).float().mean())
        res["nme_pycil_grouped_top1"] = pycil_grouped(pred_nme, y)
    if cfg.top5:
        res["top5"] = 100.0 * float(hit5.float().mean())
    return res


def forgetting(per_task_history: list) -> float:
    """Average forgetting: for each task but the last, best accuracy at any earlier step minus
    accuracy at the final step, averaged (0 for a single step)."""
    if len(per_task_history) < 2:
        return 0.0
    final = per_task_history[-1]
    drops = []
    for j in range(len(final) - 1):
        best = max(h[j] for h in per_task_history[:-1] if len(h) > j)
        drops.append(best - final[j])
    return float(np.mean(drops)) if drops else 0.0


def forgetting_pycil(grouped_history: list) -> float:
    """Forgetting as PyCIL's trainer reports it: accuracy per block of 10 classes
    (:func:`pycil_grouped`) after each step, unseen blocks counted 0; over the first
    (steps - 1) blocks, best accuracy at any step minus accuracy at the last step, averaged
    (0 for a single step). Unlike :func:`forgetting` the best includes the last step, so no
    block counts negative forgetting."""
    n = len(grouped_history)
    if n < 2:
        return 0.0
    width = max(n, max(len(h) for h in grouped_history))
    table = np.zeros((width, n))  # [block, step]
    for j, h in enumerate(grouped_history):
        table[: len(h), j] = h
    return float(np.mean((table.max(1) - table[:, -1])[: n - 1]))


def step_row(model, data, memory, cfg, t, device, hw, partial: dict, previous: list) -> dict:
    """Evaluate after step t and return its metrics row: accuracy, parameters and MACs
    (pruned and, with pruning, unpruned), memory size, the stage results and times in
    ``partial``. ``previous``: the rows of the earlier steps."""
    n_old, n_known = data.num_old(t), data.num_known(t)
    t0 = time.perf_counter()
    means = exemplar_means(model, data, memory, 2 * cfg.batch_size, device)
    ev = evaluate(model, data, t, cfg, device, nme_means=means)
    time_eval = time.perf_counter() - t0
    macs = model.extractor_macs(hw)
    row = {"step": t, "n_classes": n_known, "n_new": n_known - n_old, **ev,
           "params": model.num_params(),
           "extractor_params": model.extractor_params(),
           "macs": sum(macs), "extractor_macs": macs,
           "memory_size": len(memory), "time_eval_s": time_eval, **partial}
    if cfg.masks and cfg.prune:
        # unpruned: every extractor at the width it had before its own pruning
        unp = [s["extractor_params_unpruned"][-1] for s in previous]
        row["extractor_params_unpruned"] = unp + [row["extractor_params_unpruned"][-1]]
        row["params_unpruned"] = row["params"] + sum(row["extractor_params_unpruned"]) \
            - sum(row["extractor_params"])
        unm = [s["extractor_macs_unpruned"][-1] for s in previous]
        row["extractor_macs_unpruned"] = unm + [row["extractor_macs_unpruned"][-1]]
        row["macs_unpruned"] = sum(row["extractor_macs_unpruned"])
    else:
        for k in ("params_unpruned", "extractor_params_unpruned", "extractor_macs_unpruned"):
            row.pop(k, None)
    row["time_total_s"] = sum(v for k, v in row.items()
                              if k.startswith("time_") and k != "time_total_s")
    return row


def summary(steps: list) -> dict:
    """The whole run's numbers from its step rows (averages over steps, final values)."""
    if not steps:
        return {}
    accs = [s["top1"] for s in steps]
    out = {"avg_incremental_top1": float(np.mean(accs)), "last_top1": accs[-1],
           "forgetting": forgetting([s["per_task_top1"] for s in steps]),
           "avg_params": float(np.mean([s["params"] for s in steps])),
           "final_params": steps[-1]["params"],
           "total_time_s": float(sum(s["time_total_s"] for s in steps))}
    out["forgetting_pycil"] = forgetting_pycil([s.get("pycil_grouped_top1", [])
                                                for s in steps])
    if all("nme_top1" in s for s in steps):
        out["avg_incremental_nme"] = float(np.mean([s["nme_top1"] for s in steps]))
        out["last_nme"] = steps[-1]["nme_top1"]
        out["forgetting_pycil_nme"] = forgetting_pycil([s["nme_pycil_grouped_top1"]
                                                        for s in steps])
    if "top5" in steps[0]:
        out["avg_incremental_top5"] = float(np.mean([s["top5"] for s in steps]))
        out["last_top5"] = steps[-1]["top5"]
    ext = [sum(s["extractor_params"]) for s in steps]
    out["avg_extractor_params"] = float(np.mean(ext))
    out["final_extractor_params"] = ext[-1]
    if all("macs" in s for s in steps):
        out["avg_macs"] = float(np.mean([s["macs"] for s in steps]))
        out["final_macs"] = steps[-1]["macs"]
    if all("params_unpruned" in s for s in steps):
        out["avg_params_unpruned"] = float(np.mean([s["params_unpruned"] for s in steps]))
        unp = [sum(s["extractor_params_unpruned"]) for s in steps]
        out["avg_extractor_params_unpruned"] = float(np.mean(unp))
        out["final_extractor_params_unpruned"] = unp[-1]
        out["avg_macs_unpruned"] = float(np.mean([s["macs_unpruned"] for s in steps]))
        out["final_macs_unpruned"] = steps[-1]["macs_unpruned"]
    return out
