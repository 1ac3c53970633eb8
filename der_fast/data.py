"""Data layer of der_fast: datasets, class-incremental splits, batching/augmentation and the
exemplar memory (iCaRL herding).

This module deliberately does not import the model: exemplar selection gets its features
from a callback.

Datasets
--------
``load_dataset(name, root=None, ...)`` returns a :class:`ClassDataset`:

* ``fashion_mnist``: in memory (uint8 ``[N, 1, 28, 28]``). Source, in this order:
  ``root`` if given (the torchvision layout ``ROOT/FashionMNIST/raw/*-ubyte[.gz]`` or a
  directory holding the four IDX files directly, gzipped or not), else the Debian package's
  full set in ``/usr/share/datasets/fashion-mnist`` if present, else the compact real subset
  shipped in ``der_fast/assets`` (first 600 train / 200 test images of every class).
  ``root="embedded"`` forces the shipped subset.
* ``cifar100``: in memory (uint8 ``[N, 3, 32, 32]``), through torchvision's ``CIFAR100``
  (``ROOT/cifar-100-python``); ``download=True`` fetches it; ``verify=False`` skips only the
  md5 checks of the files.
* ``imagenet100`` / ``imagefolder``: ``torchvision.datasets.ImageFolder`` on ``ROOT/train``
  and ``ROOT/val``; images are read lazily by path.

In-memory datasets are augmented in batches with tensor ops (:func:`augment_batch`, random
crop with zero padding + horizontal flip, the same distribution as torchvision's
``RandomCrop(size, padding) + RandomHorizontalFlip``) and normalised with
:func:`normalize_batch`; both run on whatever device the batch lives on. Path-based datasets use
the per-image PIL transforms of :class:`DatasetInfo` through :class:`TransformDataset`.
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Union

import numpy as np
import torch

PathLike = Union[str, os.PathLike]

SYSTEM_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
ASSETS_DIR = Path(__file__).resolve().parent / "assets"
EMBEDDED_FASHION_MNIST = ASSETS_DIR / "fashion_mnist_subset.npz"
EMBEDDED = "embedded"  # root value that forces the shipped Fashion-MNIST subset

__all__ = [
    "DataError",
    "DatasetInfo",
    "ClassDataset",
    "DATASET_NAMES",
    "dataset_info",
    "load_dataset",
    "read_idx",
    "load_fashion_mnist",
    "load_fashion_mnist_embedded",
    "load_cifar100",
    "load_imagefolder",
    "limit_per_class",
    "class_order",
    "make_steps",
    "IncrementalData",
    "balanced_subset",
    "augment_batch",
    "sample_augment_params",
    "crop_flip",
    "normalize_batch",
    "TransformDataset",
    "iterate_batches",
    "herding",
    "Memory",
    "make_feature_fn",
]


class DataError(ValueError):
    """Missing, corrupt or inconsistent dataset files, or an invalid split/memory setting."""


# --------------------------------------------------------------------------------------------
# Dataset descriptions
# --------------------------------------------------------------------------------------------

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


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


def _canon(name: str) -> str:
    key = name.lower().replace("-", "_")
    aliases = {"fmnist": "fashion_mnist", "fashionmnist": "fashion_mnist",
               "cifar_100": "cifar100", "imagenet_100": "imagenet100"}
    key = aliases.get(key, key)
    if key not in _INFOS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)}")
    return key


def dataset_info(name: str, **overrides) -> DatasetInfo:
    """The :class:`DatasetInfo` of a dataset name (fields may be overridden)."""
    key = _canon(name)
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
        return self.train_y if _split(split) == "train" else self.test_y

    def images(self, split: str) -> torch.Tensor:
        x = self.train_x if _split(split) == "train" else self.test_x
        if x is None:
            raise DataError(f"{self.info.name} is path-based; use TransformDataset/iterate_batches")
        return x

    def paths(self, split: str) -> list:
        p = self.train_paths if _split(split) == "train" else self.test_paths
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


def _split(split: str) -> str:
    s = split.lower()
    if s in ("train",):
        return "train"
    if s in ("test", "val", "eval"):
        return "test"
    raise DataError(f"split must be 'train' or 'test', got {split!r}")


# --------------------------------------------------------------------------------------------
# Fashion-MNIST (IDX files)
# --------------------------------------------------------------------------------------------

_IDX_IMAGES_MAGIC = 2051
_IDX_LABELS_MAGIC = 2049
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def read_idx(path: PathLike, expected_magic: Optional[int] = None) -> np.ndarray:
    """Read an IDX file (``.gz`` or plain) of unsigned bytes into a uint8 array.

    Validates the magic number (``0x0000 08 <ndim>``; 2049 = labels, 2051 = images when
    ``expected_magic`` is given) and that the payload size matches the header; raises
    :class:`DataError` naming the file otherwise.
    """
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"IDX file not found: {path}") from None
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"cannot read IDX file {path} (corrupt or truncated gzip?): {e}") from e
    if len(raw) < 4:
        raise DataError(f"IDX file {path} is truncated: {len(raw)} bytes, no header")
    magic = struct.unpack(">I", raw[:4])[0]
    if expected_magic is not None and magic != expected_magic:
        raise DataError(f"IDX file {path} has magic number {magic}, expected {expected_magic}")
    if magic >> 8 != 0x08:
        raise DataError(f"IDX file {path}: magic {magic:#010x} is not an unsigned-byte IDX file")
    ndim = magic & 0xFF
    if ndim < 1 or len(raw) < 4 + 4 * ndim:
        raise DataError(f"IDX file {path} is truncated or has a bad header ({ndim} dims)")
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    n = int(np.prod(dims, dtype=np.int64))
    payload = len(raw) - 4 - 4 * ndim
    if payload != n:
        what = "truncated" if payload < n else "too long"
        raise DataError(f"IDX file {path} is {what}: header says {dims} = {n} bytes of data, "
                        f"file holds {payload}")
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims).copy()


def _find_idx_dir(root: Path) -> Optional[Path]:
    for d in (root / "FashionMNIST" / "raw", root / "raw", root):
        if all(_idx_file(d, base) is not None for base in FASHION_MNIST_FILES.values()):
            return d
    return None


def _idx_file(d: Path, base: str) -> Optional[Path]:
    for name in (base, base + ".gz"):
        if (d / name).is_file():
            return d / name
    return None


def load_fashion_mnist(root: Optional[PathLike] = None) -> ClassDataset:
    """Fashion-MNIST from ``root`` (see module doc), else the system copy, else the embedded
    subset. ``root="embedded"`` forces the embedded subset."""
    if root is not None and str(root) == EMBEDDED:
        return load_fashion_mnist_embedded()
    if root is None:
        if _find_idx_dir(SYSTEM_FASHION_MNIST) is not None:
            root = SYSTEM_FASHION_MNIST
        else:
            return load_fashion_mnist_embedded()
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"Fashion-MNIST: --data-root {root} is not a directory")
    d = _find_idx_dir(root)
    if d is None:
        names = ", ".join(f"{b}[.gz]" for b in FASHION_MNIST_FILES.values())
        raise DataError(f"Fashion-MNIST: no IDX files under {root} (looked in "
                        f"{root}/FashionMNIST/raw, {root}/raw and {root}); expected {names}")
    arr = {}
    for key, base in FASHION_MNIST_FILES.items():
        magic = _IDX_IMAGES_MAGIC if key.endswith("images") else _IDX_LABELS_MAGIC
        arr[key] = read_idx(_idx_file(d, base), magic)
    for split in ("train", "test"):
        x, y = arr[f"{split}_images"], arr[f"{split}_labels"]
        fx, fy = _idx_file(d, FASHION_MNIST_FILES[f"{split}_images"]), \
            _idx_file(d, FASHION_MNIST_FILES[f"{split}_labels"])
        if x.ndim != 3 or x.shape[1:] != (28, 28):
            raise DataError(f"Fashion-MNIST: {fx} holds images of shape {x.shape[1:]}, "
                            "expected 28x28")
        if y.ndim != 1 or len(y) != len(x):
            raise DataError(f"Fashion-MNIST: {fy} holds {len(y)} labels but {fx} holds "
                            f"{len(x)} images")
        if len(y) and y.max() > 9:
            raise DataError(f"Fashion-MNIST: {fy} has label {int(y.max())} outside 0..9")
    return _fmnist(arr["train_images"], arr["train_labels"], arr["test_images"],
                   arr["test_labels"], source=str(d))


def load_fashion_mnist_embedded() -> ClassDataset:
    """The compact real Fashion-MNIST subset shipped in der_fast/assets (see
    FASHION_MNIST_LICENSE.txt there): first 600 train / 200 test images of every class."""
    if not EMBEDDED_FASHION_MNIST.is_file():
        raise DataError(f"embedded Fashion-MNIST subset missing: {EMBEDDED_FASHION_MNIST} "
                        "(regenerate with tools/make_fmnist_subset.py)")
    try:
        with np.load(EMBEDDED_FASHION_MNIST) as z:
            tx, ty, vx, vy = (z[k] for k in ("train_x", "train_y", "test_x", "test_y"))
    except Exception as e:  # zip/npz corruption
        raise DataError(f"embedded Fashion-MNIST subset {EMBEDDED_FASHION_MNIST} is "
                        f"unreadable: {e}") from e
    return _fmnist(tx, ty, vx, vy, source=f"embedded subset ({EMBEDDED_FASHION_MNIST.name})")


def _fmnist(tx, ty, vx, vy, source) -> ClassDataset:
    return ClassDataset(
        info=dataset_info("fashion_mnist"),
        train_x=torch.from_numpy(np.ascontiguousarray(tx, dtype=np.uint8)).unsqueeze(1),
        train_y=np.asarray(ty, dtype=np.int64),
        test_x=torch.from_numpy(np.ascontiguousarray(vx, dtype=np.uint8)).unsqueeze(1),
        test_y=np.asarray(vy, dtype=np.int64),
        class_names=list(FASHION_MNIST_CLASSES),
        source=source,
    )


# --------------------------------------------------------------------------------------------
# CIFAR-100 (torchvision)
# --------------------------------------------------------------------------------------------

def _cifar100_class(verify: bool):
    from torchvision.datasets import CIFAR100

    class _CIFAR100(CIFAR100):
        """torchvision's CIFAR100; with ``verify=False`` files are only required to exist
        (md5 checks skipped), everything else is torchvision's code."""

        def __init__(self, *a, **k):
            self._verify = verify
            super().__init__(*a, **k)

        def _check_integrity(self) -> bool:
            if self._verify:
                return super()._check_integrity()
            return all(os.path.isfile(os.path.join(self.root, self.base_folder, f))
                       for f, _ in self.train_list + self.test_list)

        def _load_meta(self) -> None:
            if self._verify:
                return super()._load_meta()
            path = os.path.join(self.root, self.base_folder, self.meta["filename"])
            if not os.path.isfile(path):
                raise RuntimeError(f"Dataset metadata file not found: {path}")
            with open(path, "rb") as f:
                self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
            self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    return _CIFAR100


