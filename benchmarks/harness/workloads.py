"""The workloads: what one timed call of a case does on one provider (inference, a stage-1 or
stage-2 step, the floor, an epoch), and the outputs it gives the equivalence check."""

from __future__ import annotations

import torch

from der_fast import masks as M
from der_fast.objective import make_optimizer, stage1_loss, stage2_loss

from .constants import (EPOCH_BATCHES, LAMBDA_A, LAMBDA_S, LR, MOMENTUM, S_MAX, S_TRAIN,
                        TEMPERATURE, WEIGHT_DECAY)
from .env import sync
from .grid import Case
from .models import make_data
from .providers import Built


def _sgd(params: list) -> torch.optim.Optimizer:
    """The trainer's stage optimiser (mask embeddings: plain SGD at the mask lr)."""
    return make_optimizer(params, LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)


class Workload:
    """One case's unit of work on one provider. ``step()`` is what gets timed;
    ``check_outputs()`` gives the tensors compared against the reference (a forward and, for
    training workloads, the loss and the gradient of every trainable parameter)."""

    def __init__(self, case: Case, built: Built, device: torch.device,
                 dtype: torch.dtype = torch.float32):
        self.case, self.built, self.device = case, built, device
        n = EPOCH_BATCHES if case.workload == "epoch" else 1
        self.batches = [(built.to_input(x.to(dtype)), y) for x, y in make_data(case, device, n)]
        m = built.model
        self.t = len(m.convnets)
        self.n_old = m.n_classes - m.task_sizes[-1]
        if case.workload == "infer":
            m.eval()
        else:
            m.train()
        if case.workload in ("stage1", "floor", "epoch"):
            m.set_s(S_TRAIN)
        params = [(k, p) for k, p in m.named_parameters() if p.requires_grad]
        if case.workload == "stage2":
            params = [(k, p) for k, p in params if k.startswith("fc.")]
            for k, p in m.named_parameters():
                if not k.startswith("fc."):
                    p.requires_grad_(False)
        self.params = params
        self.opt = _sgd(params) if case.workload != "infer" else None
        self.last_loss = None

    # the loss of each training workload (der_fast.train's definitions)
    def _loss(self, out: dict, y: torch.Tensor) -> torch.Tensor:
        if self.case.workload == "stage2":
            return stage2_loss(out, y, TEMPERATURE)
        return stage1_loss(self.built.model, out, y, self.n_old,
                           LAMBDA_A if self.t > 1 else 0.0, LAMBDA_S)

    def _train_step(self, x, y, s: float) -> torch.Tensor:
        m = self.built.model
        loss = self._loss(self.built.forward(x), y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.case.workload != "stage2":
            m.compensate_mask_grads(s, S_MAX)
        self.opt.step()
        if self.case.workload != "stage2":
            m.clamp_masks(S_MAX)
        return loss.detach()

    def step(self):
        w = self.case.workload
        if w == "infer":
            with torch.no_grad():
                out = self.built.forward(self.batches[0][0])["logits"]
        elif w == "epoch":
            for b, (x, y) in enumerate(self.batches):
                s = M.anneal_s(b, len(self.batches), S_MAX)
                self.built.model.set_s(s)
                out = self._train_step(x, y, s)
        else:
            out = self._train_step(*self.batches[0], S_TRAIN)
        self.last_loss = out if w != "infer" else None
        sync(self.device)
        return out

    def check_outputs(self) -> dict:
        """Forward (+ loss and gradients for training workloads) without an optimiser step."""
        x, y = self.batches[0]
        if self.case.workload == "infer":
            with torch.no_grad():
                out = self.built.forward(x)
            return {"logits": out["logits"].detach().double().cpu()}
        out = self.built.forward(x)  # epoch: checked at S_TRAIN (at s ~ 1/s_max every gate is
        # ~0.5, activations shrink through the blocks and train-mode BN amplifies rounding)
        loss = self._loss(out, y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        res = {"logits": out["logits"].detach().double().cpu(),
               "loss": loss.detach().double().cpu()}
        if out["aux_logits"] is not None and self.case.workload != "stage2":
            res["aux_logits"] = out["aux_logits"].detach().double().cpu()
        for k, p in self.params:
            res[f"grad:{k}"] = (p.grad.detach().double().cpu() if p.grad is not None
                                else torch.zeros(p.shape, dtype=torch.float64))
        self.opt.zero_grad(set_to_none=True)
        return res
