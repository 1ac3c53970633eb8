"""FastDERNet's frozen path against the reference: the extractors folded (BatchNorm and gates
into the convolutions) and run one by one (loop), fused into grouped convolutions, or on the
direct bordered 3x3 kernel (Python layer by layer, or der_fast::bordered_resnet, the compiled
whole-network executor), with its fallbacks. Features are judged like tests/test_fast.py's
outputs: error against float64 <= 2x the fp32 reference's + 48 ulps.
"""

from __future__ import annotations

import copy

import pytest
import torch

from der_fast import ops
from der_fast.fast import FastDERNet, fold_extractor, fuse_grouped, run_bordered, run_folded
from helpers import assert_as_good, make_ref, needs_cpu_ext, rand_x

pytestmark = pytest.mark.usefixtures("one_thread")


def test_fold_and_fuse_exact_on_pruned_and_soft_extractors():
    ref = make_ref("resnet18_cifar", 3, prune=(1,), seed=5).eval()
    ref.convnets[-1].binary_masks = False  # soft sigmoid(s*e) gates get folded too
    x = rand_x("resnet18_cifar", 2, seed=6)
    with torch.no_grad():
        r64 = copy.deepcopy(ref).double()
        want = torch.cat([c(x.double()) for c in r64.convnets], 1)
        got32 = torch.cat([c(x) for c in ref.convnets], 1)
        folded = [fold_extractor(c) for c in ref.convnets]
        assert [f.out_dims[0] for f in folded] == [c.out_dim for c in ref.convnets]
        loop = torch.cat([run_folded(f, x) for f in folded], 1)
        grouped = run_folded(fuse_grouped(folded), x)
        if ops.HAS_CPU_EXT:
            direct = torch.cat([run_bordered(f, x, force=True) for f in folded], 1)
            mixed = torch.cat([run_bordered(f, x) for f in folded], 1)
    assert_as_good("loop features", loop, got32, want)
    assert_as_good("grouped features", grouped, got32, want)
    if ops.HAS_CPU_EXT:
        assert_as_good("direct features", direct, got32, want)
        assert_as_good("direct/oneDNN mixed features", mixed, got32, want)


@needs_cpu_ext("der_fast._C (the direct kernel) not built")
@pytest.mark.parametrize("backbone", ["resnet32", "resnet18"])
def test_direct_plan_every_backbone_soft_and_pruned(backbone):
    """The bordered executor on each backbone: 7x7 stride-2 stem + max pool and 1x1 (type B)
    shortcuts (resnet18), option-A shortcuts with pruned input widths (resnet32), soft gates."""
    ref = make_ref(backbone, 3, prune=(0, 1), seed=21).eval()
    ref.convnets[-1].binary_masks = False
    x = rand_x(backbone, 2, seed=22)
    with torch.no_grad():
        r64 = copy.deepcopy(ref).double()
        want = torch.cat([c(x.double()) for c in r64.convnets], 1)
        got32 = torch.cat([c(x) for c in ref.convnets], 1)
        folded = [fold_extractor(c) for c in ref.convnets]
        for force in (True, False):
            for chunk in (None, 0, 1):  # batch cut into chunks of 1 image: same features
                for exe in (True, False):  # compiled whole-network executor / Python layers
                    got = torch.cat([run_bordered(f, x, force=force, chunk=chunk, executor=exe)
                                     for f in folded], 1)
                    assert_as_good(f"{backbone} direct features (force={force}, "
                                   f"chunk={chunk}, executor={exe})", got, got32, want)
        fast = FastDERNet.from_reference(ref, frozen_plan="direct")
        out, out32, out64 = fast(x), ref(x), r64(x.double())
        assert fast.plan()["frozen_last_run"] == ["direct"] * 3
    for k in ("logits", "aux_logits", "features"):
        assert_as_good(f"{backbone} {k}", out[k], out32[k], out64[k])


