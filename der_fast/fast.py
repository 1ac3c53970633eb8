"""FastDERNet: DERNet's API and state, executed fast.

:class:`FastDERNet` *is* a :class:`~der_fast.reference.DERNet` (same modules, parameters,
buffers, ``state_dict``, optimiser-facing API); only how ``forward`` / ``extract_vector`` run
differs:

* **Frozen extractors** (every extractor in eval mode whose parameters need no gradient: the
  old ones in stage 1, all of them in stage 2 after ``freeze_conv``, and all of them under
  ``torch.no_grad()`` in eval mode) run an inference-only *plan*: BatchNorm folded into the
  conv weights and biases (folding done in float64), binary masks folded by removing the off
  channels for real (exact, see :mod:`der_fast.backbones`), soft gates folded into the conv
  where there is no residual, option-A shortcuts as index gathers, channels_last, no
  autograd. On CPU with oneDNN, conv + bias + ReLU and conv + bias + residual + ReLU run as
  single fused oneDNN primitives.
  Three ways to run several frozen extractors, picked per device (``frozen_plan="auto"``) or
  forced (``"loop"`` / ``"grouped"`` / ``"direct"``):

  - ``direct`` (the CPU default, float32): one folded network after the other with every
    activation kept as a zero-bordered NCHW tensor and 3x3 convs up to ~40 channels on
    der_fast's direct conv kernel (``ops.conv3x3_bordered``: ~3x oneDNN at 5 channels, see
    ``_AUTO_PLAN``), wider ones on oneDNN. The whole network runs in one call of the compiled
    executor ``der_fast::bordered_resnet`` (batch chunks that stay in L2, four reused buffers,
    no per-layer tensors or dispatch; ``run_bordered(..., executor=False)`` is the same
    computation layer by layer from Python). Under ``"auto"`` an extractor whose
    multiply-adds are mostly in wide convs (full-width ones) runs ``loop`` instead;
  - ``loop``: one folded network after the other;
  - ``grouped``: all of them as one network: the stems are one dense conv with the sum of
    the widths as outputs (they all read the same image), every later conv one grouped conv
    (narrower, pruned extractors zero-padded to the widest), and the pooled output gathered
    into the super-feature in one index op.

  The compiled plan is cached and rebuilt whenever it could be stale: a version counter
  bumped by ``update_fc`` / ``prune`` / ``load_state_dict`` / ``.to()`` / ``reset_fc`` /
  ``freeze_conv`` / ``invalidate_plan()``, the device and dtype, and, as a safety net, the
  ``data_ptr`` and ``_version`` of every parameter and buffer it was built from.
* **The trainable extractor** (the newest one in stage 1) runs with autograd in
  channels_last; every ``gate * relu(bn(x) [+ residual])`` point is PyTorch's native batch
  norm followed by one ``masked_gate`` op (gate + ReLU + residual add in one pass, with the
  gradient of ``e`` from the same pass). Folding BN's batch statistics into the op's
  scale/shift was measured slower on CPU (see :func:`_bn_affine`).
* **The head** (concat + classifier + auxiliary classifier) is one ``concat_linear_head`` op.

The custom ops come from :mod:`der_fast.ops` (imported lazily); when that module cannot be
imported, pure-PyTorch versions with the same semantics are used, and :meth:`FastDERNet.plan`
says so.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from . import masks as M
from .backbones import MaskedResNet, shortcut_a_index
from .reference import DERNet

__all__ = ["FROZEN_PLANS", "FastDERNet", "direct_share", "fold_extractor", "fuse_grouped",
           "run_bordered", "run_folded"]

FROZEN_PLANS = ("auto", "loop", "grouped", "direct")

# Default frozen plan per device type, from measurements. CPU (2-core Xeon, AVX-512, oneDNN
# 3.12, resnet32, batch 128, 32x32, t frozen extractors, forward, 1 thread, median of 5
# interleaved rounds, ms; loop / grouped, both with fused oneDNN conv+bias[+add]+ReLU):
#   t=2: 251 / 219 (tie within noise; min 178 / 160), t=5: 340 / 622, t=10: 742 / 1490;
# with 2 threads (min of 5 rounds, the machine was shared): t=2: 75 / 80, t=5: 192 / 319,
# t=10: 403 / 796. oneDNN's grouped conv with narrow groups is ~2x slower than separate
# convs. CUDA: not measured (no GPU was available); "loop" until someone measures.
#
# "direct" (CPU, float32): the zero-bordered executor (run_bordered) with der_fast's direct 3x3
# conv kernel on narrow layers. Per conv, oneDNN (fused, channels_last) vs the direct kernel,
# 1 thread, batch 128, conv + bias + residual + ReLU: 5->5 at 32x32: 1.86 / 0.63 ms (2.96x);
# 3->5: 3.1x; 10->8 at 16x16: 1.6x; 19->21 at 8x8: 1.16x; 16->16 at 32x32: 1.13x; 32->32 at
# 16x16: 0.63x; 64->64 at 8x8: 0.5x; 20->20: 1.2x at 16x16, 1.5x at 32x32; 24->24 at 8x8 and
# 16x16: 0.95x; 28->28 at 8x8: 0.75x. Under "auto" an extractor runs bordered when at least
# half of its multiply-adds are in narrow convs (_narrow: pruned extractors); otherwise it runs
# the channels_last loop.
#
# Inside the bordered executor the alternative to the kernel is oneDNN on NCHW bordered planes
# (layout reorders included), which the kernel beats on much wider convs. Kernel time / oneDNN
# time (benchmarks/bench_conv.py test_conv3x3_bordered_choice: 1 thread, conv + bias +
# residual + ReLU at the executor's ~1 MiB batch chunk, medians): stride 1: 19 -> 19 at 8x8
# 0.40, 32 -> 32 at 16x16 0.72, 40 -> 40 at 8x8 0.76, 48 -> 48 at 8x8 1.19, 64 -> 64 at 8x8
# 1.28 (at 16x16 0.86); stride 2 (16 -> 8 px): 10 -> 19 0.70, 19 -> 38 0.83, 32 -> 64 1.15.
# So a conv of a bordered extractor runs the kernel when C_in * C_out <= _BORDERED_S1_MAX
# (stride 1) or _BORDERED_S2_MAX (stride 2).
_AUTO_PLAN = {"cpu": "direct", "cuda": "loop"}
# "narrow" (counts toward an extractor's direct share): ad-hoc whole-extractor A/Bs in one
# process (not a benchmarks/ case; FastDERNet inference, resnet32, batch 128, 1 thread, 5
# rounds), bordered executor vs loop: channel density 0.3 (t = 2): 2.3x, 0.6 (t = 5): 1.45x,
# 0.8 (t = 5): 1.06x, 1.0 (16/32/64 channels): 0.99x at t = 2, 0.90x at t = 10. A threshold
# of 700 sends 0.6-density extractors (stage-2 convs ~19 -> 19) bordered and keeps full-width
# ones (32 -> 32) on loop.
_DIRECT_MAX_CIN_COUT = 700
_BORDERED_S1_MAX = 2048
_BORDERED_S2_MAX = 720

_BIG_LOGIT = 1.0e4  # sigmoid(+-1e4) is exactly 1 / 0 in fp16, bf16, fp32 and fp64


# ============================================================================ ops (lazy)
def _masked_gate_local(x, scale, shift, e=None, s=1.0, residual=None):
    """``sigmoid(s*e)[c] * relu(scale[c] * x + shift[c] + residual)`` (same semantics as
    ``der_fast.ops.masked_gate``), used only when :mod:`der_fast.ops` cannot be imported."""
    shp = (1, -1) + (1,) * (x.dim() - 2)
    y = x * scale.view(shp) + shift.view(shp)
    if residual is not None:
        y = y + residual
    y = F.relu(y)
    if e is not None:
        y = y * torch.sigmoid(s * e).view(shp)
    return y


def _concat_linear_head_local(feats, weight, bias, aux_weight=None, aux_bias=None):
    """Pooled features of every entry -> concat -> classifier (+ auxiliary classifier over the
    last entry). Same semantics as ``der_fast.ops.concat_linear_head``."""
    pooled = [f if f.dim() == 2 else f.mean(tuple(range(2, f.dim()))) for f in feats]
    features = torch.cat(pooled, 1) if len(pooled) > 1 else pooled[0]
    logits = F.linear(features, weight, bias)
    aux = F.linear(pooled[-1], aux_weight, aux_bias) if aux_weight is not None else None
    return logits, aux, features


_OPS = None


def _ops():
    """(masked_gate, concat_linear_head, description), resolved once per process."""
    global _OPS
    if _OPS is None:
        try:
            from . import ops as mod
        except Exception as exc:  # noqa: BLE001 - any import problem: use the local versions
            why = f"local pure-PyTorch fallback (der_fast.ops unavailable: {type(exc).__name__})"
            _OPS = (_masked_gate_local, _concat_linear_head_local, why)
        else:
            gate = getattr(mod, "masked_gate", None) or getattr(mod, "masked_gate_ref", None)
            head = getattr(mod, "concat_linear_head", None) or getattr(
                mod, "concat_linear_head_ref", None)
            desc = "der_fast.ops"
            if gate is None:
                gate, desc = _masked_gate_local, "local fallback"
            if head is None:
                head, desc = _concat_linear_head_local, "local fallback"
            _OPS = (gate, head, desc)
    return _OPS


# ============================================================================ folding
@dataclass
class _Conv:
    """A conv with BatchNorm (and possibly a non-negative gate) folded in."""
    weight: torch.Tensor  # [C_out, C_in / groups, k, k], channels_last
    bias: torch.Tensor  # [C_out]
    stride: int
    padding: int
    groups: int = 1
    # contiguous copy for the direct kernel, made on first use: the folded net is rebuilt
    # whenever the model changes; set it to None after editing ``weight`` in place yourself
    weight_nchw: torch.Tensor | None = None


@dataclass
class _Block:
    conv1: _Conv
    conv2: _Conv
    sc: str  # "id" | "A" | "B"
    sc_conv: _Conv | None = None
    sc_stride: int = 1
    sc_index: torch.Tensor | None = None  # A: per output channel, source position or C_in (0)
    sc_pad: int | None = None  # A: when the index is "identity then zeros", how many zeros
    gate: torch.Tensor | None = None  # soft stream gate, applied after the ReLU


@dataclass
class FoldedNet:
    """An inference-only extractor (or several fused ones): convs with BN folded in."""
    stem: _Conv
    maxpool: bool
    blocks: list
    out_index: torch.Tensor | None  # gather into [pooled, 0] -> features; None = identity
    out_dims: list  # feature width of every extractor it computes (full, unpruned width)
    n_nets: int = 1
    # per input size: derived plan facts (direct_share, batch chunk), computed once
    memo: dict = field(default_factory=dict, repr=False, compare=False)


def _fold_conv(conv, bn, rows, cols, gate, dtype, groups=1) -> _Conv:
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
    return _Conv(w, shift.to(dtype).contiguous(), conv.stride[0], conv.padding[0], groups)


def _a_shortcut_pad(idx: torch.Tensor, c_in: int):
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
                b = _Block(c1, c2, "B", _fold_conv(blk.sc_conv, blk.sc_bn, loc[dst], loc[src],
                                                   None, dtype), gate=g)
            elif bi > 0 or si == 0:
                b = _Block(c1, c2, "id", gate=g)
            else:
                idx = shortcut_a_index(kept[src], kept[dst]).to(dev)
                b = _Block(c1, c2, "A", sc_stride=blk.stride, sc_index=idx,
                           sc_pad=_a_shortcut_pad(idx, loc[src].numel()), gate=g)
            blocks.append(b)
    last = loc[f"stream{len(arch.stages) - 1}"]
    out_dim = net.out_dim
    out_index = None
    if last.numel() != out_dim:
        out_index = torch.full((out_dim,), last.numel(), dtype=torch.long, device=dev)
        out_index[last] = torch.arange(last.numel(), device=dev)
    return FoldedNet(stem, arch.stem_maxpool, blocks, out_index, [out_dim])


def _stack_convs(convs, dense_input: bool) -> _Conv:
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
    return _Conv(w.contiguous(memory_format=torch.channels_last), b, convs[0].stride,
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
            blk = _Block(c1, c2, "B", _stack_convs([b.sc_conv for b in bs], False), gate=gate)
        elif kind == "id":
            blk = _Block(c1, c2, "id", gate=gate)
        else:
            ci = c1.weight.shape[1]  # padded input width of the block
            zero = t * ci
            idx = torch.full((t * co,), zero, dtype=torch.long, device=dev)
            for i, b in enumerate(bs):
                n_in = b.conv1.weight.shape[1]
                src = b.sc_index
                idx[i * co:i * co + src.numel()] = torch.where(src < n_in, src + i * ci,
                                                               torch.full_like(src, zero))
            blk = _Block(c1, c2, "A", sc_stride=bs[0].sc_stride, sc_index=idx, gate=gate)
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


# ============================================================================ executing
def _mkldnn_ok(x: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn,
                                                                 "_convolution_pointwise"))


def _conv(x, c: _Conv, relu: bool, residual=None, fused: bool = False):
    """``[relu](conv(x) + bias [+ residual])``; one oneDNN primitive when ``fused``."""
    if fused:
        p, s = [c.padding, c.padding], [c.stride, c.stride]
        if residual is None:
            return torch.ops.mkldnn._convolution_pointwise(
                x, c.weight, c.bias, p, s, [1, 1], c.groups, "relu" if relu else "none", [], "")
        residual = residual.contiguous(memory_format=torch.channels_last)
        return torch.ops.mkldnn._convolution_pointwise.binary(
            x, residual, c.weight, c.bias, p, s, [1, 1], c.groups, "add", None,
            "relu" if relu else None, [], "")
    y = F.conv2d(x, c.weight, c.bias, c.stride, c.padding, 1, c.groups)
    if residual is not None:
        y = y + residual if torch.is_grad_enabled() else y.add_(residual)
    if relu:
        y = F.relu(y) if torch.is_grad_enabled() else y.relu_()
    return y


def _shortcut_a(y, b: _Block):
    xs = y[:, :, ::b.sc_stride, ::b.sc_stride]
    if b.sc_pad is not None:
        return F.pad(xs, (0, 0, 0, 0, 0, b.sc_pad))
    zero = xs.new_zeros(xs.shape[0], 1, *xs.shape[2:])
    return torch.cat([xs, zero], 1).index_select(1, b.sc_index)


def run_folded(f: FoldedNet, x: torch.Tensor, fused: bool | None = None) -> torch.Tensor:
    """Features [N, sum(out_dims)] of a folded (possibly fused) network.

    The input is not converted to channels_last: with channels_last weights the stem conv
    reads NCHW directly and writes channels_last (measured faster than converting first,
    1.40 vs 1.74 ms for the resnet32 stem at batch 128, and no extra copy of the batch)."""
    if fused is None:
        fused = _mkldnn_ok(x) and not (torch.is_grad_enabled() and x.requires_grad)
    y = _conv(x, f.stem, True, fused=fused)
    if f.maxpool:
        y = F.max_pool2d(y, 3, 2, 1)
    for b in f.blocks:
        h = _conv(y, b.conv1, True, fused=fused)
        if b.sc == "id":
            r = y
        elif b.sc == "B":
            r = _conv(y, b.sc_conv, False, fused=fused)
        else:
            r = _shortcut_a(y, b)
        y = _conv(h, b.conv2, True, residual=r, fused=fused)
        if b.gate is not None:
            y = y * b.gate.view(1, -1, 1, 1)
    pooled = y.mean((2, 3))
    if f.out_index is not None:
        pooled = torch.cat([pooled, pooled.new_zeros(pooled.shape[0], 1)], 1).index_select(
            1, f.out_index)
    return pooled


_DIRECT_OP: list = []  # [op or None], resolved on first use


def _direct_op():
    """der_fast.ops.conv3x3_bordered, or None where the compiled kernel is unavailable (its
    pure-PyTorch fallback would be slower than the loop plan). Resolved once per process."""
    if not _DIRECT_OP:
        _DIRECT_OP.append(_resolve_direct_op())
    return _DIRECT_OP[0]


def _direct_isa() -> str:
    """The instruction set the direct kernel was dispatched to ("avx512", "avx2",
    "baseline"), or "" where it is unavailable."""
    if not _DIRECT_ISA:
        isa = ""
        if _direct_op() is not None:
            try:
                from . import ops as mod

                isa = mod.conv3x3_isa()
            except Exception:  # noqa: BLE001
                isa = ""
        _DIRECT_ISA.append(isa)
    return _DIRECT_ISA[0]


_DIRECT_ISA: list = []


def _resolve_direct_op():
    try:
        from . import ops as mod
    except Exception:  # noqa: BLE001
        return None
    fn = getattr(mod, "conv3x3_bordered", None)
    if fn is None or not getattr(mod, "HAS_CPU_EXT", False):
        return None
    try:
        torch.ops.der_fast.conv3x3_bordered  # noqa: B018 - an old build may lack the op
    except (AttributeError, RuntimeError):
        return None
    return fn


def _is_3x3_s1(c: _Conv) -> bool:
    return (tuple(c.weight.shape[2:]) == (3, 3) and c.stride == 1 and c.padding == 1
            and c.groups == 1)


def _is_3x3_s2(c: _Conv) -> bool:
    return (tuple(c.weight.shape[2:]) == (3, 3) and c.stride == 2 and c.padding == 1
            and c.groups == 1)


def _use_direct(c: _Conv, force: bool) -> bool:
    """Whether the bordered executor runs this conv on the direct kernel (else oneDNN on the
    bordered NCHW planes): 3x3 convs of stride 1 or 2 up to the widths where the kernel stops
    beating oneDNN on that layout (``force``: every 3x3 conv of stride 1 or 2)."""
    cc = c.weight.shape[0] * c.weight.shape[1]
    if _is_3x3_s2(c):
        return force or cc <= _BORDERED_S2_MAX
    if not _is_3x3_s1(c):
        return False
    return force or cc <= _BORDERED_S1_MAX


def _narrow(c: _Conv) -> bool:
    """3x3, stride 1, C_in * C_out <= _DIRECT_MAX_CIN_COUT: the share of an extractor's
    multiply-adds in such convs decides between the bordered executor and the channels_last
    loop (see the comment at _DIRECT_MAX_CIN_COUT)."""
    return _is_3x3_s1(c) and c.weight.shape[0] * c.weight.shape[1] <= _DIRECT_MAX_CIN_COUT


def _convs_with_size(f: FoldedNet, hw: tuple) -> list:
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


def direct_share(f: FoldedNet, hw: tuple = (32, 32)) -> float:
    """Share of a folded net's multiply-adds that the direct kernel would run under "auto"."""
    key = ("share", tuple(hw))
    if key in f.memo:
        return f.memo[key]
    tot = dire = 0
    for c, n in _convs_with_size(f, hw):
        macs = c.weight.numel() * n
        tot += macs
        if _narrow(c):
            dire += macs
    f.memo[key] = dire / max(tot, 1)
    return f.memo[key]


