"""Exemplar memory: iCaRL herding, the per-class rehearsal :class:`Memory`, and the feature
callback it herds with (the data layer does not import the model)."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import torch

from .batches import iterate_batches
from .datasets import ClassDataset, DataError, int64_array


def herding(features, m: int) -> np.ndarray:
    """iCaRL herding: ordered indices of ``m`` exemplars (``min(m, n)``) from ``features``
    [n, d]. Rows are L2-normalised (idempotent if they already are); step k picks, among
    unpicked samples, the one whose addition brings the mean of the k picked features
    closest to the class mean (ties -> lowest index)."""
    f = torch.as_tensor(features).detach().to(torch.float64)
    if f.dim() != 2:
        raise ValueError(f"herding expects features [n, d], got {tuple(f.shape)}")
    n = f.shape[0]
    m = min(int(m), n)
    if m <= 0:
        return np.zeros(0, dtype=np.int64)
    f = f / (f.norm(dim=1, keepdim=True) + 1e-8)
    mu = f.mean(0)
    picked = torch.zeros(n, dtype=torch.bool)
    acc = torch.zeros_like(mu)
    order = []
    for k in range(1, m + 1):
        d = ((mu - (acc + f) / k) ** 2).sum(1)
        d[picked] = float("inf")
        i = int(torch.argmin(d))
        order.append(i)
        picked[i] = True
        acc += f[i]
    return np.asarray(order, dtype=np.int64)


class Memory:
    """Rehearsal memory of exemplar dataset indices (training split) per class.

    Exactly one of ``total`` (fixed total, split evenly: ``total // n_seen_classes`` per
    class) or ``per_class`` (fixed number per class). Each class keeps its herding order, so
    shrinking the budget truncates to the best exemplars.
    """

    def __init__(self, total: Optional[int] = None, per_class: Optional[int] = None):
        if (total is None) == (per_class is None):
            raise DataError("Memory: give exactly one of total= or per_class=")
        if total is not None and total < 0 or per_class is not None and per_class < 0:
            raise DataError("Memory: budget must be non-negative")
        self.total, self.per_class = total, per_class
        self.exemplars: dict = {}  # class -> np.ndarray of dataset indices (herding order)

    def per_class_budget(self, n_seen_classes: int) -> int:
        if self.per_class is not None:
            return self.per_class
        if n_seen_classes <= 0:
            raise DataError("per_class_budget: need at least one class")
        if self.total < n_seen_classes:
            raise DataError(f"memory total {self.total} is smaller than the number of classes "
                            f"({n_seen_classes}): not even one exemplar per class")
        return self.total // n_seen_classes

    @property
    def classes(self) -> list:
        return sorted(self.exemplars)

    def __len__(self) -> int:
        return sum(len(v) for v in self.exemplars.values())

    def indices(self) -> np.ndarray:
        """All exemplar dataset indices (classes in ascending order, herding order within)."""
        if not self.exemplars:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([self.exemplars[c] for c in self.classes]).astype(np.int64)

    def reduce(self, m: int) -> None:
        """Truncate every class to its first ``m`` exemplars (herding order kept)."""
        for c in self.exemplars:
            self.exemplars[c] = self.exemplars[c][:m]

    def update(self, feature_fn: Callable, labels, new_classes: Sequence[int],
               candidates=None) -> int:
        """Add ``new_classes`` and rebalance; returns the per-class budget used.

        ``labels``: labels of the training split (the numbering ``new_classes`` uses, e.g.
        :attr:`IncrementalData.train_y`). ``feature_fn(indices) -> [len(indices), d]``
        features of those training images under test transforms (e.g. the model's
        extract_vector). ``candidates`` restricts the pool (default: the whole split).
        Old classes are truncated to the new budget; new ones are herded.
        """
        new_classes = [int(c) for c in new_classes]
        dup = [c for c in new_classes if c in self.exemplars]
        if dup:
            raise DataError(f"Memory.update: classes {dup} are already in memory")
        m = self.per_class_budget(len(self.exemplars) + len(new_classes))
        self.reduce(m)
        labels = int64_array(labels)
        pool = np.arange(len(labels)) if candidates is None else int64_array(candidates)
        for c in new_classes:
            idx = pool[labels[pool] == c]
            if len(idx) == 0:
                raise DataError(f"Memory.update: no training samples of class {c}")
            if m == 0:
                self.exemplars[c] = idx[:0]
                continue
            feats = feature_fn(idx)
            if len(feats) != len(idx):
                raise DataError(f"feature_fn returned {len(feats)} rows for {len(idx)} indices")
            self.exemplars[c] = idx[herding(feats, m)]
        return m

    def state_dict(self) -> dict:
        return {"total": self.total, "per_class": self.per_class,
                "exemplars": {int(c): v.tolist() for c, v in self.exemplars.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.total, self.per_class = state["total"], state["per_class"]
        self.exemplars = {int(c): np.asarray(v, dtype=np.int64)
                          for c, v in state["exemplars"].items()}


def make_feature_fn(extract: Callable, data: ClassDataset, *, split: str = "train",
                    batch_size: int = 256, device=None) -> Callable:
    """A ``feature_fn`` for :meth:`Memory.update`: runs ``extract`` (e.g. the model's
    extract_vector, already in eval mode) on the test-transformed images of the given
    indices of ``split`` under ``torch.no_grad()``; returns float32 CPU features [n, d]."""

    def feature_fn(indices) -> torch.Tensor:
        out = []
        with torch.no_grad():
            for x, _ in iterate_batches(data, split, indices, batch_size, device=device):
                out.append(extract(x).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, 0)

    return feature_fn
