"""Masks (HAT-style), sparsity loss and gradient compensation of MaskedResNet; its conv listing
and input checks. Pruning: tests/test_prune.py."""

import math

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from der_fast import masks as M
from der_fast.backbones import ARCHS, MaskedResNet, conv_layers, floor_channels

BACKBONES = ["resnet32", "resnet18_cifar", "resnet18"]


pytestmark = pytest.mark.usefixtures("one_thread")


def set_e(net, point, values):
    with torch.no_grad():
        net.mask_e[point].copy_(torch.as_tensor(values, dtype=net.mask_e[point].dtype))


# ------------------------------------------------------------------------------ anneal_s
def test_anneal_s_endpoints_and_linear():
    s_max, B = 400.0, 7
    s = [M.anneal_s(b, B, s_max) for b in range(B)]
    assert s[0] == pytest.approx(1.0 / s_max, rel=1e-12)
    assert s[-1] == pytest.approx(s_max, rel=1e-12)
    step = (s_max - 1.0 / s_max) / (B - 1)
    for b in range(B):  # DER.md: s = 1/s_max + (s_max - 1/s_max) (b - 1) / (B - 1), b = 1..B
        assert s[b] == pytest.approx(1.0 / s_max + step * b, rel=1e-12)
    diffs = [s[i + 1] - s[i] for i in range(B - 1)]
    assert all(d == pytest.approx(step, rel=1e-9) for d in diffs)


def test_anneal_s_other_smax_and_two_batches():
    assert M.anneal_s(0, 2, 10.0) == pytest.approx(0.1)
    assert M.anneal_s(1, 2, 10.0) == pytest.approx(10.0)
    assert M.anneal_s(2, 5, 10.0) == pytest.approx(0.1 + (10.0 - 0.1) * 2 / 4)


def test_anneal_s_single_batch_is_smax():
    assert M.anneal_s(0, 1, 400.0) == pytest.approx(400.0)
    assert M.anneal_s(0, 1, 3.5) == pytest.approx(3.5)


@pytest.mark.parametrize("args", [(0, 5, 0.0), (0, 5, -1.0), (-1, 5, 400.0), (5, 5, 400.0),
                                  (0, 0, 400.0), (3, 2, 400.0)])
def test_anneal_s_bad_args_raise(args):
    with pytest.raises(ValueError):
        M.anneal_s(*args)


# ------------------------------------------------------------------------------ conv listing
@pytest.mark.parametrize("arch", BACKBONES)
def test_conv_layers_cover_every_conv_with_matching_shapes(arch):
    net = MaskedResNet(arch, in_channels=5)
    layers = conv_layers(net.arch)
    convs = {n for n, m in net.named_modules() if isinstance(m, nn.Conv2d)}
    assert sorted(p for p, *_ in layers) == sorted(convs)
    widths = dict(net.widths, input=5)
    for path, src, dst, k in layers:
        w = net.get_submodule(path).weight
        assert tuple(w.shape) == (widths[dst], widths[src], *w.shape[2:]), path
        assert w.shape[2] * w.shape[3] == k, path
    # the sparsity loss' denominator is the number of conv weights
    assert sum(k * widths[s] * widths[d] for _, s, d, k in layers) == \
        sum(net.get_submodule(p).weight.numel() for p in convs)


def test_conv_layers_resnet32_chain():
    layers = conv_layers(ARCHS["resnet32"])
    assert len(layers) == 1 + 3 * 5 * 2
    assert layers[0] == ("stem.conv", "input", "stream0", 9)
    assert ("stages.1.0.conv1", "stream0", "inner1_0", 9) in layers
    assert ("stages.1.0.conv2", "inner1_0", "stream1", 9) in layers
    assert ("stages.2.3.conv1", "stream2", "inner2_3", 9) in layers
    assert all(k == 9 for *_, k in layers)


def test_conv_layers_resnet18_kernels():
    layers = conv_layers(ARCHS["resnet18"])
    assert layers[0] == ("stem.conv", "input", "stream0", 49)
    sc = [layer for layer in layers if layer[0].endswith("sc_conv")]
    assert sc == [("stages.1.0.sc_conv", "stream0", "stream1", 1),
                  ("stages.2.0.sc_conv", "stream1", "stream2", 1),
                  ("stages.3.0.sc_conv", "stream2", "stream3", 1)]
    assert len(layers) == 1 + 4 * 2 * 2 + 3


