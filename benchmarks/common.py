"""Shared helpers of the der_fast benchmark suite: the grid, seeded DER models in a given state,
the workloads (inference, stage-1 step, stage-2 step, floor, epoch), the providers (reference,
channels_last, torch.compile, torch.func ensemble, FastDERNet plans), the equivalence check
that runs before any timing, and the peak-memory measurement.

Used by ``benchmarks/bench_model.py`` (pytest-benchmark), ``benchmarks/scaling.py`` and
``tests/test_bench_report.py``. Import it as ``benchmarks.common`` with the repository root on
``sys.path`` (``ROOT`` below is put there by the users of this module).

Environment:
  DER_FAST_BENCH=quick|full|smoke  grid size (default quick: about 10 minutes on a 2-core CPU;
                                    smoke: tiny shapes, checks the plumbing in a minute)
  DER_FAST_BENCH_DEVICE=auto|cpu|cuda   device (auto: cuda when available)
  DER_FAST_BENCH_PROVIDERS=a,b,...  run only these providers (default: all)
  DER_FAST_BENCH_ROUNDS=N           timed rounds per case (default: 5 quick, 7 full)
  DER_FAST_BENCH_MEMORY=0|1         measure peak memory per case (default 1)
  DER_FAST_BENCH_COMPILE=auto|all|small|quick|none   which cases torch.compile runs (quick:
                                    resnet32 stage1 t<=2 only; small: t<=2; auto: quick for the
                                    quick grid, all for the full grid)
  DER_FAST_BENCH_FLOOR=0|1          time the floor step between the rounds of every stage-1
                                    case (default 1), so step / floor compares runs made at
                                    the same time (the machine's load drifts between cases)
  DER_FAST_BENCH_THREADS=N          torch intra-op threads (default: torch's default). On a
                                    CPU shared with other busy processes, 1 thread gives far
                                    steadier numbers (a parallel region waits for its slowest
                                    thread).
"""

from __future__ import annotations

import copy
import os
import platform
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # pragma: no cover - depends on how we were started
    sys.path.append(str(ROOT))  # appended: an installed der_fast (run_gpu.sh) stays first

import der_fast  # noqa: E402
from der_fast import masks as M  # noqa: E402
from der_fast.backbones import MaskedResNet, conv_layers  # noqa: E402
from der_fast.reference import DERNet  # noqa: E402
from der_fast.objective import make_optimizer, stage1_loss, stage2_loss  # noqa: E402

# ----------------------------------------------------------------------------- constants
CLASSES_PER_TASK = 10
LAMBDA_A = 1.0  # official DER: auxiliary loss weight from step 1 on
LAMBDA_S = 1e-3  # a fixed sparsity weight (the trainer adapts it to its budget)
S_TRAIN = 5.0  # mask temperature used by the timed stage-1 steps (mid-anneal)
S_MAX = 400.0
TEMPERATURE = 5.0  # stage 2 logits / T (CIFAR)
LR, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 5e-4

# backbone -> (batch, image side); ResNet-18-CIFAR at batch 16 to fit the CPU budget (on CUDA
# it runs at the paper's batch 128: BACKBONES_CUDA)
BACKBONES = {"resnet32": (128, 32), "resnet18_cifar": (16, 32)}
BACKBONES_CUDA = {"resnet32": (128, 32), "resnet18_cifar": (128, 32)}

WORKLOADS = ("infer", "stage1", "stage2", "floor", "epoch")
WORKLOAD_DOC = {
    "infer": "eval forward of the logits (no_grad), every extractor pruned and frozen",
    "stage1": "one stage-1 step: forward, CE + aux CE + lambda_s * sparsity, backward, "
              "HAT grad compensation, SGD step, clamp e; t-1 frozen pruned extractors + 1 "
              "trainable masked one",
    "stage2": "one stage-2 step: classifier only (all extractors frozen), CE(logits / 5), "
              "backward, SGD step",
    "floor": "the floor of a stage-1 step: one trainable masked extractor + head, CE + "
             "sparsity, backward, SGD step (= stage1 at t=1)",
    "epoch": "a stage-1 epoch over a fixed dataset of 4 batches, s annealed per batch",
}
EPOCH_BATCHES = 4

