"""DERNet: the plain PyTorch reference of DER (Dynamically Expandable Representation).

A loop over extractors, masks as multiplications, ``nn.Linear`` classifiers. Readable and
obviously right: every fast path is tested against it. The public names follow PyCIL's DERNet
(``update_fc``, ``forward -> {"logits", "aux_logits", "features"}``, ``extract_vector``,
``weight_align``, ``convnets``, ``fc``, ``aux_fc``, ``task_sizes``, ``out_dim``,
``feature_dim``, ``copy``, ``freeze``, ``load_checkpoint``); it is built from PyCIL's
``args`` as ``DERNet(args, pretrained)`` and loads PyCIL DERNet state_dicts
(:mod:`der_fast.compat`).
"""

from __future__ import annotations

import copy
import operator
import re
import warnings

import torch
from torch import nn

from . import compat
from . import masks as M
from .backbones import ARCHS, MaskedResNet

__all__ = ["DERNet", "UntrainedMasksWarning", "new_classifier"]


class UntrainedMasksWarning(UserWarning):
    """``update_fc`` binarised soft masks that were never annealed (``set_s`` never called)."""


def new_classifier(in_features: int, out_features: int, device=None, dtype=None) -> nn.Linear:
    """A classifier (H_t, the auxiliary one, stage 2's re-initialised one) as the authors' code
    and PyCIL initialise it: weights of variance 1 / in_features (kaiming, 'linear' gain;
    PyCIL's uniform form) and a zero bias. ``nn.Linear``'s own default has a third of that
    variance and a random bias."""
    fc = nn.Linear(in_features, out_features)
    nn.init.kaiming_uniform_(fc.weight, nonlinearity="linear")
    nn.init.zeros_(fc.bias)
    return fc.to(device=device, dtype=dtype)