# ------------------------------------------------------------------------------ sparsity loss
def test_sparsity_loss_random_e_matches_formula(seed):
    net = MaskedResNet("resnet32", in_channels=3, masked=True)
    with torch.no_grad():
        for e in net.mask_e.values():
            e.copy_(torch.randn(e.shape) * 2)
    s = 3.7
    M.set_s(net, s)
    # |m_l|_1 computed independently: the channels binarisation keeps whatever their sign
    # (the largest e: half a stream, one inner channel) count one each, the others their gate;
    # layer 0 = the image, |m_0|_1 = 3
    norms = {}
    for p, e in net.mask_e.items():
        k = net.min_on(p)
        order = sorted(range(e.numel()), key=lambda i: -float(e[i]))
        norms[p] = k + sum(float(torch.sigmoid(s * e[i].detach().double())) for i in order[k:])
    norms["input"] = 3.0
    widths = dict(net.widths, input=3)
    num = sum(k * norms[a] * norms[b] for _, a, b, k in conv_layers(net.arch))
    den = sum(k * widths[a] * widths[b] for _, a, b, k in conv_layers(net.arch))
    loss = M.sparsity_loss(net)
    assert loss.dim() == 0
    assert 0.0 < float(loss.detach()) < 1.0
    assert_close(loss.double(), torch.tensor(num / den, dtype=torch.float64), rtol=1e-5, atol=0)


def _explicit_resnet32(in_channels):
    """resnet32 with ~exact 0/1 masks: s = 400, e = +-6 -> sigmoid(+-2400) == 1 / 0.
    Kept channels: stream0 8/16, stream1 16/32, stream2 32/64, every inner point 1/4."""
    net = MaskedResNet("resnet32", in_channels=in_channels, masked=True)
    keep = {"stream0": 8, "stream1": 16, "stream2": 32}
    for si, w in enumerate((16, 32, 64)):
        for bi in range(5):
            keep[f"inner{si}_{bi}"] = w // 4
    gen = torch.Generator().manual_seed(1)
    for p, k in keep.items():
        w = net.widths[p]
        v = torch.full((w,), -6.0)
        v[torch.randperm(w, generator=gen)[:k]] = 6.0
        set_e(net, p, v)
    M.set_s(net, 400.0)
    return net


def test_sparsity_loss_explicit_binary_case():
    net = _explicit_resnet32(3)
    # sum_l K |m_{l-1}| |m_l|, by hand (K = 9 for every resnet32 conv):
    num = 9 * (3 * 8                                  # stem: image (3) -> stream0 (8)
               + 5 * (8 * 4 + 4 * 8)                  # stage 0: 5 blocks
               + (8 * 8 + 8 * 16) + 4 * (16 * 8 + 8 * 16)      # stage 1
               + (16 * 16 + 16 * 32) + 4 * (32 * 16 + 16 * 32))  # stage 2
    den = 9 * (3 * 16
               + 5 * (16 * 16 + 16 * 16)
               + (16 * 32 + 32 * 32) + 4 * (32 * 32 + 32 * 32)
               + (32 * 64 + 64 * 64) + 4 * (64 * 64 + 64 * 64))
    assert (num, den) == (57816, 461232)
    assert float(M.sparsity_loss(net).detach()) == pytest.approx(num / den, rel=1e-6)


def test_sparsity_loss_explicit_input_channels():
    net = _explicit_resnet32(1)
    num = 57816 - 9 * 2 * 8
    den = 461232 - 9 * 2 * 16
    assert float(M.sparsity_loss(net).detach()) == pytest.approx(num / den, rel=1e-6)


