"""PyCIL compatibility: PyCIL's ``args`` dict -> backbone and masks, and PyCIL ``DERNet``
state_dicts <-> der_fast's.

PyCIL (G-U-N/PyCIL, ``utils/inc_net.py``) builds ``DERNet(args, pretrained)``; its extractors
come from ``get_convnet(args)``: ``convs/cifar_resnet.py`` ``resnet32`` (stem ``conv_1_3x3`` /
``bn_1``, blocks ``stage_{1,2,3}.{b}.conv_a/bn_a/conv_b/bn_b``, parameter-free option-A
shortcuts, and an unused ``fc`` layer) or ``convs/resnet.py`` ``resnet18`` (stem
``conv1.0`` / ``conv1.1``, blocks ``layer{1..4}.{b}.conv1/bn1/conv2/bn2``, shortcuts
``downsample.0`` / ``downsample.1``). The classifiers ``fc`` and ``aux_fc`` have the same
names in both. der_fast's names are in :mod:`der_fast.backbones`.
"""

from __future__ import annotations

import functools
import re

import torch

from .backbones import ARCHS, MASK_INIT, MaskedResNet

__all__ = ["backbone_from_args", "masks_from_args", "from_pycil_state_dict",
           "to_pycil_state_dict", "is_pycil_state_dict", "pycil_extractor_name"]

_CONVNET = re.compile(r"convnets\.(\d+)\.(.*)")
# leaf module renames inside a block, per naming family
_BLOCK_CIFAR = {"conv1": "conv_a", "bn1": "bn_a", "conv2": "conv_b", "bn2": "bn_b"}
_BLOCK_TV = {"conv1": "conv1", "bn1": "bn1", "conv2": "conv2", "bn2": "bn2",
             "sc_conv": "downsample.0", "sc_bn": "downsample.1"}


def backbone_from_args(args: dict) -> str:
    """der_fast's backbone for PyCIL's ``args``, as PyCIL's ``get_convnet`` picks it:
    ``resnet32`` -> ``"resnet32"``; ``resnet18`` -> the CIFAR stem (3x3, stride 1, no max-pool,
    ``"resnet18_cifar"``) when ``"cifar"`` is in ``args["dataset"]``, the ImageNet stem
    (``"resnet18"``) for ``imagenet*`` with ``init_cls == increment`` (PyCIL's other ImageNet
    stem, 3x3 + max-pool, is not available). der_fast's own names are accepted as they are."""
    name = str(args["convnet_type"]).lower()
    if name in ARCHS and name != "resnet18":
        return name
    if name != "resnet18":
        raise ValueError(f"PyCIL convnet_type {args['convnet_type']!r} is not supported; "
                         f"der_fast has resnet32 and resnet18 (and {sorted(ARCHS)})")
    dataset = str(args.get("dataset", "imagenet")).lower()
    if "cifar" in dataset:
        return "resnet18_cifar"
    if "imagenet" in dataset:
        if args.get("init_cls", 0) == args.get("increment", 0):
            return "resnet18"
        raise ValueError("PyCIL's resnet18 for imagenet with init_cls != increment has a 3x3 "
                         "stem followed by a max-pool; der_fast has no such backbone (use "
                         "convnet_type 'resnet18_cifar' or 'resnet18' explicitly)")
    raise ValueError(f"PyCIL's resnet18 defines its stem only for cifar* and imagenet* "
                     f"datasets, got dataset {args.get('dataset')!r}; pass convnet_type "
                     "'resnet18_cifar' or 'resnet18' to choose")


def masks_from_args(args: dict) -> bool:
    """DER's channel masks are off for a PyCIL ``args`` dict unless it sets ``use_masks``:
    PyCIL's learner never anneals, compensates or prunes them."""
    return bool(args.get("use_masks", False))


def pycil_extractor_name(backbone: str, name: str) -> str:
    """PyCIL's name of one of der_fast's extractor entries (e.g. ``stages.0.1.bn1.weight`` ->
    ``stage_1.1.bn_a.weight`` for resnet32). KeyError for entries PyCIL has no counterpart of
    (``kept_*``, ``mask_e.*``)."""
    parts = name.split(".")
    cifar = ARCHS[backbone].shortcut == "A"  # PyCIL's cifar_resnet family
    if parts[0] == "stem":
        head = ({"conv": "conv_1_3x3", "bn": "bn_1"} if cifar else
                {"conv": "conv1.0", "bn": "conv1.1"})[parts[1]]
        return ".".join([head] + parts[2:])
    if parts[0] == "stages":
        si, bi, leaf = int(parts[1]), parts[2], parts[3]
        stage = f"stage_{si + 1}" if cifar else f"layer{si + 1}"
        block = (_BLOCK_CIFAR if cifar else _BLOCK_TV)[leaf]
        return ".".join([stage, bi, block] + parts[4:])
    raise KeyError(name)


@functools.lru_cache(maxsize=None)
def _extractor_layout(backbone: str, in_channels: int) -> tuple:
    """(entry name -> shape, mask point -> width) of a full-width, unmasked extractor."""
    net = MaskedResNet(backbone, in_channels)
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()
              if not k.startswith("kept_")}
    return shapes, dict(net.full_widths)


def _unused_fc(backbone: str) -> dict:
    """Entries PyCIL's extractor has but never uses (resnet32's ``fc``: Linear(64, 10))."""
    if ARCHS[backbone].shortcut == "A":
        d = ARCHS[backbone].out_dim
        return {"fc.weight": (10, d), "fc.bias": (10,)}
    return {}


