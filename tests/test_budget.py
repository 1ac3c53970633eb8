"""Mask learning and the parameter budget: gradients reach the masks in every batch, the
budget controller lands on the kept fraction asked for, floors hold, BatchNorm is re-estimated
with the binary masks, and the costs (parameters, MACs) are counted right."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from der_fast import masks as M
from der_fast import train as T
from der_fast.backbones import STREAM_FLOOR, MaskedResNet, binarize
from der_fast.objective import make_optimizer
from der_fast.reference import DERNet

BACKBONES = ["resnet32", "resnet18_cifar", "resnet18"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _grad_fraction_per_batch(init, n_batches=12, seed=0):
    """``init`` None: der_fast's masks. A number: HAT's (every e = init, clamped to +-6)."""
    """Stage-1 steps over one annealing epoch (s from 1/400 to 400) on random data; per batch,
    the fraction of mask channels whose compensated gradient is non-zero."""
    torch.manual_seed(seed)
    net = DERNet("resnet32", in_channels=3)
    net.update_fc(4)
    if init is not None:
        with torch.no_grad():
            for e in net.convnets[-1].mask_e.values():
                e.fill_(init)
    gen = torch.Generator().manual_seed(seed + 1)
    opt = make_optimizer(net.named_parameters(), 0.01, momentum=0.9, weight_decay=5e-4)
    fractions = []
    for b in range(n_batches):
        s = M.anneal_s(b, n_batches, 400.0)
        net.set_s(s)
        x = torch.randn(8, 3, 16, 16, generator=gen)
        y = torch.randint(0, 4, (8,), generator=gen)
        opt.zero_grad()
        loss = F.cross_entropy(net(x)["logits"], y) + 0.5 * net.sparsity_loss()
        loss.backward()
        net.compensate_mask_grads(s, 400.0)
        g = torch.cat([e.grad.flatten() for e in net.convnets[-1].mask_e.values()])
        fractions.append(float((g != 0).float().mean()))
        opt.step()
        if init is None:
            net.clamp_masks(400.0)
        else:
            with torch.no_grad():
                for e in net.convnets[-1].mask_e.values():
                    e.clamp_(-6.0, 6.0)
    return fractions


def test_masks_get_gradient_in_every_batch():
    fractions = _grad_fraction_per_batch(None)
    assert min(fractions) >= 0.95, fractions
    # HAT's e = 1 (|e| clamped at 6): sigmoid(400 e) == 1 in float32, the gradient vanishes
    hat = _grad_fraction_per_batch(1.0)
    assert max(hat[len(hat) // 2:]) < 0.05, hat


def test_new_masks_are_spread_and_on(seed):
    net = MaskedResNet("resnet32", masked=True)
    for p, e in net.mask_e.items():
        v = e.detach()
        assert bool((v >= 0).all() and (v < M.MASK_INIT).all()), p
        assert float(v.std()) > 0.1 * M.MASK_INIT, p  # spread, not one value
    assert M.keep_ratio(net) == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("arch", BACKBONES)
def test_keep_ratio_is_what_pruning_keeps(arch, seed):
    net = MaskedResNet(arch, masked=True)
    with torch.no_grad():
        for e in net.mask_e.values():
            e.copy_(torch.randn(e.shape) * 0.01)
    ratio = M.keep_ratio(net)
    pruned = M.prune(net)
    assert 0.0 < ratio < 1.0
    assert ratio == pytest.approx(M.count_params(pruned) / M.count_params(net), rel=1e-12)


@pytest.mark.parametrize("arch", BACKBONES)
def test_floors_hold_under_any_pressure(arch, seed):
    """Every e negative: no point ends with zero channels; residual streams (the last one is
    the feature output) keep STREAM_FLOOR of their width."""
    net = MaskedResNet(arch, masked=True)
    with torch.no_grad():
        for e in net.mask_e.values():
            e.copy_(-torch.rand(e.shape) - 0.01)
    pruned = M.prune(net)
    for p, w in pruned.widths.items():
        full = pruned.full_widths[p]
        assert w >= 1, p
        if p.startswith("stream"):
            assert w == math.ceil(STREAM_FLOOR * full), p
        else:
            assert w == 1, p
    assert pruned.out_dim == math.ceil(STREAM_FLOOR * net.out_dim)


def test_sparsity_loss_exerts_no_pressure_on_the_floor_channels(seed):
    """The channels binarisation keeps whatever their sign (the min_on largest e of a point)
    get no sparsity gradient, whatever the other gates sum to; every other channel is pushed
    down, also when a point's soft gates sum to less than its floor."""
    net = MaskedResNet("resnet32", masked=True)
    with torch.no_grad():
        for e in net.mask_e.values():
            e.copy_(torch.rand(e.shape) * 0.02 - 0.015)  # gates ~ 0.002-0.99
    net.s = 400.0
    M.sparsity_loss(net).backward()
    for p, e in net.mask_e.items():
        k = net.min_on(p)
        top = torch.topk(e.detach(), k).indices
        floor = torch.zeros(e.numel(), dtype=torch.bool)
        floor[top] = True
        assert torch.equal(floor, binarize(e.detach() - 1.0, k)), p  # binarize's floor
        assert float(e.grad[floor].abs().max()) == 0.0, p
        assert bool((e.grad[~floor] > 0).all()), p