def test_sparsity_loss_all_on_all_off():
    net = MaskedResNet("resnet32", masked=True)
    M.set_s(net, 400.0)
    for p in net.mask_e:
        set_e(net, p, torch.full((net.widths[p],), 6.0))
    assert float(M.sparsity_loss(net).detach()) == pytest.approx(1.0, rel=1e-6)
    for p in net.mask_e:
        set_e(net, p, torch.full((net.widths[p],), -6.0))
    # all off: the floors remain (streams 8 / 16 / 32 channels, inner points 1)
    floor = dict({p: net.min_on(p) for p in net.mask_e}, input=3)
    assert (floor["stream0"], floor["stream2"], floor["inner2_0"]) == (8, 32, 1)
    num = sum(k * floor[a] * floor[b] for _, a, b, k in conv_layers(net.arch))
    den = sum(k * w * v for _, a, b, k in conv_layers(net.arch)
              for w, v in [(dict(net.widths, input=3)[a], dict(net.widths, input=3)[b])])
    assert float(M.sparsity_loss(net).detach()) == pytest.approx(num / den, rel=1e-6)


def test_sparsity_loss_needs_masks():
    with pytest.raises(ValueError):
        M.sparsity_loss(MaskedResNet("resnet32", masked=False))


def test_sparsity_loss_gradient_reaches_every_e(seed):
    net = MaskedResNet("resnet32", masked=True).double()
    with torch.no_grad():
        for e in net.mask_e.values():
            e.copy_(torch.randn(e.shape, dtype=torch.float64) * 0.5 + 1.5)  # above the floors
    M.set_s(net, 2.0)
    loss = M.sparsity_loss(net)
    loss.backward()
    for p, e in net.mask_e.items():
        assert e.grad is not None, p
        assert torch.isfinite(e.grad).all(), p
        floor = floor_channels(e, net.min_on(p))  # kept whatever their gate: no pressure
        assert (e.grad[~floor] > 0).all(), p  # more of any channel = more weights in use
        assert (e.grad[floor] == 0).all(), p
    # finite differences on a few coordinates: the smallest e of a point (never a floor
    # channel) and a floor channel
    eps = 1e-6
    coords = [(p, int(net.mask_e[p].argmin())) for p in ("stream0", "inner1_2", "stream2")]
    coords.append(("stream1", int(net.mask_e["stream1"].argmax())))
    for p, i in coords:
        e = net.mask_e[p]
        with torch.no_grad():
            e[i] += eps
            up = float(M.sparsity_loss(net))
            e[i] -= 2 * eps
            down = float(M.sparsity_loss(net))
            e[i] += eps
        assert float(e.grad[i]) == pytest.approx((up - down) / (2 * eps), rel=1e-5), (p, i)


# ------------------------------------------------------------------------------ HAT helpers
@pytest.mark.parametrize("s", [1.0 / 400, 1.0, 37.5, 400.0])
def test_compensate_grads_matches_hat(seed, s):
    s_max = 400.0
    net = MaskedResNet("resnet32", masked=True)
    with torch.no_grad():
        for e in net.mask_e.values():
            e.copy_(torch.randn(e.shape) * 2)  # |e| up to ~6: |s e| > 50 at s = 37.5, 400
            e.grad = torch.randn(e.shape)
    before = {p: e.grad.clone() for p, e in net.mask_e.items()}
    M.compensate_grads(net, s, s_max)
    n_clamped = 0
    for p, e in net.mask_e.items():
        expected = []
        for ev, gv in zip(e.detach().tolist(), before[p].tolist()):
            z = s * ev
            if abs(z) > 50:
                n_clamped += 1
            z = max(-50.0, min(50.0, z))
            expected.append(gv * s_max / s * (math.cosh(z) + 1) / (math.cosh(ev) + 1))
        assert torch.isfinite(e.grad).all(), p
        assert_close(e.grad, torch.tensor(expected, dtype=torch.float32), rtol=2e-5, atol=1e-30,
                     msg=lambda m, p=p: f"point {p}: {m}")
    if s >= 37.5:
        assert n_clamped > 0  # the clamp at |s e| > 50 is exercised


def test_compensate_grads_skips_missing_grads_and_unmasked_nets():
    net = MaskedResNet("resnet32", masked=True)
    with torch.no_grad():
        net.mask_e["stream1"].grad = torch.ones(32)
    M.compensate_grads(net, 1.0, 400.0)  # points without grad: no error
    assert all(net.mask_e[p].grad is None for p in net.mask_e if p != "stream1")
    M.compensate_grads(MaskedResNet("resnet32"), 1.0, 400.0)  # no masks: no-op


