"""Pruning during stage 1 (when the budget's ramp ends and the masks turn binary) is exact:
training the pruned network on equals training the binary-masked full-width network on and
pruning it afterwards, in float64 to rounding: kept weights, BatchNorm buffers, momentum,
classifier columns and logits, every backbone, t = 1 and 3, both models, one process and
DDP's two-process path."""

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from der_fast import DERNet, FastDERNet
from der_fast import masks as M
from der_fast import train as T
from der_fast.train import loop, stages
from helpers import TensorData, noisy_batches

pytestmark = pytest.mark.usefixtures("one_thread")

N_IMAGES, BATCH, HW = 24, 8, 32  # 3 batches per epoch


class _Data(TensorData):
    """Random float64 images (for ``recalibrate_bn``; the training batches are
    :func:`noisy_batches` of them)."""

    def __init__(self, channels, n_classes):
        g = torch.Generator().manual_seed(5)
        self.x = torch.randn(N_IMAGES, channels, HW, HW, generator=g, dtype=torch.float64)
        self.y = torch.randint(0, n_classes, (N_IMAGES,), generator=g)
        self.info = SimpleNamespace(image_size=HW)


def _model(cls, backbone, t, in_channels=3):
    """A float64 model at step ``t``: extractors 0..t-1 pruned (random masks, >= 1 channel
    off), extractor t fresh with masks."""
    torch.manual_seed(11)
    model = cls(backbone, in_channels=in_channels, use_masks=True)
    for step in range(t + 1):
        if step:
            net = model.convnets[-1]
            with torch.no_grad():
                for e in net.mask_e.values():
                    e.copy_(torch.randn(e.shape) * 0.01)
            model.set_s(400.0)
            model.prune()
        model.update_fc(2 * (step + 1))
    return model.double()


def _cfg(backbone, prune, epochs=2):
    cfg, _ = T.config_from_args(["--backbone", backbone, "--epochs", str(epochs),
                                 "--batch-size", str(BATCH), "--keep", "0.3",
                                 "--lr", "0.05", "--no-progress", "--no-plots"]
                                + ([] if prune else ["--no-prune"]))
    cfg.warmup_epochs = 0
    return cfg


def _train(model, cfg, t, monkeypatch, rt=None):
    data = _Data(model.in_channels, model.n_classes)
    monkeypatch.setattr(loop, "train_batches", noisy_batches)
    report = {}
    torch.manual_seed(3)
    stages.stage1(model, data, np.arange(N_IMAGES), cfg, t, 2 * t, "cpu", rt, report=report)
    return report, data


def _states_close(a, b, rtol=1e-9):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        if not torch.is_tensor(sa[k]):  # the model's extra state (task sizes, mask flags)
            assert sa[k] == sb[k], k
            continue
        if not torch.is_floating_point(sa[k]):
            assert torch.equal(sa[k], sb[k]), k
            continue
        scale = max(float(sb[k].abs().max()), 1e-30) if sb[k].numel() else 1.0
        err = float((sa[k] - sb[k]).abs().max()) if sa[k].numel() else 0.0
        assert err <= rtol * scale, f"{k}: {err:.3g} vs scale {scale:.3g}"


@pytest.mark.parametrize("cls", [DERNet, FastDERNet])
@pytest.mark.parametrize("backbone,t", [("resnet32", 1), ("resnet32", 3), ("resnet18_cifar", 1),
                                        ("resnet18", 1)])