ALL_PROVIDERS = ("reference", "reference_cl", "compile", "func", "fast", "fast_loop",
                 "fast_grouped")
PROVIDER_DOC = {
    "reference": "DERNet eager (loop over extractors, masks as multiplications)",
    "reference_cl": "DERNet eager, model and input in channels_last",
    "compile": "torch.compile(DERNet) (inductor, default mode; extras record compile time)",
    "func": "frozen extractors as a torch.func ensemble (stack_module_state + "
            "functional_call + vmap; pruned ones zero-padded to full width with binary "
            "gates); trainable extractor and head eager",
    "fast": "FastDERNet.from_reference, frozen_plan='auto'",
    "fast_loop": "FastDERNet, frozen_plan='loop'",
    "fast_grouped": "FastDERNet, frozen_plan='grouped'",
}


class ProviderUnavailable(RuntimeError):
    """The provider cannot run here (reason in the message): the case is skipped, not failed."""


# ----------------------------------------------------------------------------- environment
def grid_name() -> str:
    g = os.environ.get("DER_FAST_BENCH", "quick").strip().lower() or "quick"
    if g not in ("quick", "full", "smoke"):
        raise ValueError(f"DER_FAST_BENCH must be quick, full or smoke, got {g!r}")
    return g


def bench_device() -> torch.device:
    d = os.environ.get("DER_FAST_BENCH_DEVICE", "auto").strip().lower() or "auto"
    if d == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(d)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("DER_FAST_BENCH_DEVICE=cuda but CUDA is not available")
    return dev


def rounds() -> tuple[int, int]:
    """(timed rounds, warm-up rounds) per case."""
    n = os.environ.get("DER_FAST_BENCH_ROUNDS")
    if n:
        return max(1, int(n)), 1
    return (5, 0) if grid_name() != "full" else (7, 1)


def memory_enabled() -> bool:
    return os.environ.get("DER_FAST_BENCH_MEMORY", "1") != "0"


def selected_providers() -> tuple:
    env = os.environ.get("DER_FAST_BENCH_PROVIDERS", "").strip()
    if not env:
        return ALL_PROVIDERS
    names = tuple(p.strip() for p in env.split(",") if p.strip())
    bad = [p for p in names if p not in ALL_PROVIDERS]
    if bad:
        raise ValueError(f"unknown providers {bad}; choose from {ALL_PROVIDERS}")
    return names


def apply_threads() -> None:
    n = os.environ.get("DER_FAST_BENCH_THREADS", "").strip()
    if n:
        torch.set_num_threads(max(1, int(n)))


apply_threads()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} cpus, {torch.get_num_threads()} torch threads)"


def env_info(device: torch.device) -> dict:
    return {"device": str(device), "device_name": device_name(device),
            "torch": torch.__version__, "der_fast": der_fast.__version__,
            "python": platform.python_version(), "grid": grid_name(),
            "threads": torch.get_num_threads(),
            "tf32": bool(device.type == "cuda" and torch.backends.cudnn.allow_tf32),
            "check": f"max|provider - ref64| <= {CHECK_FACTOR} x max|ref32 - ref64| (worse of "
                     f"NCHW / channels_last fp32 reference) + {CHECK_ATOL} x max|ref64|, per "
                     f"output and gradient",
            "der_fast_path": str(Path(der_fast.__file__).parent)}


