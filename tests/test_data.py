"""Tests of der_fast.data: loaders on generated files in the real on-disk formats, splits,
balanced subsets, herding/memory and batched augmentation. All data is random and seeded."""

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from der_fast import data as D


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

def _idx_bytes(arr: np.ndarray) -> bytes:
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    return struct.pack(">I", 0x0800 | arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + \
        arr.tobytes()


def _write_idx(path, arr, gz):
    b = _idx_bytes(arr)
    if gz:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as f:
            f.write(b)
    else:
        path.write_bytes(b)
    return path


def _make_fmnist(d, gz=True, n_train=30, n_test=20, seed=0):
    rng = np.random.RandomState(seed)
    arrs = {
        "train-images-idx3-ubyte": rng.randint(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": np.arange(n_train) % 10,
        "t10k-images-idx3-ubyte": rng.randint(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": rng.randint(0, 10, n_test),
    }
    d.mkdir(parents=True, exist_ok=True)
    paths = {k: _write_idx(d / k, v, gz) for k, v in arrs.items()}
    return arrs, paths


def _tiny_dataset(n_classes=6, per_train=10, per_test=4, seed=0, size=8):
    g = torch.Generator().manual_seed(seed)
    ty = np.repeat(np.arange(n_classes), per_train)
    vy = np.repeat(np.arange(n_classes), per_test)
    perm = np.random.RandomState(seed).permutation(len(ty))
    ty = ty[perm]
    info = D.dataset_info("cifar100", num_classes=n_classes, image_size=size)
    return D.ClassDataset(
        info=info, train_y=ty.astype(np.int64), test_y=vy.astype(np.int64),
        train_x=torch.randint(0, 256, (len(ty), 3, size, size), generator=g, dtype=torch.uint8),
        test_x=torch.randint(0, 256, (len(vy), 3, size, size), generator=g, dtype=torch.uint8))


# --------------------------------------------------------------------------------------------
# Fashion-MNIST IDX
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("gz", [True, False])
def test_idx_loader_plain_and_gz(tmp_path, gz):
    arrs, _ = _make_fmnist(tmp_path / "flat", gz=gz)
    ds = D.load_fashion_mnist(tmp_path / "flat")
    assert ds.train_x.shape == (30, 1, 28, 28) and ds.train_x.dtype == torch.uint8
    assert ds.test_x.shape == (20, 1, 28, 28)
    assert np.array_equal(ds.train_x[:, 0].numpy(), arrs["train-images-idx3-ubyte"])
    assert np.array_equal(ds.test_y, arrs["t10k-labels-idx1-ubyte"])
    assert ds.train_y.dtype == np.int64 and ds.info.num_classes == 10


def test_idx_loader_torchvision_layout(tmp_path):
    arrs, _ = _make_fmnist(tmp_path / "FashionMNIST" / "raw", gz=True)
    ds = D.load_dataset("fashion_mnist", tmp_path, max_train_per_class=2)
    assert len(ds.train_y) == 20 and np.bincount(ds.train_y).tolist() == [2] * 10
    # first two of each class by original order: indices 0..19 (labels are i % 10)
    assert np.array_equal(ds.train_x[:, 0].numpy(), arrs["train-images-idx3-ubyte"][:20])


def test_read_idx_validates(tmp_path):
    img = np.zeros((3, 28, 28), np.uint8)
    good = _write_idx(tmp_path / "good-idx3-ubyte", img, gz=False)
    assert D.read_idx(good, 2051).shape == (3, 28, 28)
    with pytest.raises(D.DataError, match="good-idx3-ubyte.*magic number 2051, expected 2049"):
        D.read_idx(good, 2049)
    trunc = tmp_path / "trunc-idx3-ubyte"
    trunc.write_bytes(_idx_bytes(img)[:-5])
    with pytest.raises(D.DataError, match="trunc-idx3-ubyte is truncated"):
        D.read_idx(trunc)
    trunc_gz = tmp_path / "tgz-idx3-ubyte.gz"
    trunc_gz.write_bytes(gzip.compress(_idx_bytes(img))[:-20])
    with pytest.raises(D.DataError, match="tgz-idx3-ubyte.gz"):
        D.read_idx(trunc_gz)
    garbage = tmp_path / "garbage-idx3-ubyte"
    garbage.write_bytes(b"\x12\x34\x56\x78" + bytes(100))
    with pytest.raises(D.DataError, match="garbage-idx3-ubyte"):
        D.read_idx(garbage)


def test_fmnist_corrupt_file_named(tmp_path):
    _, paths = _make_fmnist(tmp_path, gz=False)
    p = paths["t10k-labels-idx1-ubyte"]
    p.write_bytes(struct.pack(">II", 2051, 20) + bytes(20))  # image magic on a label file
    with pytest.raises(D.DataError, match="t10k-labels-idx1-ubyte"):
        D.load_fashion_mnist(tmp_path)
    p.write_bytes(_idx_bytes(np.zeros(19, np.uint8)))  # 19 labels for 20 images
    with pytest.raises(D.DataError, match="19 labels"):
        D.load_fashion_mnist(tmp_path)


def test_fmnist_missing_files(tmp_path):
    with pytest.raises(D.DataError, match="no IDX files"):
        D.load_fashion_mnist(tmp_path)
    with pytest.raises(D.DataError, match="not a directory"):
        D.load_fashion_mnist(tmp_path / "nope")


def test_embedded_subset():
    ds = D.load_dataset("fashion_mnist", D.EMBEDDED)
    assert ds.info.num_classes == 10 and ds.info.image_size == 28 and ds.info.channels == 1
    assert ds.train_x.shape == (6000, 1, 28, 28) and ds.train_x.dtype == torch.uint8
    assert ds.test_x.shape == (2000, 1, 28, 28) and ds.test_x.dtype == torch.uint8
    assert np.bincount(ds.train_y).tolist() == [600] * 10
    assert np.bincount(ds.test_y).tolist() == [200] * 10
    assert ds.train_x.float().std() > 50  # real images, not blank
    assert D.EMBEDDED_FASHION_MNIST.stat().st_size < 3.2e6
    assert (D.ASSETS_DIR / "FASHION_MNIST_LICENSE.txt").is_file()


@pytest.mark.skipif(not (D.SYSTEM_FASHION_MNIST / "train-labels-idx1-ubyte.gz").is_file(),
                    reason="system Fashion-MNIST not installed")
def test_embedded_subset_matches_full_set():
    full = D.load_fashion_mnist()  # default: the system copy
    assert len(full.train_y) == 60000 and len(full.test_y) == 10000
    with np.load(D.EMBEDDED_FASHION_MNIST) as z:
        for split in ("train", "test"):
            idx = z[f"{split}_index"]
            n = 600 if split == "train" else 200
            y = full.labels(split)
            expect = np.sort(np.concatenate([np.flatnonzero(y == c)[:n] for c in range(10)]))
            assert np.array_equal(idx, expect)
            assert np.array_equal(z[f"{split}_x"], full.images(split)[idx, 0].numpy())
            assert np.array_equal(z[f"{split}_y"], y[idx])


# --------------------------------------------------------------------------------------------
# CIFAR-100 (real on-disk format: Python-2 pickles)
# --------------------------------------------------------------------------------------------

class _Py2Str(str):
    """A str pickled as a Python 2 byte string (what the official CIFAR files contain)."""


class _Py2Pickler(pickle._Pickler):
    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2str(self, obj):
        b = obj.encode("latin1")
        if len(b) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(b)]) + b)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(b)) + b)
        self.memoize(obj)

    dispatch[_Py2Str] = save_py2str