def load_cifar100(root: Optional[PathLike], download: bool = False,
                  verify: bool = True) -> ClassDataset:
    """CIFAR-100 through ``torchvision.datasets.CIFAR100(root, train, download)``.

    ``root`` is the directory that holds (or will hold) ``cifar-100-python/``; a path to
    ``cifar-100-python`` itself is accepted too. ``verify=False`` skips torchvision's md5
    checks (only for non-official copies of the files; ignored when downloading).
    """
    if root is None:
        raise DataError("cifar100 needs a data directory: pass --data-root DIR (the directory "
                        "containing cifar-100-python/), and --download to fetch it there")
    root = Path(root)
    if root.name == "cifar-100-python" and (root / "train").is_file():
        root = root.parent
    folder = root / "cifar-100-python"
    if not download:
        missing = [f for f in ("train", "test", "meta") if not (folder / f).is_file()]
        if missing:
            raise DataError(f"CIFAR-100 not found: {folder} lacks {', '.join(missing)}; pass "
                            "--data-root DIR pointing at the directory that contains "
                            "cifar-100-python/, or --download to fetch it into --data-root")
    cls = _cifar100_class(verify or download)
    out = {}
    for split, train in (("train", True), ("test", False)):
        try:
            ds = cls(str(root), train=train, download=download)
        except RuntimeError as e:
            if "corrupted" in str(e) or "not found" in str(e):
                raise DataError(
                    f"CIFAR-100 files in {folder} failed torchvision's check ({e}). If they are "
                    "a non-official copy, load with verify=False (skips only the md5 check); "
                    "otherwise re-fetch them with --download") from e
            raise
        except (pickle.UnpicklingError, EOFError, KeyError, ValueError) as e:
            raise DataError(f"CIFAR-100 {split} file in {folder} is unreadable: {e!r}") from e
        x = np.asarray(ds.data, dtype=np.uint8)  # [N, 32, 32, 3]
        if x.ndim != 4 or x.shape[1:] != (32, 32, 3):
            raise DataError(f"CIFAR-100 {split} data in {folder} has shape {x.shape}")
        out[split] = (torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))),
                      np.asarray(ds.targets, dtype=np.int64), list(ds.classes))
    (tx, ty, names), (vx, vy, _) = out["train"], out["test"]
    if len(names) != 100:
        raise DataError(f"CIFAR-100 meta in {folder} lists {len(names)} classes, expected 100")
    return ClassDataset(info=dataset_info("cifar100"), train_x=tx, train_y=ty, test_x=vx,
                        test_y=vy, class_names=names, source=str(folder))


