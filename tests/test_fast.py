"""FastDERNet against the reference DERNet: same weights and masks in, same numbers out.

Forward outputs and gradients are judged against a float64 run of the reference: the fast
model's error must be at most 2x the fp32 reference's own error plus a small atol (so the test
measures "as good as the reference", not an arbitrary tolerance). Every mismatch message says
where (which output / parameter, index, values).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from der_fast import ops
from der_fast.fast import FastDERNet, narrow_share, fold_extractor
from der_fast.fast import plan as fast_plan
from der_fast.reference import DERNet
from helpers import ULP, ULPS, assert_as_good, diff_at, make_ref, rand_x

pytestmark = pytest.mark.usefixtures("one_thread")


def _trainable(net):
    return {n: p for n, p in net.named_parameters() if p.requires_grad}


def _loss(out, n_old):
    logits = out["logits"]
    y = torch.arange(logits.shape[0]) % logits.shape[1]
    loss = F.cross_entropy(logits, y) + 0.1 * out["features"].square().mean()
    if out["aux_logits"] is not None:
        y_aux = torch.where(y < n_old, 0, y - n_old + 1)
        loss = loss + F.cross_entropy(out["aux_logits"], y_aux)
    return loss


def _grads(model, x, n_old):
    _loss(model(x), n_old).backward()
    return {n: p.grad for n, p in _trainable(model).items()}


def check_forward_backward(ref: DERNet, fast: FastDERNet, x, train: bool, grads=True):
    """Forward outputs, grads of every trainable parameter and BN buffers after the step.

    Forward (fp32): fast error vs a float64 reference <= 2 x the fp32 reference's + atol.
    Gradients: exactly (1e-9 relative) in float64 - fast64 against reference64 - because in
    fp32 a ReLU input within rounding of 0 (we hit |z| = 4e-10) may land on either side
    and legitimately change one element's gradient, in the reference as much as in the fast
    model; the fp32 gradients must be as close to float64 in norm as 2 x the fp32 reference's
    (run as users run it: NCHW) + 48 ulps of the norm. (The per-tensor max-error bound over
    random draws is tests/test_exactness.py.)
    """
    ref, fast = copy.deepcopy(ref), copy.deepcopy(fast)
    ref.train(train)
    fast.train(train)
    r64 = copy.deepcopy(ref).double()
    f64 = FastDERNet.from_reference(r64)
    n_old = ref.n_classes - ref.task_sizes[-1]
    with torch.no_grad():
        outs = [m(xx) for m, xx in ((copy.deepcopy(ref), x), (copy.deepcopy(fast), x),
                                    (copy.deepcopy(r64), x.double()),
                                    (copy.deepcopy(f64), x.double()))]
    mode = "train" if train else "eval"
    for k in ("logits", "aux_logits", "features"):
        assert_as_good(f"{mode} {k}", outs[1][k], outs[0][k], outs[2][k])
        if outs[2][k] is not None:
            torch.testing.assert_close(outs[3][k], outs[2][k], rtol=1e-9, atol=1e-10,
                                       msg=lambda m, k=k: f"{mode} {k} float64: {m}")
    if grads:
        gr, gf, g64, gf64 = (
            _grads(m, xx, n_old) for m, xx in
            ((ref, x), (fast, x), (r64, x.double()), (f64, x.double())))
        assert gr.keys() == gf.keys() == g64.keys() == gf64.keys() and gr, "trainable sets"
        for n in g64:
            if g64[n] is None:
                assert gf[n] is None and gf64[n] is None, f"grad of {n}: reference has none"
                continue
            assert gf[n] is not None and gf64[n] is not None, f"grad of {n}: missing in fast"
            mag = float(g64[n].abs().max())
            err64 = float((gf64[n] - g64[n]).abs().max())
            assert err64 <= 1e-9 * max(mag, 1e-3), \
                f"{mode} grad of {n} (float64): {diff_at(gf64[n], g64[n])}"
            nrm = float(g64[n].norm())
            e_f = float((gf[n].double() - g64[n]).norm())
            e_r = float((gr[n].double() - g64[n]).norm())
            assert e_f <= 2 * e_r + ULPS * ULP * nrm, (
                f"{mode} grad of {n} (fp32): |fast - float64| = {e_f:.3e} > 2 x reference "
                f"{e_r:.3e} + {ULPS} ulps of |g| {nrm:.3e}; {diff_at(gf[n], g64[n])}")
    for (n, b), (n2, c) in zip(ref.named_buffers(), fast.named_buffers()):
        assert n == n2
        if b.dtype.is_floating_point:
            torch.testing.assert_close(c, b, rtol=1e-5, atol=1e-5,
                                       msg=lambda m, n=n: f"{n}: {m}")
        else:
            assert torch.equal(b, c), f"buffer {n}: {b} vs {c}"
    return ref, fast


# ============================================================================ forward/backward
CASES = [(bb, t) for bb in ("resnet32", "resnet18_cifar", "resnet18") for t in (1, 2, 3, 4)]


@pytest.mark.parametrize("backbone,t", CASES)
def test_forward_backward_match_reference(backbone, t):
    # widths differ: extractor 0 pruned (t > 2), the others binary-masked with random e
    ref = make_ref(backbone, t, prune=(0,) if t > 2 else (), seed=t)
    fast = FastDERNet.from_reference(ref)
    x = rand_x(backbone, n=3 if backbone == "resnet32" else 2, seed=10 + t)
    for train in (True, False):
        check_forward_backward(ref, fast, x, train)


@pytest.mark.parametrize("plan", ["loop", "grouped", "direct", "auto"])
@pytest.mark.parametrize("fusion", [True, False])
def test_frozen_plans_agree(plan, fusion, monkeypatch):
    # the "narrow" threshold fixed so that auto mixes plans on these random widths: at 500,
    # extractor 1 (a 22 -> 23 channel stage-2 conv) has less than half of its MACs narrow
    monkeypatch.setattr(fast_plan, "_NARROW_MAX_CIN_COUT", 500)
    ref = make_ref("resnet32", 4, prune=(0, 2), seed=3)
    fast = FastDERNet.from_reference(ref, frozen_plan=plan, onednn_fusion=fusion)
    # auto: direct where the kernel runs its AVX-512 build, else loop
    auto = "direct" if fast_plan._bordered_isa() == "avx512" else "loop"
    assert fast.resolved_frozen_plan() == (plan if plan != "auto" else auto)
    x = rand_x("resnet32", 4, seed=4)
    check_forward_backward(ref, fast, x, train=True)
    ref.freeze_conv()
    fast.freeze_conv()
    check_forward_backward(ref, fast, x, train=True, grads=True)
    with torch.no_grad():
        check_forward_backward(ref, fast, x, train=False, grads=False)
    if fast.resolved_frozen_plan() == "direct" and ops.HAS_CPU_EXT:
        with torch.no_grad():
            fast.eval()(x)
        # auto: an extractor runs direct iff at least half of its multiply-adds are in narrow
        # convs (here: the two pruned ones yes, the unpruned binary-masked one no)
        want = ["direct" if plan == "direct" or narrow_share(fold_extractor(c), x.shape[2:])
                >= 0.5 else "loop" for c in fast.convnets]
        assert fast.plan()["frozen_last_run"] == want
        assert plan == "direct" or (want[0] == want[2] == "direct" and "loop" in want)


@pytest.mark.parametrize("isa", ["avx512", "avx2", "baseline", ""])
def test_auto_plan_is_direct_only_with_the_avx512_kernel(isa, monkeypatch):
    monkeypatch.setattr(fast_plan, "_BORDERED_ISA", [isa])
    fast = FastDERNet("resnet32")
    assert fast.resolved_frozen_plan("cpu") == ("direct" if isa == "avx512" else "loop")
    assert fast.resolved_frozen_plan("cuda") == "measure"
    fast.frozen_plan = "direct"
    assert fast.resolved_frozen_plan("cpu") == "direct"


# ============================================================================ state, freshness
def test_state_dict_round_trips_and_conversion():
    ref = make_ref("resnet32", 3, prune=(1,), seed=9)
    fast = FastDERNet.from_reference(ref)
    assert type(fast) is FastDERNet and type(fast.to_reference()) is DERNet
    assert list(fast.state_dict()) == list(ref.state_dict())
    for k, v in ref.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert fast.state_dict()[k].shape == v.shape, k
    x = rand_x("resnet32", 2, seed=2)

    def same(a, b):
        a.eval()
        b.eval()
        with torch.no_grad():
            oa, ob = a(x), b(x)
        for k in ("logits", "aux_logits", "features"):
            torch.testing.assert_close(ob[k], oa[k], rtol=1e-5, atol=1e-5)

    fast2 = FastDERNet("resnet32")  # DERNet checkpoint -> fresh FastDERNet
    fast2.load_state_dict(ref.state_dict())
    same(ref, fast2)
    ref2 = DERNet("resnet32")  # FastDERNet checkpoint -> fresh DERNet
    ref2.load_state_dict(fast.state_dict())
    same(ref2, fast)
    same(ref, fast.to_reference())
    # conversion keeps modes, requires_grad flags and s
    ref.train()
    ref.set_s(7.0)
    f3 = FastDERNet.from_reference(ref)
    assert f3.convnets[-1].s == 7.0 and f3.convnets[-1].training and not f3.convnets[0].training
    assert [p.requires_grad for p in f3.parameters()] == [p.requires_grad for p in ref.parameters()]
    assert f3.num_params() == ref.num_params()


def test_plan_stays_fresh():
    ref = make_ref("resnet32", 2, seed=11)
    fast = FastDERNet.from_reference(ref)
    x = rand_x("resnet32", 3, seed=12)

    def check(what, train=False):
        for m in (ref, fast):
            m.train(train)
        with torch.no_grad():
            r64 = copy.deepcopy(ref).double()(x.double())
            orr, of = ref(x), fast(x)
        for k in ("logits", "aux_logits", "features"):
            assert_as_good(f"{what}: {k}", of[k], orr[k], r64[k])

    check("initial")
    # an optimiser step on the newest extractor: its eval/no-grad fold must follow
    for m in (ref, fast):
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
        m.train()
        _loss(m(x), 3).backward()
        opt.step()
    check("after an optimiser step")
    for m in (ref, fast):
        m.set_s(50.0)
    check("after set_s")
    n_new = ref.n_classes + 4
    for m in (ref, fast):
        torch.manual_seed(5)  # new classifier rows / extractor init draw from the global RNG
        m.update_fc(n_new)
    check("after update_fc")
    for m in (ref, fast):
        m.prune()
    check("after prune")
    for m in (ref, fast):
        m.to(torch.float64)
    x = x.double()
    check("after .to(float64)")
    for m in (ref, fast):
        m.to(torch.float32)
    x = x.float()
    with torch.no_grad():  # a frozen extractor changed in place
        for m in (ref, fast):
            m.convnets[0].stem.bn.running_mean.add_(0.5)
    check("after an in-place change of a frozen buffer")
    for m in (ref, fast):
        m.freeze_conv()
    check("after freeze_conv (train mode)", train=True)
    sd = make_ref("resnet32", 3, prune=(0,), seed=13).state_dict()
    for m in (ref, fast):
        m.load_state_dict(sd)
    check("after load_state_dict")
    fast.frozen_plan = "grouped"
    check("after frozen_plan = grouped")
    fast.frozen_plan = "direct"
    check("after frozen_plan = direct")


def test_stage2_backbone_is_frozen_path_and_only_fc_trains():
    ref = make_ref("resnet18_cifar", 2, prune=(0,), seed=14).freeze_conv()
    fast = FastDERNet.from_reference(ref)
    fast.train()
    p = fast.plan()
    assert p["frozen_extractors"] == [0, 1] and p["trainable_extractors"] == []
    assert "concat_linear_head" in p["head"]
    out = fast(rand_x("resnet18_cifar", 2, seed=15))
    assert not out["features"].requires_grad and out["logits"].requires_grad
    _loss(out, 3).backward()
    assert all(q.grad is None for n, q in fast.named_parameters() if not n.startswith(("fc",
                                                                                         "aux")))
    assert fast.fc.weight.grad is not None


def test_input_gradient_through_frozen_extractors():
    ref = make_ref("resnet32", 3, prune=(1,), seed=16)
    fast = FastDERNet.from_reference(ref)
    x = rand_x("resnet32", 2, seed=17)
    grads = []
    for m in (ref, fast, copy.deepcopy(ref).double()):
        m.eval()
        xx = (x.double() if next(m.parameters()).dtype == torch.float64 else x.clone())
        xx.requires_grad_(True)
        m(xx)["logits"].square().sum().backward()
        grads.append(xx.grad)
    assert_as_good("grad of x", grads[1], grads[0], grads[2])


def test_unmasked_and_binary_trainable_extractor():
    ref = make_ref("resnet32", 2, seed=18, use_masks=False)
    check_forward_backward(ref, FastDERNet.from_reference(ref), rand_x("resnet32"), True)
    ref = make_ref("resnet32", 2, seed=19)
    ref.convnets[-1].binary_masks = True  # binarised but still trainable: no grad to e
    check_forward_backward(ref, FastDERNet.from_reference(ref), rand_x("resnet32"), True)


def test_plan_description_and_errors():
    fast = FastDERNet("resnet32")
    with pytest.raises(RuntimeError, match="update_fc"):
        fast(torch.randn(1, 3, 8, 8))
    fast.update_fc(4)
    fast.update_fc(8)
    fast.train()
    p = fast.plan()
    assert p["frozen_extractors"] == [0] and p["trainable_extractors"] == [1]
    assert "bn_gate" in p["trainable"]
    direct = fast.resolved_frozen_plan() == "direct" and ops.HAS_CPU_EXT
    assert p["frozen"].startswith("direct" if direct else "loop")
    if direct:
        assert "one compiled call (der_fast::bordered_resnet)" in p["frozen"]
    with torch.no_grad():  # full-width resnet32: 2/3 of the multiply-adds in wide convs
        fast.eval()(torch.randn(2, 3, 16, 16))
    assert fast.plan()["frozen_last_run"] == ["loop", "loop"]
    fast.train()
    with pytest.raises(ValueError, match="frozen_plan"):
        FastDERNet("resnet32", frozen_plan="nope")
    with pytest.raises(ValueError, match="expected input"):
        fast(torch.randn(2, 1, 8, 8))
    with torch.no_grad():
        assert fast.eval().plan()["frozen_extractors"] == [0, 1]


def test_shared_api_extract_vector_weight_align_copy():
    ref = make_ref("resnet32", 3, prune=(1,), seed=20)
    fast = FastDERNet.from_reference(ref)
    x = rand_x("resnet32", 2, seed=21)
    for m in (ref, fast):
        m.eval()
    with torch.no_grad():
        u64 = copy.deepcopy(ref).double().extract_vector(x.double())
        assert_as_good("extract_vector", fast.extract_vector(x), ref.extract_vector(x), u64)
    assert fast.feature_dim == ref.feature_dim and fast.out_dim == ref.out_dim
    assert fast.num_params() == ref.num_params()
    assert fast.extractor_params() == ref.extractor_params()
    assert fast.weight_align(3) == pytest.approx(ref.weight_align(3), rel=1e-6)
    torch.testing.assert_close(fast.fc.weight, ref.fc.weight)
    twin = fast.copy()
    assert type(twin) is FastDERNet and twin.frozen_plan == fast.frozen_plan
    with torch.no_grad():
        torch.testing.assert_close(twin(x)["logits"], fast(x)["logits"])