def _dump_py2(obj, path):
    with open(path, "wb") as f:
        _Py2Pickler(f, protocol=2).dump(obj)


def _make_cifar100(root, n_train=12, n_test=6, seed=0):
    rng = np.random.RandomState(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        x = rng.randint(0, 256, (n, 3072)).astype(np.uint8)
        y = rng.randint(0, 100, n).tolist()
        _dump_py2({_Py2Str("filenames"): [_Py2Str(f"img_{i}.png") for i in range(n)],
                   _Py2Str("batch_label"): _Py2Str(f"{split} batch"),
                   _Py2Str("fine_labels"): y,
                   _Py2Str("coarse_labels"): [c // 5 for c in y],
                   _Py2Str("data"): x}, folder / split)
        out[split] = (x, y)
    _dump_py2({_Py2Str("fine_label_names"): [_Py2Str(f"class{i:03d}") for i in range(100)],
               _Py2Str("coarse_label_names"): [_Py2Str(f"super{i}") for i in range(20)]},
              folder / "meta")
    return out


def test_cifar100_loader(tmp_path):
    ref = _make_cifar100(tmp_path)
    # the generated files look like the official ones to a bytes-mode reader
    with open(tmp_path / "cifar-100-python" / "train", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    assert set(raw) >= {b"data", b"fine_labels", b"coarse_labels", b"filenames"}
    # md5s differ from the official release: the default (verified) path says so clearly
    with pytest.raises(D.DataError, match="verify=False"):
        D.load_cifar100(tmp_path)
    ds = D.load_cifar100(tmp_path, verify=False)
    assert ds.train_x.shape == (12, 3, 32, 32) and ds.train_x.dtype == torch.uint8
    assert ds.test_x.shape == (6, 3, 32, 32)
    assert np.array_equal(ds.train_x.reshape(12, -1).numpy(), ref["train"][0])  # planar RGB
    assert ds.train_y.tolist() == ref["train"][1] and ds.test_y.tolist() == ref["test"][1]
    assert ds.class_names[:2] == ["class000", "class001"] and ds.info.num_classes == 100
    # a path to cifar-100-python itself is accepted too
    ds2 = D.load_dataset("cifar100", tmp_path / "cifar-100-python", verify=False)
    assert torch.equal(ds2.test_x, ds.test_x)


def test_cifar100_missing(tmp_path):
    with pytest.raises(D.DataError, match="--data-root"):
        D.load_cifar100(None)
    with pytest.raises(D.DataError, match="--download"):
        D.load_cifar100(tmp_path / "nothing")


# --------------------------------------------------------------------------------------------
# ImageFolder
# --------------------------------------------------------------------------------------------

def test_imagefolder(tmp_path):
    from PIL import Image

    rng = np.random.RandomState(0)
    for split, n in (("train", 3), ("val", 2)):
        for c in ("ant", "bee", "cat"):
            d = tmp_path / split / c
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.randint(0, 256, (40, 36, 3)).astype(np.uint8)).save(
                    d / f"{i}.png")
    ds = D.load_dataset("imagefolder", tmp_path, image_size=32)
    assert not ds.in_memory and ds.info.num_classes == 3
    assert ds.class_names == ["ant", "bee", "cat"]
    assert ds.train_y.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2] and len(ds.test_paths) == 6
    xs = list(D.iterate_batches(ds, "test", np.arange(6), 4))
    assert [x.shape for x, _ in xs] == [(4, 3, 32, 32), (2, 3, 32, 32)]

    def aug(seed):
        g = torch.Generator().manual_seed(seed)
        return [(x, y) for x, y in D.iterate_batches(ds, "train", np.arange(9), 5,
                                                     augment=True, shuffle=True, generator=g)]

    a, b = aug(3), aug(3)
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))
    assert sorted(torch.cat([y for _, y in a]).tolist()) == ds.train_y.tolist()
    ds_small = D.load_dataset("imagefolder", tmp_path, image_size=32, max_train_per_class=1)
    assert ds_small.train_y.tolist() == [0, 1, 2]
    assert ds_small.train_paths[1].endswith("bee/0.png")
    with pytest.raises(D.DataError, match="expected 100"):
        D.load_dataset("imagenet100", tmp_path)
    with pytest.raises(D.DataError, match="not a directory"):
        D.load_dataset("imagefolder", tmp_path / "train")