def sync(device: torch.device) -> None:
    """Wait for the device (CUDA kernels are asynchronous: time them to completion)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# The equivalence check (ARCHITECTURE.md): ground truth is the reference run in float64; a
# provider's error must be no worse than CHECK_FACTOR x the float32 reference's own error plus a
# small atol (CHECK_ATOL x the output's max |value|), per output tensor (logits, aux logits,
# loss, the gradient of every trainable parameter). "The fp32 reference's own error" is the
# larger of two equally valid fp32 runs of the reference, NCHW and channels_last: gradients of a
# deep train-mode-BN ResNet on random labels cancel a lot, their fp32 error is up to ~1e-2 of
# the max, and one run alone can be luckily close to float64 (measured: channels_last vs NCHW
# differ by up to 400x in some gradients' error, both being plain fp32 rounding).
CHECK_FACTOR = 2.0
CHECK_ATOL = 1e-4


# ----------------------------------------------------------------------------- the grid
@dataclass(frozen=True)
class Case:
    workload: str
    backbone: str
    t: int
    density: float  # channel density of the frozen extractors (1.0 = unpruned)
    batch: int
    hw: int

    @property
    def id(self) -> str:
        d = "-" if self.workload == "floor" else f"d{int(round(self.density * 100))}"
        return f"{self.workload}-{self.backbone}-b{self.batch}-t{self.t}-{d}"

    @property
    def group(self) -> str:
        return self.id

    @property
    def n_classes(self) -> int:
        return CLASSES_PER_TASK * self.t


def backbone_shape(backbone: str, device: Optional[torch.device] = None) -> tuple:
    """(batch, image side) of a backbone's cases on ``device`` (default: the bench device)."""
    device = device or bench_device()
    return (BACKBONES_CUDA if device.type == "cuda" else BACKBONES)[backbone]


def _cases(workloads, backbone, ts, densities, batch=None, hw=None):
    b, s = backbone_shape(backbone)
    return [Case(w, backbone, t, d, batch or b, hw or s) for w in workloads for t in ts
            for d in densities]


def grid(name: Optional[str] = None) -> list:
    """The benchmark cases. ``quick`` (default) fits in about 10 minutes on a 2-core CPU;
    ``full`` is the whole grid of the issue (hours on a 2-core CPU, minutes on a GPU)."""
    name = name or grid_name()
    if name == "smoke":
        cases = _cases(("floor",), "resnet32", (1,), (1.0,), batch=4, hw=16)
        cases += _cases(("infer", "stage1", "stage2", "epoch"), "resnet32", (3,), (0.3,),
                        batch=4, hw=16)
        return cases
    if name == "full":
        cases = []
        for bb in BACKBONES:
            cases += _cases(("floor",), bb, (1,), (1.0,))
            cases += _cases(("infer", "stage1", "stage2"), bb, (1, 2, 5, 10), (1.0, 0.3))
            cases += _cases(("epoch",), bb, (2, 10), (0.3,))
        return cases
    cases = _cases(("floor",), "resnet32", (1,), (1.0,))
    cases += _cases(("stage1",), "resnet32", (2, 5), (0.3,))
    cases += _cases(("stage1",), "resnet32", (5,), (1.0,))
    cases += _cases(("infer", "stage2"), "resnet32", (5,), (0.3,))
    cases += _cases(("floor",), "resnet18_cifar", (1,), (1.0,))
    cases += _cases(("stage1", "infer"), "resnet18_cifar", (5,), (0.3,))
    return cases


def providers_for(case: Case) -> tuple:
    """The providers of a case (DER_FAST_BENCH_PROVIDERS, default all). Cases a provider
    cannot or need not run are skipped inside the test with the reason (skip_reason)."""
    return selected_providers()


def skip_reason(case: Case, provider: str, device: torch.device) -> Optional[str]:
    """Why ``provider`` does not run ``case`` (None: it runs)."""
    g = grid_name()
    quick = g != "full"
    t_frozen = 0 if case.workload == "floor" else (case.t - 1 if case.workload in (
        "stage1", "epoch") else case.t)
    if provider == "compile":
        policy = os.environ.get("DER_FAST_BENCH_COMPILE", "auto").strip().lower() or "auto"
        if policy not in ("auto", "all", "small", "quick", "none"):
            raise ValueError(f"DER_FAST_BENCH_COMPILE must be auto, all, small, quick or none, "
                             f"got {policy!r}")
        if policy == "auto":
            policy = "quick" if quick else "all"
        if policy == "none":
            return "DER_FAST_BENCH_COMPILE=none"
        if policy == "small" and case.t > 2:
            return "DER_FAST_BENCH_COMPILE=small: torch.compile only for t <= 2"
        if policy == "quick" and not (case.backbone == "resnet32"
                                      and case.workload == "stage1" and case.t <= 2):
            return (f"{g} grid: torch.compile only for resnet32 stage1 t<=2 (a cold compile of "
                    f"forward + backward takes minutes per case on a shared 2-core CPU); "
                    f"DER_FAST_BENCH_COMPILE=all compiles every case")
    if quick and provider == "func" and t_frozen == 0:
        return f"{g} grid: no frozen extractor in this case, func runs the reference's code"
    if quick and provider in ("fast_loop", "fast_grouped"):
        if t_frozen < 2:
            return f"{g} grid: {t_frozen} frozen extractor(s), every frozen plan is the same"
        try:
            auto = build_provider("fast", reference_model(case), device).info.get(
                "frozen_plan_resolved")
        except ProviderUnavailable as exc:
            return str(exc)
        if auto == FAST_PLANS[provider]:
            return f"{g} grid: same plan as `fast` (auto resolves to {auto!r} on {device.type})"
    return None


