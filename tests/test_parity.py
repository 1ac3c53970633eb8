"""benchmarks/parity/parity.py, the side-by-side comparison with PyCIL: the images both systems
see, der_fast's side of a run, and the table's statistics. (PyCIL itself is not a dependency:
its side runs only where a checkout is given.)"""

import math

import numpy as np
import pytest
import torch

from benchmarks.parity import parity

pytestmark = pytest.mark.usefixtures("one_thread")


def _protocol(**kw):
    p = parity._parser().parse_args([])
    for k, v in kw.items():
        setattr(p, k, v)
    return p


def test_protocol_images_are_padded_grey_images_repeated_to_rgb():
    images, source = parity.protocol_images(7, 3)
    from der_fast.data import limit_per_class, load_fashion_mnist

    ds = limit_per_class(load_fashion_mnist(), 7)
    (tx, ty), (vx, vy) = images["train"], images["test"]
    assert tx.shape == (70, 32, 32, 3) and tx.dtype == np.uint8 and vx.shape == (30, 32, 32, 3)
    assert np.bincount(ty).tolist() == [7] * 10 and np.bincount(vy).tolist() == [3] * 10
    assert (tx[:, :2] == 0).all() and (tx[:, :, -2:] == 0).all()  # the zero border
    assert (tx[..., 0] == tx[..., 2]).all()
    # the first images of each class, in the dataset's order
    np.testing.assert_array_equal(tx[:, 2:30, 2:30, 1], ds.images("train")[:, 0].numpy())
    first = np.flatnonzero(ds.labels("test") == vy[0])[0]
    np.testing.assert_array_equal(vx[0, 2:30, 2:30, 0], ds.images("test")[first, 0].numpy())


def test_der_fast_side_runs_the_protocol(tmp_path):
    p = _protocol(train_per_class=12, test_per_class=4, memory=20, epochs=1, milestones=[],
                  init_cls=4, increment=3, batch_size=16)
    images, _ = parity.protocol_images(12, 4)
    res = parity.run_der_fast(p, 3, images, tmp_path / "run")
    assert len(res["top1"]) == 3 and all(0 <= a <= 100 for a in res["top1"])
    from der_fast.data import class_order

    assert res["class_order"] == class_order(10, 1993)  # PyCIL's order for the same seed
    assert len(res["loss"]) == 3 and all(0 < v < math.inf for v in res["loss"])
    # --last-step 0: step 0 alone, the same as the whole run's step 0
    p.last_step = 0
    first = parity.run_der_fast(p, 3, images, tmp_path / "step0")
    assert first["top1"] == res["top1"][:1]
    assert first["loss"] == pytest.approx(res["loss"][:1])


def test_pycils_last_epoch_loss_is_read_from_its_log_line():
    import logging

    log = parity._EpochLog()
    for msg in ("Exemplar size: 200",
                "Task 0, Epoch 6/6 => Loss 0.693, Train_accy 50.12",
                "Task 1, Epoch 6/6 => Loss 1.234, Loss_clf 0.900, Loss_aux 0.334, "
                "Train_accy 71.00, Test_accy 60.50"):
        log.handle(logging.LogRecord("root", logging.INFO, "der.py", 1, msg, None, None))
    assert log.losses == [0.693, 1.234]


