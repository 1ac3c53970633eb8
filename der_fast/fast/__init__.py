"""FastDERNet: DERNet's API and state, executed fast (see :mod:`.model`).

  model         FastDERNet: plan cache, frozen / trainable split, head
  plan          FrozenPlan: what a frozen_plan setting runs on a device; the thresholds
  chooser       the measured plan: candidates checked against loop, timed, fastest cached
  graphs        CUDA graphs of the frozen path (a candidate of the measured plan on CUDA)
  fold          extractors folded for inference (BN into convs, off channels removed), fusing
  run_loop      the loop executor (channels_last, fused oneDNN convs): plans loop, grouped
  run_bordered  the bordered executor (zero-bordered NCHW, conv3x3_bordered kernel): plan direct
  trainable     the trainable extractor's forward through the bn_gate op (BatchNorm + gate)

Kernels are reached only through :mod:`der_fast.ops`.
"""

from .fold import FoldedNet, fold_extractor, fuse_grouped
from .model import FastDERNet
from .plan import FROZEN_PLANS, FrozenPlan, narrow_share, resolve_frozen_plan
from .run_bordered import bordered_program, run_bordered
from .run_loop import run_folded
from .trainable import trainable_feature_map

__all__ = ["FROZEN_PLANS", "FastDERNet", "FoldedNet", "FrozenPlan", "bordered_program",
           "fold_extractor", "fuse_grouped", "narrow_share", "resolve_frozen_plan",
           "run_bordered", "run_folded", "trainable_feature_map"]
