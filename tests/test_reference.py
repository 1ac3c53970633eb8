"""The plain PyTorch reference DERNet: structure, freezing, stages 1 and 2, pruning, checkpoints."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from der_fast import DERNet
from der_fast import masks as M

N_IMG, HW = 4, 16


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------ helpers
def spec_aux_targets(y: torch.Tensor, n_old: int) -> torch.Tensor:
    """DER.md: every old class -> 0 ("old"), new class c -> c - n_old + 1."""
    return torch.tensor([0 if c < n_old else c - n_old + 1 for c in y.tolist()],
                        dtype=y.dtype)


def randomize_bn(module: nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(0.5 + torch.rand(c, generator=gen))
                m.bias.copy_(0.2 * torch.randn(c, generator=gen))
                m.running_mean.copy_(0.2 * torch.randn(c, generator=gen))
                m.running_var.copy_(0.5 + 1.5 * torch.rand(c, generator=gen))


def randomize_masks(net, gen: torch.Generator, p_on: float = 0.6) -> None:
    """Random e with random signs (about p_on of the channels on, never none)."""
    with torch.no_grad():
        for e in net.mask_e.values():
            v = torch.randn(e.shape, generator=gen).abs() + 0.05
            sign = torch.where(torch.rand(e.shape, generator=gen) < p_on, 1.0, -1.0)
            sign[int(torch.randint(len(v), (1,), generator=gen))] = 1.0
            e.copy_(v * sign)


def snapshot(module: nn.Module) -> dict:
    """Every parameter and buffer (BN running stats included), cloned."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()
            if isinstance(v, torch.Tensor)}


def assert_unchanged(module: nn.Module, before: dict, what: str) -> None:
    after = snapshot(module)
    assert after.keys() == before.keys()
    for k in before:
        assert_close(after[k], before[k], rtol=0, atol=0, msg=lambda m, k=k: f"{what}.{k}: {m}")


def changed_keys(module: nn.Module, before: dict) -> set:
    after = snapshot(module)
    return {k for k in before if not torch.equal(after[k], before[k])}


def images(gen, n=N_IMG, c=3, hw=HW):
    return torch.randn(n, c, hw, hw, generator=gen)


