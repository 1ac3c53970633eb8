"""The whole DER pipeline: ``python -m der_fast.train [flags]``.

Per step t: update_fc -> stage 1 (CE + aux CE + lambda_s * sparsity, masks annealed per batch)
-> pruning -> stage 2 (balanced classifier re-training with temperature, or weight aligning)
-> herding memory update -> evaluation. A checkpoint is written atomically after every stage;
``--resume DIR`` continues from the last complete one and reproduces an uninterrupted run.
Published protocols are presets (``--preset cifar100-b0-10``, :mod:`der_fast.presets`); under
``torchrun`` the training stages run data-parallel (:mod:`der_fast.train.distributed`).

Modules, in reading order: ``config`` (Config), ``cli`` (flags -> Config), ``pipeline`` (run:
the steps), ``stages`` (stage 1 and 2), ``loop`` (the SGD epoch loop), ``batches`` (training
batches), ``evaluate`` (accuracy, metrics rows), ``outputs`` (checkpoints, result files),
``distributed`` (DDP, BatchNorm over micro-batches), ``faults`` (NaN loss, SIGTERM/SIGINT,
failed writes).
"""

from ..objective import aux_targets
from .cli import config_from_args, main
from .config import Config, ConfigError
from .faults import Interrupted, NonFiniteLoss
from .pipeline import run

# the pipeline's building blocks, importable from der_fast.train as well
from .config import IMPLS, S_ANNEAL, STAGE2_MODES  # noqa: F401
from .evaluate import evaluate, extract, forgetting  # noqa: F401
from .outputs import format_table  # noqa: F401
from .stages import recalibrate_bn, stage1, stage2  # noqa: F401

__all__ = ["Config", "ConfigError", "NonFiniteLoss", "Interrupted", "aux_targets",
           "run", "main", "config_from_args"]
