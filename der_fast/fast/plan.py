"""How FastDERNet runs its frozen extractors: the plan choice and its thresholds.

Plans (``FastDERNet.frozen_plan``; :func:`resolve_frozen_plan` turns the setting into a
:class:`FrozenPlan` for a device and dtype, which is all the model reads):

- ``"measure"`` (``"auto"`` on CUDA): the fastest of the plans below that can run, each also
  as a CUDA graph on CUDA, timed on the first call per input shape and extractor structure
  and checked against ``loop`` (:mod:`~der_fast.fast.chooser`, :mod:`~der_fast.fast.graphs`);

- ``"loop"``: one folded extractor after the other, channels_last, oneDNN / cuDNN convs
  (:func:`~der_fast.fast.run_loop.run_folded`);
- ``"grouped"``: all folded extractors fused into one network (dense stem conv, grouped convs,
  narrower extractors zero-padded; :func:`~der_fast.fast.fold.fuse_grouped`), run like loop;
- ``"direct"`` (CPU, float32, no autograd, compiled extension): each extractor on the
  bordered executor (:func:`~der_fast.fast.run_bordered.run_bordered`). Under ``"auto"`` an
  extractor whose multiply-adds are mostly in wide convs runs ``loop`` instead.

Names: ``"direct"`` is only the plan's user-facing value (the setting, and how ``plan()``
reports a run). Everything the plan is made of says bordered: activations kept as
zero-bordered NCHW planes, the executor ``run_bordered`` (compiled as the op
``ops.bordered_resnet``), the kernel ``ops.conv3x3_bordered`` that a conv inside it runs when
:func:`use_kernel` (limits ``_BORDERED_S1_MAX`` / ``_BORDERED_S2_MAX``, else oneDNN), and
:attr:`FrozenPlan.bordered_ok`. "Narrow" is the rule that sends an extractor to the bordered
executor under "auto": 3x3 stride-1 convs with C_in * C_out <= ``_NARROW_MAX_CIN_COUT``;
:func:`narrow_share` is the share of multiply-adds in them.

The measurements behind each threshold: benchmarks/RESULTS.md ("The fast path's
thresholds" and the sections it points to).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import ops
from .fold import FoldedConv, FoldedNet, convs_with_size

FROZEN_PLANS = ("auto", "measure", "loop", "grouped", "direct")

# Plan under "auto" per device type. CPU: loop vs grouped, benchmarks/bench_model.py and
# scaling.py (fast_loop / fast_grouped; RESULTS.md "Quick grid" to "Scaling with t"); direct
# vs loop: RESULTS.md "The direct conv kernel"; "measure" is opt-in there until it is shown never
# slower than this static rule. CUDA: which plan wins depends on the card, so it is measured there.
_AUTO_PLAN = {"cpu": "direct", "cuda": "measure"}
# narrow: C_in * C_out of a 3x3 stride-1 conv (ad-hoc whole-extractor A/Bs, not a benchmarks/
# case: RESULTS.md, "The fast path's thresholds")
_NARROW_MAX_CIN_COUT = 700
# the kernel vs oneDNN inside the bordered executor, per stride:
# benchmarks/bench_conv3x3_bordered.py::test_conv3x3_bordered_choice
_BORDERED_S1_MAX = 2048
_BORDERED_S2_MAX = 720


def _is_3x3_s1(c: FoldedConv) -> bool:
    return (tuple(c.weight.shape[2:]) == (3, 3) and c.stride == 1 and c.padding == 1
            and c.groups == 1)


def _is_3x3_s2(c: FoldedConv) -> bool:
    return (tuple(c.weight.shape[2:]) == (3, 3) and c.stride == 2 and c.padding == 1
            and c.groups == 1)


def use_kernel(c: FoldedConv, force: bool) -> bool:
    """Whether the bordered executor runs this conv on the conv3x3_bordered kernel (else
    oneDNN on the bordered NCHW planes): 3x3 convs of stride 1 or 2 up to the widths where the
    kernel stops beating oneDNN on that layout (``force``: every 3x3 conv of stride 1 or 2)."""
    cc = c.weight.shape[0] * c.weight.shape[1]
    if _is_3x3_s2(c):
        return force or cc <= _BORDERED_S2_MAX
    if not _is_3x3_s1(c):
        return False
    return force or cc <= _BORDERED_S1_MAX


def _narrow(c: FoldedConv) -> bool:
    """3x3, stride 1, C_in * C_out <= _NARROW_MAX_CIN_COUT: the share of an extractor's
    multiply-adds in such convs decides between the bordered executor and the loop."""
    return _is_3x3_s1(c) and c.weight.shape[0] * c.weight.shape[1] <= _NARROW_MAX_CIN_COUT


def narrow_share(f: FoldedNet, hw: tuple = (32, 32)) -> float:
    """Share of a folded net's multiply-adds in narrow convs (the direct plan's rule under
    "auto": at least 0.5 runs the bordered executor)."""
    key = ("share", tuple(hw))
    if key in f.memo:
        return f.memo[key]
    tot = narrow = 0
    for c, n in convs_with_size(f, hw):
        macs = c.weight.numel() * n
        tot += macs
        if _narrow(c):
            narrow += macs
    f.memo[key] = narrow / max(tot, 1)
    return f.memo[key]


_BORDERED_ISA: list = []  # [isa], resolved on first use


def _bordered_isa() -> str:
    """The instruction set the conv3x3_bordered kernel was dispatched to ("avx512", "avx2",
    "baseline"), or "" without the compiled extension."""
    if not _BORDERED_ISA:
        _BORDERED_ISA.append(ops.conv3x3_isa() if ops.HAS_CPU_EXT else "")
    return _BORDERED_ISA[0]


@dataclass(frozen=True)
class FrozenPlan:
    """What a ``frozen_plan`` setting means on one device and dtype (built by
    :func:`resolve_frozen_plan`; FastDERNet keeps one per device and dtype).

    ``name``: ``"measure"``, ``"loop"``, ``"grouped"`` or ``"direct"``. ``forced``: the user
    set ``"direct"`` (every extractor on the bordered executor, the kernel for every 3x3 conv
    of stride 1 or 2); ``"direct"`` picked by ``"auto"`` sends only extractors with a narrow
    share of at least 0.5 there, and a conv to the kernel only within ``use_kernel``'s widths.
    ``bordered_ok``: the bordered executor can run here without autograd (CPU, float32,
    compiled kernel; its PyTorch fallback would be slower than the loop plan)."""

    name: str
    forced: bool
    bordered_ok: bool

    def runs(self, need_grad: bool) -> str:
        """The plan one frozen forward runs: ``"measure"`` and ``"direct"`` need no input
        gradient, ``"direct"`` also ``bordered_ok``; otherwise they run ``"loop"``."""
        if self.name == "measure":
            return "loop" if need_grad else "measure"
        if self.name == "direct" and (need_grad or not self.bordered_ok):
            return "loop"
        return self.name

    def runs_bordered(self, f: FoldedNet, hw: tuple) -> bool:
        """Under the direct plan, whether this extractor runs the bordered executor (else
        loop)."""
        return self.forced or narrow_share(f, hw) >= 0.5

    def describe(self, n_frozen: int, fused: bool) -> str:
        """The ``"frozen"`` entry of ``FastDERNet.plan()``: how frozen extractors run, in
        words."""
        if n_frozen == 0:
            return "none"
        plan = self.name
        if plan == "measure":
            return ("measured: the fastest plan that matches loop, timed on the first call per "
                    "(device, dtype, input shape, extractor structure); see frozen_choice")
        if plan == "direct" and self.bordered_ok:
            return ("direct: zero-bordered NCHW, der_fast conv3x3_bordered kernel for "
                    + ("every 3x3 conv (stride 1 or 2)" if self.forced else
                       f"3x3 convs with C_in*C_out <= {_BORDERED_S1_MAX} (stride 1) or "
                       f"<= {_BORDERED_S2_MAX} (stride 2)")
                    + ", oneDNN for the others"
                    + ("" if self.forced else "; extractors with less than half of their "
                       f"multiply-adds in narrow convs (3x3 stride 1, C_in*C_out <= "
                       f"{_NARROW_MAX_CIN_COUT}) run loop-channels_last + oneDNN fused "
                       "conv/bias/residual/ReLU")
                    + ("; each extractor in one compiled call (der_fast::bordered_resnet)"
                       if ops.HAS_BORDERED_RESNET else "; layer by layer from Python")
                    + "; BN and masks folded, off channels removed, no autograd")
        if plan == "direct":
            plan = "loop"
        frozen = ("loop-channels_last" if plan == "loop" or n_frozen < 2 else
                  "grouped-channels_last (dense stem conv + grouped convs, zero-padded)")
        frozen += " + oneDNN fused conv/bias/residual/ReLU" if fused else " + aten conv"
        return frozen + "; BN and masks folded, off channels removed, no autograd"


def resolve_frozen_plan(setting: str, device: torch.device, dtype: torch.dtype) -> FrozenPlan:
    """The :class:`FrozenPlan` a ``frozen_plan`` setting means on ``device`` for ``dtype``.
    ``"auto"``: ``_AUTO_PLAN`` per device type, where on CPU direct only if the kernel runs
    its AVX-512 build (its AVX2 build measured slower than oneDNN: RESULTS.md,
    "Frozen plan on this CPU")."""
    name = setting
    if setting == "auto":
        name = _AUTO_PLAN.get(device.type, "loop")
        if name == "direct" and _bordered_isa() != "avx512":
            name = "loop"
    bordered_ok = (device.type == "cpu" and dtype == torch.float32 and ops.HAS_CPU_EXT)
    return FrozenPlan(name, setting == "direct", bordered_ok)


def structure(f: FoldedNet) -> tuple:
    """The shapes that decide a folded net's speed (conv shapes, strides, groups, shortcuts,
    gates, output widths), for the measured plan's key."""
    if "structure" not in f.memo:
        def conv(c):
            return None if c is None else (tuple(c.weight.shape), c.stride, c.padding, c.groups)
        f.memo["structure"] = (
            conv(f.stem), f.maxpool, tuple(f.out_dims), f.out_index is not None,
            tuple((conv(b.conv1), conv(b.conv2), b.sc, conv(b.sc_conv), b.sc_stride,
                   b.gate is not None) for b in f.blocks))
    return f.memo["structure"]