# --------------------------------------------------------------------------------------------
# ImageFolder / ImageNet-100
# --------------------------------------------------------------------------------------------

def load_imagefolder(root: Optional[PathLike], name: str = "imagefolder",
                     image_size: Optional[int] = None) -> ClassDataset:
    """``ImageFolder(ROOT/train)`` and ``ImageFolder(ROOT/val)`` (``ROOT/test`` if there is no
    ``val``); images are read lazily by path. ``imagenet100`` requires 100 classes."""
    from torchvision.datasets import ImageFolder

    key = _canon(name)
    if root is None:
        raise DataError(f"{key} needs --data-root DIR with DIR/train/<class>/*.JPEG and "
                        "DIR/val/<class>/*.JPEG")
    root = Path(root)
    train_dir = root / "train"
    test_dir = root / "val" if (root / "val").is_dir() else root / "test"
    for d in (train_dir, test_dir):
        if not d.is_dir():
            raise DataError(f"{key}: {d} is not a directory (expected --data-root DIR with "
                            "DIR/train/<class>/ and DIR/val/<class>/ image folders)")
    try:
        tr, te = ImageFolder(str(train_dir)), ImageFolder(str(test_dir))
    except (FileNotFoundError, RuntimeError) as e:
        raise DataError(f"{key}: cannot read image folders under {root}: {e}") from e
    if tr.classes != te.classes:
        raise DataError(f"{key}: class folders differ between {train_dir} ({len(tr.classes)}) "
                        f"and {test_dir} ({len(te.classes)})")
    n = len(tr.classes)
    if key == "imagenet100" and n != 100:
        raise DataError(f"imagenet100: {train_dir} has {n} class folders, expected 100 "
                        "(use the dataset name 'imagefolder' for other folders)")
    over = {"num_classes": n}
    if image_size is not None:
        over["image_size"] = int(image_size)
    return ClassDataset(
        info=dataset_info(key, **over),
        train_y=np.asarray(tr.targets, dtype=np.int64),
        test_y=np.asarray(te.targets, dtype=np.int64),
        train_paths=[p for p, _ in tr.samples], test_paths=[p for p, _ in te.samples],
        class_names=list(tr.classes), source=str(root),
    )


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------

