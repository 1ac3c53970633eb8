"""Residual feature extractors with DER's channel masks and exact physical pruning.

Every backbone is a :class:`MaskedResNet`: a stem, stages of basic blocks, global average
pooling. Channel masks (HAT-style, ``m = sigmoid(s * e)``) sit at two kinds of *mask points*:

* ``inner{stage}_{block}``: the first conv of a block,   ``h = m * relu(bn1(conv1(x)))``
* ``stream{stage}``: the residual stream of a stage,     ``y = m * relu(bn2(conv2(h)) + sc(x))``
  (the stem writes into ``stream0``: ``y = m * relu(bn(conv(x)))``).

All blocks of a stage share the stage's stream mask, so a channel that is off is zero in the
whole stage's residual stream. With binary masks, removing the off channels (conv in/out
channels, BN entries, shortcut entries, classifier columns) is therefore *exact*: the pruned
network computes the same function as the masked one (tests/test_prune.py checks this).

A network may be pruned: then each mask point has a width smaller than the architecture's and a
persistent buffer ``kept_<point>`` holding the original channel indices that survive (sorted).
Those buffers are in the ``state_dict``, so a checkpoint describes its own shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ARCHS", "Arch", "MaskedResNet", "make_backbone", "conv_layers", "binarize",
           "floor_channels",
           "STREAM_FLOOR", "S_MAX", "LOGIT_BOUND", "MASK_INIT"]

# Fewest channels a residual stream keeps when binarised, as a fraction of its full width.
# A stream mask is shared by every block of its stage, so its channels carry the sparsity
# pressure of ~10 convs and, without a floor, the streams are pruned to one channel before any
# block's inner width moves (the last one is also the feature output the classifiers read).
# Structured-pruning studies of ResNets prune the residual stream least or not at all (Li et
# al., "Pruning Filters for Efficient ConvNets", 2017). Inner points keep at least 1 channel.
STREAM_FLOOR = 0.5

S_MAX = 400.0  # HAT's s_max
# e is clamped to |e| <= LOGIT_BOUND / s_max after every step, so |s e| <= LOGIT_BOUND at every
# s <= s_max. In float32 sigmoid(x) rounds to exactly 1 for x >= ~16.7, and then the gate's
# gradient (and HAT's compensation of it) is exactly 0; at 12, 1 - sigmoid(12) = 6e-6 is still
# resolved to ~1 %, so every mask gets its (compensated) gradient in every batch, while the
# gate at s_max is within 6e-6 of binary. (HAT clamps |e| <= 6, i.e. |s_max e| <= 2400.)
LOGIT_BOUND = 12.0
# Initial e ~ U(0, MASK_INIT): every channel on, logits at s_max spread over (0, LOGIT_BOUND).
MASK_INIT = LOGIT_BOUND / S_MAX


@dataclass(frozen=True)
class Arch:
    name: str
    stem_channels: int
    stem_kernel: int
    stem_stride: int
    stem_maxpool: bool
    stages: tuple  # ((planes, n_blocks, stride), ...)
    shortcut: str  # "A": subsample + zero channels (parameter-free); "B": 1x1 conv + BN

    @property
    def out_dim(self) -> int:
        return self.stages[-1][0]

    def feature_size(self, size: int) -> int:
        """Side of the last feature map for a ``size`` x ``size`` input (stem, max-pool and
        each stage's stride; padded 3x3 convolutions)."""
        def down(n, k, stride):
            return (n + 2 * (k // 2) - k) // stride + 1

        n = down(size, self.stem_kernel, self.stem_stride)
        if self.stem_maxpool:
            n = down(n, 3, 2)
        for _, _, stride in self.stages:
            n = down(n, 3, stride)
        return n


ARCHS = {
    # PyCIL's CIFAR ResNet-32 (0.46M parameters, 64-d features, option-A shortcuts).
    "resnet32": Arch("resnet32", 16, 3, 1, False, ((16, 5, 1), (32, 5, 2), (64, 5, 2)), "A"),
    # ResNet-18 with a 3x3 stride-1 stem and no max-pool (the DER paper's CIFAR backbone).
    "resnet18_cifar": Arch(
        "resnet18_cifar", 64, 3, 1, False, ((64, 2, 1), (128, 2, 2), (256, 2, 2), (512, 2, 2)), "B"
    ),
    # Standard ImageNet ResNet-18.
    "resnet18": Arch(
        "resnet18", 64, 7, 2, True, ((64, 2, 1), (128, 2, 2), (256, 2, 2), (512, 2, 2)), "B"
    ),
}


def _points(arch: Arch) -> dict:
    """Full width of every mask point, in network order."""
    pts = {}
    for si, (planes, n_blocks, _) in enumerate(arch.stages):
        if si == 0 and arch.stem_channels != planes:
            raise ValueError("stem width must equal the first stage's width")
        pts[f"stream{si}"] = planes
        for bi in range(n_blocks):
            pts[f"inner{si}_{bi}"] = planes
    return pts


def conv_layers(arch: Arch) -> list:
    """Every conv as (module path, input mask point, output mask point, kernel area K).

    ``"input"`` is the image. Used by the sparsity loss and by pruning.
    """
    k = arch.stem_kernel
    layers = [("stem.conv", "input", "stream0", k * k)]
    for si, (_, n_blocks, _) in enumerate(arch.stages):
        for bi in range(n_blocks):
            src = f"stream{si - 1}" if (bi == 0 and si > 0) else f"stream{si}"
            path = f"stages.{si}.{bi}"
            layers.append((f"{path}.conv1", src, f"inner{si}_{bi}", 9))
            layers.append((f"{path}.conv2", f"inner{si}_{bi}", f"stream{si}", 9))
            if arch.shortcut == "B" and bi == 0 and (si > 0 or arch.stages[0][2] != 1):
                layers.append((f"{path}.sc_conv", src, f"stream{si}", 1))
    return layers


def gated_relu(x, g=None, residual=None):
    """``g * relu(x + residual)`` with a per-channel gate ``g`` (None = 1)."""
    if residual is not None:
        x = x + residual
    y = F.relu(x)
    if g is not None:
        y = y * g.view(1, -1, *([1] * (y.dim() - 2)))
    return y


class Block(nn.Module):
    def __init__(self, c_in, c_mid, c_out, stride, shortcut_conv):
        super().__init__()
        self.stride = stride
        self.conv1 = nn.Conv2d(c_in, c_mid, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_mid)
        self.conv2 = nn.Conv2d(c_mid, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        if shortcut_conv:
            self.sc_conv = nn.Conv2d(c_in, c_out, 1, stride, bias=False)
            self.sc_bn = nn.BatchNorm2d(c_out)
        else:
            self.sc_conv = None
            self.sc_bn = None


class MaskedResNet(nn.Module):
    """A ResNet feature extractor ``x [N, C_in, H, W] -> features [N, out_dim]``.

    Args:
        arch: a key of :data:`ARCHS` or an :class:`Arch`.
        in_channels: image channels (any number).
        masked: whether it carries learnable mask embeddings ``e`` (``mask_e``).
        kept: for a pruned network, the sorted original channel indices kept at each mask
            point (dict point -> LongTensor); default: every channel.
        mask_init: initial mask embeddings: a float ``b`` draws every ``e`` from U(0, b)
            (torch's global generator): all channels on, at spread-out margins, so that under
            sparsity pressure they turn off one by one rather than a whole layer at once; or
            a dict point -> tensor of per-channel initial values.
    """

    def __init__(self, arch="resnet32", in_channels=3, masked=False, kept=None,
                 mask_init=MASK_INIT):
        super().__init__()
        if isinstance(arch, str):
            if arch not in ARCHS:
                raise ValueError(f"unknown backbone {arch!r}; choose one of {sorted(ARCHS)}")
            arch = ARCHS[arch]
        if not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
        self.arch = arch
        self.in_channels = in_channels
        full = _points(arch)
        if kept is None:
            kept = {p: torch.arange(w) for p, w in full.items()}
        if set(kept) != set(full):
            raise ValueError(f"kept must name exactly the mask points {sorted(full)}")
        widths = {}
        for p, idx in kept.items():
            idx = torch.as_tensor(idx, dtype=torch.long).cpu()
            if idx.dim() != 1 or not 1 <= idx.numel() <= full[p] or (
                    idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all())) or \
                    int(idx.min()) < 0 or int(idx.max()) >= full[p]:
                raise ValueError(f"kept[{p!r}] must be 1..{full[p]} sorted distinct indices "
                                 f"in [0, {full[p]})")
            widths[p] = idx.numel()
            self.register_buffer(f"kept_{p}", idx.clone())
        self.full_widths = full
        self.widths = widths

        w0 = widths["stream0"]
        stem = nn.Module()
        stem.conv = nn.Conv2d(in_channels, w0, arch.stem_kernel, arch.stem_stride,
                              arch.stem_kernel // 2, bias=False)
        stem.bn = nn.BatchNorm2d(w0)
        self.stem = stem
        self.stages = nn.ModuleList()
        for si, (_, n_blocks, stride) in enumerate(arch.stages):
            blocks = nn.ModuleList()
            for bi in range(n_blocks):
                c_in = widths[f"stream{si - 1}" if (bi == 0 and si > 0) else f"stream{si}"]
                s = stride if bi == 0 else 1
                sc_conv = arch.shortcut == "B" and bi == 0 and (si > 0 or stride != 1)
                blocks.append(Block(c_in, widths[f"inner{si}_{bi}"], widths[f"stream{si}"], s,
                                    sc_conv))
            self.stages.append(blocks)
        self.mask_e = None
        if masked:
            init = mask_init if isinstance(mask_init, dict) else \
                {p: torch.rand(w) * float(mask_init) for p, w in widths.items()}
            self.mask_e = nn.ParameterDict(
                {p: nn.Parameter(torch.as_tensor(init[p], dtype=torch.float32).clone().cpu())
                 for p in widths})
        self.s = 1.0  # mask temperature, set by the trainer (masks.set_s)
        self.binary_masks = False  # use (e > 0) instead of sigmoid(s * e)
        self.reset_parameters()

    # ------------------------------------------------------------------ basics
    def reset_parameters(self):
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def out_dim(self) -> int:
        return self.widths[f"stream{len(self.arch.stages) - 1}"]

    @property
    def is_pruned(self) -> bool:
        return any(self.widths[p] != self.full_widths[p] for p in self.widths)

    def kept(self, point: str) -> torch.Tensor:
        return getattr(self, f"kept_{point}")

    @property
    def feature_point(self) -> str:
        """The mask point of the output features (the last stage's stream)."""
        return f"stream{len(self.arch.stages) - 1}"

    def min_on(self, point: str) -> int:
        """Fewest channels a mask point keeps when binarised (see :func:`binarize`):
        :data:`STREAM_FLOOR` of the full width on a residual stream, one on an inner point."""
        if point.startswith("stream"):
            return max(1, math.ceil(STREAM_FLOOR * self.full_widths[point]))
        return 1

    def binary_mask(self, point: str) -> torch.Tensor:
        """The binarised mask of a point (bool, local channels): ``e > 0``, at least
        :meth:`min_on` channels."""
        return binarize(self.mask_e[point].detach(), self.min_on(point))

    def gate(self, point: str):
        """The mask of a point: sigmoid(s * e), or the binary mask when binarised, None if
        unmasked."""
        if self.mask_e is None:
            return None
        e = self.mask_e[point]
        if self.binary_masks:
            return self.binary_mask(point).to(e.dtype)
        return torch.sigmoid(self.s * e)

    # ------------------------------------------------------------------ forward
    def _shortcut(self, blk: Block, x, si: int, bi: int):
        if blk.sc_conv is not None:
            return blk.sc_bn(blk.sc_conv(x))
        if bi > 0 or si == 0:
            return x
        # Option A: subsample, then channel j of the previous stage's stream feeds channel j of
        # this stage's stream; the appended channels are zero. With pruned streams this is a
        # gather through the kept index lists (-> zero where the source channel is gone).
        xs = x[:, :, :: blk.stride, :: blk.stride]
        idx = shortcut_a_index(self.kept(f"stream{si - 1}"), self.kept(f"stream{si}"))
        xs = torch.cat([xs, xs.new_zeros(xs.shape[0], 1, *xs.shape[2:])], 1)
        return xs.index_select(1, idx)

    def feature_map(self, x):
        """The last feature map [N, out_dim, h, w] (before global pooling)."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected input [N, {self.in_channels}, H, W], got {tuple(x.shape)}")
        y = gated_relu(self.stem.bn(self.stem.conv(x)), self.gate("stream0"))
        if self.arch.stem_maxpool:
            y = F.max_pool2d(y, 3, 2, 1)
        for si, blocks in enumerate(self.stages):
            g_stream = self.gate(f"stream{si}")
            for bi, blk in enumerate(blocks):
                h = gated_relu(blk.bn1(blk.conv1(y)), self.gate(f"inner{si}_{bi}"))
                y = gated_relu(blk.bn2(blk.conv2(h)), g_stream, self._shortcut(blk, y, si, bi))
        return y

    def forward(self, x):
        return self.feature_map(x).mean((2, 3))


def shortcut_a_index(kept_in: torch.Tensor, kept_out: torch.Tensor) -> torch.Tensor:
    """For each kept output channel of an option-A shortcut, the position of its source in the
    kept input channels, or ``len(kept_in)`` (a zero channel) when it has none."""
    # Option A maps original input channel j to original output channel j.
    match = kept_out[:, None] == kept_in[None, :]
    src = match.to(torch.int8).argmax(1)
    return torch.where(match.any(1), src, torch.full_like(src, kept_in.numel()))


def binarize(e: torch.Tensor, min_on: int = 1) -> torch.Tensor:
    """Binary mask of an embedding: sigmoid(s_max * e) > 0.5, i.e. e > 0, and at least
    ``min_on`` channels on (the largest e; ties by lower index), so no layer is ever removed
    entirely. No Python branch on tensor values, so torch.compile traces a binarised model
    without graph breaks."""
    m = e > 0
    k = min(max(1, int(min_on)), e.numel())
    return m | (floor_channels(e, k) & (m.sum() < k))


def floor_channels(e: torch.Tensor, min_on: int) -> torch.Tensor:
    """The channels :func:`binarize` keeps whatever their sign: the ``min_on`` largest ``e``
    (ties by lower index), as a bool mask."""
    k = min(max(1, int(min_on)), e.numel())
    top = torch.argsort(-e.detach().float(), stable=True)[:k]
    return torch.zeros(e.shape, dtype=torch.bool, device=e.device).scatter(0, top, True)


def make_backbone(name: str, in_channels: int = 3, masked: bool = False, **kw) -> MaskedResNet:
    return MaskedResNet(name, in_channels, masked=masked, **kw)
