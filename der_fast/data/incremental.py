"""Class-incremental splits: the seeded class order, the classes of each step, the
remapped-label view of a dataset (:class:`IncrementalData`) and class-balanced subsets."""

from __future__ import annotations

from typing import Iterator, Optional, Sequence, Union

import numpy as np
import torch

from .batches import iterate_batches
from .datasets import ClassDataset, DataError, PathLike, canonical_split, int64_array
from .loaders import check_image_files, limit_per_class, load_dataset


def class_order(num_classes: int, seed: Optional[int] = 1993) -> list:
    """Seeded class order, identical to PyCIL's (``np.random.seed(seed);
    np.random.permutation(n)``). ``seed=None`` keeps the natural order 0..n-1."""
    if num_classes <= 0:
        raise DataError(f"num_classes must be positive, got {num_classes}")
    if seed is None:
        return list(range(num_classes))
    return np.random.RandomState(seed).permutation(num_classes).tolist()


def make_steps(num_classes: int, init_cls: int, increment: int,
               order: Optional[Sequence[int]] = None) -> list:
    """Split classes into steps: ``init_cls`` classes first, then ``increment`` per step.

    Without ``order`` the classes are the order positions (= remapped labels: step 0 is
    ``0..init_cls-1``); with ``order`` they are the original class ids in that order.
    """
    if init_cls <= 0:
        raise DataError(f"init_cls must be positive, got {init_cls}")
    if init_cls > num_classes:
        raise DataError(f"init_cls={init_cls} exceeds the number of classes ({num_classes})")
    rest = num_classes - init_cls
    if rest > 0:
        if increment <= 0:
            raise DataError(f"increment must be positive, got {increment}")
        if rest % increment != 0:
            raise DataError(f"increment={increment} does not divide the {rest} classes left "
                            f"after init_cls={init_cls} (num_classes={num_classes})")
    if order is not None:
        order = list(order)
        if sorted(order) != list(range(num_classes)):
            raise DataError(f"class order must be a permutation of 0..{num_classes - 1}")
    labels = order if order is not None else list(range(num_classes))
    steps = [labels[:init_cls]]
    for s in range(init_cls, num_classes, increment if rest else 1):
        steps.append(labels[s:s + increment])
    return steps


