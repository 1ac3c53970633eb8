"""Mixed precision: every op under torch.autocast computes in float32 (inputs cast up), the
fast model trains under autocast, and the trainer's --precision (bf16 on CPU here; float16 with
a GradScaler, whose unscaling before the mask compensation is checked on CPU). The error
bound against float64 under autocast is tests/test_exactness.py's."""

from __future__ import annotations

import copy

import pytest
import torch

from der_fast import FastDERNet, ops
from der_fast import train as T
from der_fast.train import config as C
from der_fast.train import loop
from helpers import grown_dernet

pytestmark = pytest.mark.usefixtures("one_thread")


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def _op_calls() -> dict:
    """op name -> f(x, r): the op on activations x, r (any dtype) and float32 parameters."""
    g = _g()
    scale, shift, e = (torch.randn(6, generator=g) for _ in range(3))
    bn = torch.nn.BatchNorm2d(6).eval()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5, generator=g)
        bn.bias.normal_(generator=g)
        bn.running_mean.normal_(generator=g)
        bn.running_var.uniform_(0.5, 2.0, generator=g)
    w, b = torch.randn(7, 6, generator=g), torch.randn(7, generator=g)
    wc, bc = torch.randn(6, 6, 3, 3, generator=g), torch.randn(6, generator=g)
    return {
        "masked_gate": lambda x, r: ops.masked_gate(x, scale, shift, e, 3.0, r),
        "bn_gate": lambda x, r: ops.bn_gate(x, bn, e, 3.0, r),
        "concat_linear_head": lambda x, r: ops.concat_linear_head([x, r], w.repeat(1, 2),
                                                                  b)[0],
        "conv3x3_bordered": lambda x, r: ops.conv3x3_bordered(ops.border(x), wc, bc,
                                                              ops.border(r)),
    }


@pytest.mark.parametrize("name", ["masked_gate", "bn_gate", "concat_linear_head",
                                  "conv3x3_bordered"])