@pytest.mark.parametrize("arch", BACKBONES)
@pytest.mark.parametrize("hw", [(32, 32), (28, 20)])
def test_extractor_macs_match_a_hook_count(arch, hw, seed):
    net = MaskedResNet(arch, in_channels=3, masked=True)
    with torch.no_grad():
        for e in net.mask_e.values():
            e.copy_(torch.randn(e.shape) * 0.01)
    for n in (net, M.prune(net)):
        counted = []

        def hook(mod, inp, out):
            counted.append(out[0].numel() * mod.in_channels * mod.kernel_size[0]
                           * mod.kernel_size[1])

        hs = [m.register_forward_hook(hook) for m in n.modules() if isinstance(m, nn.Conv2d)]
        with torch.no_grad():
            n.eval()(torch.randn(1, 3, *hw))
        for h in hs:
            h.remove()
        assert M.extractor_macs(n, hw) == sum(counted)


def test_controller_follows_the_ramp_and_is_bounded():
    c = M.BudgetController(0.2, 100, lam=1.0, start=0.1, end=0.5)
    assert c.aim() == 1.0
    lams = [c.update(1.0) for _ in range(10)]  # keeps everything while aiming at 1: no push
    assert lams[-1] == pytest.approx(1.0) and not c.finished
    for _ in range(20):
        c.update(1.0)  # now aim < 1: lambda grows
    assert c.lam > 1.0 and 0.2 < c.aim() < 1.0 and not c.finished
    for _ in range(20):
        c.update(1.0)
    assert c.finished and c.aim() == pytest.approx(0.2)
    before = c.lam
    c.update(0.1)  # far below the budget: backs off at once (proportional term)
    assert c.lam < before * math.exp(-1.0)
    with pytest.raises(ValueError):
        M.BudgetController(0.0, 10)
    with pytest.raises(ValueError):
        M.BudgetController(0.5, 10, start=0.8, end=0.5)


def _one_step_run(tmp_path, name, **kw):
    """A one-step run (all 10 classes at step 0) on the shipped Fashion-MNIST subset."""
    cfg = T.Config(data_root="embedded", train_per_class=30, test_per_class=10, init_cls=10,
                   increment=10, epochs=4, epochs_stage2=0, batch_size=32, lr=0.05,
                   memory_total=20, out=str(tmp_path / name), progress=False, plots=False, **kw)
    return T.run(cfg, log=lambda *a, **k: None)["steps"][0]


def test_budget_orders_and_lands(tmp_path):
    kept = {}
    for r in (0.5, 0.2, 0.1):
        step = _one_step_run(tmp_path, f"keep{r}", keep=r)
        kept[r] = step["keep"]
        assert step["extractor_params"][0] < step["extractor_params_unpruned"][0]
    assert kept[0.5] > kept[0.2] > kept[0.1], kept
    assert kept[0.2] == pytest.approx(0.2, rel=0.10), kept


