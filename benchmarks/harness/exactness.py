"""Exactness against float64: random DER models in a stage-1 state, their outputs and
gradients, and each float32 run's error relative to a float64 run of the reference (the
truth). Used by ``benchmarks/exactness.py`` (the measurement) and ``tests/test_exactness.py``
(the bound).

A run's error on a tensor is ``max|run - truth| / max|truth|``; the reference's own error is
that of the plain DERNet in float32, NCHW (the reference as users run it)."""

from __future__ import annotations

import copy
import random

import torch

from der_fast.fast import FastDERNet
from der_fast.objective import stage1_loss
from der_fast.reference import DERNet

from .constants import LAMBDA_A, LAMBDA_S
from .models import build_reference

# image side per backbone: small, but every train-mode BatchNorm sees >= 8 values per channel
# at batch 2 (the last stage is 2x2)
HW = {"resnet32": 16, "resnet18_cifar": 16, "resnet18": 64}
# mask temperatures drawn: s ~ 1/s_max (every gate ~0.5) up to s_max (gates ~binary)
S_VALUES = (0.0025, 0.3, 1.0, 5.0, 50.0, 400.0)
# the fast model's trainable-extractor layouts: trainable_channels_last
LAYOUTS = {"nchw": False, "channels_last": True}


def random_draw(backbone: str, seed: int) -> dict:
    """One random model state: extractor count t, density of the pruned frozen extractors,
    mask temperature s, soft or binary trainable masks, train or eval mode, and a batch."""
    rng = random.Random(f"{backbone}/{seed}")  # s cycles, so a few seeds cover every s
    return {"backbone": backbone, "seed": seed, "t": rng.choice((1, 2, 3)),
            "density": rng.choice((0.3, 0.6, 1.0)), "s": S_VALUES[seed % len(S_VALUES)],
            "binary": seed % 4 == 3, "batch": 2 if backbone != "resnet32" else 4}


def build_draw(d: dict, train: bool) -> tuple:
    """(reference DERNet float32, x, y, n_old) for a draw: frozen extractors pruned to about
    ``density``, calibrated BN statistics, the trainable one with soft gates
    sigmoid(s e) (or binary, ``binary``)."""
    hw = HW[d["backbone"]]
    model = build_reference(d["backbone"], d["t"], d["density"], "stage1", seed=d["seed"],
                            n_calib=8, hw=hw)
    model.set_s(d["s"])
    model.convnets[-1].binary_masks = d["binary"]
    model.train(train)
    g = torch.Generator().manual_seed(1000 + d["seed"])
    x = torch.randn(d["batch"], model.in_channels, hw, hw, generator=g)
    y = torch.randint(0, model.n_classes, (d["batch"],), generator=g)
    return model, x, y, model.n_classes - model.task_sizes[-1]


def outputs_and_grads(model: DERNet, x: torch.Tensor, y: torch.Tensor, n_old: int) -> dict:
    """The forward outputs, the stage-1 loss and the gradient of every trainable parameter
    (``grad:<name>``), as float64 CPU tensors. ``model`` is not changed except for its BN
    running statistics (train mode) and ``.grad``."""
    out = model(x)
    loss = stage1_loss(model, out, y, n_old, LAMBDA_A if len(model.convnets) > 1 else 0.0,
                       LAMBDA_S)
    params = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [p for _, p in params], allow_unused=True)
    res = {k: out[k].detach().double() for k in ("logits", "aux_logits", "features")
           if out[k] is not None}
    res["loss"] = loss.detach().double()
    for (k, p), g in zip(params, grads):
        res[f"grad:{k}"] = (g.detach().double() if g is not None
                            else torch.zeros(p.shape, dtype=torch.float64))
    return res


def rel_errors(got: dict, truth: dict) -> dict:
    """Per tensor, ``max|got - truth| / max|truth|`` (0 where the truth is all zeros and got
    equals it)."""
    assert got.keys() == truth.keys(), (sorted(got), sorted(truth))
    out = {}
    for k, a in truth.items():
        scale = float(a.abs().max()) if a.numel() else 0.0
        err = float((got[k] - a).abs().max()) if a.numel() else 0.0
        out[k] = err / scale if scale > 0 else err
    return out


def measure(d: dict, train: bool, layouts=LAYOUTS) -> dict:
    """The errors of one draw: {"reference": {tensor: rel err}, layout: {...}, ...}, every
    run in float32 against the reference in float64. Each run starts from the same state."""
    model, x, y, n_old = build_draw(d, train)
    truth = outputs_and_grads(copy.deepcopy(model).double(), x.double(), y, n_old)
    errs = {"reference": rel_errors(outputs_and_grads(copy.deepcopy(model), x, y, n_old),
                                    truth)}
    for name, cl in layouts.items():  # cl None: FastDERNet's default
        fast = FastDERNet.from_reference(model)
        if cl is not None:
            fast.trainable_channels_last = cl
        errs[name] = rel_errors(outputs_and_grads(fast, x, y, n_old), truth)
    return errs