def test_ops_under_autocast_compute_in_float32(name):
    g = _g(5)
    x, r = torch.randn(2, 6, 5, 5, generator=g), torch.randn(2, 6, 5, 5, generator=g)
    f = _op_calls()[name]
    want = f(x.bfloat16().float(), r.bfloat16().float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = f(x.bfloat16(), r.bfloat16())
    assert got.dtype == torch.float32, got.dtype
    assert torch.equal(got, want), float((got - want).abs().max())


def _model(t=1):
    return grown_dernet(t, 3, s=20.0)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_fastdernet_under_autocast_like_the_reference(train):
    """Forward and backward run under autocast; the outputs are float32 (the head is an op),
    close to the reference's under the same autocast, and every trainable parameter gets a
    float32 gradient."""
    ref = _model()
    fast = FastDERNet.from_reference(ref)
    x = torch.randn(4, 3, 32, 32, generator=_g(1))
    grads = []
    outs = []
    for m in (ref, fast):
        m.train(train)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(x)
            loss = out["logits"].float().logsumexp(1).mean() + out["features"].float().square().mean()
        loss.backward()
        outs.append(out)
        grads.append({n: p.grad for n, p in m.named_parameters() if p.requires_grad})
    assert outs[1]["logits"].dtype == torch.float32
    scale = float(outs[0]["logits"].abs().max())
    assert float((outs[1]["logits"].float() - outs[0]["logits"].float()).abs().max()) < 0.1 * scale
    assert grads[0].keys() == grads[1].keys()
    for n, g in grads[1].items():
        assert g is not None and g.dtype == torch.float32 and torch.isfinite(g).all(), n


def test_precision_config_and_cli():
    assert C.Config().precision == "32"
    cfg, _ = T.config_from_args(["--precision", "bf16"])
    assert cfg.precision == "bf16"
    with pytest.raises(SystemExit):
        T.config_from_args(["--precision", "fp8"])
    with pytest.raises(C.ConfigError, match="precision"):
        C.Config(precision="64")


TINY = ["--data-root", "embedded", "--train-per-class", "12", "--test-per-class", "6",
        "--init-cls", "2", "--increment", "8", "--epochs", "1", "--epochs-stage2", "1",
        "--batch-size", "8", "--memory", "10", "--no-progress", "--no-plots"]


def test_precision_16_needs_cuda(tmp_path):
    cfg, _ = T.config_from_args(TINY + ["--precision", "16", "--out", str(tmp_path / "r")])
    with pytest.raises(C.ConfigError, match="CUDA"):
        T.run(cfg, log=lambda *a: None)
    assert not (tmp_path / "r" / "checkpoint.pt").exists()


@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_bf16_run_trains_under_autocast(tmp_path, monkeypatch, impl):
    seen = []
    real = loop.autocast

    def spy(precision, device):
        seen.append(precision)
        return real(precision, device)

    monkeypatch.setattr(loop, "autocast", spy)
    cfg, _ = T.config_from_args(TINY + ["--precision", "bf16", "--impl", impl,
                                        "--out", str(tmp_path / "r")])
    res = T.run(cfg, log=lambda *a: None)
    assert seen and set(seen) == {"bf16"}
    assert res["config"]["precision"] == "bf16"
    assert all(0 <= s["top1"] <= 100 for s in res["steps"]) and len(res["steps"]) == 2


def test_float16_stage1_with_the_scaler_follows_float32(monkeypatch):
    """Stage 1 (the default setup: budget, shift, early prune, fine-tune) with float16
    autocast and the GradScaler, on CPU here: every step is taken with unscaled gradients, so
    the losses follow the float32 run's within float16's noise (masked training is chaotic:
    the median per-step gap is the measure), and the weights stay finite."""
    from test_trajectory import _stage1

    base = _model(1)
    l32, _, s32, lams = _stage1(copy.deepcopy(base), 1, monkeypatch)
    seen = []
    real = loop.autocast
    monkeypatch.setattr(loop, "autocast", lambda p, d: seen.append(p) or real(p, d))
    import test_trajectory

    cfg16 = test_trajectory._cfg()
    cfg16.precision = "16"
    monkeypatch.setattr(test_trajectory, "_cfg", lambda: cfg16)
    l16, _, s16, _ = _stage1(FastDERNet.from_reference(base), 1, monkeypatch, lams)
    assert seen and set(seen) == {"16"}
    gap = float(((l16 - l32).abs() / l32).median())
    assert gap < 0.1, f"float16 stage-1 losses {l16.tolist()} vs float32 {l32.tolist()}"
    assert all(torch.isfinite(v).all() for v in s16.values())


def test_frozen_extractors_under_autocast_run_in_the_autocast_dtype(monkeypatch):
    """Stage 1 under bf16 autocast: the frozen extractors run folded in bfloat16 (as the
    reference's convolutions do under autocast), their folded weights cast once per plan
    (not per call), features returned in float32 and equal to the bf16 folded network's."""
    from der_fast.fast import model as FM
    from der_fast.fast.fold import fold_extractor
    from der_fast.fast.run_loop import run_folded

    ref = grown_dernet(3, 4, s=20.0)
    fast = FastDERNet.from_reference(ref)
    fast.frozen_plan = "loop"
    fast.train()
    folds = []
    real = FM.fold_extractor
    monkeypatch.setattr(FM, "fold_extractor",
                        lambda net, dtype=None: folds.append(dtype) or real(net, dtype))
    x = torch.randn(4, 3, 32, 32, generator=_g(7))
    frozen = list(fast.convnets[:-1])
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            u = fast._run_frozen(frozen, x)
    assert folds == [torch.bfloat16] * len(frozen)  # folded once, in bf16
    assert u.dtype == torch.float32
    with torch.no_grad():
        want = torch.cat([run_folded(fold_extractor(n, torch.bfloat16), x.bfloat16())
                          for n in frozen], 1).float()
    assert torch.equal(u, want)
    # close to the reference's frozen features under the same autocast
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref_u = ref.extract_vector(x)[:, :u.shape[1]].float()
    assert float((u - ref_u).abs().max()) <= 0.05 * float(ref_u.abs().max())
    # without autocast the float32 plan runs (a second folded copy, in float32)
    with torch.no_grad():
        u32 = fast._run_frozen(frozen, x)
    assert u32.dtype == torch.float32 and folds[-1] is None