def test_summary_statistics_and_verdict():
    rng = np.random.default_rng(0)
    runs = []
    for system, shift in (("der_fast", 0.0), ("pycil", 1.0)):
        for seed in range(1, 6):
            runs.append({"system": system, "seed": seed, "threads": 1 + seed % 2,
                         "top1": list(rng.uniform(40, 90, 3) + shift),
                         "nme_top1": list(rng.uniform(40, 90, 3)),
                         "loss": list(rng.uniform(0.1, 0.7, 3)), "init_cls": 2,
                         "wall_s": float(rng.uniform(50, 100) / (1 + seed % 2))})
    s = parity.summarise(runs)
    for system in ("der_fast", "pycil"):
        rs = [r for r in runs if r["system"] == system]
        avg = [np.mean(r["top1"]) for r in rs]
        assert s[system]["avg_inc"][0] == pytest.approx(np.mean(avg))
        assert s[system]["avg_inc"][1] == pytest.approx(np.std(avg, ddof=1))
        assert s[system]["step_top1"][2][0] == pytest.approx(np.mean([r["top1"][2] for r in rs]))
    d = s["difference"]
    se = math.sqrt(s["der_fast"]["avg_inc"][1] ** 2 / 5 + s["pycil"]["avg_inc"][1] ** 2 / 5)
    assert d["se"] == pytest.approx(se)
    assert d["within_se"] == (d["avg_inc"] >= -se)
    # wall times are compared per thread count, never across
    for th in (1, 2):
        w = {sy: [r["wall_s"] for r in runs if r["system"] == sy and r["threads"] == th]
             for sy in ("der_fast", "pycil")}
        assert s["der_fast"]["wall_s"][th][2] == len(w["der_fast"])
        assert d["wall_ratio"][th] == pytest.approx(np.mean(w["pycil"]) / np.mean(w["der_fast"]))
    text = parity.table(s, _protocol())
    assert "average incremental top-1" in text and "standard error" in text
    assert "2 thread(s)" in text and "NME" in text
    losses = [r["loss"][0] for r in runs if r["system"] == "pycil"]
    assert s["pycil"]["step_loss"][0][0] == pytest.approx(np.mean(losses))
    assert "training loss, step 2" in text
    # near chance after step 0: top-1 under 100 / 2 + 5 = 55 (two classes)
    stalled = [r for r in runs if r["system"] == "der_fast" and r["top1"][0] < 55]
    assert s["der_fast"]["stalled"] == [r["seed"] for r in stalled]
    assert f"{len(stalled)}: " in text
    runs[0]["top1"][0] = 54.9
    assert 1 in parity.summarise(runs)["der_fast"]["stalled"]
    runs[0]["top1"][0] = 55.0
    assert 1 not in parity.summarise(runs)["der_fast"]["stalled"]
    # runs recorded before the losses and class counts were: the table leaves those rows out
    old = parity.summarise([{k: v for k, v in r.items() if k not in ("loss", "init_cls")}
                            for r in runs])
    assert old["der_fast"]["stalled"] is None and old["der_fast"]["step_loss"] is None
    text = parity.table(old, _protocol())
    assert "training loss" not in text and "near chance" not in text
    # a clearly lower der_fast is reported as such
    for r in runs:
        if r["system"] == "der_fast":
            r["top1"] = [a - 30 for a in r["top1"]]
    low = parity.summarise(runs)
    assert not low["difference"]["within_se"]
    assert "BELOW PyCIL" in parity.table(low, _protocol())


def test_memory_too_large_for_pycils_herding_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="herding"):
        parity.main(["--out", str(tmp_path), "--memory", "2000", "--train-per-class", "300"])


def test_der_fast_batches_are_pycils_transforms_of_the_same_images():
    """PyCIL makes each training image with PIL: RandomCrop(32, padding=4), RandomHorizontalFlip,
    ToTensor, Normalize; der_fast whole batches with tensors. Given the same crop offsets and
    flips, the two give the same numbers (the random draws differ, their distributions not)."""
    from PIL import Image
    from torchvision.transforms import functional as TF

    from der_fast.data import crop_flip, normalize_batch

    images, _ = parity.protocol_images(3, 1)
    x = images["train"][0]  # uint8 [N, 32, 32, 3]
    g = torch.Generator().manual_seed(5)
    n = len(x)
    i, j = torch.randint(0, 9, (n,), generator=g), torch.randint(0, 9, (n,), generator=g)
    flip = torch.rand(n, generator=g) < 0.5
    mine = normalize_batch(crop_flip(torch.from_numpy(x).permute(0, 3, 1, 2), i, j, flip, 4),
                           parity._MEAN, parity._STD)
    theirs = []
    for k in range(n):
        im = TF.crop(TF.pad(Image.fromarray(x[k]), 4), int(i[k]), int(j[k]), 32, 32)
        im = TF.hflip(im) if flip[k] else im
        theirs.append(TF.normalize(TF.to_tensor(im), parity._MEAN, parity._STD))
    assert flip.any() and not flip.all() and len(set(i.tolist())) > 1
    torch.testing.assert_close(mine, torch.stack(theirs), rtol=0, atol=0)
    # and the test images, unaugmented
    v = images["test"][0]
    torch.testing.assert_close(
        normalize_batch(torch.from_numpy(v).permute(0, 3, 1, 2), parity._MEAN, parity._STD),
        torch.stack([TF.normalize(TF.to_tensor(Image.fromarray(a)), parity._MEAN, parity._STD)
                     for a in v]), rtol=0, atol=0)