def limit_per_class(ds: ClassDataset, n: int) -> ClassDataset:
    """Keep the first ``n`` training images of every class (original order), in place."""
    if n is None:
        return ds
    if n <= 0:
        raise DataError(f"max_train_per_class must be positive, got {n}")
    y = ds.train_y
    keep = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        keep[np.flatnonzero(y == c)[:n]] = True
    idx = np.flatnonzero(keep)
    ds.train_y = y[idx]
    if ds.train_x is not None:
        ds.train_x = ds.train_x[torch.from_numpy(idx).to(ds.train_x.device)].contiguous()
    if ds.train_paths is not None:
        ds.train_paths = [ds.train_paths[i] for i in idx]
    return ds


def load_dataset(name: str, root: Optional[PathLike] = None, *, download: bool = False,
                 max_train_per_class: Optional[int] = None, verify: bool = True,
                 image_size: Optional[int] = None) -> ClassDataset:
    """Load ``fashion_mnist`` | ``cifar100`` | ``imagenet100`` | ``imagefolder`` (see the
    module doc for where each comes from). ``max_train_per_class`` keeps the first N training
    images of every class."""
    key = _canon(name)
    if key == "fashion_mnist":  # always available (shipped subset): download is a no-op
        ds = load_fashion_mnist(root)
    elif key == "cifar100":
        ds = load_cifar100(root, download=download, verify=verify)
    else:
        if download:
            raise DataError(f"{key} cannot be downloaded; point --data-root at it")
        ds = load_imagefolder(root, key, image_size=image_size)
    return limit_per_class(ds, max_train_per_class)