# ----------------------------------------------------------------------------- models
def _seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode()) & 0x7FFFFFFF


def _perturb(net: MaskedResNet, gen: torch.Generator) -> None:
    """Make each new extractor distinct from the one it was copied from (weights +-10%, BN
    affine random), so the equivalence check sees t different extractors."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.mul_(1 + 0.1 * torch.randn(m.weight.shape, generator=gen))
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=gen))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))


def _calibrate_bn(net: MaskedResNet, x: torch.Tensor) -> None:
    """Realistic BN running statistics: one train-mode forward with cumulative averaging."""
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    was = net.training
    with torch.no_grad():
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None
        net.train()
        net(x)
        for bn in bns:
            bn.momentum = 0.1
    net.train(was)


def _random_e(net: MaskedResNet, density: float, gen: torch.Generator, soft: bool) -> None:
    with torch.no_grad():
        for e in net.mask_e.values():
            mag = 0.5 + 1.5 * torch.rand(e.shape, generator=gen)
            if soft:  # trainable extractor: mostly-on soft gates, some near 0.5, some off
                e.copy_(torch.rand(e.shape, generator=gen) * 3.0 - 1.0)
            else:
                on = torch.rand(e.shape, generator=gen) < density
                e.copy_(torch.where(on, mag, -mag))


def build_reference(backbone: str, t: int, density: float, state: str, seed: int = 0,
                    n_calib: int = 16, hw: int = 32) -> DERNet:
    """A seeded DERNet with t extractors (CPU, float32).

    ``state="stage1"``: extractors 1..t-1 frozen and pruned to about ``density`` of their
    channels per mask point (random e with P(e > 0) = density, then ``prune()``); extractor t
    trainable with soft masks sigmoid(S_TRAIN * e). ``state="final"``: all t pruned and frozen
    (``freeze_conv``): what inference and stage 2 see. BN statistics are calibrated on random
    images, weights perturbed per extractor, so folding and pruning are exercised for real.
    """
    if state not in ("stage1", "final"):
        raise ValueError(state)
    gen = torch.Generator().manual_seed(_seed(backbone, t, density, state, seed))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_seed("init", backbone, t, density, state, seed))
        net = DERNet(backbone, use_masks=True)
        for i in range(t):
            net.update_fc(CLASSES_PER_TASK * (i + 1))
            new = net.convnets[-1]
            _perturb(new, gen)
            last = i == t - 1
            freeze = not last or state == "final"
            _random_e(new, density, gen, soft=not freeze)
            new.binary_masks = freeze
            new.s = 1.0 if freeze else S_TRAIN
            _calibrate_bn(new, torch.randn(n_calib, net.in_channels, hw, hw, generator=gen))
            if freeze:
                net.prune()
                with torch.no_grad():  # a trained-looking head, not the zero-padded init
                    net.fc.weight.normal_(0, 0.05, generator=gen)
                    net.fc.bias.normal_(0, 0.05, generator=gen)
        if state == "final":
            net.freeze_conv()
        net.train()
    return net


def _lru_get(cache: dict, key, make, keep: int = 2):
    """A tiny LRU: the floor case's entries survive next to the current case's."""
    if key in cache:
        cache[key] = cache.pop(key)  # most recent last
    else:
        while len(cache) >= keep:
            cache.pop(next(iter(cache)))
        cache[key] = make()
    return cache[key]


_MODEL_CACHE: dict = {}


def reference_model(case: Case, state: Optional[str] = None) -> DERNet:
    """A fresh copy of the case's seeded reference model (cached build, deep-copied)."""
    state = state or ("final" if case.workload in ("infer", "stage2") else "stage1")
    t = 1 if case.workload == "floor" else case.t
    key = (case.backbone, t, case.density, state, case.hw)
    model = _lru_get(_MODEL_CACHE, key, lambda: build_reference(
        case.backbone, t, case.density, state, hw=case.hw))  # keep 2: models at t=10 are big
    return copy.deepcopy(model)


