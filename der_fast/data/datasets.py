"""Dataset descriptions (:class:`DatasetInfo`, looked up by name with :func:`dataset_info`),
the loaded-dataset container :class:`ClassDataset`, and :class:`DataError`, the one exception
of the data layer."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch

PathLike = Union[str, os.PathLike]


class DataError(ValueError):
    """Missing, corrupt or inconsistent dataset files, or an invalid split/memory setting."""


@dataclass
class DatasetInfo:
    """Static description of a dataset: geometry, normalisation and transforms.

    ``crop_padding`` / ``flip`` describe the batched train augmentation of in-memory datasets
    (:func:`augment_batch`); ``train_transform`` / ``test_transform`` are the equivalent
    per-image PIL pipelines (used by :class:`TransformDataset`, and the only path for
    path-based datasets).
    """

    name: str
    num_classes: int
    image_size: int
    channels: int
    mean: tuple
    std: tuple
    crop_padding: int = 0
    flip: bool = True
    in_memory: bool = True

    def train_transform(self):
        from torchvision import transforms as T

        if self.in_memory:
            ops = [T.RandomCrop(self.image_size, padding=self.crop_padding)]
        else:
            ops = [T.RandomResizedCrop(self.image_size)]
        if self.flip:
            ops.append(T.RandomHorizontalFlip())
        ops += [T.ToTensor(), T.Normalize(self.mean, self.std)]
        return T.Compose(ops)

    def test_transform(self):
        from torchvision import transforms as T

        ops = []
        if not self.in_memory:
            resize = int(round(self.image_size * 256 / 224))  # 256 for 224
            ops += [T.Resize(resize), T.CenterCrop(self.image_size)]
        ops += [T.ToTensor(), T.Normalize(self.mean, self.std)]
        return T.Compose(ops)


_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)

_INFOS = {
    "fashion_mnist": dict(num_classes=10, image_size=28, channels=1, mean=(0.2860,),
                          std=(0.3530,), crop_padding=2, in_memory=True),
    "cifar100": dict(num_classes=100, image_size=32, channels=3,
                     mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762),
                     crop_padding=4, in_memory=True),
    "imagenet100": dict(num_classes=100, image_size=224, channels=3, mean=_IMAGENET_MEAN,
                        std=_IMAGENET_STD, in_memory=False),
    # num_classes of a generic folder is only known after scanning it (0 = unknown).
    "imagefolder": dict(num_classes=0, image_size=224, channels=3, mean=_IMAGENET_MEAN,
                        std=_IMAGENET_STD, in_memory=False),
}
DATASET_NAMES = tuple(_INFOS)


def canonical_name(name: str) -> str:
    """The key of a dataset name in DATASET_NAMES (aliases such as ``fmnist`` accepted)."""
    key = name.lower().replace("-", "_")
    aliases = {"fmnist": "fashion_mnist", "fashionmnist": "fashion_mnist",
               "cifar_100": "cifar100", "imagenet_100": "imagenet100"}
    key = aliases.get(key, key)
    if key not in _INFOS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)}")
    return key


def dataset_info(name: str, **overrides) -> DatasetInfo:
    """The :class:`DatasetInfo` of a dataset name (fields may be overridden)."""
    key = canonical_name(name)
    kw = dict(_INFOS[key])
    kw.update(overrides)
    return DatasetInfo(name=key, **kw)


@dataclass
class ClassDataset:
    """A loaded dataset.

    In-memory datasets fill ``train_x`` / ``test_x`` (uint8 tensors ``[N, C, H, W]``);
    path-based ones fill ``train_paths`` / ``test_paths``. Labels are int64 numpy arrays in
    the dataset's own class numbering (class-incremental remapping is done by
    :class:`IncrementalData`).
    """

    info: DatasetInfo
    train_y: np.ndarray
    test_y: np.ndarray
    train_x: Optional[torch.Tensor] = None
    test_x: Optional[torch.Tensor] = None
    train_paths: Optional[list] = None
    test_paths: Optional[list] = None
    class_names: Optional[list] = None
    source: str = ""

    @property
    def in_memory(self) -> bool:
        return self.train_x is not None

    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    def labels(self, split: str) -> np.ndarray:
        return self.train_y if canonical_split(split) == "train" else self.test_y

    def images(self, split: str) -> torch.Tensor:
        x = self.train_x if canonical_split(split) == "train" else self.test_x
        if x is None:
            raise DataError(f"{self.info.name} is path-based; use TransformDataset/iterate_batches")
        return x

    def paths(self, split: str) -> list:
        p = self.train_paths if canonical_split(split) == "train" else self.test_paths
        if p is None:
            raise DataError(f"{self.info.name} is in memory; it has no image paths")
        return p

    def __len__(self) -> int:  # number of training images
        return len(self.train_y)

    def to(self, device) -> "ClassDataset":
        """Move the in-memory image tensors (uint8) to ``device`` (e.g. once onto the GPU so
        batches are gathered, augmented and normalised there). Returns self."""
        if self.in_memory:
            self.train_x = self.train_x.to(device)
            self.test_x = self.test_x.to(device)
        return self


def canonical_split(split: str) -> str:
    """``"train"`` or ``"test"`` (``val`` / ``eval`` mean test)."""
    s = split.lower()
    if s in ("train",):
        return "train"
    if s in ("test", "val", "eval"):
        return "test"
    raise DataError(f"split must be 'train' or 'test', got {split!r}")


def int64_array(a) -> np.ndarray:
    """Labels or indices (tensor, array or sequence) as a flat int64 numpy array."""
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    return np.asarray(a, dtype=np.int64).reshape(-1)