# --------------------------------------------------------------------------------------------
# splits
# --------------------------------------------------------------------------------------------

def test_class_order():
    o = D.class_order(100, 1993)
    # PyCIL's CIFAR-100 order for seed 1993
    assert o[:12] == [68, 56, 78, 8, 23, 84, 90, 65, 74, 76, 40, 89]
    assert sorted(o) == list(range(100)) and o == D.class_order(100, 1993)
    assert D.class_order(100, 1) != o
    assert D.class_order(5, None) == [0, 1, 2, 3, 4]


def test_make_steps():
    s = D.make_steps(100, 10, 10)
    assert len(s) == 10 and s[0] == list(range(10)) and s[-1] == list(range(90, 100))
    s = D.make_steps(100, 50, 5)
    assert len(s) == 11 and len(s[0]) == 50 and s[1] == [50, 51, 52, 53, 54]
    assert D.make_steps(10, 10, 0) == [list(range(10))]
    assert D.make_steps(4, 2, 1, order=[3, 1, 0, 2]) == [[3, 1], [0], [2]]
    with pytest.raises(D.DataError, match="does not divide"):
        D.make_steps(100, 50, 7)
    with pytest.raises(D.DataError, match="exceeds"):
        D.make_steps(10, 11, 1)
    with pytest.raises(D.DataError, match="positive"):
        D.make_steps(10, 0, 5)
    with pytest.raises(D.DataError, match="increment must be positive"):
        D.make_steps(10, 5, 0)