def test_recalibrated_bn_is_the_average_of_batch_statistics(tmp_path):
    torch.manual_seed(0)
    cfg = T.Config(data_root="embedded", batch_size=50, init_cls=2, increment=2)
    from der_fast import data as D

    data = D.IncrementalData("fashion_mnist", 2, 2, root="embedded", seed=1993,
                             max_train_per_class=50)
    net = DERNet("resnet32", in_channels=data.info.channels)
    net.update_fc(2)
    net.convnets[-1].binary_masks = True
    idx = data.train_indices(0)  # 100 images: two batches of 50
    T.recalibrate_bn(net, data, idx, cfg, None)
    stem = net.convnets[-1].stem
    means = []
    for x, _ in data.batches("train", idx, 50):
        z = stem.conv(x)
        means.append(z.mean((0, 2, 3)))
    torch.testing.assert_close(stem.bn.running_mean, torch.stack(means).mean(0), rtol=1e-4,
                               atol=1e-5)
    assert not np.isclose(float(means[0][0].detach()), float(means[1][0].detach()))
    assert stem.bn.momentum == 0.1 and net.training


def test_step0_trains_at_the_budget_from_its_first_step(tmp_path, monkeypatch):
    """Step 0's extractor (random weights) is pruned to the budget before its first optimiser
    step, with no controller and no sparsity loss; a later step's (trained weights) once
    masks.RAMP's steps are done, its controller starting from lambda_s = 1."""
    from der_fast.train import stages

    ended, started, seen = [], [], {}

    class Recording(M.BudgetController):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            started.append(self.lam)

        @property
        def finished(self):
            done = M.BudgetController.finished.fget(self)
            if done and not getattr(self, "_seen", False):
                self._seen = True
                ended.append((self.start, self.end, self.done, self.total))
            return done

    real_train = stages.train_epochs

    def recording_train(model, params, *a, **k):
        # what each stage 1 starts training: the newest extractor's state and its parameters
        if k["desc"].endswith("stage 1"):
            new = model.convnets[-1]
            seen[k["desc"]] = (new.is_pruned, new.mask_e is None,
                               {id(p) for p in new.parameters()} <= {id(p) for _, p in params})
        return real_train(model, params, *a, **k)

    monkeypatch.setattr(stages, "BudgetController", Recording)
    monkeypatch.setattr(stages, "train_epochs", recording_train)
    cfg = T.Config(data_root="embedded", train_per_class=30, test_per_class=10, init_cls=2,
                   increment=2, last_step=1, epochs=4, epochs_stage2=1, batch_size=16,
                   memory_total=20, out=str(tmp_path / "r"), progress=False, plots=False)
    steps = T.run(cfg, log=lambda *a, **k: None)["steps"]
    assert M.ramp(0) == M.RAMP_STEP0 == (0.0, 0.0) and M.ramp(1) == M.ramp(7) == M.RAMP
    # step 0: pruned before training, the optimiser holds the pruned extractor's parameters
    assert seen["step 0 stage 1"] == (True, True, True)
    assert seen["step 1 stage 1"] == (False, False, True)  # full width, masks learnt
    assert [(s, e) for s, e, _, _ in ended] == [M.RAMP] and started == [1.0]
    _, end, done, total = ended[0]
    assert done == math.ceil(end * total) and done < total
    assert steps[0]["lambda_s"] is None and steps[1]["lambda_s"] > 0
    assert steps[0]["keep_trace"] == [round(steps[0]["keep"], 4)] * 4  # at the budget throughout
    assert steps[1]["keep_trace"][-1] == round(steps[1]["keep"], 4)
    assert steps[1]["keep_trace"][0] > steps[1]["keep"] + 0.05  # still on the ramp
    for step in steps:  # pruned at the budget in both
        assert step["keep"] == pytest.approx(0.2, abs=0.03)
        assert step["extractor_params"][-1] < step["extractor_params_unpruned"][-1]