class IncrementalData:
    """A dataset cut into class-incremental steps.

    Labels are remapped so that a class's position in ``order`` is its new label (step 0
    holds labels ``0..init_cls-1``, etc.). ``train_y`` / ``test_y`` are the remapped labels
    (int64 numpy); indices returned here index the dataset's train/test arrays.

    ``dataset`` is a name (loaded with :func:`load_dataset` using ``root``, ``download``,
    ``max_train_per_class``, ``verify``) or an already loaded :class:`ClassDataset`.
    ``init_cls=None`` means B0 (``init_cls = increment``).
    """

    def __init__(self, dataset: Union[str, ClassDataset], init_cls: Optional[int],
                 increment: int, *, root: Optional[PathLike] = None, download: bool = False,
                 seed: Optional[int] = 1993, order: Optional[Sequence[int]] = None,
                 max_train_per_class: Optional[int] = None, verify: bool = True):
        if isinstance(dataset, str):
            dataset = load_dataset(dataset, root, download=download,
                                   max_train_per_class=max_train_per_class, verify=verify)
        elif max_train_per_class is not None:
            dataset = limit_per_class(dataset, max_train_per_class)
        self.dataset = dataset
        self.info = dataset.info
        n = self.info.num_classes
        self.order = list(order) if order is not None else class_order(n, seed)
        if sorted(self.order) != list(range(n)):
            raise DataError(f"class order must be a permutation of 0..{n - 1}")
        init_cls = increment if init_cls is None or init_cls == 0 else init_cls
        self.init_cls, self.increment = init_cls, increment
        self.steps = make_steps(n, init_cls, increment)  # remapped labels per step
        remap = np.empty(n, dtype=np.int64)
        remap[np.asarray(self.order)] = np.arange(n)
        self.remap = remap  # original class -> new label
        self.train_y = remap[dataset.train_y]
        self.test_y = remap[dataset.test_y]

    def check_complete(self, test_per_class: Optional[int] = None) -> None:
        """Every class of the class order has training and test images, and every image file
        a path-based dataset will read opens as an image (only the first ``test_per_class``
        test images of each class are read); DataError naming the class or files otherwise."""
        for split, y in (("train", self.dataset.train_y), ("test", self.dataset.test_y)):
            counts = np.bincount(y, minlength=self.num_classes)
            missing = [int(c) for c in self.order if counts[c] == 0]
            if missing:
                names = self.dataset.class_names
                named = [f"{c} ({names[c]})" if names else str(c) for c in missing[:10]]
                raise DataError(f"{self.info.name}: no {split} images of class(es) "
                                f"{', '.join(named)} (of {self.num_classes} in the class order)")
        if self.dataset.in_memory:
            return
        test = self.dataset.test_paths
        if test_per_class is not None:
            y = self.dataset.test_y
            test = [test[i] for c in np.unique(y)
                    for i in np.flatnonzero(y == c)[:test_per_class]]
        check_image_files(self.dataset.train_paths + list(test), self.info.name)

    @property
    def num_steps(self) -> int:
        return len(self.steps)

    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    def labels(self, split: str) -> np.ndarray:
        return self.train_y if canonical_split(split) == "train" else self.test_y

    def new_classes(self, t: int) -> list:
        """Remapped labels of the classes that arrive at step t."""
        return list(self.steps[self._t(t)])

    def seen_classes(self, t: int) -> list:
        """Remapped labels of all classes seen up to and including step t."""
        return list(range(self.num_known(t)))

    def num_known(self, t: int) -> int:
        """Number of classes seen after step t."""
        return sum(len(s) for s in self.steps[: self._t(t) + 1])

    def num_old(self, t: int) -> int:
        """Number of classes seen before step t."""
        return sum(len(s) for s in self.steps[: self._t(t)])

    def train_indices(self, t: int) -> np.ndarray:
        """Training-set indices of the classes new at step t (ascending)."""
        lo, hi = self.num_old(t), self.num_known(t)
        return np.flatnonzero((self.train_y >= lo) & (self.train_y < hi))

    def test_indices(self, t: int) -> np.ndarray:
        """Test-set indices of all classes seen up to step t (ascending)."""
        return np.flatnonzero(self.test_y < self.num_known(t))

    def class_indices(self, split: str, c: int) -> np.ndarray:
        return np.flatnonzero(self.labels(split) == c)

    def batches(self, split: str, indices, batch_size: int, **kw) -> Iterator:
        """:func:`iterate_batches` with this object's remapped labels."""
        return iterate_batches(self.dataset, split, indices, batch_size,
                               labels=self.labels(split), **kw)

    def _t(self, t: int) -> int:
        if not 0 <= t < len(self.steps):
            raise DataError(f"step {t} out of range (0..{len(self.steps) - 1})")
        return t


def balanced_subset(labels, classes: Optional[Sequence[int]] = None,
                    generator: Optional[torch.Generator] = None,
                    indices=None) -> np.ndarray:
    """Class-balanced random subset: every class is subsampled (without replacement, using
    ``generator``) to the smallest class count. Returns indices into ``labels`` (ascending).

    ``indices`` restricts the pool (e.g. new-class indices + memory indices); ``classes``
    defaults to the classes present in the pool. A listed class with no sample is an error.
    """
    labels = int64_array(labels)
    pool = np.arange(len(labels)) if indices is None else int64_array(indices)
    pool_y = labels[pool]
    classes = np.unique(pool_y).tolist() if classes is None else list(classes)
    per = [pool[pool_y == c] for c in classes]
    empty = [c for c, p in zip(classes, per) if len(p) == 0]
    if empty:
        raise DataError(f"balanced_subset: no samples of classes {empty[:10]}")
    if not per:
        return np.zeros(0, dtype=np.int64)
    m = min(len(p) for p in per)
    out = [p[torch.randperm(len(p), generator=generator)[:m].numpy()] for p in per]
    return np.sort(np.concatenate(out)).astype(np.int64)