def test_incremental_data():
    ds = _tiny_dataset(n_classes=6)
    inc = D.IncrementalData(ds, 2, 2, seed=5)
    order = D.class_order(6, 5)
    assert inc.order == order and inc.num_steps == 3
    assert inc.new_classes(1) == [2, 3] and inc.seen_classes(1) == [0, 1, 2, 3]
    assert inc.num_old(2) == 4 and inc.num_known(2) == 6
    # new label = position in the order
    assert np.array_equal(inc.train_y, np.array([order.index(c) for c in ds.train_y]))
    tr = inc.train_indices(1)
    assert len(tr) == 20 and set(ds.train_y[tr]) == {order[2], order[3]}
    te = inc.test_indices(1)
    assert len(te) == 16 and set(inc.test_y[te]) == {0, 1, 2, 3}
    b0 = D.IncrementalData(ds, None, 3, seed=None)
    assert b0.steps == [[0, 1, 2], [3, 4, 5]] and np.array_equal(b0.train_y, ds.train_y)
    with pytest.raises(D.DataError, match="does not divide"):
        D.IncrementalData(ds, 2, 3)
    with pytest.raises(D.DataError, match="out of range"):
        inc.train_indices(3)
    xb, yb = next(inc.batches("train", tr, 8))
    assert xb.shape == (8, 3, 8, 8) and set(yb.tolist()) <= {2, 3}


def test_balanced_subset():
    labels = np.array([0] * 7 + [1] * 3 + [2] * 5 + [3] * 9)
    g = torch.Generator().manual_seed(0)
    a = D.balanced_subset(labels, [0, 1, 2], g)
    assert np.bincount(labels[a], minlength=4).tolist() == [3, 3, 3, 0]
    assert len(np.unique(a)) == 9
    draws = {tuple(D.balanced_subset(labels, [0, 2, 3], g)) for _ in range(10)}
    assert len(draws) > 1  # re-drawn each call
    for d in draws:
        assert np.bincount(labels[list(d)], minlength=4).tolist() == [5, 0, 5, 5]
    pool = np.array([0, 1, 7, 8, 10, 11, 12, 15, 16])  # 2 of class 0/1, 3 of class 2, ...
    s = D.balanced_subset(torch.as_tensor(labels), None, g, indices=pool)
    assert set(s) <= set(pool) and np.bincount(labels[s], minlength=4).tolist() == [2, 2, 2, 2]
    with pytest.raises(D.DataError, match="no samples"):
        D.balanced_subset(labels, [0, 9], g)


# --------------------------------------------------------------------------------------------
# herding and memory
# --------------------------------------------------------------------------------------------

def _herding_reference(f, m):
    """PyCIL-style herding (numpy, removes picked rows), for comparison."""
    f = f / (np.linalg.norm(f, axis=1, keepdims=True) + 1e-8)
    mu = f.mean(0)
    left = list(range(len(f)))
    chosen, acc = [], np.zeros_like(mu)
    for k in range(1, m + 1):
        cand = f[left]
        i = int(np.argmin(np.linalg.norm(mu - (acc + cand) / k, axis=1)))
        chosen.append(left[i])
        acc += cand[i]
        left.pop(i)
    return chosen


