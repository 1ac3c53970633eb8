"""benchmarks/parity/parity_lockstep.py: der_fast's side of the lockstep with PyCIL. PyCIL is
not a dependency, so its training loop is written out here as models/der.py has it (SGD over the
parameters that require grad, MultiStepLR, CE + auxiliary CE, frozen extractors in eval mode,
weight aligning); der_fast's trainer fed the same batches must land on the same weights."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from benchmarks.parity import parity_lockstep
from der_fast import DERNet
from der_fast.compat import from_pycil_state_dict, to_pycil_state_dict

pytestmark = pytest.mark.usefixtures("one_thread")


def _protocol(**kw):
    p = parity_lockstep.parity._parser().parse_args([])
    for k, v in kw.items():
        setattr(p, k, v)
    return p


def _pycil_loop(net, epochs, known, total, *, lr, milestones, weight_decay):
    """PyCIL's models/der.py, _train + _update_representation (or _init_train at step 0),
    on the given batches."""
    opt = torch.optim.SGD(filter(lambda p: p.requires_grad, net.parameters()), lr=lr,
                          momentum=0.9, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)
    step = len(net.convnets) - 1
    for batches in epochs:
        net.train()
        net.convnets[-1].train()
        for i in range(step):
            net.convnets[i].eval()
        for x, y in batches:
            out = net(x)
            loss = F.cross_entropy(out["logits"], y)
            if step > 0:
                aux = torch.where(y - known + 1 > 0, y - known + 1, 0)
                loss = loss + F.cross_entropy(out["aux_logits"], aux)
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    if step > 0:
        net.weight_align(total - known)
    return net


@pytest.mark.parametrize("task_sizes", [[3], [3, 2]], ids=["step0", "step1"])
def test_der_fast_step_follows_pycils_loop_in_float64(task_sizes):
    torch.manual_seed(11)
    p = _protocol(epochs=3, milestones=[1, 2], lr=0.05, weight_decay=2e-4,
                  init_weight_decay=5e-4)
    net = DERNet("resnet32", use_masks=False)
    seen = 0
    for size in task_sizes:
        seen += size
        net.update_fc(seen)
    net.double()
    for m in net.modules():  # BatchNorm statistics and affine parameters away from the init
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    start = to_pycil_state_dict(net)
    epochs = [[(torch.randn(6, 3, 32, 32, dtype=torch.float64),
                torch.randint(0, seen, (6,))) for _ in range(2)] for _ in range(p.epochs)]
    known = seen - task_sizes[-1]
    wd = p.init_weight_decay if len(task_sizes) == 1 else p.weight_decay
    theirs = _pycil_loop(copy.deepcopy(net), epochs, known, seen, lr=p.lr,
                         milestones=p.milestones, weight_decay=wd).state_dict()

    def ours(**kw):
        return parity_lockstep.der_fast_step(p, 1, start, task_sizes, epochs, impl="reference",
                                             dtype=torch.float64, **kw).state_dict()

    keys = [k for k, v in theirs.items()
            if isinstance(v, torch.Tensor) and v.is_floating_point()]
    moved = parity_lockstep._distance(from_pycil_state_dict(start, "resnet32",
                                                            task_sizes=task_sizes), theirs, keys)
    assert moved > 1e-2  # the step did train
    assert parity_lockstep._distance(ours(), theirs, keys) < 1e-10
    # and the comparison sees a small change of recipe
    assert parity_lockstep._distance(ours(weight_decay=2.5 * wd), theirs, keys) > 1e-6


def test_recorder_passes_batches_through_and_keeps_each_pass():
    rec = parity_lockstep._Recorder()
    data = [(i, torch.randn(2, 3), torch.tensor([i, i + 1])) for i in range(3)]
    loader = rec.wrap(data)
    assert len(loader) == 3
    for _ in range(2):
        got = list(loader)
        assert [g[0] for g in got] == [0, 1, 2]
    assert len(rec.epochs) == 2 and len(rec.epochs[1]) == 3
    torch.testing.assert_close(rec.epochs[0][2][0], data[2][1])
    assert rec.epochs[1][0][1].tolist() == [0, 1]


def test_distance_is_relative_l2():
    a = {"w": torch.tensor([3.0, 4.0]), "b": torch.tensor([0.0])}
    b = {"w": torch.tensor([3.0, 4.0]), "b": torch.tensor([5.0])}
    assert parity_lockstep._distance(b, a, ["w", "b"]) == pytest.approx(1.0)
    assert parity_lockstep._distance(a, b, ["w", "b"]) == pytest.approx(5.0 / math.sqrt(50.0))
    assert parity_lockstep._distance(a, a, ["w"]) == 0.0


def test_table_reads_results_back_from_json():
    import json

    names = ["pycil, float64", "control"]
    rows = [{"step": t, "iterations": 3 + 5 * t, "step_size": 0.1,
             "distance_after": {n: {k: float(torch.rand(())) for k in (1, 2, 4)
                                    if k < 3 + 5 * t} for n in names},
             "distance_to_float64": {n: float(torch.rand(())) for n in names},
             "test_predictions_equal": 1.0, "herding_same_exemplars_in_order": [True, False]}
            for t in range(2)]
    text = parity_lockstep.table(json.loads(json.dumps({"steps": rows})))
    lines = text.splitlines()
    assert "after 1 | after 2 | after 4 | end of step" in lines[0]
    assert len(lines) == 2 + 2 * len(names)
    step0 = [c.strip() for c in lines[2].split("|")]
    assert f"{rows[0]['distance_after']['pycil, float64'][2]:.1e}" in step0
    assert step0[-2] == "1/2 classes"
    assert lines[3].split("|")[5].strip() == ""  # no 4th iteration at step 0


@pytest.mark.parametrize("args", [["--first-step", "3", "--last-step", "2"],
                                  ["--first-step", "-1"]])
def test_bad_step_range_is_refused_before_anything_runs(args, capsys):
    with pytest.raises(SystemExit) as exc:
        parity_lockstep.main(["--pycil", "/nonexistent"] + args)
    assert exc.value.code == 2
    assert "--first-step" in capsys.readouterr().err
