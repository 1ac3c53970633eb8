"""FastDERNet: DERNet's API and state, executed fast (see :mod:`.model`).

  model         FastDERNet: plan cache, frozen / trainable split, head
  plan          which plan runs frozen extractors, its thresholds, and what each name means
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
from .plan import FROZEN_PLANS, direct_share
from .plan import _direct_isa  # noqa: F401 (tests)
from .run_bordered import _bordered_program  # noqa: F401 (tests)
from .run_bordered import run_bordered
from .run_loop import run_folded
from .trainable import trainable_feature_map

__all__ = ["FROZEN_PLANS", "FastDERNet", "FoldedNet", "direct_share", "fold_extractor",
           "fuse_grouped", "run_bordered", "run_folded", "trainable_feature_map"]