def test_herding_known_cases():
    r = 1 / np.sqrt(2)
    f = np.array([[1, 0], [0, 1], [r, r]])
    assert D.herding(f, 3).tolist() == [2, 0, 1]  # the diagonal is the mean-closest point
    assert D.herding(f * np.array([[3], [0.5], [7]]), 1).tolist() == [2]  # rows normalised
    e = np.eye(2)
    sym = np.array([e[0], e[1], -e[0], -e[1]])
    # mean is 0: after a point, its antipode brings the running mean back to the centre
    assert D.herding(sym, 4).tolist() == [0, 2, 1, 3]
    assert D.herding(sym, 10).tolist() == [0, 2, 1, 3]  # m > n -> all, ordered
    assert D.herding(sym, 0).tolist() == []
    rf = np.random.RandomState(0).randn(50, 8)
    assert D.herding(torch.tensor(rf, dtype=torch.float32), 20).tolist() == \
        _herding_reference(rf, 20)


def test_memory_budget():
    with pytest.raises(D.DataError, match="exactly one"):
        D.Memory()
    with pytest.raises(D.DataError, match="exactly one"):
        D.Memory(total=10, per_class=2)
    m = D.Memory(total=2000)
    assert m.per_class_budget(10) == 200 and m.per_class_budget(30) == 66
    with pytest.raises(D.DataError, match="smaller than the number of classes"):
        D.Memory(total=5).per_class_budget(6)
    assert D.Memory(per_class=20).per_class_budget(90) == 20


def test_memory_update_and_truncation():
    rng = np.random.RandomState(0)
    labels = np.repeat(np.arange(4), 10)[rng.permutation(40)]
    feats = torch.tensor(rng.randn(40, 6), dtype=torch.float32)
    calls = []

    def feature_fn(idx):
        calls.append(np.asarray(idx))
        return feats[torch.as_tensor(idx)]

    mem = D.Memory(total=12)
    assert mem.update(feature_fn, labels, [0, 1]) == 6
    assert len(mem) == 12 and mem.classes == [0, 1]
    for c in (0, 1):
        idx = np.flatnonzero(labels == c)
        assert mem.exemplars[c].tolist() == idx[D.herding(feats[idx], 6)].tolist()
    before = {c: mem.exemplars[c].copy() for c in (0, 1)}
    assert mem.update(feature_fn, labels, [2, 3]) == 3
    assert len(calls) == 4  # old classes are not re-herded
    for c in (0, 1):  # truncated, herding order kept
        assert mem.exemplars[c].tolist() == before[c][:3].tolist()
    assert all(len(mem.exemplars[c]) == 3 and (labels[mem.exemplars[c]] == c).all()
               for c in range(4))
    assert sorted(mem.indices().tolist()) == sorted(sum((v.tolist() for v in
                                                         mem.exemplars.values()), []))
    with pytest.raises(D.DataError, match="already in memory"):
        mem.update(feature_fn, labels, [3])
    # make_feature_fn: test-transformed images through an extractor, in index order
    ds = _tiny_dataset(n_classes=4, per_train=10)
    fn = D.make_feature_fn(lambda x: x.mean(dim=(2, 3)), ds, batch_size=7)
    idx = np.array([5, 1, 30, 12, 9, 0, 2, 3, 4])
    expect = D.normalize_batch(ds.train_x[idx], ds.info.mean, ds.info.std).mean(dim=(2, 3))
    assert torch.allclose(fn(idx), expect, atol=1e-6)
    m3 = D.Memory(total=8)
    m3.update(fn, ds.train_y, [0, 1, 2, 3])
    assert [len(m3.exemplars[c]) for c in range(4)] == [2, 2, 2, 2]
    m2 = D.Memory(per_class=1)
    m2.load_state_dict(mem.state_dict())
    assert m2.total == 12 and m2.indices().tolist() == mem.indices().tolist()
    pc = D.Memory(per_class=4)
    pc.update(feature_fn, labels, [1], candidates=np.flatnonzero(labels == 1)[:5])
    first5 = set(np.flatnonzero(labels == 1)[:5])
    assert len(pc.exemplars[1]) == 4 and set(pc.exemplars[1]) <= first5


