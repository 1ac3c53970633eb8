"""Exact pruning of masked networks (MaskedResNet): the pruned network computes the binary-
masked one's function, keeps the original channel indices and BatchNorm state, composes; and
expand_from, which grows a pruned extractor back to full width around its kept channels."""

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from der_fast import masks as M
from der_fast.backbones import MaskedResNet, conv_layers

BACKBONES = ["resnet32", "resnet18_cifar", "resnet18"]


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------ helpers
def randomize_bn(net: nn.Module, gen: torch.Generator) -> None:
    """Random affine parameters and running statistics in every BatchNorm (moderate scale, so
    deep nets neither explode nor vanish)."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                dt = m.weight.dtype
                m.weight.copy_(0.5 + torch.rand(c, generator=gen, dtype=dt))
                m.bias.copy_(0.2 * torch.randn(c, generator=gen, dtype=dt))
                m.running_mean.copy_(0.2 * torch.randn(c, generator=gen, dtype=dt))
                m.running_var.copy_(0.5 + 1.5 * torch.rand(c, generator=gen, dtype=dt))
                m.num_batches_tracked.fill_(7)


def randomize_masks(net: MaskedResNet, gen: torch.Generator) -> dict:
    """Random embeddings e (random signs). stream0 and every third inner point get a single
    channel on; the inner points after those have every e negative (binarisation must then keep
    their largest e). Returns the expected binary masks, point -> bool."""
    expected = {}
    with torch.no_grad():
        for i, (p, e) in enumerate(net.mask_e.items()):
            v = torch.randn(e.shape, generator=gen, dtype=e.dtype)
            kind = "random" if p.startswith("stream") and p != "stream0" else \
                ("single" if p == "stream0" or i % 3 == 1 else "none" if i % 3 == 2 else "random")
            if kind == "single":
                v = -v.abs() - 0.1
                v[int(torch.randint(len(v), (1,), generator=gen))] = 0.7
            elif kind == "none" and len(v) > 1:
                v = -v.abs() - 0.1
            e.copy_(v)
            m = v > 0
            k = net.min_on(p)  # streams keep STREAM_FLOOR of their channels: the largest e
            if int(m.sum()) < k:
                m = m.clone()
                m[torch.argsort(-v, stable=True)[:k]] = True
            expected[p] = m
    # make sure the test is not vacuous: some points are pruned, some keep several channels
    assert any(not m.all() for m in expected.values())
    assert sum(int(m.sum()) == 1 for m in expected.values()) >= 2
    assert any(int(m.sum()) > 1 for m in expected.values())
    return expected


def masked_net(arch, in_channels=3, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = MaskedResNet(arch, in_channels=in_channels, masked=True).to(dtype)
    randomize_bn(net, gen)
    expected = randomize_masks(net, gen)
    return net, expected, gen


# ------------------------------------------------------------------------------ pruning
def _check_prune(net, expected, x, rtol, atol):
    net.eval()
    net.binary_masks = True
    with torch.no_grad():
        ref = net(x)
        net.binary_masks = False
        soft = net(x)
        net.binary_masks = True
    pruned = M.prune(net)
    assert not pruned.training
    assert pruned.mask_e is None and pruned.is_pruned
    assert next(pruned.parameters()).dtype == x.dtype
    # widths = number of on channels; kept_* = their (sorted) indices
    for p, m in expected.items():
        assert pruned.widths[p] == int(m.sum()), p
        assert torch.equal(pruned.kept(p), net.kept(p)[m]), p  # original indices
    with torch.no_grad():
        out = pruned(x)
    # the features that are pruned away are exactly zero in the masked net
    last = f"stream{len(net.arch.stages) - 1}"
    keep = expected[last]
    assert out.shape == (x.shape[0], int(keep.sum()))
    assert int(torch.count_nonzero(ref[:, ~keep])) == 0
    assert float(ref.abs().max()) > 1e-3  # not a vacuous all-zero comparison
    assert not torch.allclose(soft, ref)  # the masks matter
    assert_close(out, ref[:, keep], rtol=rtol, atol=atol)
    return pruned


@pytest.mark.parametrize("arch", BACKBONES)
def test_prune_exact_float32(arch):
    net, expected, gen = masked_net(arch, seed=11)
    x = torch.randn(2, 3, 32, 32, generator=gen)
    pruned = _check_prune(net, expected, x, rtol=1e-4, atol=1e-5)
    assert M.count_params(pruned) < M.count_params(net)


@pytest.mark.parametrize("arch", BACKBONES)
def test_prune_exact_float64(arch):
    net, expected, gen = masked_net(arch, dtype=torch.float64, seed=12)
    x = torch.randn(2, 3, 32, 32, generator=gen, dtype=torch.float64)
    _check_prune(net, expected, x, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("in_channels", [1, 3, 5])
def test_prune_exact_any_input_channels(in_channels):
    net, expected, gen = masked_net("resnet32", in_channels=in_channels, seed=13)
    x = torch.randn(3, in_channels, 16, 16, generator=gen)
    pruned = _check_prune(net, expected, x, rtol=1e-4, atol=1e-5)
    assert pruned.in_channels == in_channels
    assert pruned.stem.conv.weight.shape[1] == in_channels


def test_prune_exact_in_train_mode_too():
    """BatchNorm batch statistics are per channel, so pruning is exact with batch stats too."""
    net, expected, gen = masked_net("resnet18_cifar", seed=14)
    x = torch.randn(4, 3, 16, 16, generator=gen)
    net.binary_masks = True
    pruned = M.prune(net)
    net.train()
    pruned.train()
    with torch.no_grad():
        ref = net(x)
        out = pruned(x)
    keep = expected["stream3"]
    assert_close(out, ref[:, keep], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", BACKBONES)
def test_pruned_param_count(arch):
    net, expected, _ = masked_net(arch, in_channels=3, seed=15)
    pruned = M.prune(net)
    n_on = {p: int(m.sum()) for p, m in expected.items()}
    n_on["input"] = 3
    # every conv has one BatchNorm (2 affine parameters per output channel)
    want = sum(k * n_on[a] * n_on[b] + 2 * n_on[b] for _, a, b, k in conv_layers(net.arch))
    assert M.count_params(pruned) == want
    assert M.count_params(pruned) < M.count_params(net)
    assert M.count_params(net, include_masks=True) == \
        M.count_params(net) + sum(net.widths.values())


def test_prune_keeps_bn_state_and_weights(seed):
    net, expected, _ = masked_net("resnet18", seed=16)
    pruned = M.prune(net)
    on = {p: m.nonzero().flatten() for p, m in expected.items()}
    on["input"] = torch.arange(3)
    w_old = net.get_submodule("stages.2.0.sc_conv").weight
    w_new = pruned.get_submodule("stages.2.0.sc_conv").weight
    assert_close(w_new, w_old[on["stream2"]][:, on["stream1"]], rtol=0, atol=0)
    for name in ("weight", "bias", "running_mean", "running_var"):
        old = getattr(net.stages[1][1].bn1, name)
        new = getattr(pruned.stages[1][1].bn1, name)
        assert_close(new, old[on["inner1_1"]], rtol=0, atol=0)
    assert int(pruned.stem.bn.num_batches_tracked) == int(net.stem.bn.num_batches_tracked)


def test_prune_composes():
    """Pruning a pruned (then re-masked) network keeps original indices and stays exact."""
    net, expected, gen = masked_net("resnet32", seed=17)
    p1 = M.prune(net)
    again = MaskedResNet("resnet32", masked=True, kept={p: p1.kept(p) for p in p1.widths})
    missing, unexpected = again.load_state_dict(p1.state_dict(), strict=False)
    assert unexpected == [] and all(k.startswith("mask_e.") for k in missing)
    expected2 = randomize_masks(again, gen)
    x = torch.randn(2, 3, 16, 16, generator=gen)
    p2 = _check_prune(again, expected2, x, rtol=1e-4, atol=1e-5)
    for p in p2.widths:
        assert torch.equal(p2.kept(p), p1.kept(p)[expected2[p]]), p


def test_prune_needs_masks():
    with pytest.raises(ValueError):
        M.prune(MaskedResNet("resnet32", masked=False))


# ------------------------------------------------------------------------------ expand_from
def test_expand_from_unpruned_is_identical(seed):
    gen = torch.Generator().manual_seed(3)
    prev = MaskedResNet("resnet18_cifar")
    randomize_bn(prev, gen)
    new = M.expand_from(prev, masked=False)
    assert new is not prev and not new.is_pruned
    for (k, a), (k2, b) in zip(prev.state_dict().items(), new.state_dict().items()):
        assert k == k2
        assert_close(b, a, rtol=0, atol=0, msg=lambda m, k=k: f"{k}: {m}")
    prev.eval()
    new.eval()
    x = torch.randn(2, 3, 16, 16, generator=gen)
    with torch.no_grad():
        assert_close(new(x), prev(x), rtol=0, atol=0)
    # independent copies: changing the new one leaves prev alone
    with torch.no_grad():
        new.stem.conv.weight.add_(1.0)
    assert not torch.equal(new.stem.conv.weight, prev.stem.conv.weight)


@pytest.mark.parametrize("arch", ["resnet32", "resnet18"])
def test_expand_from_pruned_places_kept_channels(arch):
    net, expected, gen = masked_net(arch, in_channels=5, seed=18)
    prev = M.prune(net)
    new = M.expand_from(prev, masked=True, mask_init=0.25)
    assert not new.is_pruned and new.in_channels == 5
    assert new.widths == new.full_widths
    idx = {p: prev.kept(p) for p in prev.widths}
    idx["input"] = torch.arange(5)
    for p, e in new.mask_e.items():  # every channel on: U(0, 0.25), spread, not one value
        v = e.detach()
        assert e.requires_grad and bool((v > 0).all() and (v < 0.25).all()), p
        assert len(set(v.tolist())) > 1, p
    for path, src, dst, _ in conv_layers(prev.arch):
        w_new = new.get_submodule(path).weight
        w_old = prev.get_submodule(path).weight
        assert_close(w_new[idx[dst]][:, idx[src]], w_old, rtol=0, atol=0, msg=lambda m: path + m)
        head, _, leaf = path.rpartition(".")
        bn = {"conv": "bn", "conv1": "bn1", "conv2": "bn2", "sc_conv": "sc_bn"}[leaf]
        for name in ("weight", "bias", "running_mean", "running_var"):
            a = getattr(new.get_submodule(f"{head}.{bn}"), name)[idx[dst]]
            b = getattr(prev.get_submodule(f"{head}.{bn}"), name)
            assert_close(a, b, rtol=0, atol=0, msg=lambda m: f"{head}.{bn}.{name}: {m}")
    # fresh channels never feed kept ones
    for path, src, dst, _ in conv_layers(prev.arch):
        if src == "input":
            continue
        fresh_src = torch.ones(new.widths[src], dtype=torch.bool)
        fresh_src[idx[src]] = False
        w = new.get_submodule(path).weight.detach()[idx[dst]][:, fresh_src]
        assert int(torch.count_nonzero(w)) == 0, path
    # the fresh channels start on and add new features; switched off, the expanded net
    # computes prev's function exactly (binary masks)
    new.binary_masks = True
    x = torch.randn(2, 5, 32, 32, generator=gen)
    new.eval()
    with torch.no_grad():
        on = new(x)
        for p, e in new.mask_e.items():
            fresh = torch.ones(new.widths[p], dtype=torch.bool)
            fresh[idx[p]] = False
            e[fresh] = -1.0
    last = f"stream{len(prev.arch.stages) - 1}"
    fresh_last = torch.ones(new.widths[last], dtype=torch.bool)
    fresh_last[idx[last]] = False
    assert int(torch.count_nonzero(on[:, fresh_last])) > 0
    prev.eval()
    with torch.no_grad():
        out_new = new(x)
        out_prev = prev(x)
    assert_close(out_new[:, idx[last]], out_prev, rtol=1e-4, atol=1e-5)
    assert int(torch.count_nonzero(out_new[:, fresh_last])) == 0


def test_expand_from_keeps_dtype():
    prev = MaskedResNet("resnet32", masked=True).double()
    new = M.expand_from(prev, masked=True)
    assert all(p.dtype == torch.float64 for p in new.parameters())
