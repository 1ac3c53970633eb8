"""Dataset loaders. ``load_dataset(name, root=None, ...)`` returns a :class:`ClassDataset`:

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
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import zlib
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .datasets import ClassDataset, DataError, PathLike, canonical_name, dataset_info

SYSTEM_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"  # der_fast/assets
EMBEDDED_FASHION_MNIST = ASSETS_DIR / "fashion_mnist_subset.npz"
EMBEDDED = "embedded"  # root value that forces the shipped Fashion-MNIST subset

# --------------------------------------------------------------------------------------------
# Fashion-MNIST (IDX files)
# --------------------------------------------------------------------------------------------

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)

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

    key = canonical_name(name)
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


def check_image_files(paths, name: str = "imagefolder", workers: int = 8) -> None:
    """Decode every image file (a header alone does not show a truncated or corrupt file,
    which would stop training mid-step); a DataError names the unreadable files before any
    training. JPEGs decode in PIL's draft mode (1/8 scale: the whole entropy-coded stream is
    still read, so truncation shows, in about half the time of a full decode); the files are
    read in ``workers`` threads (PIL releases the GIL while decoding)."""
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    def problem(path):
        try:
            with Image.open(path) as im:
                if im.format == "JPEG":
                    im.draft(im.mode, (1, 1))  # the smallest DCT scale
                im.load()
            return None
        except Exception as exc:  # noqa: BLE001 - PIL raises many kinds
            return f"{path} ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"

    with ThreadPoolExecutor(workers) as pool:
        bad = [p for p in pool.map(problem, paths) if p is not None]
    if bad:
        raise DataError(f"{name}: {len(bad)} unreadable image file(s), e.g. {bad[0]}; remove "
                        "or replace them")


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
    key = canonical_name(name)
    if key == "fashion_mnist":  # always available (shipped subset): download is a no-op
        ds = load_fashion_mnist(root)
    elif key == "cifar100":
        ds = load_cifar100(root, download=download, verify=verify)
    else:
        if download:
            raise DataError(f"{key} cannot be downloaded; point --data-root at it")
        ds = load_imagefolder(root, key, image_size=image_size)
    return limit_per_class(ds, max_train_per_class)