# --------------------------------------------------------------------------------------------
# Class-incremental splits
# --------------------------------------------------------------------------------------------

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

    @property
    def num_steps(self) -> int:
        return len(self.steps)

    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    def labels(self, split: str) -> np.ndarray:
        return self.train_y if _split(split) == "train" else self.test_y

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
    labels = _np_int(labels)
    pool = np.arange(len(labels)) if indices is None else _np_int(indices)
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


def _np_int(a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    return np.asarray(a, dtype=np.int64).reshape(-1)


# --------------------------------------------------------------------------------------------
# Batched augmentation (in-memory datasets)
# --------------------------------------------------------------------------------------------

def sample_augment_params(n: int, padding: int, flip: bool = True,
                          generator: Optional[torch.Generator] = None):
    """Random crop offsets and flip flags for :func:`augment_batch`, drawn in this order from
    ``generator`` (on its device): top ``i`` = randint(0, 2p+1, (n,)), left ``j`` likewise,
    then ``flip`` = rand(n) < 0.5 (only if ``flip``). Offsets are in the padded image."""
    dev = generator.device if generator is not None else torch.device("cpu")
    i = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=dev)
    j = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=dev)
    f = (torch.rand(n, generator=generator, device=dev) < 0.5) if flip else \
        torch.zeros(n, dtype=torch.bool, device=dev)
    return i, j, f


def crop_flip(x: torch.Tensor, i: torch.Tensor, j: torch.Tensor, flip: torch.Tensor,
              padding: int) -> torch.Tensor:
    """Per-sample crop of the zero-padded batch at offsets (i, j) (same H x W as ``x``),
    then horizontal flip where ``flip``; one ``gather``, any dtype/device."""
    n, c, h, w = x.shape
    dev = x.device
    i, j, flip = i.to(dev), j.to(dev), flip.to(dev)
    if padding:
        x = torch.nn.functional.pad(x, (padding, padding, padding, padding))
    hp, wp = h + 2 * padding, w + 2 * padding
    rows = i[:, None] + torch.arange(h, device=dev)                      # [n, h]
    ar = torch.arange(w, device=dev)
    cols = j[:, None] + torch.where(flip[:, None], w - 1 - ar, ar)        # [n, w]
    idx = (rows[:, :, None] * wp + cols[:, None, :]).view(n, 1, h * w).expand(n, c, h * w)
    return x.reshape(n, c, hp * wp).gather(2, idx).view(n, c, h, w)


def augment_batch(x: torch.Tensor, generator: Optional[torch.Generator] = None,
                  padding: int = 4, flip: bool = True) -> torch.Tensor:
    """Batched ``RandomCrop(H, padding) + RandomHorizontalFlip`` on ``x`` [N, C, H, W]
    (uint8 or float, un-normalised so the padding is black like torchvision's). Deterministic
    given ``generator``; see :func:`sample_augment_params` for the draw order."""
    if x.dim() != 4:
        raise ValueError(f"augment_batch expects [N, C, H, W], got {tuple(x.shape)}")
    if x.shape[0] == 0 or (padding == 0 and not flip):
        return x
    i, j, f = sample_augment_params(x.shape[0], padding, flip, generator)
    return crop_flip(x, i, j, f, padding)


def normalize_batch(x: torch.Tensor, mean: Sequence[float],
                    std: Sequence[float]) -> torch.Tensor:
    """uint8 [N, C, H, W] (0..255) or float in [0, 1] -> normalised float32 (ToTensor +
    Normalize)."""
    x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


