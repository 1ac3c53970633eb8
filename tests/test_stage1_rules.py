"""Rules of stage 1 that the trainer relies on, each also the test that catches one mutant of
tests/mutants/ (run_mutants.py). Random data, seconds each.

* BatchNorm re-estimation runs the binary-masked extractor (mutant 05);
* shift_to_budget lands as close to the budget as whole channels allow (mutant 06);
* micro-batches of uneven size are weighted by their size, so the accumulated gradient is the
  whole batch's (mutant 09);
* the stage-1 loss weights the auxiliary cross-entropy by lambda_a (mutant 17).
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from der_fast import masks as M
from der_fast import train as T
from der_fast.backbones import MaskedResNet
from der_fast.objective import aux_targets, stage1_loss
from der_fast.reference import DERNet
from der_fast.train import loop

pytestmark = pytest.mark.usefixtures("one_thread")


class _Images:
    """Random images served like IncrementalData.batches (no augmentation)."""

    def __init__(self, n, channels=3, hw=16, seed=0, dtype=torch.float32):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, channels, hw, hw, generator=g, dtype=dtype)
        self.y = torch.zeros(n, dtype=torch.long)

    def batches(self, split, indices, batch_size, device=None, **_):
        for i in range(0, len(indices), batch_size):
            idx = torch.as_tensor(np.asarray(indices[i:i + batch_size]))
            yield self.x[idx], self.y[idx]


def _some_channels_off(net: MaskedResNet, g: torch.Generator) -> None:
    """Random e with about a third of every point's channels off (floors still hold)."""
    with torch.no_grad():
        for e in net.mask_e.values():
            e.copy_(torch.rand(e.shape, generator=g) - 0.33)