def model_at(steps, backbone="resnet32", seed=0, prune=False, **kw):
    """A DERNet after ``update_fc`` for each cumulative class count in ``steps``, with random
    BN statistics and (if masked) random masks on every extractor; optionally pruned each step."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 100)
    model = DERNet(backbone, **kw)
    for n in steps:
        model.update_fc(n)
        randomize_bn(model.convnets[-1], gen)
        if model.convnets[-1].mask_e is not None:
            randomize_masks(model.convnets[-1], gen)
            model.set_s(5.0)
        if prune:
            model.prune()
    return model, gen


# ------------------------------------------------------------------------------ structure
def test_forward_keys_and_shapes_over_steps(seed):
    gen = torch.Generator().manual_seed(1)
    x = images(gen)
    model = DERNet("resnet32")
    model.update_fc(4)
    out = model(x)
    assert set(out) == {"logits", "aux_logits", "features"}
    assert out["logits"].shape == (N_IMG, 4)
    assert out["aux_logits"] is None
    assert out["features"].shape == (N_IMG, 64)
    assert model.feature_dim == 64 and model.out_dim == 64 and model.task_sizes == [4]

    for n, t, n_new in [(7, 2, 3), (9, 3, 2)]:
        model.update_fc(n)
        out = model(x)
        assert out["logits"].shape == (N_IMG, n)
        assert out["aux_logits"].shape == (N_IMG, n_new + 1)  # new classes + one "old" label
        assert out["features"].shape == (N_IMG, 64 * t)
        assert len(model.convnets) == t and model.feature_dim == 64 * t
    assert model.task_sizes == [4, 3, 2] and model.n_classes == 9


def test_features_are_concat_of_extractors_and_heads_use_them():
    model, gen = model_at([3, 5, 8])
    model.eval()
    x = images(gen)
    with torch.no_grad():
        out = model(x)
        parts = [net(x) for net in model.convnets]
    assert_close(out["features"], torch.cat(parts, 1), rtol=0, atol=0)
    assert_close(model.extract_vector(x), out["features"], rtol=0, atol=0)
    assert_close(out["logits"], model.fc(out["features"]), rtol=0, atol=0)
    # the auxiliary classifier sees the newest extractor only
    assert_close(out["aux_logits"], model.aux_fc(parts[-1]), rtol=0, atol=0)


def test_update_fc_carries_old_classifier():
    model, gen = model_at([4])
    with torch.no_grad():
        model.fc.weight.copy_(torch.randn(model.fc.weight.shape, generator=gen))
        model.fc.bias.copy_(torch.randn(4, generator=gen))
    w, b = model.fc.weight.detach().clone(), model.fc.bias.detach().clone()
    model.update_fc(7)
    assert model.fc.weight.shape == (7, 128)
    assert_close(model.fc.weight[:4, :64], w, rtol=0, atol=0)
    assert_close(model.fc.bias[:4], b, rtol=0, atol=0)
    assert model.aux_fc.weight.shape == (4, 64)
    w2, b2 = model.fc.weight.detach().clone(), model.fc.bias.detach().clone()
    model.update_fc(9)
    assert model.fc.weight.shape == (9, 192)
    assert_close(model.fc.weight[:7, :128], w2, rtol=0, atol=0)
    assert_close(model.fc.bias[:7], b2, rtol=0, atol=0)
    assert model.aux_fc.weight.shape == (3, 64)


def test_new_extractor_starts_from_previous_and_old_is_frozen():
    model, gen = model_at([4])
    prev = snapshot(model.convnets[0])
    model.update_fc(7)
    new = model.convnets[1]
    for k, v in prev.items():
        if k.startswith("mask_e."):
            continue
        assert_close(new.state_dict()[k], v, rtol=0, atol=0, msg=lambda m, k=k: f"{k}: {m}")
    assert all(not p.requires_grad for p in model.convnets[0].parameters())
    assert all(p.requires_grad for p in new.parameters())
    # the old extractor keeps its binarised masks
    assert model.convnets[0].binary_masks and not new.binary_masks


def test_update_fc_needs_more_classes():
    model = DERNet("resnet32")
    model.update_fc(4)
    for bad in (4, 3, 0):
        with pytest.raises(ValueError, match="4"):
            model.update_fc(bad)
    assert len(model.convnets) == 1 and model.task_sizes == [4]
    assert model.fc.out_features == 4


def test_unknown_backbone_is_named():
    with pytest.raises(ValueError, match="resnet50"):
        DERNet("resnet50")
    with pytest.raises(ValueError, match="vit_b"):
        DERNet({"convnet_type": "vit_b"})


def test_pycil_style_construction():
    model = DERNet({"convnet_type": "resnet32"})
    assert model.backbone == "resnet32"
    model2 = DERNet({"convnet_type": "resnet32"}, False)  # PyCIL: DERNet(args, pretrained)
    model2.update_fc(10)
    out = model2(torch.randn(2, 3, HW, HW))
    assert out["logits"].shape == (2, 10)
    model3 = DERNet({"convnet_type": "resnet32", "in_channels": 1})
    model3.update_fc(2)
    assert model3(torch.randn(2, 1, HW, HW))["logits"].shape == (2, 2)


def test_train_mode_keeps_old_extractors_in_eval():
    model, _ = model_at([2, 4, 6])
    model.train()
    assert model.training and model.fc.training and model.aux_fc.training
    assert [net.training for net in model.convnets] == [False, False, True]
    for net in model.convnets[:2]:
        assert not any(m.training for m in net.modules())
    assert all(m.training for m in model.convnets[2].modules())
    model.eval()
    assert not any(m.training for m in model.modules())
    model.train()
    assert [net.training for net in model.convnets] == [False, False, True]


# ------------------------------------------------------------------------------ stage 1
def test_aux_targets_matches_spec():
    from der_fast.objective import aux_targets  # the spec is spec_aux_targets

    gen = torch.Generator().manual_seed(5)
    y = torch.randint(0, 10, (64,), generator=gen)
    for n_old in (1, 4, 7):
        want = spec_aux_targets(y, n_old)
        got = aux_targets(y, n_old)
        assert_close(got, want, rtol=0, atol=0)
    assert spec_aux_targets(torch.tensor([0, 3, 4, 6]), 4).tolist() == [0, 0, 1, 3]


def stage1_step(model, x, y, n_old, lambda_s=0.5, lr=0.1, s=3.0):
    model.train()
    model.set_s(s)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
    opt.zero_grad()
    out = model(x)
    loss = F.cross_entropy(out["logits"], y)
    if out["aux_logits"] is not None:
        loss = loss + F.cross_entropy(out["aux_logits"], spec_aux_targets(y, n_old))
    loss = loss + lambda_s * model.sparsity_loss()
    loss.backward()
    model.compensate_mask_grads(s, 400.0)
    opt.step()
    model.clamp_masks(400.0)
    return float(loss.detach())


def test_stage1_step_updates_only_the_new_extractor():
    model, gen = model_at([4, 7])
    x = images(gen)
    y = torch.tensor([0, 3, 5, 6])  # old and new classes
    old_before = snapshot(model.convnets[0])
    new_before = snapshot(model.convnets[1])
    aux_before = snapshot(model.aux_fc)
    stage1_step(model, x, y, n_old=4)
    assert all(p.grad is None for p in model.convnets[0].parameters())
    assert_unchanged(model.convnets[0], old_before, "convnets.0")
    changed = changed_keys(model.convnets[1], new_before)
    new = model.convnets[1]
    for name, _ in new.named_parameters():  # conv/BN weights and mask embeddings
        assert name in changed, name
    for name, m in new.named_modules():  # BN running statistics moved (train mode)
        if isinstance(m, nn.BatchNorm2d):
            for stat in ("running_mean", "running_var", "num_batches_tracked"):
                assert f"{name}.{stat}" in changed, f"{name}.{stat}"
    assert changed_keys(model.aux_fc, aux_before) == {"weight", "bias"}


def test_stage1_step_at_first_step_without_aux():
    model, gen = model_at([5])
    x = images(gen)
    y = torch.tensor([0, 1, 3, 4])
    before = snapshot(model.convnets[0])
    stage1_step(model, x, y, n_old=0)
    assert "stem.conv.weight" in changed_keys(model.convnets[0], before)
    assert "mask_e.stream2" in changed_keys(model.convnets[0], before)


def test_masks_are_clamped_after_step():
    model, gen = model_at([4, 7])
    with torch.no_grad():
        model.convnets[1].mask_e["stream1"].fill_(0.0299)
    stage1_step(model, images(gen), torch.tensor([0, 3, 5, 6]), n_old=4, lambda_s=-1e4)
    e = model.convnets[1].mask_e["stream1"].detach()
    assert float(e.abs().max()) == pytest.approx(12.0 / 400.0)  # pushed up to the bound


# ------------------------------------------------------------------------------ stage 2
def test_stage2_trains_the_classifier_only():
    model, gen = model_at([4, 7])
    x = images(gen)
    y = torch.tensor([1, 2, 4, 6])
    stage1_step(model, x, y, n_old=4)
    model.freeze_conv()
    fc_before_reset = snapshot(model.fc)
    model.reset_fc()
    assert model.fc.weight.shape == (7, 128)
    assert changed_keys(model.fc, fc_before_reset) == {"weight", "bias"}
    model.train()
    assert not any(net.training for net in model.convnets)  # the whole extractor is frozen
    nets_before = [snapshot(net) for net in model.convnets]
    aux_before = snapshot(model.aux_fc)
    fc_before = snapshot(model.fc)
    opt = torch.optim.SGD(model.fc.parameters(), lr=0.1, momentum=0.9)
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(x)["logits"] / 5.0, y).backward()
        opt.step()
    for i, net in enumerate(model.convnets):
        assert all(not p.requires_grad for p in net.parameters()), i
        assert_unchanged(net, nets_before[i], f"convnets.{i}")
    assert_unchanged(model.aux_fc, aux_before, "aux_fc")
    assert changed_keys(model.fc, fc_before) == {"weight", "bias"}


def test_weight_align_hand_computed():
    model, gen = model_at([4, 7])
    with torch.no_grad():
        model.fc.weight.copy_(torch.randn(7, 128, generator=gen))
        model.fc.weight[4:] *= 3.0  # new classes have larger norms
        model.fc.bias.copy_(torch.randn(7, generator=gen))
    w = model.fc.weight.detach().double().clone()
    b = model.fc.bias.detach().clone()
    old_norms = [sum(v * v for v in row) ** 0.5 for row in w[:4].tolist()]
    new_norms = [sum(v * v for v in row) ** 0.5 for row in w[4:].tolist()]
    gamma = (sum(old_norms) / 4) / (sum(new_norms) / 3)
    assert 0.2 < gamma < 0.5
    got = model.weight_align(3)
    assert got == pytest.approx(gamma, rel=1e-5)
    assert_close(model.fc.weight[:4].double(), w[:4], rtol=0, atol=0)
    assert_close(model.fc.weight[4:].double(), w[4:] * gamma, rtol=1e-5, atol=1e-6)
    assert_close(model.fc.bias, b, rtol=0, atol=0)
    norms = model.fc.weight.detach().norm(dim=1)
    assert float(norms[:4].mean()) == pytest.approx(float(norms[4:].mean()), rel=1e-5)
    for bad in (0, 7, -1):
        with pytest.raises(ValueError):
            model.weight_align(bad)


# ------------------------------------------------------------------------------ pruning
@pytest.mark.parametrize("steps", [[5], [4, 7]])
def test_prune_equals_binary_masked_model(steps):
    model, gen = model_at(steps)
    model.eval()
    x = images(gen)
    net = model.convnets[-1]
    net.binary_masks = True
    with torch.no_grad():
        ref = model(x)
    keep = M.binary_masks(net)["stream2"]
    assert 0 < int(keep.sum()) < 64
    rep = model.prune()
    assert rep["params_after"] < rep["params_before"]
    assert rep["params_after"] == model.num_params()
    assert model.convnets[-1].mask_e is None and model.convnets[-1].out_dim == int(keep.sum())
    assert not model.training and not model.convnets[-1].training
    with torch.no_grad():
        out = model(x)
    assert float(ref["logits"].abs().max()) > 1e-3
    assert_close(out["logits"], ref["logits"], rtol=1e-4, atol=1e-5)
    if ref["aux_logits"] is None:
        assert out["aux_logits"] is None
    else:
        assert_close(out["aux_logits"], ref["aux_logits"], rtol=1e-4, atol=1e-5)
    off = 64 * (len(steps) - 1)
    cols = torch.cat([torch.arange(off), off + keep.nonzero().flatten()])
    assert_close(out["features"], ref["features"][:, cols], rtol=1e-4, atol=1e-5)
    dropped = torch.ones(ref["features"].shape[1], dtype=torch.bool)
    dropped[cols] = False
    assert int(torch.count_nonzero(ref["features"][:, dropped])) == 0
    assert model.fc.weight.shape == (steps[-1], off + int(keep.sum()))
    assert model.aux_fc.weight.shape[1] == int(keep.sum())


def test_prune_then_next_step_expands_to_full_width():
    model, gen = model_at([4], prune=True)
    model.update_fc(7)
    assert model.convnets[0].is_pruned and not model.convnets[1].is_pruned
    assert model.convnets[1].out_dim == 64
    assert model.fc.weight.shape == (7, model.convnets[0].out_dim + 64)
    out = model(images(gen))
    assert out["logits"].shape == (N_IMG, 7) and out["aux_logits"].shape == (N_IMG, 4)


def test_prune_without_masks_raises():
    model = DERNet("resnet32", use_masks=False)
    model.update_fc(3)
    with pytest.raises(RuntimeError):
        model.prune()


# ------------------------------------------------------------------------------ checkpoints
def _outputs(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)


def test_pruned_checkpoint_round_trip_is_exact():
    model, gen = model_at([4, 7], prune=True)
    x = images(gen)
    ref = _outputs(model, x)
    sd = model.state_dict()
    fresh = DERNet("resnet32")
    fresh.load_state_dict(sd)
    out = _outputs(fresh, x)
    for k in ("logits", "aux_logits", "features"):
        assert_close(out[k], ref[k], rtol=0, atol=0, msg=lambda m, k=k: f"{k}: {m}")
    assert fresh.task_sizes == [4, 3]
    assert [n.widths for n in fresh.convnets] == [n.widths for n in model.convnets]
    assert fresh.num_params() == model.num_params()
    # the loaded model continues: old extractors frozen, next step works
    assert all(not p.requires_grad for p in fresh.convnets[0].parameters())
    fresh.update_fc(9)
    assert fresh(x)["logits"].shape == (N_IMG, 9)


def test_unpruned_masked_checkpoint_round_trip_is_exact():
    """A checkpoint taken mid-step (newest extractor still has soft masks at some s)."""
    model, gen = model_at([4, 7])
    model.set_s(37.0)
    x = images(gen)
    ref = _outputs(model, x)
    fresh = DERNet("resnet32")
    fresh.load_state_dict(model.state_dict())
    assert fresh.convnets[0].binary_masks and not fresh.convnets[1].binary_masks
    out = _outputs(fresh, x)
    for k in ("logits", "aux_logits", "features"):
        assert_close(out[k], ref[k], rtol=0, atol=0, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("src,dst", [("resnet32", "resnet18_cifar"),
                                     ("resnet18_cifar", "resnet18")])
def test_load_rejects_other_backbone(src, dst):
    torch.manual_seed(0)
    model = DERNet(src)
    model.update_fc(3)
    sd = model.state_dict()
    other = DERNet(dst)
    other.update_fc(5)
    with pytest.raises(ValueError, match=f"backbone.*{src}"):
        other.load_state_dict(sd)
    # nothing was rebuilt: the model is intact
    assert len(other.convnets) == 1 and other.task_sizes == [5]
    assert other(torch.randn(2, 3, HW, HW))["logits"].shape == (2, 5)


def test_load_rejects_other_input_channels():
    model = DERNet("resnet32", in_channels=3)
    model.update_fc(3)
    with pytest.raises(ValueError, match="input channels"):
        DERNet("resnet32", in_channels=1).load_state_dict(model.state_dict())


def test_classifiers_start_like_the_authors_and_pycil():
    """Every classifier (H_t, the auxiliary one, stage 2's re-initialised one): weights of
    variance 1 / in_features, zero bias (nn.Linear's default would give a third of that
    variance and a random bias)."""
    torch.manual_seed(5)
    model = DERNet("resnet32", use_masks=False)
    model.update_fc(40)
    model.update_fc(90)
    model.reset_fc()
    for fc in (model.fc, model.aux_fc):
        w = fc.weight.detach().double()
        fan_in = w.shape[1]
        assert torch.equal(fc.bias, torch.zeros_like(fc.bias))
        assert w.var().item() == pytest.approx(1 / fan_in, rel=0.1)
        assert w.abs().max().item() <= (3 / fan_in) ** 0.5 + 1e-7