def make_data(case: Case, device: torch.device, n_batches: int = 1) -> list:
    """Fixed random batches (x, y) with labels over every seen class."""
    gen = torch.Generator().manual_seed(_seed("data", case.id))
    t = 1 if case.workload == "floor" else case.t
    out = []
    for _ in range(n_batches):
        x = torch.randn(case.batch, 3, case.hw, case.hw, generator=gen)
        y = torch.randint(0, CLASSES_PER_TASK * t, (case.batch,), generator=gen)
        out.append((x.to(device), y.to(device)))
    return out


# ----------------------------------------------------------------------------- func ensemble
class _VmapExtractor(MaskedResNet):
    """A frozen (possibly pruned, possibly binary-masked) extractor as a full-width network
    with its binary masks as float ``gate_*`` buffers: pruned channels get zero weights, zero
    BN affine and a zero gate. Every extractor of an architecture then has the same structure,
    so they stack (torch.func.stack_module_state). Exact: a pruned net computes the function of
    the binary-masked full-width one (der_fast.backbones)."""

    def __init__(self, net: MaskedResNet):
        super().__init__(net.arch, net.in_channels, masked=False)
        p0 = next(net.parameters())
        self.to(device=p0.device, dtype=p0.dtype)
        dev = p0.device
        kept = {p: net.kept(p).to(dev) for p in net.widths}
        kept["input"] = torch.arange(net.in_channels, device=dev)
        bin_masks = M.binary_masks(net) if net.mask_e is not None else {}
        with torch.no_grad():
            for p, full in self.full_widths.items():
                g = torch.zeros(full, device=dev, dtype=p0.dtype)
                on = bin_masks[p].to(p0.dtype) if p in bin_masks else 1.0
                g[kept[p]] = on
                self.register_buffer(f"gate_{p}", g)
            for path, src, dst, _ in conv_layers(net.arch):
                w_new, w_old = self.get_submodule(path).weight, net.get_submodule(path).weight
                w_new.zero_()
                w_new[kept[dst][:, None], kept[src][None, :]] = w_old.detach()
                head, _, leaf = path.rpartition(".")
                bn = {"conv": "bn", "conv1": "bn1", "conv2": "bn2", "sc_conv": "sc_bn"}[leaf]
                b_new, b_old = self.get_submodule(f"{head}.{bn}"), net.get_submodule(
                    f"{head}.{bn}")
                b_new.weight.zero_()
                b_new.bias.zero_()
                b_new.running_mean.zero_()
                b_new.running_var.fill_(1.0)
                for name in ("weight", "bias", "running_mean", "running_var"):
                    getattr(b_new, name)[kept[dst]] = getattr(b_old, name).detach()
        self.requires_grad_(False)
        self.eval()

    def gate(self, point: str):
        return getattr(self, f"gate_{point}")

    def _shortcut(self, blk, x, si: int, bi: int):
        if blk.sc_conv is not None or bi > 0 or si == 0:
            return super()._shortcut(blk, x, si, bi)
        xs = x[:, :, :: blk.stride, :: blk.stride]  # option A at full width: pad with zeros
        return F.pad(xs, (0, 0, 0, 0, 0, self.full_widths[f"stream{si}"] - xs.shape[1]))