def test_early_prune_equals_binary_masked_training(cls, backbone, t, monkeypatch):
    base = _model(cls, backbone, t)
    early, late = base, copy.deepcopy(base)
    rep_e, data = _train(early, _cfg(backbone, prune=True), t, monkeypatch)
    rep_l, _ = _train(late, _cfg(backbone, prune=False), t, monkeypatch)
    # the early run pruned mid-stage (3 batches x 2 epochs, ramp until half): trained on after
    assert "time_prune_s" in rep_e and early.convnets[-1].mask_e is None
    assert late.convnets[-1].mask_e is not None and late.convnets[-1].binary_masks
    assert rep_e["keep_trace"] == rep_l["keep_trace"]
    assert rep_e["lambda_s"] == rep_l["lambda_s"]
    assert rep_e["extractor_params_unpruned"] == [M.count_params(n) for n in late.convnets]
    late.prune()
    assert early.convnets[-1].widths == late.convnets[-1].widths
    assert early.convnets[-1].is_pruned
    _states_close(early, late)
    x = data.x[:10]
    for mode in (True, False):
        early.train(mode), late.train(mode)
        with torch.no_grad():
            a, b = early(x), late(x)
        for k in ("logits", "aux_logits", "features"):
            err = float((a[k] - b[k]).abs().max())
            assert err <= 1e-9 * float(b[k].abs().max()), (k, mode, err)


def test_early_prune_carries_momentum_exactly(monkeypatch):
    """Momentum of every kept weight is the slice of the full-width one: with the same
    optimiser steps after the prune the weights agree, but they would not with fresh buffers
    (the check has teeth)."""
    base = _model(DERNet, "resnet32", 1)
    cfg = _cfg("resnet32", prune=True)
    early = copy.deepcopy(base)
    _train(early, cfg, 1, monkeypatch)
    late = copy.deepcopy(base)
    _train(late, _cfg("resnet32", prune=False), 1, monkeypatch)
    late.prune()
    _states_close(early, late)

    fresh = copy.deepcopy(base)  # the same, but momentum dropped at the prune
    real_prune = DERNet.prune
    monkeypatch.setattr(DERNet, "prune",
                        lambda self, optimizer=None: real_prune(self, _reset(optimizer)))
    _train(fresh, cfg, 1, monkeypatch)
    w_e = early.convnets[-1].stages[0][0].conv1.weight
    w_f = fresh.convnets[-1].stages[0][0].conv1.weight
    assert float((w_e - w_f).detach().abs().max()) > 1e-6


def _reset(opt):
    if opt is not None:
        opt.state.clear()
    return opt


def test_no_prune_keeps_the_full_width_network(monkeypatch):
    model = _model(DERNet, "resnet32", 1)
    full = dict(model.convnets[-1].widths)
    rep, _ = _train(model, _cfg("resnet32", prune=False), 1, monkeypatch)
    assert model.convnets[-1].widths == full and "time_prune_s" not in rep
    assert model.convnets[-1].binary_masks


def _ddp_worker(rank, world, store_path, backbone, prune, out):
    import torch.distributed as dist

    from der_fast.train.distributed import Dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank,
                            world_size=world)
    try:
        mp = pytest.MonkeyPatch()
        model = _model(DERNet, backbone, 1)
        rt = loop.Runtime(dist=Dist(rank, world, None, True, False, "gloo"))
        rep, _ = _train(model, _cfg(backbone, prune), 1, mp, rt)
        assert ("time_prune_s" in rep) == prune
        if not prune:
            model.prune()
        if rank == 0:
            torch.save(model.state_dict(), out)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")
def test_early_prune_under_ddp_equals_binary_masked_ddp(tmp_path, monkeypatch):
    """Two gloo processes (DDP re-wrapped at the prune; running statistics averaged per
    batch): the early-pruned run equals the binary-masked run pruned afterwards."""
    import torch.multiprocessing as tmp

    results = {}
    for prune in (True, False):
        out = str(tmp_path / f"{prune}.pt")
        tmp.spawn(_ddp_worker, args=(2, str(tmp_path / f"store{prune}"), "resnet32", prune, out),
                  nprocs=2, join=True)
        results[prune] = torch.load(out)
    a, b = results[True], results[False]
    assert a.keys() == b.keys()
    for k in a:
        if not torch.is_tensor(a[k]):
            assert a[k] == b[k], k
        elif torch.is_floating_point(a[k]):
            assert float((a[k] - b[k]).abs().max()) <= 1e-9 * max(float(b[k].abs().max()),
                                                                   1e-30), k
        else:
            assert torch.equal(a[k], b[k]), k