class DERNet(nn.Module):
    """DER's network at step t: t extractors, a classifier over their concatenated features
    and an auxiliary classifier over the newest extractor's features.

    Args:
        backbone: ``"resnet32"``, ``"resnet18_cifar"`` or ``"resnet18"``; or PyCIL's ``args``
            dict (``DERNet(args, pretrained)``): the backbone follows ``convnet_type`` and, for
            ``resnet18``, ``dataset`` (:func:`der_fast.compat.backbone_from_args`), masks are
            off unless ``args["use_masks"]`` (the ``use_masks`` argument is then ignored), and
            ``in_channels`` may be given as ``args["in_channels"]``.
        in_channels: image channels.
        use_masks: give every new extractor DER's channel masks (needed for pruning). Masks
            must be trained (``set_s``, ``compensate_mask_grads``, ...): ``update_fc``
            binarises the previous extractor's masks, and does so for masks that were never
            annealed only with an :class:`UntrainedMasksWarning` (an error for a model built
            from PyCIL's ``args``).
        mask_init: new mask embeddings e are drawn from U(0, mask_init) (``masks.MASK_INIT``:
            logits at s_max = 400 spread over (0, ``masks.LOGIT_BOUND``)).
    """

    def __init__(self, backbone="resnet32", in_channels: int = 3, use_masks: bool = True,
                 mask_init: float = M.MASK_INIT, pretrained: bool = False):
        super().__init__()
        self.args = None
        if isinstance(backbone, dict):  # PyCIL: DERNet(args, pretrained)
            if isinstance(in_channels, bool):  # PyCIL's 2nd positional argument is `pretrained`
                pretrained, in_channels = in_channels, 3
            self.args = backbone
            in_channels = backbone.get("in_channels", in_channels)
            use_masks = compat.masks_from_args(backbone)
            mask_init = backbone.get("mask_init", mask_init)
            backbone = compat.backbone_from_args(backbone)
        if backbone not in ARCHS:
            raise ValueError(f"unknown backbone {backbone!r}; choose one of {sorted(ARCHS)}")
        if pretrained:
            raise ValueError("pretrained backbones are not supported (no downloads here)")
        self.backbone = backbone
        self.convnet_type = backbone  # PyCIL's name
        self.pretrained = False
        self.in_channels = int(in_channels)
        self.use_masks = bool(use_masks)
        self.mask_init = float(mask_init)
        self.convnets = nn.ModuleList()
        self.fc = None
        self.aux_fc = None
        self.task_sizes = []
        self.out_dim = ARCHS[backbone].out_dim

    # ------------------------------------------------------------------ structure
    @property
    def feature_dim(self) -> int:
        return sum(c.out_dim for c in self.convnets)

    @property
    def n_classes(self) -> int:
        return sum(self.task_sizes)

    def _device_dtype(self):
        for p in self.parameters():
            return p.device, p.dtype
        return torch.device("cpu"), torch.float32

    def update_fc(self, nb_classes: int) -> None:
        """Start a new step with ``nb_classes`` classes seen in total: add an extractor
        (initialised from the previous one), freeze the old ones and rebuild the classifiers
        (old classifier rows and columns are carried over)."""
        known = self.n_classes
        # the argument is checked, and every new part built, before the model changes: a
        # failed call leaves the model as it was (no half-built extractor)
        if isinstance(nb_classes, bool):
            raise TypeError(f"nb_classes must be an integer, got {nb_classes!r}")
        try:
            nb_classes = operator.index(nb_classes)  # int, numpy / 0-d tensor integers
        except TypeError:
            raise TypeError(f"nb_classes must be an integer, got {nb_classes!r}") from None
        if nb_classes <= known:
            raise ValueError(f"nb_classes must exceed the {known} classes already seen, got "
                             f"{nb_classes}")
        self._check_masks_trained()
        device, dtype = self._device_dtype()
        if len(self.convnets) == 0:
            new = MaskedResNet(self.backbone, self.in_channels, masked=self.use_masks,
                               mask_init=self.mask_init)
        else:
            new = M.expand_from(self.convnets[-1], masked=self.use_masks,
                                mask_init=self.mask_init)
        new = new.to(device=device, dtype=dtype)
        fc = new_classifier(self.feature_dim + new.out_dim, nb_classes, device, dtype)
        if self.fc is not None:
            with torch.no_grad():
                n_out, n_in = self.fc.weight.shape
                fc.weight[:n_out, :n_in] = self.fc.weight
                fc.bias[:n_out] = self.fc.bias
        aux_fc = new_classifier(new.out_dim, nb_classes - known + 1, device, dtype)
        for old in self.convnets:
            self._freeze_extractor(old)
        self.convnets.append(new)
        self.fc = fc
        self.task_sizes.append(nb_classes - known)
        self.aux_fc = aux_fc
        self.train(self.training)

    def _check_masks_trained(self) -> None:
        """Before ``update_fc`` binarises the newest extractor's soft masks: were they ever
        annealed? Binarising untrained gates (sigmoid(e) ~ 0.5 -> 1) changes the old
        extractor's features by orders of magnitude: PyCIL's learner never anneals masks."""
        if not self.convnets:
            return
        net = self.convnets[-1]
        if net.mask_e is None or net.binary_masks or getattr(net, "annealed", False):
            return
        msg = ("update_fc would binarise the masks of extractor "
               f"{len(self.convnets) - 1}, which were never annealed (set_s was never "
               "called): its features would change abruptly. Train the masks (set_s, "
               "sparsity_loss, compensate_mask_grads, prune; see der_fast.train) or build "
               "the model without masks (use_masks=False; PyCIL args: leave out 'use_masks').")
        if self.args is not None:
            raise RuntimeError(msg)
        warnings.warn(msg, UntrainedMasksWarning, stacklevel=3)

    @staticmethod
    def _freeze_extractor(net: MaskedResNet) -> None:
        net.requires_grad_(False)
        if net.mask_e is not None:
            net.binary_masks = True  # an old extractor keeps its binarised masks
        net.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        for net in self.convnets:
            if not any(p.requires_grad for p in net.parameters()):
                net.eval()  # frozen: BatchNorm statistics never update again
        return self

    def reset_fc(self) -> None:
        """Re-initialise the classifier H_t (stage 2 of DER trains it from scratch)."""
        device, dtype = self._device_dtype()
        self.fc = new_classifier(self.feature_dim, self.n_classes, device, dtype)

    def freeze(self):
        self.requires_grad_(False)
        self.eval()
        return self

    def freeze_conv(self):
        """Freeze every extractor (stage 2): parameters and BatchNorm statistics."""
        for net in self.convnets:
            self._freeze_extractor(net)
        return self

    def copy(self):
        return copy.deepcopy(self)

    # ------------------------------------------------------------------ forward
    def extract_vector(self, x: torch.Tensor) -> torch.Tensor:
        """The super-feature u = concat(F_1(x), ..., F_t(x))."""
        if len(self.convnets) == 0:
            raise RuntimeError("call update_fc(n_classes) before using the model")
        return torch.cat([net(x) for net in self.convnets], 1)

    def forward(self, x: torch.Tensor) -> dict:
        features = self.extract_vector(x)
        logits = self.fc(features)
        aux_logits = None
        if len(self.convnets) > 1:
            aux_logits = self.aux_fc(features[:, -self.convnets[-1].out_dim:])
        return {"logits": logits, "aux_logits": aux_logits, "features": features}

    # ------------------------------------------------------------------ masks
    @property
    def new_extractor(self) -> MaskedResNet:
        return self.convnets[-1]

    def set_s(self, s: float) -> None:
        """The newest extractor's mask temperature (marks its masks as annealed)."""
        M.set_s(self.convnets[-1], s)

    def sparsity_loss(self) -> torch.Tensor:
        return M.sparsity_loss(self.convnets[-1])

    def compensate_mask_grads(self, s: float, s_max: float) -> None:
        M.compensate_grads(self.convnets[-1], s, s_max)

    def clamp_masks(self, s_max: float = M.S_MAX) -> None:
        M.clamp_embeddings(self.convnets[-1], s_max)

    def keep_ratio(self) -> float:
        """Fraction of the newest extractor's parameters that pruning now would keep."""
        return M.keep_ratio(self.convnets[-1])

    def extractor_macs(self, hw: tuple) -> list:
        """Multiply-accumulates of each extractor's convolutions for one ``hw`` image."""
        return [M.extractor_macs(net, hw) for net in self.convnets]

    def prune(self, optimizer=None) -> dict:
        """Binarise the newest extractor's masks and remove its off channels (and the matching
        classifier columns) for real. Exact: outputs equal those of the binary-masked model.
        Returns parameter counts before and after.

        With ``optimizer`` (one holding the model's parameters, e.g. mid-way through a
        stage), the optimiser goes on with the pruned parameters: each removed parameter is
        replaced by its pruned successor in its group, its state (momentum buffers) cut the
        same way; the mask embeddings leave it. Training on is then exactly training the
        binary-masked model on (the removed channels compute zeros and get no gradient)."""
        net = self.convnets[-1]
        if net.mask_e is None:
            raise RuntimeError("the newest extractor has no masks to prune (use_masks=False)")
        before = self.num_params()
        local = torch.nonzero(net.binary_mask(net.feature_point)).flatten()
        pruned, slices = M.prune_with_slices(net)
        offset = self.feature_dim - net.out_dim  # columns of the older extractors
        cols = torch.cat([torch.arange(offset), offset + local]).to(self.fc.weight.device)
        local = local.to(self.fc.weight.device)
        device, dtype = self._device_dtype()
        fc = nn.Linear(len(cols), self.fc.out_features).to(device=device, dtype=dtype)
        aux = nn.Linear(pruned.out_dim, self.aux_fc.out_features).to(device=device, dtype=dtype)
        old_params = dict(net.named_parameters())
        moved = [(old_params[name], p, slices[name]) for name, p in pruned.named_parameters()]
        moved += [(self.fc.weight, fc.weight, [(1, cols)]), (self.fc.bias, fc.bias, []),
                  (self.aux_fc.weight, aux.weight, [(1, local)]), (self.aux_fc.bias, aux.bias, [])]
        with torch.no_grad():
            for old, p, cuts in moved:
                p.copy_(M.cut(old, cuts))
        if optimizer is not None:
            _carry_optimizer(optimizer, moved, dropped=list(net.mask_e.values()))
        self.convnets[-1] = pruned
        self.fc, self.aux_fc = fc, aux
        self.train(self.training)
        return {"params_before": before, "params_after": self.num_params()}

    # ------------------------------------------------------------------ misc API
    def weight_align(self, increment: int) -> float:
        """PyCIL's weight aligning: scale the newest ``increment`` classifier rows by
        mean(old row norms) / mean(new row norms). Returns that factor."""
        if not 0 < increment < self.fc.out_features:
            raise ValueError(f"increment must be in (0, {self.fc.out_features}), got {increment}")
        w = self.fc.weight.data
        gamma = w[:-increment].norm(p=2, dim=1).mean() / w[-increment:].norm(p=2, dim=1).mean()
        w[-increment:] *= gamma
        return float(gamma)

    def num_params(self, include_masks: bool = False) -> int:
        return M.count_params(self, include_masks)

    def extractor_params(self) -> list:
        return [M.count_params(net) for net in self.convnets]

    # ------------------------------------------------------------------ checkpoints
    def get_extra_state(self):
        return {"task_sizes": list(self.task_sizes), "backbone": self.backbone,
                "in_channels": self.in_channels, "use_masks": self.use_masks,
                "mask_init": self.mask_init,
                "binary": [bool(n.binary_masks) for n in self.convnets],
                "s": [float(n.s) for n in self.convnets],
                "annealed": [bool(getattr(n, "annealed", False)) for n in self.convnets]}

    def _check_compatible(self, state) -> None:
        if state["backbone"] != self.backbone or state["in_channels"] != self.in_channels:
            raise ValueError(
                f"checkpoint is for backbone {state['backbone']!r} with {state['in_channels']} "
                f"input channels, this model is {self.backbone!r}/{self.in_channels}")

    def set_extra_state(self, state):
        self._check_compatible(state)
        self.task_sizes = list(state["task_sizes"])
        self.use_masks = state["use_masks"]
        self.mask_init = state["mask_init"]
        for net, b in zip(self.convnets, state["binary"]):
            net.binary_masks = b
        for net, s in zip(self.convnets, state.get("s", [])):
            net.s = s
        # checkpoints older than the flag: their masks count as trained
        for net, a in zip(self.convnets, state.get("annealed", [True] * len(self.convnets))):
            net.annealed = a

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Loads any DERNet/FastDERNet checkpoint: the structure (number of extractors, pruned
        widths, masks, classifier sizes) is rebuilt from the checkpoint first. A PyCIL DERNet
        state_dict is converted first (:func:`der_fast.compat.from_pycil_state_dict`, default
        task sizes; use :meth:`from_pycil` to give them)."""
        if compat.is_pycil_state_dict(state_dict):
            state_dict = compat.from_pycil_state_dict(state_dict, self.backbone,
                                                      self.in_channels)
        self._rebuild_like(state_dict)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # ------------------------------------------------------------------ PyCIL
    @classmethod
    def from_pycil(cls, state_dict: dict, args, task_sizes=None, **kw):
        """A model holding a PyCIL ``DERNet`` state_dict (PyCIL's ``save_checkpoint`` stores it
        as ``"model_state_dict"``). ``args``: PyCIL's args dict or a backbone name;
        ``task_sizes``: see :func:`der_fast.compat.from_pycil_state_dict`; ``kw``: more
        constructor arguments (e.g. FastDERNet's ``frozen_plan``)."""
        model = cls(args, **kw)
        model.load_state_dict(compat.from_pycil_state_dict(
            state_dict, model.backbone, model.in_channels, task_sizes))
        return model

    def pycil_state_dict(self) -> dict:
        """This model's state_dict with PyCIL DERNet names (unpruned, unmasked models only)."""
        return compat.to_pycil_state_dict(self)

    def load_checkpoint(self, args) -> float:
        """PyCIL's ``load_checkpoint``: the first task's extractor and classifier from
        ``checkpoints/finetune_{args['csv_name']}_0.pkl`` (``{"convnet", "fc", "test_acc"}``,
        PyCIL or der_fast extractor names); returns the stored test accuracy."""
        infos = torch.load(f"checkpoints/finetune_{args['csv_name']}_0.pkl",
                           map_location="cpu")
        if len(self.convnets) != 1:
            raise RuntimeError("load_checkpoint needs exactly one extractor (after the first "
                               "update_fc)")
        net = self.convnets[0]
        sd = dict(infos["convnet"])
        if any(k.startswith(("stem.", "stages.")) for k in sd):  # der_fast names
            net.load_state_dict(sd)
        else:
            wanted = {compat.pycil_extractor_name(self.backbone, k): k
                      for k in net.state_dict() if not k.startswith(("kept_", "mask_e."))}
            bad = sorted(set(wanted) ^ (set(sd) - {"fc.weight", "fc.bias"}))
            if bad:
                raise ValueError(f"checkpoint convnet entries do not match PyCIL's "
                                 f"{self.backbone}: {', '.join(bad[:12])}")
            net.load_state_dict({wanted[k]: v for k, v in sd.items() if k in wanted},
                                strict=False)
        self.fc.load_state_dict(infos["fc"])
        if hasattr(self, "invalidate_plan"):
            self.invalidate_plan()
        return infos["test_acc"]

    def _rebuild_like(self, sd) -> None:
        if isinstance(sd.get("_extra_state"), dict):
            self._check_compatible(sd["_extra_state"])  # before rebuilding anything
        n = 1 + max((int(m.group(1)) for k in sd if (m := re.match(r"convnets\.(\d+)\.", k))),
                    default=-1)
        if n == 0 or "fc.weight" not in sd:
            raise ValueError("not a DERNet checkpoint: no convnets.* or fc.weight entries")
        device, dtype = self._device_dtype()
        nets = []
        for i in range(n):
            pre = f"convnets.{i}."
            kept = {k[len(pre) + 5:]: v for k, v in sd.items()
                    if k.startswith(pre + "kept_")}
            masked = any(k.startswith(pre + "mask_e.") for k in sd)
            net = MaskedResNet(self.backbone, self.in_channels, masked=masked, kept=kept)
            nets.append(net.to(device=device, dtype=dtype))
        self.convnets = nn.ModuleList(nets)
        for old in nets[:-1]:
            self._freeze_extractor(old)
        k, d = sd["fc.weight"].shape
        self.fc = nn.Linear(d, k).to(device=device, dtype=dtype)
        k, d = sd["aux_fc.weight"].shape
        self.aux_fc = nn.Linear(d, k).to(device=device, dtype=dtype)
        self.train(self.training)


def _carry_optimizer(optimizer, moved, dropped) -> None:
    """Point ``optimizer`` at the pruned parameters: ``moved`` is ``[(old, new, cuts)]``
    (:func:`masks.cut`), ``dropped`` parameters leave it; state tensors shaped like their
    parameter are cut like it, others (step counts) carried as they are."""
    successor = {id(old): (new, cuts) for old, new, cuts in moved}
    gone = {id(p) for p in dropped}
    for group in optimizer.param_groups:
        params = []
        for p in group["params"]:
            if id(p) in gone:
                optimizer.state.pop(p, None)
                continue
            if id(p) in successor:
                new, cuts = successor[id(p)]
                state = optimizer.state.pop(p, None)
                if state:
                    optimizer.state[new] = {
                        k: M.cut(v, cuts) if torch.is_tensor(v) and v.shape == p.shape else v
                        for k, v in state.items()}
                p = new
            params.append(p)
        group["params"] = params
    optimizer.param_groups[:] = [g for g in optimizer.param_groups if g["params"]]
