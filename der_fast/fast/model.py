"""FastDERNet: :class:`~der_fast.reference.DERNet`'s API and state, executed fast.

Same modules, parameters, buffers, ``state_dict`` and optimiser-facing API as DERNet; only
``forward`` / ``extract_vector`` run differently:

* **Frozen extractors** (eval mode, parameters needing no gradient: the old ones in stage 1,
  all of them in stage 2 after ``freeze_conv`` or under ``torch.no_grad()`` in eval mode) run
  folded (:mod:`.fold`: BatchNorm folded into the convs in float64, binary masks folded by
  removing the off channels, soft gates folded where there is no residual, no autograd) on
  the plan :mod:`.plan` picks: ``loop`` / ``grouped`` (:mod:`.run_loop`), ``direct``
  (:mod:`.run_bordered`), or ``measure``: the fastest of them (and of their CUDA graphs,
  :mod:`.graphs`) on the first call per input shape and structure (:mod:`.chooser`). The
  folded networks are cached and rebuilt whenever they could be stale: a version counter
  bumped by ``update_fc`` / ``prune`` / ``load_state_dict`` / ``.to()`` / ``reset_fc`` /
  ``freeze_conv`` / ``invalidate_plan()``, the device and dtype, and, as a safety net, the
  ``data_ptr`` and ``_version`` of every parameter and buffer.
* **The trainable extractor** (the newest one in stage 1) runs with autograd, in the input's
  layout (NCHW) unless ``trainable_channels_last``, every BatchNorm with its masked point
  (gate, ReLU, residual) one ``bn_gate`` op (:mod:`.trainable`).
* **The head** (concat + classifier + auxiliary classifier) is one ``concat_linear_head`` op.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch.nn.modules import module as nn_module

from .. import masks as M
from .. import ops
from ..backbones import MaskedResNet
from ..reference import DERNet
from . import chooser
from . import graphs as G
from . import plan as P
from .fold import FoldedNet, fold_extractor, fuse_grouped
from .plan import FROZEN_PLANS
from .run_bordered import run_bordered
from .run_loop import mkldnn_ok, run_folded
from .trainable import trainable_feature_map


def _empty_plan_cache() -> dict:
    """Folded extractors by id, the fused group, CUDA graphs by input shape, the resolved
    frozen plan by (device, dtype)."""
    return {"nets": {}, "group": None, "graphs": {}, "frozen_plans": {}}


def _autocast_dtype(x: torch.Tensor):
    """The dtype autocast would run ``x``'s convolutions in (bfloat16 / float16), or None
    where autocast is off or leaves ``x`` alone (only float32 inputs are cast)."""
    kind = x.device.type
    if x.dtype != torch.float32 or not torch.is_autocast_enabled(kind):
        return None
    low = torch.get_autocast_dtype(kind)
    return low if low in (torch.bfloat16, torch.float16) else None


def _net_key(net: MaskedResNet) -> tuple:
    """Everything a folded extractor depends on (the cache's safety net)."""
    soft = net.mask_e is not None and not net.binary_masks
    return (id(net), float(net.s) if soft else None, bool(net.binary_masks),
            tuple((t.data_ptr(), t._version) for t in (*net.parameters(), *net.buffers())))


class FastDERNet(DERNet):
    """:class:`~der_fast.reference.DERNet` with fast execution (module doc).

    Same constructor arguments as DERNet plus:

    Args:
        frozen_plan: how frozen extractors run: ``"auto"`` (``"direct"`` on CPU where its
            AVX-512 kernel runs, else ``"loop"``; ``"measure"`` on CUDA), ``"measure"`` (time
            the plans that can run, and on CUDA their CUDA graphs, on the first call per input
            shape and extractor structure; keep the fastest that matches ``"loop"``;
            ``plan()["frozen_choice"]`` shows the timings), ``"loop"`` (one folded extractor
            after the other, oneDNN/cuDNN convs), ``"grouped"`` (all fused into dense-stem +
            grouped convs) or ``"direct"`` (the bordered executor, the conv3x3_bordered
            kernel for every 3x3 conv; CPU float32 only, elsewhere it runs ``"loop"``).
            Also settable as an attribute.
        onednn_fusion: on CPU (fp32 / bf16), run the frozen convs as fused oneDNN
            conv + bias [+ residual] + ReLU primitives.
        trainable_channels_last: run the trainable extractor in channels_last (opt-in, also
            an attribute). Off by default: in float32 its gradients are up to ~25x farther
            from a float64 run than the NCHW reference's own (the NCHW path stays within 2x;
            benchmarks/RESULTS.md, "Exactness against float64").
    """

    def __init__(self, backbone="resnet32", in_channels: int = 3, use_masks: bool = True,
                 mask_init: float = M.MASK_INIT, pretrained: bool = False,
                 frozen_plan: str = "auto",
                 onednn_fusion: bool = True, trainable_channels_last: bool = False):
        super().__init__(backbone, in_channels, use_masks, mask_init, pretrained)
        self._init_fast(frozen_plan, onednn_fusion, trainable_channels_last)

    def _init_fast(self, frozen_plan="auto", onednn_fusion=True, trainable_channels_last=False):
        self._plan_version = 0
        self._plan_cache = _empty_plan_cache()
        self.frozen_plan = frozen_plan
        self.onednn_fusion = bool(onednn_fusion)
        self.trainable_channels_last = bool(trainable_channels_last)

    # ------------------------------------------------------------------ conversion
    @classmethod
    def from_reference(cls, net: DERNet, frozen_plan: str = "auto",
                       onednn_fusion: bool = True,
                       trainable_channels_last: bool = False) -> FastDERNet:
        """A FastDERNet copy of ``net``: same modules, weights, buffers, masks, ``s``, train /
        eval modes, ``requires_grad`` flags, device and dtype (nothing is shared)."""
        if not isinstance(net, DERNet):
            raise TypeError(f"expected a DERNet, got {type(net).__name__}")
        fast = copy.deepcopy(net)
        fast.__class__ = cls
        fast._init_fast(frozen_plan, onednn_fusion, trainable_channels_last)
        return fast

    def to_reference(self) -> DERNet:
        """A plain :class:`DERNet` copy of this model (same state, modes and flags)."""
        ref = copy.deepcopy(self)
        for name in ("_plan_version", "_plan_cache", "_frozen_plan", "_last_frozen_run",
                     "_last_choice", "onednn_fusion",
                     "trainable_channels_last"):
            ref.__dict__.pop(name, None)
        ref.__class__ = DERNet
        return ref

    def __getstate__(self):  # deepcopy / pickle: never carry the compiled plan
        state = dict(super().__getstate__())
        state["_plan_cache"] = _empty_plan_cache()
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
        self._plan_cache = _empty_plan_cache()

    def update_fc(self, nb_classes: int) -> None:
        super().update_fc(nb_classes)
        self.invalidate_plan()

    def prune(self, optimizer=None) -> dict:
        out = super().prune(optimizer)
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
        """``"measure"``, ``"loop"``, ``"grouped"`` or ``"direct"``: the frozen plan used on
        ``device`` (``"direct"`` falls back to ``"loop"`` per call where it cannot run: not CPU
        float32, an input gradient needed, or the op not built; so does ``"measure"`` where an
        input gradient is needed)."""
        model_device, dtype = self._device_dtype()
        return self._frozen_plan_on(model_device if device is None else device, dtype).name

    def _frozen_plan_on(self, device, dtype: torch.dtype) -> P.FrozenPlan:
        """What ``frozen_plan`` means on ``device`` for ``dtype``: resolved once per plan
        version (a new setting or any model change resolves it anew); every frozen forward,
        the measured plan's candidates and ``plan()`` read this one value."""
        key = (torch.device(device), dtype)
        resolved = self._plan_cache.setdefault("frozen_plans", {})
        if key not in resolved:
            resolved[key] = P.resolve_frozen_plan(self.frozen_plan, *key)
        return resolved[key]

    @staticmethod
    def _inferable(net: MaskedResNet, grad_enabled: bool) -> bool:
        """Whether an extractor can run the inference-only path: eval mode and no gradient
        needed for its parameters."""
        if net.training:
            return False
        return not grad_enabled or not any(p.requires_grad for p in net.parameters())

    def _folded(self, net: MaskedResNet, dtype=None) -> FoldedNet:
        """``net`` folded, its weights stored in ``dtype`` (default: the model's), cached per
        extractor and dtype: under autocast the low-precision copy is made once per plan."""
        key = (self._plan_version, _net_key(net))
        hit = self._plan_cache["nets"].get((id(net), dtype))
        if hit is not None and hit[0] == key:
            return hit[1]
        f = fold_extractor(net, dtype)
        self._plan_cache["nets"][(id(net), dtype)] = (key, f)
        return f

    def _frozen_folded(self, nets: list, dtype=None) -> list:
        """The folded network of every frozen extractor, in order (cache entries of extractors
        that are gone are dropped)."""
        alive = {id(n) for n in self.convnets}
        cache = self._plan_cache["nets"]
        for k in [k for k in cache if k[0] not in alive]:
            del cache[k]
        return [self._folded(n, dtype) for n in nets]

    def _grouped(self, folded: list) -> FoldedNet:
        """The folded networks fused into one (cached; kept while other plans run, since the
        measured plan may alternate between plans per input shape)."""
        key = (self._plan_version, tuple(id(f) for f in folded))
        hit = self._plan_cache["group"]
        if hit is None or hit[0] != key:
            hit = self._plan_cache["group"] = (key, fuse_grouped(folded))
        return hit[1]

    def _plan_runner(self, folded: list, x: torch.Tensor, plan: str) -> tuple:
        """-> (run, how): ``run(x)`` computes the super-feature slice of the ``folded`` frozen
        extractors on ``plan`` ("loop", "grouped", "direct", each optionally + "+graph":
        replayed as a CUDA graph captured for x's shape); ``how``: per network run, what runs
        it."""
        base, graph = plan.removesuffix("+graph"), plan.endswith("+graph")
        nets = [self._grouped(folded)] if base == "grouped" and len(folded) > 1 else folded
        need_grad = torch.is_grad_enabled() and x.requires_grad
        fused = self.onednn_fusion and not need_grad and mkldnn_ok(x)
        hw, fp = tuple(x.shape[2:]), self._frozen_plan_on(x.device, x.dtype)
        parts = []
        for f in nets:
            if base == "direct" and fp.runs_bordered(f, hw):
                parts.append(("direct", lambda xx, f=f: run_bordered(f, xx, force=fp.forced)))
            else:
                parts.append(("loop" if base == "direct" else base,
                              lambda xx, f=f: run_folded(f, xx, fused=fused)))

        def run(xx):
            outs = [part(xx) for _, part in parts]
            return outs[0] if len(outs) == 1 else torch.cat(outs, 1)

        how = [h for h, _ in parts]
        if graph:
            return self._graph(base, nets, run, x), [h + "+graph" for h in how]
        return run, how

    def _graph(self, base: str, nets: list, run, x: torch.Tensor) -> G.FrozenGraph:
        """The CUDA graph of ``run`` (on the folded ``nets``) for x's shape, captured anew when
        the folded networks (the model) or the input shape changed."""
        key = (base, tuple(x.shape), x.stride(), x.dtype, str(x.device))
        graphs = self._plan_cache["graphs"]
        hit = graphs.get(key)
        if hit is None or len(hit[0]) != len(nets) or any(
                a is not b for a, b in zip(hit[0], nets)):
            hit = graphs[key] = (list(nets), G.FrozenGraph(run, x))
        return hit[1]

    def _frozen_candidates(self, folded: list, x: torch.Tensor) -> dict:
        """The measured plan's candidates for ``x``: name -> ``run(x)``."""
        names = ["loop"] + (["grouped"] if len(folded) > 1 else [])
        if self._frozen_plan_on(x.device, x.dtype).bordered_ok:
            names.append("direct")
        if G.available(x):
            names += [n + "+graph" for n in names]
        return {n: (lambda xx, n=n: self._plan_runner(folded, xx, n)[0](xx)) for n in names}

    def _choice_key(self, folded: list, x: torch.Tensor) -> tuple:
        """What the measured plan's choice depends on: device, dtype, input shape and strides,
        oneDNN fusion, and the structure of every frozen extractor."""
        fused = self.onednn_fusion and mkldnn_ok(x)
        return (str(x.device), x.dtype, tuple(x.shape), x.stride(), fused,
                tuple(P.structure(f) for f in folded))

    def _run_measured(self, nets: list, x: torch.Tensor, dtype=None) -> torch.Tensor:
        folded = self._frozen_folded(nets, dtype)
        candidates = self._frozen_candidates(folded, x)
        label = (f"{x.device} {str(x.dtype).replace('torch.', '')} {list(x.shape)}, "
                 f"{len(nets)} frozen extractors")
        choice, out = chooser.choose(self._choice_key(folded, x), candidates, x, label)
        self._last_choice = choice
        if choice.chosen.removesuffix("+graph") in ("loop", "grouped", "direct"):
            run, self._last_frozen_run = self._plan_runner(folded, x, choice.chosen)
        else:  # a candidate that is not a plan (added by a test)
            run, self._last_frozen_run = candidates[choice.chosen], [choice.chosen]
        return run(x) if out is None else out

    @torch.compiler.disable
    def _run_frozen(self, nets: list, x: torch.Tensor) -> torch.Tensor:
        """Super-feature slice [N, sum out_dim] of frozen extractors (no autograd unless x
        needs a gradient). Under torch.compile it runs eagerly (one graph break): the plans
        fold, cache, time and replay CUDA graphs, and run the compiled kernels themselves."""
        need_grad = torch.is_grad_enabled() and x.requires_grad
        low = None if need_grad else _autocast_dtype(x)
        if low is None:
            with torch.set_grad_enabled(need_grad):
                return self._run_frozen_plan(nets, x, need_grad)
        # under autocast: the folded weights in the autocast dtype (cast once per plan), the
        # whole frozen block in that dtype with autocast off inside, features back in x's dtype
        with torch.autocast(x.device.type, enabled=False), torch.no_grad():
            return self._run_frozen_plan(nets, x.to(low), False, low).to(x.dtype)

    def _run_frozen_plan(self, nets: list, x: torch.Tensor, need_grad: bool,
                         dtype=None) -> torch.Tensor:
        plan = self._frozen_plan_on(x.device, x.dtype).runs(need_grad)
        if plan == "measure":
            return self._run_measured(nets, x, dtype)
        run, self._last_frozen_run = self._plan_runner(self._frozen_folded(nets, dtype), x,
                                                       plan)
        return run(x)

    # ------------------------------------------------------------------ forward
    def _check_input(self, x: torch.Tensor) -> None:
        if len(self.convnets) == 0:
            raise RuntimeError("call update_fc(n_classes) before using the model")
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected input [N, {self.in_channels}, H, W], got {tuple(x.shape)}")

    def _trainable_input(self, x: torch.Tensor) -> torch.Tensor:
        """channels_last for the autograd path if ``trainable_channels_last`` (opt-in: less
        exact in float32, RESULTS.md "Exactness against float64"), else as given."""
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
        if self._hooked():
            return super().extract_vector(x)
        feats = self._feature_list(x)
        pooled = [f if f.dim() == 2 else f.mean((2, 3)) for f in feats]
        return pooled[0] if len(pooled) == 1 else torch.cat(pooled, 1)

    def _hooked(self) -> bool:
        """Whether a hook is registered on a submodule (or globally, on every module): the
        fused paths never call the submodules, so the model then runs DERNet's module path,
        where the hooks fire as they do on DERNet (said once per model)."""
        hooked = bool(nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks
                      or nn_module._global_backward_hooks
                      or nn_module._global_backward_pre_hooks) or any(
            m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
            or m._backward_pre_hooks for m in self.modules() if m is not self)
        if hooked and not getattr(self, "_warned_hooks", False):
            self._warned_hooks = True
            warnings.warn("FastDERNet: hooks are registered on its submodules: it runs DERNet's "
                          "module path (the fused paths are off) while they are registered",
                          stacklevel=3)
        return hooked

    def forward(self, x: torch.Tensor) -> dict:
        if self._hooked():
            return super().forward(x)
        feats = self._feature_list(x)
        aux_w = aux_b = None
        if len(self.convnets) > 1:
            aux_w, aux_b = self.aux_fc.weight, self.aux_fc.bias
        logits, aux_logits, features = ops.concat_linear_head(feats, self.fc.weight,
                                                              self.fc.bias, aux_w, aux_b)
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
             "trainable": "fused BatchNorm + gate: bn_gate op (cpp (der_fast._C)), ...",
             "head": "concat_linear_head op (cpp (der_fast._C))", ...}
        """
        device, dtype = self._device_dtype()
        grad = torch.is_grad_enabled() if grad_enabled is None else grad_enabled
        infer = [self._inferable(n, grad) for n in self.convnets]
        frozen_idx = [i for i, f in enumerate(infer) if f]
        train_idx = [i for i, f in enumerate(infer) if not f]
        fused = self.onednn_fusion and mkldnn_ok(torch.empty(0, device=device, dtype=dtype))
        frozen = self._frozen_plan_on(device, dtype).describe(len(frozen_idx), fused)
        trainable = "none"
        if train_idx:
            layout = "channels_last" if self.trainable_channels_last else "as given"
            impl = ops.implementation("bn_gate", device)
            trainable = f"fused BatchNorm + gate: bn_gate op ({impl}), {layout}, autograd"
        head_impl = ops.implementation("concat_linear_head", device)
        return {
            "device": str(device), "dtype": str(dtype).replace("torch.", ""),
            "frozen_plan_setting": self.frozen_plan,
            "frozen": frozen, "frozen_extractors": frozen_idx,
            # per frozen extractor, how the last forward ran it ("direct" / "loop" / "grouped")
            "frozen_last_run": list(getattr(self, "_last_frozen_run", [])),
            # under "measure": the last choice (winner, timings of the candidates, dropped ones)
            "frozen_choice": (self._last_choice.as_dict()
                              if getattr(self, "_last_choice", None) else None),
            "trainable": trainable, "trainable_extractors": train_idx,
            "head": f"concat_linear_head op ({head_impl})",
        }
