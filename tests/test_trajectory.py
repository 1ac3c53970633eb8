"""Stage 1 as the trainer runs it by default, FastDERNet against DERNet, step by step: s fixed
at s_max, the budget controller adapting lambda_s, the shift that lands the masks on the
budget, binary masks, the early prune, fine-tuning of the kept channels, and the BatchNorm
re-estimation (``stages.stage1`` itself, on random data).

* float64: the fast model's trajectory is the reference's to rounding (every step's loss, the
  keep ratio after every epoch, lambda_s, the pruned widths, the final state).
* float32: every step's loss and the final weights stay as close to the float64 reference's
  trajectory as 2x the float32 reference's own distance + a few ulps. The run is set up to be
  tame in float32 (the reference's own float32 distance is a small fraction of the update), so
  a fast path that does not train, or trains a different function, cannot pass: the test
  asserts that too.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from der_fast import DERNet, FastDERNet
from der_fast import train as T
from der_fast.masks import BudgetController
from der_fast.train import loop, stages
from helpers import TensorData, grown_dernet, noisy_batches

pytestmark = pytest.mark.usefixtures("one_thread")

N_IMAGES, BATCH, HW, EPOCHS = 32, 8, 16, 6  # 4 batches per epoch, 24 steps
ULP = 2.0 ** -23
FACTOR, ULPS = 2.0, 48  # the rule of tests/test_exactness.py


class _Data(TensorData):
    """Random images of a few well-separated classes (the run learns), in ``dtype``."""

    def __init__(self, n_classes, dtype):
        g = torch.Generator().manual_seed(5)
        self.y = torch.arange(N_IMAGES) % n_classes
        centres = torch.randn(n_classes, 3, HW, HW, generator=g, dtype=torch.float64)
        x = centres[self.y] + 0.5 * torch.randn(N_IMAGES, 3, HW, HW, generator=g,
                                                dtype=torch.float64)
        self.x = x.to(dtype)
        self.info = SimpleNamespace(image_size=HW)


def _model(t: int, seed: int = 11) -> DERNet:
    """A float32 reference at step ``t``: extractors 0..t-1 pruned, extractor t fresh."""
    return grown_dernet(t, seed)


def _cfg():
    cfg, _ = T.config_from_args(["--epochs", str(EPOCHS), "--batch-size", str(BATCH),
                                 "--keep", "0.3", "--lr", "0.002", "--no-progress",
                                 "--no-plots"])
    cfg.warmup_epochs = 0
    cfg.mask_lr = cfg.mask_lr * 0.03
    return cfg


def _stage1(model, t, monkeypatch, lams=None):
    """Runs the trainer's stage 1; returns (losses per step, report, final state, the budget
    controller's lambda_s after every step). With ``lams``, the controller replays them."""
    dtype = next(model.parameters()).dtype
    data = _Data(model.n_classes, dtype)
    losses = []
    real = stages.stage1_loss

    def recording(*a, **k):
        loss = real(*a, **k)
        losses.append(float(loss.detach()))
        return loss

    seen = []

    class Controller(BudgetController):
        def update(self, keep):
            if lams is None:
                seen.append(super().update(keep))
            else:
                self.done += 1
                self.lam = lams[self.done - 1]
                seen.append(self.lam)
            return seen[-1]

    monkeypatch.setattr(loop, "train_batches", noisy_batches)
    monkeypatch.setattr(stages, "stage1_loss", recording)
    monkeypatch.setattr(stages, "BudgetController", Controller)
    report = {}
    stages.stage1(model, data, np.arange(N_IMAGES), _cfg(), t, 3 * t, "cpu", report=report)
    state = {k: v.double() for k, v in model.state_dict().items()
             if torch.is_tensor(v) and v.dtype.is_floating_point}
    return torch.tensor(losses, dtype=torch.float64), report, state, seen