def _conv_bordered(xb, c: _Conv, relu: bool, residual=None, gate=None, force=False):
    """``gate * [relu](conv(x) + bias [+ residual])`` from and to the zero-bordered layout."""
    if _use_direct(c, force):
        if c.weight_nchw is None:
            c.weight_nchw = c.weight.contiguous()
        return _direct_op()(xb, c.weight_nchw, c.bias, residual, gate, relu, c.stride)
    # oneDNN / aten: the border is the conv's padding (or the interior, for padding 0)
    if c.padding >= 1:
        y = F.conv2d(xb, c.weight, c.bias, c.stride, c.padding - 1, 1, c.groups)
    else:
        y = F.conv2d(xb[:, :, 1:-1, 1:-1], c.weight, c.bias, c.stride, 0, 1, c.groups)
    if residual is not None:
        y = y.add_(residual[:, :, 1:-1, 1:-1])
    if relu:
        y = y.relu_()
    if gate is not None:
        y = y.mul_(gate.view(1, -1, 1, 1))
    return F.pad(y, (1, 1, 1, 1)).contiguous()


# Batch chunk of the bordered executor: narrow layers are memory-bound (a 5 -> 5 channel conv
# at 32x32 moves 3 x 3 MiB per 128 images), so the batch is cut into chunks whose activations
# stay in the L2 cache through the whole network. Per image and 5 -> 5 conv + residual + ReLU,
# 1 thread: 5.6 us at N = 128, 3.6-3.8 us at N = 8..32, 4.3 us at N = 4 (call overhead).
_CHUNK_BYTES = 1 << 20  # target bytes of the widest activation of one chunk
_CHUNK_MIN = 8