class FuncEnsemble(nn.Module):
    """DERNet's forward with the frozen extractors run as one torch.func ensemble:
    ``vmap(functional_call(base, stacked params/buffers, x))`` over the extractors, the
    trainable extractor and the classifiers eager (they are ``model``'s own modules, so an
    optimiser over ``model``'s parameters trains them)."""

    def __init__(self, model: DERNet):
        super().__init__()
        object.__setattr__(self, "model", model)  # not a submodule: no duplicate params
        self._key = None

    @staticmethod
    def _is_frozen(net) -> bool:
        return not net.training and not any(p.requires_grad for p in net.parameters())

    def _prepare(self, frozen: list) -> None:
        copies = [_VmapExtractor(n) for n in frozen]
        params, buffers = torch.func.stack_module_state(copies)
        self._params = {k: v.detach() for k, v in params.items()}
        self._buffers = buffers
        base = copy.deepcopy(copies[0]).to("meta")
        self._base = base
        full = base.out_dim
        dev = self._params[next(iter(self._params))].device
        self._cols = torch.cat([i * full + n.kept(f"stream{len(n.arch.stages) - 1}").to(dev)
                                for i, n in enumerate(frozen)])

    def _call(self, params, buffers, x):
        return torch.func.functional_call(self._base, (params, buffers), (x,))

    def frozen_features(self, frozen: list, x: torch.Tensor) -> torch.Tensor:
        key = tuple((id(n), bool(n.binary_masks)) for n in frozen)
        if key != self._key:
            self._prepare(frozen)
            self._key = key
        with torch.no_grad():
            f = torch.vmap(self._call, in_dims=(0, 0, None))(self._params, self._buffers, x)
        n, b, d = f.shape
        return f.permute(1, 0, 2).reshape(b, n * d).index_select(1, self._cols)

    def forward(self, x: torch.Tensor) -> dict:
        m = self.model
        nets = list(m.convnets)
        frozen = [i for i, n in enumerate(nets) if self._is_frozen(n)]
        per_net = [None] * len(nets)
        if frozen:
            u = self.frozen_features([nets[i] for i in frozen], x)
            for i, piece in zip(frozen, u.split([nets[i].out_dim for i in frozen], 1)):
                per_net[i] = piece
        for i, n in enumerate(nets):
            if per_net[i] is None:
                per_net[i] = n(x)
        features = torch.cat(per_net, 1) if len(per_net) > 1 else per_net[0]
        logits = m.fc(features)
        aux = m.aux_fc(features[:, -nets[-1].out_dim:]) if len(nets) > 1 else None
        return {"logits": logits, "aux_logits": aux, "features": features}


# ----------------------------------------------------------------------------- providers
@dataclass
class Built:
    """A provider ready to run: ``forward(x) -> DERNet's output dict``; ``model`` holds the
    trainable parameters and DERNet's mask API (set_s, sparsity_loss, ...)."""
    name: str
    model: nn.Module
    forward: Callable
    to_input: Callable
    info: dict


def _identity(x):
    return x


def _channels_last(x):
    return x.contiguous(memory_format=torch.channels_last)


FAST_PLANS = {"fast": "auto", "fast_loop": "loop", "fast_grouped": "grouped"}


def fast_class():
    """FastDERNet, or raise ProviderUnavailable with the reason."""
    try:
        from der_fast.fast import FastDERNet
    except Exception as exc:  # noqa: BLE001 - any import problem means "not available"
        raise ProviderUnavailable(
            f"der_fast.fast.FastDERNet is not importable ({type(exc).__name__}: {exc})") from exc
    return FastDERNet


def build_provider(name: str, model: DERNet, device: torch.device) -> Built:
    """Wrap ``model`` (consumed: moved to ``device``, maybe converted) as provider ``name``."""
    model = model.to(device)
    if name == "reference":
        return Built(name, model, model, _identity, {})
    if name == "reference_cl":
        model = model.to(memory_format=torch.channels_last)
        return Built(name, model, model, _channels_last, {"memory_format": "channels_last"})
    if name == "compile":
        if not hasattr(torch, "compile"):
            raise ProviderUnavailable("torch.compile is not available in this torch")
        return Built(name, model, torch.compile(model), _identity,
                     {"compile": "inductor, mode=default"})
    if name == "func":
        ens = FuncEnsemble(model)
        return Built(name, model, ens, _identity, {"func": "stack_module_state+vmap"})
    if name in FAST_PLANS:
        cls = fast_class()
        plan = FAST_PLANS[name]
        try:
            fast = cls.from_reference(model, frozen_plan=plan)
        except TypeError:
            fast = cls.from_reference(model)
            if plan != "auto":
                if not hasattr(fast, "frozen_plan"):
                    raise ProviderUnavailable(f"FastDERNet has no frozen_plan={plan!r}")
                fast.frozen_plan = plan
        except ValueError as exc:
            raise ProviderUnavailable(f"FastDERNet rejects frozen_plan={plan!r}: {exc}")
        fast = fast.to(device)
        info = {"frozen_plan": plan}
        resolved = getattr(fast, "resolved_frozen_plan", None)
        if callable(resolved):
            info["frozen_plan_resolved"] = resolved(device)
        return Built(name, fast, fast, _identity, info)
    raise ValueError(f"unknown provider {name!r}; choose from {ALL_PROVIDERS}")


