"""Build der_fast/assets/fashion_mnist_subset.npz: a compact real subset of Fashion-MNIST.

Takes the first 600 training and the first 200 test images of every class (by original
index) from the full IDX files (default: /usr/share/datasets/fashion-mnist, Debian package
dataset-fashion-mnist) and stores them, still sorted by original index, as a compressed npz:
train_x/test_x uint8 [n, 28, 28], train_y/test_y int64 [n], train_index/test_index int32 [n]
(the images' indices in the original files). The npz is an ordinary zip read by np.load, with
LZMA-compressed members (about 15% smaller than np.savez_compressed's deflate) and fixed
timestamps, so the output is byte-for-byte reproducible.

    python tools/make_fmnist_subset.py [--src DIR] [--out PATH]
"""

import argparse
import hashlib
import importlib.util
import zipfile
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def _data_module():
    # Load the der_fast/data package by path: it is self-contained, and this avoids importing
    # der_fast itself (model code, compiled ops) just to build a data file.
    pkg = REPO / "der_fast" / "data"
    spec = importlib.util.spec_from_file_location("_der_fast_data", pkg / "__init__.py",
                                                  submodule_search_locations=[str(pkg)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses and relative imports need it registered
    spec.loader.exec_module(mod)
    return mod


def first_per_class(y: np.ndarray, n: int) -> np.ndarray:
    keep = np.concatenate([np.flatnonzero(y == c)[:n] for c in np.unique(y)])
    return np.sort(keep)


def write_npz_lzma(path: Path, arrays: dict) -> None:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_LZMA) as zf:
        for k, v in arrays.items():
            info = zipfile.ZipInfo(k + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_LZMA
            with zf.open(info, "w") as f:
                np.lib.format.write_array(f, np.ascontiguousarray(v), allow_pickle=False)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--out", default=str(REPO / "der_fast" / "assets" / "fashion_mnist_subset.npz"))
    ap.add_argument("--train-per-class", type=int, default=600)
    ap.add_argument("--test-per-class", type=int, default=200)
    a = ap.parse_args()

    data = _data_module()
    full = data.load_fashion_mnist(a.src)
    arrays = {}
    for split, n in (("train", a.train_per_class), ("test", a.test_per_class)):
        y = full.labels(split)
        idx = first_per_class(y, n)
        counts = np.bincount(y[idx], minlength=10)
        assert (counts == n).all(), counts
        arrays[f"{split}_x"] = full.images(split)[idx, 0].numpy().astype(np.uint8)
        arrays[f"{split}_y"] = y[idx].astype(np.int64)
        arrays[f"{split}_index"] = idx.astype(np.int32)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_npz_lzma(out, arrays)
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    print(f"wrote {out}: {out.stat().st_size} bytes, sha256 {digest}")
    for k, v in arrays.items():
        print(f"  {k}: {v.dtype} {v.shape}")


if __name__ == "__main__":
    main()