def is_pycil_state_dict(sd) -> bool:
    """Whether ``sd`` names its extractors' entries PyCIL's way."""
    return any((m := _CONVNET.match(k)) and m.group(2).startswith(
        ("conv_1_3x3.", "bn_1.", "stage_", "conv1.0.", "conv1.1.", "layer"))
        for k in sd)


def _listing(keys, n=12) -> str:
    keys = sorted(keys)
    more = f" (and {len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def from_pycil_state_dict(sd: dict, backbone, in_channels: int = 3, task_sizes=None) -> dict:
    """A der_fast ``DERNet`` state_dict from a PyCIL ``DERNet`` state_dict.

    Args:
        sd: PyCIL's ``network.state_dict()`` (e.g. ``torch.load(...)["model_state_dict"]`` of
            PyCIL's ``save_checkpoint``).
        backbone: der_fast's backbone name or PyCIL's ``args`` dict.
        task_sizes: classes added at each step. PyCIL does not store them; by default the last
            is ``aux_fc``'s outputs - 1, the earlier ones equal it, and the first takes the
            rest (PyCIL's ``init_cls`` + ``increment`` splits).

    Raises ValueError naming the PyCIL keys that are missing, unexpected or of the wrong
    shape. PyCIL's unused ``convnets.i.fc`` entries (resnet32) are dropped.
    """
    if isinstance(backbone, dict):
        in_channels = backbone.get("in_channels", in_channels)
        backbone = backbone_from_args(backbone)
    n = 1 + max((int(m.group(1)) for k in sd if (m := _CONVNET.match(k))), default=-1)
    if n == 0:
        raise ValueError("not a PyCIL DERNet state_dict: no convnets.* entries")
    template, widths = _extractor_layout(backbone, int(in_channels))
    unused = _unused_fc(backbone)
    expected, ours = {}, {}
    for i in range(n):
        for name, shape in template.items():
            key = f"convnets.{i}.{pycil_extractor_name(backbone, name)}"
            expected[key] = shape
            ours[key] = f"convnets.{i}.{name}"
    d = ARCHS[backbone].out_dim
    optional = {f"convnets.{i}.{k}" for i in range(n) for k in unused}
    heads = {"fc.weight", "fc.bias", "aux_fc.weight", "aux_fc.bias"}
    missing = [k for k in list(expected) + sorted(heads) if k not in sd]
    unexpected = [k for k in sd if k not in expected and k not in heads and k not in optional]
    wrong = [f"{k} {tuple(sd[k].shape)} (expected {expected[k]})" for k in expected
             if k in sd and tuple(sd[k].shape) != expected[k]]
    if not missing and not unexpected:
        if sd["fc.weight"].dim() != 2 or sd["fc.weight"].shape[1] != n * d:
            wrong.append(f"fc.weight {tuple(sd['fc.weight'].shape)} (expected [classes, {n * d}])")
        if sd["aux_fc.weight"].dim() != 2 or sd["aux_fc.weight"].shape[1] != d:
            wrong.append(f"aux_fc.weight {tuple(sd['aux_fc.weight'].shape)} "
                         f"(expected [new classes + 1, {d}])")
    if missing or unexpected or wrong:
        msg = [f"not a PyCIL DERNet state_dict for backbone {backbone!r} with {n} extractor(s)"]
        if missing:
            msg.append(f"missing PyCIL keys: {_listing(missing)}")
        if unexpected:
            msg.append(f"unexpected keys: {_listing(unexpected)}")
        if wrong:
            msg.append(f"wrong shapes: {_listing(wrong)}")
        raise ValueError("; ".join(msg))
    n_classes = int(sd["fc.weight"].shape[0])
    if task_sizes is None:
        last = int(sd["aux_fc.weight"].shape[0]) - 1
        task_sizes = [n_classes - (n - 1) * last] + [last] * (n - 1)
    task_sizes = [int(v) for v in task_sizes]
    if len(task_sizes) != n or sum(task_sizes) != n_classes or min(task_sizes) < 1 or \
            task_sizes[-1] + 1 != sd["aux_fc.weight"].shape[0]:
        raise ValueError(f"task_sizes {task_sizes} do not fit {n} extractors, {n_classes} "
                         f"classes and aux_fc with {sd['aux_fc.weight'].shape[0]} outputs")
    out = {ours[k]: v for k, v in sd.items() if k in ours}
    out.update({k: sd[k] for k in heads})
    for i in range(n):
        for p, w in widths.items():
            out[f"convnets.{i}.kept_{p}"] = torch.arange(w)
    out["_extra_state"] = {"task_sizes": task_sizes, "backbone": backbone,
                           "in_channels": int(in_channels), "use_masks": False,
                           "mask_init": MASK_INIT, "binary": [False] * n, "s": [1.0] * n}
    return out


def to_pycil_state_dict(model) -> dict:
    """PyCIL's ``DERNet`` state_dict of a der_fast ``DERNet`` (unpruned, without masks: PyCIL
    has neither). resnet32 extractors get PyCIL's unused ``fc`` as zeros, so PyCIL loads it
    with ``strict=True``."""
    out = {}
    for i, net in enumerate(model.convnets):
        if net.mask_e is not None or net.is_pruned:
            raise ValueError(f"extractor {i} has masks or is pruned: PyCIL's DERNet has "
                             "neither")
        for name, v in net.state_dict().items():
            if name.startswith("kept_"):
                continue
            out[f"convnets.{i}.{pycil_extractor_name(model.backbone, name)}"] = v
        for k, shape in _unused_fc(model.backbone).items():
            out[f"convnets.{i}.{k}"] = torch.zeros(shape, dtype=net.stem.conv.weight.dtype)
    for k in ("fc.weight", "fc.bias", "aux_fc.weight", "aux_fc.bias"):
        out[k] = model.get_parameter(k).detach()
    return out