# --------------------------------------------------------------------------------------------
# augmentation and batching
# --------------------------------------------------------------------------------------------

def test_augment_batch_matches_manual_crop():
    g0 = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (16, 3, 8, 10), generator=g0, dtype=torch.uint8)
    out = D.augment_batch(x, torch.Generator().manual_seed(42), padding=2)
    assert out.shape == x.shape and out.dtype == torch.uint8
    # the same draws, in the documented order, applied by hand
    i, j, f = D.sample_augment_params(16, 2, True, torch.Generator().manual_seed(42))
    xp = F.pad(x, (2, 2, 2, 2))
    for n in range(16):
        ref = xp[n, :, i[n]:i[n] + 8, j[n]:j[n] + 10]
        if f[n]:
            ref = ref.flip(-1)
        assert torch.equal(out[n], ref)
    assert f.any() and (~f).any() and ((i != 2) | (j != 2)).any()  # really applied
    # deterministic, float works the same, different seeds differ
    assert torch.equal(out, D.augment_batch(x, torch.Generator().manual_seed(42), padding=2))
    assert torch.equal(out.float(), D.augment_batch(x.float(), torch.Generator().manual_seed(42),
                                                    padding=2))
    assert not torch.equal(out, D.augment_batch(x, torch.Generator().manual_seed(7), padding=2))
    # flip only
    i0, j0, f0 = D.sample_augment_params(16, 0, True, torch.Generator().manual_seed(1))
    fo = D.augment_batch(x, torch.Generator().manual_seed(1), padding=0)
    assert torch.equal(fo, torch.where(f0[:, None, None, None], x.flip(-1), x))


def test_normalize_and_in_memory_batches():
    ds = _tiny_dataset(n_classes=4, per_train=5)
    x = ds.train_x[:3]
    mean, std = ds.info.mean, ds.info.std
    from torchvision.transforms import functional as TF
    ref = torch.stack([TF.normalize(xi.float() / 255, mean, std) for xi in x])
    assert torch.allclose(D.normalize_batch(x, mean, std), ref, atol=1e-6)

    idx = np.arange(20)
    plain = list(D.iterate_batches(ds, "train", idx, 6))
    assert [b[0].shape[0] for b in plain] == [6, 6, 6, 2]
    assert torch.allclose(plain[0][0], D.normalize_batch(ds.train_x[:6], mean, std))
    assert torch.equal(torch.cat([y for _, y in plain]), torch.from_numpy(ds.train_y))
    assert len(list(D.iterate_batches(ds, "train", idx, 6, drop_last=True))) == 3

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return list(D.iterate_batches(ds, "train", idx, 6, augment=True, shuffle=True,
                                      generator=g))

    a, b = run(1), run(1)
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b))
    assert sorted(torch.cat([y for _, y in a]).tolist()) == sorted(ds.train_y.tolist())
    # TransformDataset (per-image PIL path) is seeded per item and leaves the global RNG alone
    state = torch.get_rng_state()
    td = D.TransformDataset(ds, "train", idx[:4], train=True, seed=9)
    x1, y1 = td[2]
    assert torch.equal(x1, td[2][0]) and x1.shape == (3, 8, 8) and y1 == ds.train_y[2]
    assert torch.equal(state, torch.get_rng_state())


def test_dataset_info():
    ci = D.dataset_info("cifar100")
    assert (ci.num_classes, ci.image_size, ci.channels, ci.crop_padding) == (100, 32, 3, 4)
    fm = D.dataset_info("fashion-mnist")
    assert (fm.image_size, fm.channels, fm.crop_padding) == (28, 1, 2)
    im = D.dataset_info("imagenet100")
    names = [type(t).__name__ for t in im.train_transform().transforms]
    assert names[:2] == ["RandomResizedCrop", "RandomHorizontalFlip"]
    assert [type(t).__name__ for t in im.test_transform().transforms][:2] == \
        ["Resize", "CenterCrop"]
    with pytest.raises(D.DataError, match="unknown dataset"):
        D.dataset_info("mnist")