# --------------------------------------------------------------------------------------------
# Per-image Dataset wrapper and batch iteration
# --------------------------------------------------------------------------------------------

class TransformDataset(torch.utils.data.Dataset):
    """torch Dataset over ``indices`` of one split, applying a per-image transform.

    ``train=True`` uses ``info.train_transform()``, else ``info.test_transform()`` (or pass
    ``transform``). Yields ``(image_tensor, label)`` with ``labels`` (default: the dataset's
    own) indexed by dataset index. With ``seed`` set, item k is transformed under
    ``torch.manual_seed(seed + k)`` inside a forked RNG, so random transforms are reproducible
    and the global RNG is left alone (also with worker processes).
    """

    def __init__(self, data: ClassDataset, split: str, indices=None, *, train: bool = False,
                 transform: Optional[Callable] = None, labels=None, seed: Optional[int] = None):
        self.data, self.split = data, _split(split)
        y = data.labels(self.split) if labels is None else _np_int(labels)
        self.labels = y
        self.indices = np.arange(len(y)) if indices is None else _np_int(indices)
        if transform is None:
            transform = data.info.train_transform() if train else data.info.test_transform()
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.indices)

    def _image(self, idx: int):
        from PIL import Image

        if self.data.in_memory:
            a = self.data.images(self.split)[idx].cpu().numpy()  # [C, H, W] uint8
            return Image.fromarray(a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0))
        with open(self.data.paths(self.split)[idx], "rb") as f:
            return Image.open(f).convert("RGB")

    def __getitem__(self, k: int):
        idx = int(self.indices[k])
        img = self._image(idx)
        if self.seed is None:
            x = self.transform(img)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed((self.seed + k) % (2 ** 63))
                x = self.transform(img)
        return x, int(self.labels[idx])


def iterate_batches(data: ClassDataset, split: str, indices, batch_size: int, *,
                    labels=None, augment: bool = False, shuffle: bool = False,
                    generator: Optional[torch.Generator] = None, drop_last: bool = False,
                    device=None, num_workers: int = 0) -> Iterator:
    """Yield ``(x, y)`` batches over ``indices`` of a split: ``x`` normalised float32
    [B, C, H, W] on ``device``, ``y`` int64 (``labels`` indexed by dataset index; default the
    dataset's own labels).

    ``shuffle`` permutes the order with ``generator``; ``augment`` applies the train
    augmentation, also drawn from ``generator`` (same generator -> same batches). In-memory
    datasets are sliced from their uint8 tensors and augmented in batch on ``device``
    (default: where the images live); path-based ones go through a DataLoader over
    :class:`TransformDataset` (``num_workers`` processes).
    """
    idx = _np_int(indices)
    y_all = data.labels(split) if labels is None else _np_int(labels)
    if shuffle and len(idx):
        idx = idx[torch.randperm(len(idx), generator=generator).numpy()]
    n = len(idx)
    stop = n - n % batch_size if drop_last else n
    info = data.info
    if data.in_memory:
        images = data.images(split)
        dev = torch.device(device) if device is not None else images.device
        y_t = torch.from_numpy(y_all)
        for s in range(0, stop, batch_size):
            b = torch.from_numpy(idx[s:s + batch_size])
            x = images[b.to(images.device)].to(dev, non_blocking=True)
            if augment:
                x = augment_batch(x, generator, info.crop_padding, info.flip)
            yield normalize_batch(x, info.mean, info.std), y_t[b].to(dev, non_blocking=True)
        return
    seed = None
    if augment:
        seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator).item())
    ds = TransformDataset(data, split, idx[:stop], train=augment, labels=y_all, seed=seed)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False,
                                         num_workers=num_workers, drop_last=drop_last,
                                         pin_memory=device is not None and
                                         torch.device(device).type == "cuda")
    for x, y in loader:
        if device is not None:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        yield x, y


# --------------------------------------------------------------------------------------------
# Exemplar memory (iCaRL herding)
# --------------------------------------------------------------------------------------------

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
        labels = _np_int(labels)
        pool = np.arange(len(labels)) if candidates is None else _np_int(candidates)
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
