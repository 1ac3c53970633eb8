"""Folding: a trained extractor as an inference-only network (BatchNorm folded into the convs,
masks folded by removing off channels), and several folded extractors fused into one."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..backbones import MaskedResNet, shortcut_a_index


@dataclass
class FoldedConv:
    """A conv with BatchNorm (and possibly a non-negative gate) folded in."""
    weight: torch.Tensor  # [C_out, C_in / groups, k, k], channels_last
    bias: torch.Tensor  # [C_out]
    stride: int
    padding: int
    groups: int = 1
    # contiguous copy for the conv3x3_bordered kernel, made on first use: the folded net is
    # rebuilt whenever the model changes; set it to None after editing ``weight`` in place
    weight_nchw: torch.Tensor | None = None


@dataclass
class FoldedBlock:
    conv1: FoldedConv
    conv2: FoldedConv
    sc: str  # "id" | "A" | "B"
    sc_conv: FoldedConv | None = None
    sc_stride: int = 1
    sc_index: torch.Tensor | None = None  # A: per output channel, source position or C_in (0)
    sc_pad: int | None = None  # A: when the index is "identity then zeros", how many zeros
    gate: torch.Tensor | None = None  # soft stream gate, applied after the ReLU


@dataclass
class FoldedNet:
    """An inference-only extractor (or several fused ones): convs with BN folded in."""
    stem: FoldedConv
    maxpool: bool
    blocks: list
    out_index: torch.Tensor | None  # gather into [pooled, 0] -> features; None = identity
    out_dims: list  # feature width of every extractor it computes (full, unpruned width)
    n_nets: int = 1
    # per input size: derived plan facts (narrow_share, batch chunk), computed once
    memo: dict = field(default_factory=dict, repr=False, compare=False)


def _fold_conv(conv, bn, rows, cols, gate, dtype, groups=1) -> FoldedConv:
    """``gate * bn(conv(x))`` restricted to output channels ``rows`` and input channels
    ``cols``, as a conv with bias; computed in float64, stored in ``dtype``."""
    if bn.running_mean is None or bn.running_var is None:
        raise RuntimeError("cannot fold a BatchNorm without running statistics")
    fd = torch.float64 if conv.weight.device.type != "mps" else torch.float32
    w = conv.weight.detach().to(fd).index_select(0, rows).index_select(1, cols)
    inv = torch.rsqrt(bn.running_var.detach().to(fd).index_select(0, rows) + bn.eps)
    scale = inv * bn.weight.detach().to(fd).index_select(0, rows) if bn.weight is not None \
        else inv
    shift = -bn.running_mean.detach().to(fd).index_select(0, rows) * scale
    if bn.bias is not None:
        shift = shift + bn.bias.detach().to(fd).index_select(0, rows)
    if gate is not None:  # g * relu(z) == relu(g * z) for g >= 0
        scale = scale * gate
        shift = shift * gate
    w = (w * scale.view(-1, 1, 1, 1)).to(dtype).contiguous(memory_format=torch.channels_last)
    return FoldedConv(w, shift.to(dtype).contiguous(), conv.stride[0], conv.padding[0], groups)


def a_shortcut_pad(idx: torch.Tensor, c_in: int):
    """If an option-A index is ``0..c_in-1`` followed by zeros only, the number of zeros."""
    n = idx.numel()
    if n < c_in:
        return None
    ar = torch.arange(c_in, device=idx.device)
    if bool((idx[:c_in] == ar).all()) and bool((idx[c_in:] == c_in).all()):
        return n - c_in
    return None


def fold_extractor(net: MaskedResNet, dtype=None) -> FoldedNet:
    """The inference-only (eval-mode) version of one extractor.

    Binary masks (``binary_masks=True``) are folded by *removing* the off channels (exact:
    they are zero in the masked network); soft masks ``sigmoid(s*e)`` are folded into the
    stem / first conv of each block and applied after the ReLU on the residual stream.
    """
    dtype = dtype or next(net.parameters()).dtype
    arch = net.arch
    dev = net.stem.conv.weight.device
    masked = net.mask_e is not None
    soft = masked and not net.binary_masks
    if masked and net.binary_masks:
        loc = {p: torch.nonzero(net.binary_mask(p)).flatten().to(dev) for p in net.mask_e}
    else:
        loc = {p: torch.arange(w, device=dev) for p, w in net.widths.items()}
    loc["input"] = torch.arange(net.in_channels, device=dev)
    fd = torch.float64 if dev.type != "mps" else torch.float32
    gates = {p: torch.sigmoid(net.s * e.detach().to(fd)) for p, e in net.mask_e.items()} \
        if soft else {}
    kept = {p: net.kept(p).to(dev).index_select(0, loc[p]) for p in net.widths}

    stem = _fold_conv(net.stem.conv, net.stem.bn, loc["stream0"], loc["input"],
                      gates.get("stream0"), dtype)
    blocks = []
    for si, stage in enumerate(net.stages):
        dst = f"stream{si}"
        for bi, blk in enumerate(stage):
            src = f"stream{si - 1}" if (bi == 0 and si > 0) else dst
            inner = f"inner{si}_{bi}"
            c1 = _fold_conv(blk.conv1, blk.bn1, loc[inner], loc[src], gates.get(inner), dtype)
            c2 = _fold_conv(blk.conv2, blk.bn2, loc[dst], loc[inner], None, dtype)
            g = gates[dst].to(dtype) if dst in gates else None
            if blk.sc_conv is not None:
                b = FoldedBlock(c1, c2, "B", _fold_conv(blk.sc_conv, blk.sc_bn, loc[dst], loc[src],
                                                   None, dtype), gate=g)
            elif bi > 0 or si == 0:
                b = FoldedBlock(c1, c2, "id", gate=g)
            else:
                idx = shortcut_a_index(kept[src], kept[dst]).to(dev)
                b = FoldedBlock(c1, c2, "A", sc_stride=blk.stride, sc_index=idx,
                           sc_pad=a_shortcut_pad(idx, loc[src].numel()), gate=g)
            blocks.append(b)
    last = loc[f"stream{len(arch.stages) - 1}"]
    out_dim = net.out_dim
    out_index = None
    if last.numel() != out_dim:
        out_index = torch.full((out_dim,), last.numel(), dtype=torch.long, device=dev)
        out_index[last] = torch.arange(last.numel(), device=dev)
    return FoldedNet(stem, arch.stem_maxpool, blocks, out_index, [out_dim])


def _stack_convs(convs, dense_input: bool) -> FoldedConv:
    """Several convs reading the same (dense_input) or group-wise stacked inputs, as one conv
    with zero-padded groups."""
    t = len(convs)
    co = max(c.weight.shape[0] for c in convs)
    ci = max(c.weight.shape[1] for c in convs)
    k = convs[0].weight.shape[2:]
    w0 = convs[0].weight
    w = w0.new_zeros(t * co, ci, *k)
    b = w0.new_zeros(t * co)
    for i, c in enumerate(convs):
        o, n = c.weight.shape[:2]
        w[i * co:i * co + o, :n] = c.weight
        b[i * co:i * co + o] = c.bias
    return FoldedConv(w.contiguous(memory_format=torch.channels_last), b, convs[0].stride,
                 convs[0].padding, 1 if dense_input else t)


def fuse_grouped(nets: list) -> FoldedNet:
    """Several folded extractors of one architecture as one network (see module doc)."""
    if len(nets) == 1:
        return nets[0]
    t = len(nets)
    dev = nets[0].stem.weight.device
    stem = _stack_convs([f.stem for f in nets], dense_input=True)
    blocks = []
    for j in range(len(nets[0].blocks)):
        bs = [f.blocks[j] for f in nets]
        c1 = _stack_convs([b.conv1 for b in bs], dense_input=False)
        c2 = _stack_convs([b.conv2 for b in bs], dense_input=False)
        co = c2.weight.shape[0] // t
        gate = None
        if any(b.gate is not None for b in bs):
            gate = c2.bias.new_zeros(t * co)
            for i, b in enumerate(bs):
                n = b.conv2.weight.shape[0]
                gate[i * co:i * co + n] = b.gate if b.gate is not None else 1.0
        kind = bs[0].sc
        if kind == "B":
            blk = FoldedBlock(c1, c2, "B", _stack_convs([b.sc_conv for b in bs], False), gate=gate)
        elif kind == "id":
            blk = FoldedBlock(c1, c2, "id", gate=gate)
        else:
            ci = c1.weight.shape[1]  # padded input width of the block
            zero = t * ci
            idx = torch.full((t * co,), zero, dtype=torch.long, device=dev)
            for i, b in enumerate(bs):
                n_in = b.conv1.weight.shape[1]
                src = b.sc_index
                idx[i * co:i * co + src.numel()] = torch.where(src < n_in, src + i * ci,
                                                               torch.full_like(src, zero))
            blk = FoldedBlock(c1, c2, "A", sc_stride=bs[0].sc_stride, sc_index=idx, gate=gate)
        blocks.append(blk)
    wl = blocks[-1].conv2.weight.shape[0] // t
    pieces = []
    for i, f in enumerate(nets):
        d = f.out_dims[0]
        if f.out_index is None:
            pieces.append(torch.arange(d, device=dev) + i * wl)
        else:
            n = int(f.blocks[-1].conv2.weight.shape[0])
            pieces.append(torch.where(f.out_index < n, f.out_index + i * wl,
                                      torch.full_like(f.out_index, t * wl)))
    out_index = torch.cat(pieces)
    if out_index.numel() == t * wl and bool((out_index == torch.arange(t * wl, device=dev))
                                            .all()):
        out_index = None
    return FoldedNet(stem, nets[0].maxpool, blocks, out_index, [d for f in nets
                                                               for d in f.out_dims], t)


def convs_with_size(f: FoldedNet, hw: tuple) -> list:
    """(conv, output H*W) of every conv of a folded net, for an input of spatial size hw."""
    def out(h, c):
        k = c.weight.shape[2]
        return (h + 2 * c.padding - k) // c.stride + 1
    h, w = hw
    res = []
    h, w = out(h, f.stem), out(w, f.stem)
    res.append((f.stem, h * w))
    if f.maxpool:
        h, w = (h - 1) // 2 + 1, (w - 1) // 2 + 1
    for b in f.blocks:
        h, w = out(h, b.conv1), out(w, b.conv1)
        res.append((b.conv1, h * w))
        res.append((b.conv2, h * w))
        if b.sc_conv is not None:
            res.append((b.sc_conv, h * w))
    return res