def plan_of(built: Built, grad_enabled: bool) -> Optional[str]:
    """FastDERNet.plan() as a short string (None for other providers)."""
    fn = getattr(built.model, "plan", None)
    if not callable(fn):
        return None
    try:
        p = fn(grad_enabled=grad_enabled)
    except TypeError:
        p = fn()
    if isinstance(p, dict):
        return "; ".join(f"{k}: {v}" for k, v in p.items())
    return str(p)


# ----------------------------------------------------------------------------- workloads
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


@dataclass
class RefOutputs:
    """The reference's check outputs in float64 (the truth) and in float32, NCHW and
    channels_last (its own rounding error)."""
    f64: dict
    f32: dict
    f32_cl: dict

    def noise(self, k: str) -> float:
        a = self.f64[k]
        return max(float((a - self.f32[k]).abs().max()), float((a - self.f32_cl[k]).abs().max()))


def compare(ref: RefOutputs, got: dict) -> dict:
    """Check every tensor of ``got`` against the float64 reference: ``max|got - ref64| <=
    CHECK_FACTOR * noise + CHECK_ATOL * max|ref64|`` per tensor, noise = max|ref32 - ref64|
    over the two fp32 reference runs (RefOutputs.noise). Returns
    {"err": worst provider error, "ref32_err": worst fp32-reference error} (both relative to
    the tensor's max |value|); raises AssertionError naming the tensor, the place and values
    of the worst mismatch."""
    if set(ref.f64) != set(got):
        raise AssertionError(f"outputs differ in keys: reference {sorted(ref.f64)}, "
                             f"provider {sorted(got)}")
    worst = worst32 = 0.0
    bad = []  # (error / allowed, message)
    for k, a in ref.f64.items():
        b = got[k].double()
        if a.shape != b.shape:
            raise AssertionError(f"{k}: shape {tuple(b.shape)} != reference {tuple(a.shape)}")
        if not bool(torch.isfinite(b).all()):
            raise AssertionError(f"{k}: provider output is not finite")
        if a.numel() == 0:
            continue
        scale = max(float(a.abs().max()), 1e-30)
        err = (a - b).abs()
        e_p = float(err.max())
        e_32 = ref.noise(k)
        allowed = CHECK_FACTOR * e_32 + CHECK_ATOL * scale
        worst, worst32 = max(worst, e_p / scale), max(worst32, e_32 / scale)
        if e_p > allowed:
            i = int(err.flatten().argmax())
            idx = tuple(int(v) for v in torch.unravel_index(torch.tensor(i), a.shape))
            bad.append((e_p / allowed, (
                f"{k}: differs from the float64 reference at {idx}: "
                f"{float(b.flatten()[i]):.6g} vs {float(a.flatten()[i]):.6g}; max error "
                f"{e_p:.3g} ({e_p / scale:.2g} of max|ref|) > allowed {allowed:.3g} = "
                f"{CHECK_FACTOR} x fp32 reference error {e_32:.3g} + {CHECK_ATOL} x max|ref| "
                f"{scale:.3g}")))
    if bad:
        bad.sort(key=lambda kv: -kv[0])
        lines = [m for _, m in bad[:3]]
        raise AssertionError(
            f"{len(bad)} of {len(ref.f64)} outputs/gradients fail the equivalence check "
            f"(worst {bad[0][0]:.1f}x the allowed error):\n  " + "\n  ".join(lines))
    return {"err": worst, "ref32_err": worst32}


_REF_OUT: dict = {}