@needs_cpu_ext("der_fast._C (the direct kernel) not built")
@pytest.mark.parametrize("backbone", ["resnet32", "resnet18_cifar", "resnet18"])
def test_compiled_executor_matches_python_executor(backbone):
    """der_fast::bordered_resnet runs the same kernels as the layer-by-layer Python executor:
    equal features up to the pooling's summation order, for uneven chunks, soft gates, every
    shortcut type; and the same features with 1 or 2 threads (chunks are independent)."""
    ref = make_ref(backbone, 3, prune=(0,), seed=31).eval()
    ref.convnets[-1].binary_masks = False
    x = rand_x(backbone, 7, seed=32)
    folded = [fold_extractor(c) for c in ref.convnets]
    with torch.no_grad():
        for f in folded:
            for force in (False, True):
                py = run_bordered(f, x, force=force, executor=False)
                for chunk in (3, 0):
                    got = run_bordered(f, x, force=force, chunk=chunk, executor=True)
                    torch.testing.assert_close(got, py, rtol=2e-6, atol=2e-6)
            one = run_bordered(f, x, chunk=2, executor=True)
            before = torch.get_num_threads()
            torch.set_num_threads(2)
            try:
                two = run_bordered(f, x, chunk=2, executor=True)
            finally:
                torch.set_num_threads(before)
            # the kernel's convs give the same bits; oneDNN's (wide and 1x1 convs) may pick
            # another algorithm with another thread count
            torch.testing.assert_close(two, one, rtol=1e-6, atol=1e-6)


@needs_cpu_ext("der_fast._C (the direct kernel) not built")
def test_compiled_executor_rejects_bad_programs():
    from der_fast.fast import bordered_program
    ref = make_ref("resnet32", 1, seed=33).eval()
    f = fold_extractor(ref.convnets[0])
    w, b, meta, blocks, idx, gates, oi, od, mp = bordered_program(f, False)
    x = rand_x("resnet32", 2, seed=34)
    op = ops.bordered_resnet
    assert op(x, w, b, meta, blocks, idx, gates, oi, od, mp, 0).shape == (2, od)
    with pytest.raises(RuntimeError, match="inconsistent program"):
        op(x, w[:-1], b, meta, blocks, idx, gates, oi, od, mp, 0)
    with pytest.raises(RuntimeError, match="float32 CPU tensor"):
        op(x.double(), w, b, meta, blocks, idx, gates, oi, od, mp, 0)
    with pytest.raises(RuntimeError, match="stem expects 3 channels"):
        op(x[:, :2], w, b, meta, blocks, idx, gates, oi, od, mp, 0)
    with pytest.raises(RuntimeError, match="out_dim"):
        op(x, w, b, meta, blocks, idx, gates, None, od + 1, mp, 0)
    bad = list(blocks)
    bad[0] = 7
    with pytest.raises(RuntimeError, match="bad shortcut kind"):
        op(x, w, b, meta, bad, idx, gates, oi, od, mp, 0)
    g2 = list(gates)
    g2[1] = torch.rand(3)
    with pytest.raises(RuntimeError, match="bad gate"):
        op(x, w, b, meta, blocks, idx, g2, oi, od, mp, 0)
    tiny = x[:, :, :1, :1].contiguous()  # 1x1 images: the scalar path of every conv
    torch.testing.assert_close(op(tiny, w, b, meta, blocks, idx, gates, oi, od, mp, 0),
                               run_bordered(f, tiny, executor=False), rtol=2e-6, atol=2e-6)
    assert op(x[:0], w, b, meta, blocks, idx, gates, oi, od, mp, 0).shape == (0, od)


def test_direct_plan_falls_back_where_it_cannot_run():
    """float64, or an input that needs a gradient: the direct plan runs the loop executor and
    still matches the reference."""
    ref = make_ref("resnet32", 2, prune=(0,), seed=23).eval()
    fast = FastDERNet.from_reference(ref, frozen_plan="direct")
    x = rand_x("resnet32", 2, seed=24)
    with torch.no_grad():
        fast.double()(x.double())
    assert fast.plan()["frozen_last_run"] == ["loop", "loop"]
    assert "loop" in fast.plan()["frozen"]
    fast.float()
    xx = x.clone().requires_grad_(True)
    fast(xx)["logits"].sum().backward()
    assert set(fast.plan()["frozen_last_run"]) == {"loop"} and xx.grad is not None


