"""PyCIL compatibility: a PyCIL-shaped DER learner runs DERNet and FastDERNet (one-line swap),
the args dict, and PyCIL state_dict conversion."""

import types
from pathlib import Path

import pytest
import torch

from der_fast import DERNet
from der_fast.compat import backbone_from_args, from_pycil_state_dict

ARGS = {"convnet_type": "resnet32", "dataset": "cifar100", "memory_per_class": 2, "epochs": 1}
STANDIN = Path(__file__).with_name("pycil_standin.py")


def _load_standin(swap: bool):
    src = STANDIN.read_text()
    if swap:
        line = "from der_fast import DERNet\n"
        assert src.count(line) == 1
        src = src.replace(line, "from der_fast import FastDERNet as DERNet\n")
    mod = types.ModuleType("pycil_standin_swap" if swap else "pycil_standin")
    exec(compile(src, str(STANDIN), "exec"), mod.__dict__)
    return mod


def _tasks():
    g = torch.Generator().manual_seed(0)
    tasks = []
    for lo in (0, 3):
        # 24 images: whole batches of 8 (a last batch of 2 leaves BatchNorm's statistics so
        # ill-conditioned that float32 rounding grows ~10x per SGD step in either model)
        y = torch.arange(lo, lo + 3).repeat_interleave(8)
        x = torch.randn(len(y), 3, 16, 16, generator=g) + y[:, None, None, None] * 0.3
        tasks.append((x, y))
    return tasks


def _run(swap: bool):
    mod = _load_standin(swap)
    torch.manual_seed(0)
    learner = mod.DER(dict(ARGS))
    tasks = _tasks()
    results = []
    for t in range(2):
        learner.incremental_train(tasks)
        x = torch.cat([tk[0] for tk in tasks[: t + 1]])
        results.append(learner.eval_task(x, torch.cat([tk[1] for tk in tasks[: t + 1]])))
        learner.after_task()
    return learner, results


def test_pycil_learner_runs_with_dernet_and_fastdernet():
    ref, res_ref = _run(False)
    fast, res_fast = _run(True)
    assert type(fast._network).__name__ == "FastDERNet"
    for net in (ref._network, fast._network):
        assert all(c.mask_e is None for c in net.convnets)  # masks off from PyCIL args
        assert net.task_sizes == [3, 3] and net.feature_dim == 128 and net.out_dim == 64
    for (la, na), (lb, nb) in zip(res_ref, res_fast):
        assert torch.isfinite(la).all()
        # same run up to float32 rounding, grown over the SGD steps (the fast path's error
        # bounds are tests/test_fast.py's business)
        torch.testing.assert_close(lb, la, rtol=1e-2, atol=1e-2 * float(la.abs().max()))
        assert (lb.argmax(1) == la.argmax(1)).float().mean() >= 0.9
        assert (na == nb).mean() >= 0.9


def test_masks_from_args_refuse_untrained_binarisation():
    net = DERNet({"convnet_type": "resnet32", "use_masks": True}, False)
    net.update_fc(3)
    assert net.convnets[0].mask_e is not None
    with pytest.raises(RuntimeError, match="never annealed"):
        net.update_fc(6)
    net.set_s(400.0)
    net.update_fc(6)  # annealed: binarising is what DER does


def test_backbone_from_args():
    assert backbone_from_args({"convnet_type": "resnet18", "dataset": "cifar100"}) == \
        "resnet18_cifar"
    assert backbone_from_args({"convnet_type": "resnet18", "dataset": "imagenet100",
                               "init_cls": 10, "increment": 10}) == "resnet18"
    assert backbone_from_args({"convnet_type": "resnet32", "dataset": "cifar100"}) == \
        "resnet32"
    with pytest.raises(ValueError, match="init_cls != increment"):
        backbone_from_args({"convnet_type": "resnet18", "dataset": "imagenet100",
                            "init_cls": 50, "increment": 10})


@pytest.mark.parametrize("args", [{"convnet_type": "resnet32", "dataset": "cifar100"},
                                  {"convnet_type": "resnet18", "dataset": "cifar100"}])
def test_pycil_state_dict_round_trip(args):
    torch.manual_seed(0)
    model = DERNet(args, False)
    for n in (4, 7):
        model.update_fc(n)
    sd = model.pycil_state_dict()
    if args["convnet_type"] == "resnet32":
        assert "convnets.1.stage_3.4.bn_b.running_var" in sd and "convnets.0.fc.weight" in sd
    else:
        assert "convnets.1.layer2.0.downsample.1.weight" in sd and "convnets.0.conv1.0.weight" in sd
    assert not any("stem" in k or "stages" in k or "kept_" in k for k in sd)
    x = torch.randn(3, 3, 16, 16)
    for cls_name in ("DERNet", "FastDERNet"):
        import der_fast
        cls = getattr(der_fast, cls_name)
        back = cls.from_pycil(sd, args)
        assert back.task_sizes == [4, 3]
        model.eval(), back.eval()
        with torch.no_grad():
            a, b = model(x), back(x)
        torch.testing.assert_close(b["logits"], a["logits"], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(b["aux_logits"], a["aux_logits"], rtol=1e-4, atol=1e-4)
    plain = DERNet(args)  # load_state_dict recognises PyCIL names too
    plain.load_state_dict(sd)
    assert plain.task_sizes == [4, 3]


def test_wrong_pycil_state_dict_names_pycil_keys():
    torch.manual_seed(0)
    model = DERNet(ARGS, False)
    model.update_fc(4)
    sd = model.pycil_state_dict()
    sd.pop("convnets.0.stage_2.1.conv_a.weight")
    sd["convnets.0.stage_4.0.conv_a.weight"] = torch.zeros(1)
    sd["convnets.0.bn_1.weight"] = torch.zeros(3)
    with pytest.raises(ValueError) as err:
        from_pycil_state_dict(sd, ARGS)
    msg = str(err.value)
    assert "convnets.0.stage_2.1.conv_a.weight" in msg
    assert "convnets.0.stage_4.0.conv_a.weight" in msg
    assert "mask" not in msg and "inner" not in msg and "stream" not in msg
    sd = model.pycil_state_dict()
    sd["convnets.0.bn_1.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"convnets\.0\.bn_1\.weight \(3,\)"):
        from_pycil_state_dict(sd, ARGS)
