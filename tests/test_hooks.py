"""Hooks on FastDERNet's submodules fire as on DERNet's (forward, forward-pre, full backward;
module-local and global): while one is registered the model runs DERNet's module path, said by
one warning; without hooks it runs the fused paths again."""

from __future__ import annotations

import warnings

import pytest
import torch

from der_fast import FastDERNet
from der_fast.reference import DERNet as _Ref
from helpers import grown_dernet

pytestmark = pytest.mark.usefixtures("one_thread")

POINTS = ("convnets.0", "convnets.0.stages.1.0.conv1", "convnets.1.stem.bn",
          "convnets.1.stages.2.1.conv2", "fc", "aux_fc")


def _models():
    ref = grown_dernet(1, 4, s=30.0)
    return ref, FastDERNet.from_reference(ref)


def _x():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _capture(model, kind):
    seen, handles = {}, []
    for name in POINTS:
        m = model.get_submodule(name)
        if kind == "forward":
            h = m.register_forward_hook(lambda mod, i, o, n=name: seen.__setitem__(n, o.detach()))
        elif kind == "pre":
            h = m.register_forward_pre_hook(lambda mod, i, n=name: seen.__setitem__(
                n, i[0].detach()))
        else:
            h = m.register_full_backward_hook(lambda mod, gi, go, n=name: seen.__setitem__(
                n, go[0].detach()))
        handles.append(h)
    return seen, handles


@pytest.mark.parametrize("kind", ["forward", "pre", "backward"])
def test_hooks_fire_as_on_dernet(kind):
    ref, fast = _models()
    got = []
    for model in (ref, fast):
        model.train()
        seen, handles = _capture(model, kind)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            out = model(_x())
            out["logits"].square().sum().backward()
        got.append(seen)
        for h in handles:
            h.remove()
        if model is fast:
            assert sum("hooks are registered" in str(x.message) for x in w) == 1
    assert got[0].keys() == got[1].keys() and len(got[0]) >= 3, (got[0].keys(), got[1].keys())
    for name in got[0]:
        torch.testing.assert_close(got[1][name], got[0][name], rtol=1e-5, atol=1e-5)


def test_global_hook_and_extract_vector():
    ref, fast = _models()
    fast.eval()
    calls = []
    h = torch.nn.modules.module.register_module_forward_hook(
        lambda m, i, o: calls.append(type(m).__name__))
    try:
        with pytest.warns(UserWarning, match="hooks are registered"):
            v = fast.extract_vector(_x())
    finally:
        h.remove()
    assert "Conv2d" in calls and "BatchNorm2d" in calls
    torch.testing.assert_close(v, ref.eval().extract_vector(_x()), rtol=1e-5, atol=1e-5)


def test_fused_paths_return_once_hooks_are_removed(monkeypatch):
    ref, fast = _models()
    fast.eval()
    h = fast.convnets[0].register_forward_hook(lambda *a: None)
    module_path = []
    real = _Ref.forward
    monkeypatch.setattr(_Ref, "forward", lambda self, x: module_path.append(1) or real(self, x))
    with pytest.warns(UserWarning):
        fast(_x())
    assert module_path == [1]
    h.remove()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning without hooks
        fast(_x())
    assert module_path == [1], "the fused path did not come back"