# ----------------------------------------------------------------------- BN re-estimation
def test_recalibrate_bn_uses_the_binary_masks():
    """Every BatchNorm of the newest extractor gets the average, over the batches, of the
    batch statistics its input has in the binary-masked network (the network evaluated
    afterwards), not those of the full-width one."""
    torch.manual_seed(0)
    model = DERNet("resnet32")
    model.update_fc(4)
    net = model.convnets[-1]
    _some_channels_off(net, torch.Generator().manual_seed(1))
    net.binary_masks = True
    off = {p: int((~net.binary_mask(p)).sum()) for p in net.mask_e}
    assert off["inner0_0"] > 0 and off["stream0"] > 0  # the masks matter here
    data = _Images(24, seed=2)
    idx = np.arange(24)
    cfg = SimpleNamespace(batch_size=8)

    # the expected statistics: BN inputs of the binary-masked extractor, per batch
    probe = copy.deepcopy(net).train()
    seen = {}
    hooks = [m.register_forward_pre_hook(
        lambda m, inp, name=name: seen.setdefault(name, []).append(inp[0].detach()))
        for name, m in probe.named_modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for x, _ in data.batches("train", idx, 8):
            probe(x)
    for h in hooks:
        h.remove()

    T.recalibrate_bn(model, data, idx, cfg, None)
    checked = 0
    for name, bn in net.named_modules():
        if not isinstance(bn, nn.BatchNorm2d):
            continue
        zs = seen[name]
        assert len(zs) == 3
        mean = torch.stack([z.mean((0, 2, 3)) for z in zs]).mean(0)
        var = torch.stack([z.var((0, 2, 3), unbiased=True) for z in zs]).mean(0)
        torch.testing.assert_close(bn.running_mean, mean, rtol=1e-4, atol=1e-5,
                                   msg=lambda m, n=name: f"{n}.running_mean: {m}")
        torch.testing.assert_close(bn.running_var, var, rtol=1e-4, atol=1e-5,
                                   msg=lambda m, n=name: f"{n}.running_var: {m}")
        checked += 1
    assert checked == len(seen)
    assert net.mask_e is not None and net.binary_masks  # the masks are left as they were


# ----------------------------------------------------------------------- the budget shift
def _achievable(net: MaskedResNet) -> list:
    """Keep ratio of every constant shift of e that changes the binary masks: thresholds
    between consecutive distinct values of e, and beyond both ends."""
    vals = torch.unique(torch.cat([e.detach().flatten() for e in net.mask_e.values()]).double())
    cuts = torch.cat([vals[:1] - 1, (vals[:-1] + vals[1:]) / 2, vals[-1:] + 1])
    probe = copy.deepcopy(net)
    start = [e.detach().clone() for e in probe.mask_e.values()]
    out = []
    with torch.no_grad():
        for c in cuts.tolist():
            for e, e0 in zip(probe.mask_e.values(), start):
                e.copy_(e0).sub_(c)  # the arithmetic of shift_to_budget's final shift
            out.append(M.keep_ratio(probe))
    return out


def test_shift_to_budget_lands_as_close_as_whole_channels_allow():
    """After the shift, the binary keep ratio is the closest to the budget that any constant
    shift of e reaches (one channel more or fewer would be farther), and the shift is one
    constant: the order of the margins is unchanged."""
    torch.manual_seed(0)
    net = MaskedResNet("resnet32", masked=True)
    _some_channels_off(net, torch.Generator().manual_seed(3))
    reachable = _achievable(net)
    for target in (0.15, 0.3, 0.45, 0.6, 0.85):
        shifted = copy.deepcopy(net)
        got = M.shift_to_budget(shifted, target)
        assert got == M.keep_ratio(shifted)
        best = min(abs(r - target) for r in reachable)
        assert abs(got - target) <= best + 1e-12, (
            f"target {target}: landed on {got:.5f} (|diff| {abs(got - target):.5f}), but "
            f"{min(reachable, key=lambda r: abs(r - target)):.5f} is reachable")
        d = [(a.detach().double() - b.detach().double()) for a, b in
             zip(net.mask_e.values(), shifted.mask_e.values())]
        c = float(d[0][0])
        assert all(torch.allclose(t, torch.full_like(t, c), rtol=0, atol=1e-6) for t in d)


# ----------------------------------------------------------------------- micro-batch weights
def _pieces(data, indices, cfg, gen, device, chunks=1, mine=(0,)):
    """The trainer's batches, cut as the trainer cuts them (piece k = rows
    [k n // chunks, (k+1) n // chunks)), this process's pieces only."""
    order = torch.randperm(len(indices), generator=gen)
    for i in range(0, len(order), cfg.batch_size):
        idx = torch.as_tensor(np.asarray(indices))[order[i:i + cfg.batch_size]]
        x, y, n = data.x[idx], data.y[idx], len(idx)
        yield [(x[k * n // chunks:(k + 1) * n // chunks], y[k * n // chunks:(k + 1) * n // chunks])
               for k in mine], n


def _one_epoch(accum: int, n: int, monkeypatch) -> dict:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5)).double()
    g = torch.Generator().manual_seed(4)
    data = SimpleNamespace(x=torch.randn(n, 3, 2, 2, generator=g, dtype=torch.float64),
                           y=torch.randint(0, 5, (n,), generator=g))
    cfg = SimpleNamespace(batch_size=n, accum_steps=accum, momentum=0.9, mask_lr=1e-4,
                          compile=False, seed=0, progress=False, s_max=400.0,
                          precision="32")
    monkeypatch.setattr(loop, "train_batches", _pieces)
    loop.train_epochs(model, list(model.named_parameters()), data, np.arange(n), cfg,
                      loop.Schedule(epochs=2, lr=0.5, milestones=[], weight_decay=0.0),
                      loop.BatchStep(lambda net, x, y: F.cross_entropy(net(x), y)),
                      seed_salt=(0, 1), device=None)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("accum,n", [(2, 7), (3, 10), (4, 9)])
def test_uneven_micro_batches_give_the_whole_batch_gradient(accum, n, monkeypatch):
    """--accum-steps with pieces of unequal size (a batch not divisible by world x accum)
    trains like the whole batch at once: each piece's mean loss is weighted by its share."""
    whole = _one_epoch(1, n, monkeypatch)
    pieces = _one_epoch(accum, n, monkeypatch)
    for k in whole:
        torch.testing.assert_close(pieces[k], whole[k], rtol=1e-12, atol=1e-12,
                                   msg=lambda m, k=k: f"{k} after 2 steps: {m}")


# ----------------------------------------------------------------------- the stage-1 loss
@pytest.mark.parametrize("lambda_a", [0.0, 0.3, 2.5])
def test_stage1_loss_weights_the_aux_term_by_lambda_a(lambda_a):
    torch.manual_seed(0)
    model = DERNet("resnet32", use_masks=False)
    model.update_fc(3)
    model.update_fc(7)
    x = torch.randn(6, 3, 8, 8)
    y = torch.tensor([0, 2, 3, 4, 5, 6])
    n_old = 3
    out = model(x)
    want = F.cross_entropy(out["logits"], y) + lambda_a * F.cross_entropy(
        out["aux_logits"], aux_targets(y, n_old))
    got = stage1_loss(model, out, y, n_old, lambda_a, 0.0)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