@pytest.mark.parametrize("t", [1, 2])
def test_default_stage1_float64_fast_is_reference(t, monkeypatch):
    ref = _model(t).double()
    fast = FastDERNet.from_reference(ref)
    lr_, rep_r, sr, lam_r = _stage1(ref, t, monkeypatch)
    lf_, rep_f, sf, lam_f = _stage1(fast, t, monkeypatch)
    assert "time_prune_s" in rep_r and "time_prune_s" in rep_f, "the early prune ran"
    assert rep_f["keep_trace"] == rep_r["keep_trace"] and lam_f == lam_r
    assert fast.convnets[-1].widths == ref.convnets[-1].widths
    assert len(lf_) == len(lr_) == EPOCHS * N_IMAGES // BATCH
    gap = float(((lf_ - lr_).abs() / lr_.abs()).max())
    assert gap <= 1e-9, f"float64 losses differ by {gap:.2e} (relative)"
    assert sf.keys() == sr.keys()
    for k in sr:
        scale = max(float(sr[k].abs().max()), 1e-30)
        err = float((sf[k] - sr[k]).abs().max())
        assert err <= 1e-9 * scale, f"{k}: {err:.3g} (scale {scale:.3g})"


SEEDS32 = (11, 12, 13, 14, 15)


def _tame_steps(gap: torch.Tensor) -> int:
    """Steps before the first loss gap above 1e-6."""
    big = (gap > 1e-6).nonzero()
    return int(big[0]) if len(big) else len(gap)


def test_default_stage1_float32_within_reference_over_seeds(monkeypatch):
    """float32 stage 1 in the default setup is chaotic: the budget controller turns the
    binary keep ratio (a count of channels) into lambda_s, and with s at s_max a channel whose
    e is within rounding of 0 flips the count, so one rounding difference moves every later
    step at the percent level, and the float32 reference itself often ends with other channels
    kept than its float64 run. The float32 runs therefore replay the float64 run's lambda_s
    (the controller is checked exactly by the float64 test), and are judged two ways:
    * the first two steps (rounding-sized gaps for both): the fast model's loss gap <= 2x the
      reference's + 48 ulps;
    * in distribution over seeds: the steps before the loss leaves the float64 run by 1e-6
      (summed over the seeds) >= a third of the reference's, and the final epoch's loss gap to
      float64, averaged over the seeds, <= 2x the reference's (or 2 %, with five seeds the
      mean of these heavy-tailed gaps is itself noisy; the runs' losses fall by > 20 %). A fast path that does not train, or trains another
      function, is a whole loss away (the run learns: asserted)."""
    finals_ref, finals_fast, tame_ref, tame_fast = [], [], [], []
    for seed in SEEDS32:
        base = _model(1, seed)
        l64, _, _, lams = _stage1(copy.deepcopy(base).double(), 1, monkeypatch)
        l32, _, _, _ = _stage1(copy.deepcopy(base), 1, monkeypatch, lams)
        lf, rep, _, _ = _stage1(FastDERNet.from_reference(base), 1, monkeypatch, lams)
        assert "time_prune_s" in rep, "the early prune ran"
        first, last = float(l64[:4].mean()), float(l64[-4:].mean())
        assert last < 0.8 * first, f"seed {seed}: the run does not learn: {l64.tolist()}"
        gap_ref = (l32 - l64).abs() / l64.abs()
        gap_fast = (lf - l64).abs() / l64.abs()
        over = (gap_fast[:2] > FACTOR * gap_ref[:2] + ULPS * ULP).nonzero().flatten().tolist()
        assert not over, (f"seed {seed}: float32 loss gap at steps {over}: fast "
                          f"{gap_fast[over].tolist()} vs reference {gap_ref[over].tolist()}")
        tame_ref.append(_tame_steps(gap_ref))
        tame_fast.append(_tame_steps(gap_fast))
        finals_ref.append(abs(float(l32[-4:].mean()) - last) / last)
        finals_fast.append(abs(float(lf[-4:].mean()) - last) / last)
    assert sum(tame_fast) >= sum(tame_ref) / 3, (
        f"steps before the float32 loss leaves float64 by 1e-6: fast {tame_fast}, "
        f"reference {tame_ref} (seeds {SEEDS32})")
    mean_ref, mean_fast = sum(finals_ref) / len(SEEDS32), sum(finals_fast) / len(SEEDS32)
    assert mean_ref < 0.05, finals_ref
    assert mean_fast <= FACTOR * max(mean_ref, 0.01), (
        f"final-epoch loss gap to float64 over seeds {SEEDS32}: fast {finals_fast}, "
        f"reference {finals_ref}")