def test_clamp_embeddings(seed):
    net = MaskedResNet("resnet32", masked=True)
    with torch.no_grad():
        for e in net.mask_e.values():
            e.copy_(torch.randn(e.shape) * 0.05)
    before = {p: e.detach().clone() for p, e in net.mask_e.items()}
    bound = M.LOGIT_BOUND / 400.0
    assert any((b.abs() > bound).any() for b in before.values())
    assert any((b.abs() < bound).any() for b in before.values())
    M.clamp_embeddings(net, 400.0)
    for p, e in net.mask_e.items():
        assert_close(e.detach(), before[p].clamp(-bound, bound), rtol=0, atol=0)
    M.clamp_embeddings(net, 4800.0)
    for p, e in net.mask_e.items():
        assert float(e.detach().abs().max()) <= M.LOGIT_BOUND / 4800.0


def test_clamped_masks_never_saturate_in_float32(seed):
    """|s e| <= LOGIT_BOUND: sigmoid(s e) < 1 in float32, so the gate's gradient (and HAT's
    compensation of it) never vanishes; with HAT's own clamp (|e| <= 6) it does."""
    net = MaskedResNet("resnet32", masked=True)
    with torch.no_grad():
        for e in net.mask_e.values():
            e.copy_((torch.rand(e.shape) * 2 - 1) * 6)
    M.clamp_embeddings(net, 400.0)
    for e in net.mask_e.values():
        g = torch.sigmoid(400.0 * e.detach())
        assert bool((g * (1 - g) > 0).all())
    e6 = torch.tensor([1.0, 6.0])
    g6 = torch.sigmoid(400.0 * e6)
    assert bool((g6 * (1 - g6) == 0).all())


def test_binary_masks_threshold_and_floors(seed):
    net = MaskedResNet("resnet32", masked=True)
    with torch.no_grad():
        for p, e in net.mask_e.items():
            v = torch.randn(e.shape)
            if p.startswith("stream"):  # more than the floor (half) on
                v = v.abs() + 0.01
                v[: e.numel() // 4] *= -1
            e.copy_(v)
        net.mask_e["inner2_3"].copy_(-torch.rand(64) - 0.01)  # everything off
        net.mask_e["stream2"].copy_(-torch.rand(64) - 0.01)
    masks = M.binary_masks(net)
    for p, e in net.mask_e.items():
        if p in ("stream2", "inner2_3"):
            continue
        # s = s_max, threshold 0.5 on sigmoid(s e) <=> e > 0
        assert torch.equal(masks[p], torch.sigmoid(400.0 * e.detach()) > 0.5), p
    m = masks["inner2_3"]  # an inner point keeps its largest e
    assert m.dtype == torch.bool and int(m.sum()) == 1
    assert int(m.nonzero()) == int(net.mask_e["inner2_3"].argmax())
    m = masks["stream2"]  # a stream keeps its half with the largest e
    top = torch.argsort(net.mask_e["stream2"].detach(), descending=True)[:32]
    assert int(m.sum()) == 32 and bool(m[top].all())
    # the gate in binary mode is the same mask
    net.binary_masks = True
    for p in net.mask_e:
        assert torch.equal(net.gate(p), masks[p].float()), p


# ------------------------------------------------------------------------------ input checks
@pytest.mark.parametrize("in_channels", [1, 3, 5])
def test_any_number_of_input_channels(in_channels, seed):
    net = MaskedResNet("resnet32", in_channels=in_channels, masked=True).eval()
    out = net(torch.randn(2, in_channels, 16, 16))
    assert out.shape == (2, 64)
    assert torch.isfinite(out).all()


def test_wrong_input_shape_raises_clear_error():
    net = MaskedResNet("resnet32", in_channels=3)
    with pytest.raises(ValueError, match=r"expected input \[N, 3, H, W\].*\(2, 1, 16, 16\)"):
        net(torch.randn(2, 1, 16, 16))
    with pytest.raises(ValueError, match="expected input"):
        net(torch.randn(3, 16, 16))


@pytest.mark.parametrize("bad", [0, -2, 2.0, "3"])
def test_bad_in_channels_raise(bad):
    with pytest.raises(ValueError, match="in_channels"):
        MaskedResNet("resnet32", in_channels=bad)


def test_unknown_arch_raises_naming_it():
    with pytest.raises(ValueError, match="resnet50"):
        MaskedResNet("resnet50")