def reference_outputs(case: Case, device: torch.device) -> RefOutputs:
    """The reference's check outputs for a case: float64, float32 NCHW and float32
    channels_last (computed once per case)."""
    def make():
        outs = []
        for name, dt in (("reference", torch.float64), ("reference", torch.float32),
                         ("reference_cl", torch.float32)):
            built = build_provider(name, reference_model(case).to(dt), device)
            outs.append(Workload(case, built, device, dtype=dt).check_outputs())
        return RefOutputs(*outs)

    return _lru_get(_REF_OUT, (case, str(device)), make)


# ----------------------------------------------------------------------------- memory
def _profiler_peak_bytes(fn: Callable) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = []  # (time, bytes allocated (+) or freed (-), allocator's running total)

    def walk(nodes):
        for node in nodes:
            ef = node.extra_fields
            if type(ef).__name__ == "_ExtraFields_Allocation" and ef.device.type == "cpu":
                events.append((node.start_time_ns, int(ef.alloc_size), int(ef.total_allocated)))
            walk(node.children)

    walk(prof.profiler.kineto_results.experimental_event_tree())
    if not events:
        return 0
    events.sort()
    # The running total is process-wide and drifts (tensors allocated under an earlier profiler
    # session and freed outside one are never subtracted): measure from this session's start.
    base = events[0][2] - events[0][1]
    return max(0, max(total for _, _, total in events) - base)


MEMORY_DOC = (
    "peak bytes of torch tensor allocations live during one steady-state call of the workload "
    "(after a warm-up call), above what was live when it started. CUDA: "
    "torch.cuda.max_memory_allocated() minus memory_allocated() before the call. CPU: from the "
    "torch profiler's allocation events (profile_memory=True) in a separate untimed call; it "
    "does not see oneDNN's private scratchpads, so it is the tensor working set, not the "
    "process RSS.")


def peak_memory_bytes(fn: Callable, device: torch.device) -> Optional[int]:
    """See MEMORY_DOC. None if it cannot be measured here."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return int(torch.cuda.max_memory_allocated(device) - before)
    try:
        return _profiler_peak_bytes(fn)
    except Exception:  # noqa: BLE001 - profiler internals differ between torch versions
        return None


# ----------------------------------------------------------------------------- one case
def prepare(case: Case, provider: str, device: torch.device, grid_skips: bool = True) -> tuple:
    """Build the provider for a case and run the equivalence check (which also warms it up,
    and compiles for torch.compile). Returns (workload, info dict). Raises
    ProviderUnavailable (skip) or AssertionError (wrong answer: the case fails).
    ``grid_skips=False`` ignores the grid's skip rules (skip_reason): the tests use it."""
    reason = skip_reason(case, provider, device) if grid_skips else None
    if reason:
        raise ProviderUnavailable(reason)
    ref = reference_outputs(case, device)
    built = build_provider(provider, reference_model(case), device)
    wl = Workload(case, built, device)
    t0 = time.perf_counter()
    try:
        got = wl.check_outputs()
    except ProviderUnavailable:
        raise
    except Exception as exc:
        if provider == "compile":
            raise ProviderUnavailable(
                f"torch.compile failed here: {type(exc).__name__}: {str(exc)[:300]}") from exc
        raise
    first_call = time.perf_counter() - t0
    errs = compare(ref, got)
    info = {"check_max_rel_err": errs["err"], "check_ref32_rel_err": errs["ref32_err"],
            "first_call_s": round(first_call, 3)}
    if provider == "compile":
        info["compile_s"] = round(first_call, 3)
    info.update(built.info)
    plan = plan_of(built, grad_enabled=case.workload != "infer")
    if plan:
        info["plan"] = plan
    info["params"] = int(M.count_params(built.model))
    return wl, info


def floor_case(case: Case) -> Case:
    """The floor of a stage-1 case: one trainable extractor + head, same backbone and batch."""
    return Case("floor", case.backbone, 1, 1.0, case.batch, case.hw)


def interleaved_floor_enabled() -> bool:
    return os.environ.get("DER_FAST_BENCH_FLOOR", "1") != "0"


def extra_info(case: Case, provider: str, device: torch.device) -> dict:
    d = {"provider": provider, "workload": case.workload, "backbone": case.backbone,
         "t": case.t, "density": None if case.workload == "floor" else case.density,
         "batch": case.batch, "hw": case.hw}
    d.update(env_info(device))
    return d
