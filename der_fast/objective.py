"""DER's training objectives and optimiser, written once for the trainer, the benchmarks
and the tests.

Stage 1 (representation learning of step t): cross-entropy on all classes seen so far, plus
``lambda_a`` times the auxiliary classifier's cross-entropy (new classes + one "old" class),
plus ``lambda_s`` times the masks' sparsity loss. Stage 2 (classifier re-training):
cross-entropy of the logits divided by a temperature.

The optimiser: SGD with the weights at the stage's (scheduled) lr, momentum and weight decay;
the mask embeddings ``e`` at their own constant lr with plain SGD (no momentum, no weight
decay), as HAT trains them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .masks import MASK_LR

__all__ = ["aux_targets", "stage1_loss", "stage2_loss", "make_optimizer"]


def aux_targets(y: torch.Tensor, n_old: int) -> torch.Tensor:
    """Labels of the auxiliary classifier: 0 for every old class, 1.. for the new ones."""
    return torch.where(y < n_old, torch.zeros_like(y), y - n_old + 1)


def stage1_loss(model, out: dict, y: torch.Tensor, n_old: int, lambda_a: float,
                lambda_s: float) -> torch.Tensor:
    """Stage-1 loss of ``out = model(x)`` (or of its DDP wrapper's output).

    The auxiliary term counts only where the model has an auxiliary head (step >= 1) and
    ``lambda_a > 0``; the sparsity term only where the newest extractor has masks that are
    still soft. Once they are binary (the fine-tuning phase) ``e`` enters with weight 0, so
    that every trained parameter stays in the graph (DDP requires it)."""
    loss = F.cross_entropy(out["logits"], y)
    if lambda_a > 0 and out.get("aux_logits") is not None:
        loss = loss + lambda_a * F.cross_entropy(out["aux_logits"], aux_targets(y, n_old))
    new = model.convnets[-1]
    if new.mask_e is not None:
        if new.binary_masks:
            loss = loss + 0.0 * sum(e.sum() for e in new.mask_e.values())
        elif lambda_s > 0:
            loss = loss + lambda_s * model.sparsity_loss()
    return loss


def stage2_loss(out: dict, y: torch.Tensor, temperature: float) -> torch.Tensor:
    """Stage-2 loss: cross-entropy of the logits divided by ``temperature``."""
    return F.cross_entropy(out["logits"] / temperature, y)


def make_optimizer(params, lr: float, *, momentum: float, weight_decay: float,
                   mask_lr: float = MASK_LR) -> torch.optim.SGD:
    """SGD over ``params`` (``(name, parameter)`` pairs): the weights with ``lr`` (the group
    is marked ``scheduled``: the trainer sets its lr every epoch), ``momentum`` and
    ``weight_decay``; the mask embeddings (``mask_e`` in the name) with plain SGD at the
    constant ``mask_lr``."""
    params = list(params)
    groups = [{"params": [p for n, p in params if "mask_e" not in n], "lr": lr,
               "momentum": momentum, "weight_decay": weight_decay, "scheduled": True},
              {"params": [p for n, p in params if "mask_e" in n], "lr": mask_lr,
               "momentum": 0.0, "weight_decay": 0.0, "scheduled": False}]
    return torch.optim.SGD([g for g in groups if g["params"]], lr=lr)