def _bordered_chunk(f: FoldedNet, x: torch.Tensor) -> int:
    key = ("chunk", tuple(x.shape[2:]), x.element_size())
    if key in f.memo:
        return f.memo[key]
    widest = 0
    for c, hw in _convs_with_size(f, tuple(x.shape[2:])):  # (h+2)(w+2) <= hw + 4 sqrt(hw) + 4
        bordered = hw + 4 * int(hw ** 0.5 + 1) + 4
        widest = max(widest, c.weight.shape[0] * bordered * x.element_size())
    f.memo[key] = max(_CHUNK_MIN, _CHUNK_BYTES // max(widest, 1))
    return f.memo[key]


def run_bordered(f: FoldedNet, x: torch.Tensor, force: bool = False,
                 chunk: int | None = None, executor: bool | None = None) -> torch.Tensor:
    """Features [N, sum(out_dims)] of a folded network, every activation kept as a
    zero-bordered NCHW tensor [N, C, H + 2, W + 2] so that narrow 3x3 convs run the direct
    kernel (``der_fast.ops.conv3x3_bordered``) with no padding copies; other convs run
    oneDNN on the same tensors. ``force``: the direct kernel for every 3x3 / stride 1 conv,
    whatever its width. ``chunk``: images per pass (default: as many as keep the widest
    activation within ~1 MiB, so a pass stays in the L2 cache; 0 = the whole batch at once).
    ``executor``: run the whole network in one call of the compiled executor
    (``der_fast::bordered_resnet``: same kernels, no per-layer tensors or dispatch; the
    default where the extension has it), or (False) layer by layer from Python.
    CPU, float32, no autograd."""
    if _direct_op() is None:
        raise RuntimeError("run_bordered needs der_fast's compiled CPU extension (der_fast._C, "
                           "with the conv3x3_bordered kernel); use run_folded without it")
    chunk = _bordered_chunk(f, x) if chunk is None else chunk
    exe = _executor_op() if executor is None else (_executor_op() if executor else None)
    if executor and exe is None:
        raise RuntimeError("this build of der_fast._C has no bordered_resnet executor")
    if exe is not None:
        prog = _bordered_program(f, force)
        return exe(x.contiguous(), *prog, chunk)
    if 0 < chunk < x.shape[0]:
        return torch.cat([_run_bordered(f, xc, force) for xc in x.split(chunk)], 0)
    return _run_bordered(f, x, force)


_EXECUTOR_OP: list = []  # [op or None], resolved on first use


def _executor_op():
    """torch.ops.der_fast.bordered_resnet, or None where the extension lacks it."""
    if not _EXECUTOR_OP:
        op = None
        if _direct_op() is not None:
            try:
                op = torch.ops.der_fast.bordered_resnet
            except (AttributeError, RuntimeError):
                op = None
        _EXECUTOR_OP.append(op)
    return _EXECUTOR_OP[0]


def _bordered_program(f: FoldedNet, force: bool) -> tuple:
    """The arguments of ``der_fast::bordered_resnet`` for a folded net (memoized): convs in the
    order stem, then per block conv1, conv2 [, shortcut conv], each with (stride, padding,
    groups, direct kernel?) chosen by the same rule as the Python executor (_use_direct)."""
    key = ("program", force)
    if key in f.memo:
        return f.memo[key]
    empty = f.stem.bias.new_empty(0)
    weights, biases, meta, blocks, idx, gates = [], [], [], [], [], []

    def add(c: _Conv) -> None:
        direct = _use_direct(c, force)
        if direct and c.weight_nchw is None:
            c.weight_nchw = c.weight.contiguous()
        weights.append(c.weight_nchw if direct else c.weight)
        biases.append(c.bias)
        meta.extend([c.stride, c.padding, c.groups, int(direct)])

    add(f.stem)
    for b in f.blocks:
        add(b.conv1)
        add(b.conv2)
        if b.sc == "B":
            add(b.sc_conv)
        blocks.extend([{"id": 0, "A": 1, "B": 2}[b.sc], b.sc_stride])
        idx.append(b.sc_index if b.sc == "A" else empty.long())
        gates.append(b.gate if b.gate is not None else empty)
    last = f.blocks[-1].conv2 if f.blocks else f.stem
    out_dim = sum(f.out_dims) if f.out_index is not None else last.weight.shape[0]
    prog = (weights, biases, meta, blocks, idx, gates, f.out_index, int(out_dim), f.maxpool)
    f.memo[key] = prog
    return prog


def _run_bordered(f: FoldedNet, x: torch.Tensor, force: bool) -> torch.Tensor:
    xb = F.pad(x, (1, 1, 1, 1)).contiguous()
    y = _conv_bordered(xb, f.stem, True, force=force)
    if f.maxpool:
        y = F.pad(F.max_pool2d(y[:, :, 1:-1, 1:-1], 3, 2, 1), (1, 1, 1, 1)).contiguous()
    for b in f.blocks:
        h = _conv_bordered(y, b.conv1, True, force=force)
        if b.sc == "id":
            r = y
        elif b.sc == "B":
            r = _conv_bordered(y, b.sc_conv, False, force=force)
        else:
            r = F.pad(_shortcut_a(y[:, :, 1:-1, 1:-1], b), (1, 1, 1, 1)).contiguous()
        y = _conv_bordered(h, b.conv2, True, residual=r, gate=b.gate, force=force)
    hw = (y.shape[2] - 2) * (y.shape[3] - 2)
    pooled = y.sum((2, 3)).div_(hw)  # the border is 0
    if f.out_index is not None:
        pooled = torch.cat([pooled, pooled.new_zeros(pooled.shape[0], 1)], 1).index_select(
            1, f.out_index)
    return pooled


# ============================================================================ trainable path
def _bn_affine(bn: nn.BatchNorm2d, z: torch.Tensor):
    """``(x, scale, shift)`` for ``masked_gate``: ``x = bn(z)`` by PyTorch's native batch
    norm (train mode: batch statistics, running statistics updated exactly like
    ``nn.BatchNorm2d``; eval mode: running statistics) and an identity affine.

    Measured alternatives, both rejected:

    * batch mean/var by ``torch.var_mean`` with autograd, folded into ``scale``/``shift`` of
      the op: on CPU ``var_mean`` over (N, H, W) alone costs ~3x a whole native BN forward
      (23.5 vs 8.0 ms at 128x16x32x32, 1 thread) and its backward adds 4 elementwise passes:
      a resnet32 stage-1 step got slower than the reference (2.95 s vs 2.28 s).
    * eval mode with BN's affine folded into ``scale``/``shift``: a pre-activation rounds
      differently from the reference's ``bn(z)``, so a ReLU input within rounding of 0 can
      land on the other side (seen in the tests). Identical ``bn(z)`` keeps the fast model's
      ReLU masks those of the reference; eval mode with gradients is not a hot path.
    """
    ones = torch.ones(z.shape[1], dtype=z.dtype, device=z.device)
    return bn(z), ones, torch.zeros_like(ones)


def _gate_args(net: MaskedResNet, point: str):
    """``(e, s)`` for ``masked_gate`` so that its gate equals ``net.gate(point)``."""
    if net.mask_e is None:
        return None, 1.0
    e = net.mask_e[point]
    if net.binary_masks:  # (e > 0) as sigmoid(+-big): exactly 1 / 0, no gradient to e
        return (net.binary_mask(point).to(e.dtype) * 2 - 1) * _BIG_LOGIT, 1.0
    return e, float(net.s)


def _trainable_shortcut(net: MaskedResNet, blk, y, si: int, bi: int):
    """``net._shortcut`` with the common option-A case (every input channel kept, the new
    ones zero) as a pad instead of a gather (its backward, index_add_, is slow in
    channels_last)."""
    if blk.sc_conv is None and bi == 0 and si > 0:
        idx = shortcut_a_index(net.kept(f"stream{si - 1}"), net.kept(f"stream{si}"))
        pad = _a_shortcut_pad(idx, net.kept(f"stream{si - 1}").numel())
        if pad is not None:
            return F.pad(y[:, :, ::blk.stride, ::blk.stride], (0, 0, 0, 0, 0, pad))
    return net._shortcut(blk, y, si, bi)


def trainable_feature_map(net: MaskedResNet, x: torch.Tensor) -> torch.Tensor:
    """The last feature map of one extractor, with autograd, through ``masked_gate``."""
    gate = _ops()[0]
    stem = net.stem
    z = F.conv2d(x, stem.conv.weight, None, stem.conv.stride, stem.conv.padding)
    z, scale, shift = _bn_affine(stem.bn, z)
    e, s = _gate_args(net, "stream0")
    y = gate(z, scale, shift, e=e, s=s)
    if net.arch.stem_maxpool:
        y = F.max_pool2d(y, 3, 2, 1)
    for si, blocks in enumerate(net.stages):
        e_stream, s_stream = _gate_args(net, f"stream{si}")
        for bi, blk in enumerate(blocks):
            z = F.conv2d(y, blk.conv1.weight, None, blk.conv1.stride, blk.conv1.padding)
            z, scale, shift = _bn_affine(blk.bn1, z)
            e, s = _gate_args(net, f"inner{si}_{bi}")
            h = gate(z, scale, shift, e=e, s=s)
            r = _trainable_shortcut(net, blk, y, si, bi)
            z = F.conv2d(h, blk.conv2.weight, None, blk.conv2.stride, blk.conv2.padding)
            z, scale, shift = _bn_affine(blk.bn2, z)
            y = gate(z, scale, shift, e=e_stream, s=s_stream, residual=r)
    return y


# ============================================================================ the model
def _net_key(net: MaskedResNet) -> tuple:
    """Everything a folded extractor depends on (the cache's safety net)."""
    soft = net.mask_e is not None and not net.binary_masks
    return (id(net), float(net.s) if soft else None, bool(net.binary_masks),
            tuple((t.data_ptr(), t._version) for t in (*net.parameters(), *net.buffers())))


class FastDERNet(DERNet):
    """:class:`~der_fast.reference.DERNet` with fast execution (module doc).

    Same constructor arguments as DERNet plus:

    Args:
        frozen_plan: how frozen extractors run: ``"auto"`` (fastest measured plan for the
            device: ``"direct"`` on CPU, ``"loop"`` on CUDA), ``"loop"`` (one folded extractor
            after the other, oneDNN/cuDNN convs), ``"grouped"`` (all fused into dense-stem +
            grouped convs) or ``"direct"`` (the direct 3x3 kernel for every 3x3 conv; CPU
            float32 only, elsewhere it runs ``"loop"``). Also settable as an attribute.
        onednn_fusion: on CPU (fp32 / bf16), run the frozen convs as fused oneDNN
            conv + bias [+ residual] + ReLU primitives.
    """

    def __init__(self, backbone="resnet32", in_channels: int = 3, use_masks: bool = True,
                 mask_init: float = M.MASK_INIT, pretrained: bool = False,
                 frozen_plan: str = "auto",
                 onednn_fusion: bool = True):
        super().__init__(backbone, in_channels, use_masks, mask_init, pretrained)
        self._init_fast(frozen_plan, onednn_fusion)

    def _init_fast(self, frozen_plan="auto", onednn_fusion=True):
        self._plan_version = 0
        self._plan_cache = {"nets": {}, "group": None}
        self.frozen_plan = frozen_plan
        self.onednn_fusion = bool(onednn_fusion)
        self.trainable_channels_last = True

    # ------------------------------------------------------------------ conversion
    @classmethod
    def from_reference(cls, net: DERNet, frozen_plan: str = "auto",
                       onednn_fusion: bool = True) -> FastDERNet:
        """A FastDERNet copy of ``net``: same modules, weights, buffers, masks, ``s``, train /
        eval modes, ``requires_grad`` flags, device and dtype (nothing is shared)."""
        if not isinstance(net, DERNet):
            raise TypeError(f"expected a DERNet, got {type(net).__name__}")
        fast = copy.deepcopy(net)
        fast.__class__ = cls
        fast._init_fast(frozen_plan, onednn_fusion)
        return fast

    def to_reference(self) -> DERNet:
        """A plain :class:`DERNet` copy of this model (same state, modes and flags)."""
        ref = copy.deepcopy(self)
        for name in ("_plan_version", "_plan_cache", "_frozen_plan", "_last_frozen_run",
                     "onednn_fusion",
                     "trainable_channels_last"):
            ref.__dict__.pop(name, None)
        ref.__class__ = DERNet
        return ref

    def __getstate__(self):  # deepcopy / pickle: never carry the compiled plan
        state = dict(super().__getstate__())
        state["_plan_cache"] = {"nets": {}, "group": None}
        return state

    # ------------------------------------------------------------------ plan cache
    @property
    def frozen_plan(self) -> str:
        return self._frozen_plan

    @frozen_plan.setter
    def frozen_plan(self, value: str) -> None:
        if value not in FROZEN_PLANS:
            raise ValueError(f"frozen_plan must be one of {FROZEN_PLANS}, got {value!r}")
        self._frozen_plan = value
        self.invalidate_plan()

    def invalidate_plan(self) -> None:
        """Drop the compiled frozen plan (rebuilt on the next forward). Called by every method
        that changes the model; call it yourself after modifying weights through ``.data``."""
        self._plan_version = getattr(self, "_plan_version", 0) + 1
        self._plan_cache = {"nets": {}, "group": None}

    def update_fc(self, nb_classes: int) -> None:
        super().update_fc(nb_classes)
        self.invalidate_plan()

    def prune(self) -> dict:
        out = super().prune()
        self.invalidate_plan()
        return out

    def reset_fc(self) -> None:
        super().reset_fc()
        self.invalidate_plan()

    def freeze_conv(self):
        super().freeze_conv()
        self.invalidate_plan()
        return self

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        out = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self.invalidate_plan()
        return out

    def _apply(self, fn, recurse=True):  # .to(), .double(), .cuda(), ...
        out = super()._apply(fn, recurse)
        if hasattr(self, "_plan_cache"):
            self.invalidate_plan()
        return out

    def resolved_frozen_plan(self, device=None) -> str:
        """``"loop"``, ``"grouped"`` or ``"direct"``: the frozen plan used on ``device``
        (``"direct"`` falls back to ``"loop"`` per call where it cannot run: not CPU float32,
        an input gradient needed, or the op not built)."""
        if self.frozen_plan != "auto":
            return self.frozen_plan
        device = torch.device(device) if device is not None else self._device_dtype()[0]
        plan = _AUTO_PLAN.get(device.type, "loop")
        if plan == "direct" and _direct_isa() != "avx512":
            plan = "loop"  # the kernel's AVX2 build measured slower than oneDNN (RESULTS.md)
        return plan

    @staticmethod
    def _direct_possible(device: torch.device, dtype: torch.dtype, need_grad: bool) -> bool:
        """The direct-conv executor's conditions: CPU, float32, no autograd, op built."""
        return (device.type == "cpu" and dtype == torch.float32 and not need_grad
                and _direct_op() is not None)

    @staticmethod
    def _inferable(net: MaskedResNet, grad_enabled: bool) -> bool:
        """Whether an extractor can run the inference-only path: eval mode and no gradient
        needed for its parameters."""
        if net.training:
            return False
        return not grad_enabled or not any(p.requires_grad for p in net.parameters())

    def _folded(self, net: MaskedResNet) -> FoldedNet:
        key = (self._plan_version, _net_key(net))
        hit = self._plan_cache["nets"].get(id(net))
        if hit is not None and hit[0] == key:
            return hit[1]
        f = fold_extractor(net)
        self._plan_cache["nets"][id(net)] = (key, f)
        return f

    def _frozen_net(self, nets: list, plan: str) -> list:
        """Folded networks to run, in order (one per extractor, or one fused group)."""
        alive = {id(n) for n in self.convnets}
        cache = self._plan_cache["nets"]
        for k in [k for k in cache if k not in alive]:
            del cache[k]
        folded = [self._folded(n) for n in nets]
        if plan in ("loop", "direct") or len(nets) == 1:
            self._plan_cache["group"] = None
            return folded
        key = (self._plan_version, tuple(id(f) for f in folded))
        hit = self._plan_cache["group"]
        if hit is not None and hit[0] == key:
            return [hit[1]]
        g = fuse_grouped(folded)
        self._plan_cache["group"] = (key, g)
        return [g]

    def _run_frozen(self, nets: list, x: torch.Tensor) -> torch.Tensor:
        """Super-feature slice [N, sum out_dim] of frozen extractors (no autograd unless x
        needs a gradient)."""
        plan = self.resolved_frozen_plan(x.device)
        need_grad = torch.is_grad_enabled() and x.requires_grad
        if plan == "direct" and not self._direct_possible(x.device, x.dtype, need_grad):
            plan = "loop"
        with torch.set_grad_enabled(need_grad):
            folded = self._frozen_net(nets, plan)
            fused = self.onednn_fusion and not need_grad and _mkldnn_ok(x)
            outs, how = [], []
            for f in folded:
                if plan == "direct" and (self.frozen_plan == "direct"
                                         or direct_share(f, tuple(x.shape[2:])) >= 0.5):
                    outs.append(run_bordered(f, x, force=self.frozen_plan == "direct"))
                    how.append("direct")
                else:
                    outs.append(run_folded(f, x, fused=fused))
                    how.append("loop" if plan == "direct" else plan)
            self._last_frozen_run = how
        return outs[0] if len(outs) == 1 else torch.cat(outs, 1)

    # ------------------------------------------------------------------ forward
    def _check_input(self, x: torch.Tensor) -> None:
        if len(self.convnets) == 0:
            raise RuntimeError("call update_fc(n_classes) before using the model")
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected input [N, {self.in_channels}, H, W], got {tuple(x.shape)}")

    def _trainable_input(self, x: torch.Tensor) -> torch.Tensor:
        """channels_last for the autograd path where it measured faster (CPU: a resnet32
        stage-1 step at batch 128 took ~1.37 s vs ~1.73 s contiguous, 1 thread)."""
        if self.trainable_channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def _feature_list(self, x: torch.Tensor) -> list:
        """Per-extractor features in order, merged where consecutive frozen ones allow: pooled
        [N, C] for frozen ones, the last feature map [N, C, h, w] for trainable ones. The last
        extractor is always its own entry (the auxiliary classifier reads it)."""
        self._check_input(x)
        nets = list(self.convnets)
        grad = torch.is_grad_enabled()
        infer = [self._inferable(n, grad) for n in nets]
        frozen_idx = [i for i, f in enumerate(infer) if f]
        per_net = [None] * len(nets)
        if frozen_idx:
            u = self._run_frozen([nets[i] for i in frozen_idx], x)
            for i, piece in zip(frozen_idx, u.split([nets[i].out_dim for i in frozen_idx], 1)):
                per_net[i] = piece
            if frozen_idx == list(range(len(nets) - 1)) and len(nets) > 1:
                # stage 1: one frozen block, then the trainable extractor
                return [u, trainable_feature_map(nets[-1], self._trainable_input(x))]
            if len(frozen_idx) == len(nets) and len(nets) > 1:
                d = nets[-1].out_dim
                return [u[:, :-d], u[:, -d:]]  # stage 2 / eval
        for i, f in enumerate(infer):
            if not f:
                per_net[i] = trainable_feature_map(nets[i], self._trainable_input(x))
        return per_net

    def extract_vector(self, x: torch.Tensor) -> torch.Tensor:
        """The super-feature u = concat(F_1(x), ..., F_t(x))."""
        feats = self._feature_list(x)
        pooled = [f if f.dim() == 2 else f.mean((2, 3)) for f in feats]
        return pooled[0] if len(pooled) == 1 else torch.cat(pooled, 1)

    def forward(self, x: torch.Tensor) -> dict:
        feats = self._feature_list(x)
        head = _ops()[1]
        aux_w = aux_b = None
        if len(self.convnets) > 1:
            aux_w, aux_b = self.aux_fc.weight, self.aux_fc.bias
        logits, aux_logits, features = head(feats, self.fc.weight, self.fc.bias, aux_w, aux_b)
        if features.requires_grad and not any(f.requires_grad for f in feats):
            features = features.detach()  # as in the reference: frozen features need no grad
        return {"logits": logits, "aux_logits": aux_logits, "features": features}

    # ------------------------------------------------------------------ introspection
    def plan(self, grad_enabled: bool | None = None) -> dict:
        """What runs, in words: which extractors take the frozen inference path and how, the
        trainable path and the head, for the current train/eval modes (``grad_enabled``
        defaults to torch's current setting). For example, stage 1 on CPU::

            {"frozen": "direct: zero-bordered NCHW, der_fast conv3x3_bordered kernel for ...",
             "frozen_extractors": [0, 1], "frozen_last_run": ["direct", "loop"],
             "trainable_extractors": [2],
             "trainable": "native BatchNorm + masked_gate op (cpp (der_fast._C)), ...",
             "head": "concat_linear_head op (cpp (der_fast._C))", ...}
        """
        device, dtype = self._device_dtype()
        grad = torch.is_grad_enabled() if grad_enabled is None else grad_enabled
        infer = [self._inferable(n, grad) for n in self.convnets]
        frozen_idx = [i for i, f in enumerate(infer) if f]
        train_idx = [i for i, f in enumerate(infer) if not f]
        plan = self.resolved_frozen_plan(device)
        fused = self.onednn_fusion and _mkldnn_ok(torch.empty(0, device=device, dtype=dtype))
        if not frozen_idx:
            frozen = "none"
        elif plan == "direct" and self._direct_possible(device, dtype, False):
            force = self.frozen_plan == "direct"
            frozen = ("direct: zero-bordered NCHW, der_fast conv3x3_bordered kernel for "
                      + ("every 3x3 conv (stride 1 or 2)" if force else
                         f"3x3 convs with C_in*C_out <= {_BORDERED_S1_MAX} (stride 1) or "
                         f"<= {_BORDERED_S2_MAX} (stride 2)")
                      + ", oneDNN for the others"
                      + ("" if force else "; extractors with less than half of their "
                         f"multiply-adds in narrow convs (3x3 stride 1, C_in*C_out <= "
                         f"{_DIRECT_MAX_CIN_COUT}) run loop-channels_last + oneDNN fused "
                         "conv/bias/residual/ReLU")
                      + ("; each extractor in one compiled call (der_fast::bordered_resnet)"
                         if _executor_op() is not None else "; layer by layer from Python")
                      + "; BN and masks folded, off channels removed, no autograd")
        else:
            if plan == "direct":
                plan = "loop"
            frozen = ("loop-channels_last" if plan == "loop" or len(frozen_idx) < 2 else
                      "grouped-channels_last (dense stem conv + grouped convs, zero-padded)")
            frozen += (" + oneDNN fused conv/bias/residual/ReLU" if fused else " + aten conv")
            frozen += "; BN and masks folded, off channels removed, no autograd"
        trainable = "none"
        if train_idx:
            layout = "channels_last" if self.trainable_channels_last else "as given"
            trainable = (f"native BatchNorm + masked_gate op ({self._op_impl('masked_gate')})"
                         f", {layout}, autograd")
        return {
            "device": str(device), "dtype": str(dtype).replace("torch.", ""),
            "frozen_plan_setting": self.frozen_plan,
            "frozen": frozen, "frozen_extractors": frozen_idx,
            # per frozen extractor, how the last forward ran it ("direct" / "loop" / "grouped")
            "frozen_last_run": list(getattr(self, "_last_frozen_run", [])),
            "trainable": trainable, "trainable_extractors": train_idx,
            "head": f"concat_linear_head op ({self._op_impl('concat_linear_head')})",
        }

    def _op_impl(self, op: str) -> str:
        desc = _ops()[2]
        if desc != "der_fast.ops":
            return desc
        from . import ops as mod

        impl = getattr(mod, "implementation", None)
        return impl(op, self._device_dtype()[0]) if impl is not None else desc
