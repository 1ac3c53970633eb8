"""Config: every knob of a run, its typed validation (one spec per field, :data:`_SPECS`),
and preset / dict construction."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields
from typing import NamedTuple, Optional

import torch

from .. import presets as P
from ..backbones import ARCHS
from ..data import DATASET_NAMES, DataError
from ..data.datasets import canonical_name
from ..masks import MASK_INIT, MASK_LR

STAGE2_MODES = ("retrain", "weight_align", "none")
IMPLS = ("reference", "fast")
PRECISIONS = ("32", "bf16", "16")  # float32; torch.autocast to bfloat16 / float16
S_ANNEAL = ("epoch", "fixed")


class Schedule(NamedTuple):
    """One step's stage-1 schedule (see :meth:`Config.schedule`)."""

    epochs: int
    lr: float
    milestones: list
    weight_decay: float


class ConfigError(ValueError):
    """A bad configuration (clear message, non-zero exit from the CLI)."""


@dataclass
class Config:
    """Every knob of a run; saved with the results. Defaults: the offline demo run."""

    dataset: str = "fashion_mnist"
    data_root: Optional[str] = None
    download: bool = False
    # the default run uses the first 600/200 images per class: exactly the shipped subset, so it
    # gives the same result with or without the full Fashion-MNIST installed (0 = all images)
    train_per_class: Optional[int] = 600
    test_per_class: Optional[int] = 200
    backbone: str = "resnet32"
    init_cls: int = 2
    increment: int = 2
    class_seed: int = 1993
    last_step: Optional[int] = None  # stop after this step (0-based); None = the protocol's last
    memory_total: Optional[int] = 200
    memory_per_class: Optional[int] = None
    epochs: int = 4
    warmup_epochs: int = 0
    milestones: list = field(default_factory=list)  # stage-1 epochs where lr *= 0.1
    batch_size: int = 64
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    # step 0's own stage-1 schedule (PyCIL and the authors' configs train the first step with
    # other epochs / decays / weight decay than the later ones); None = the later steps' value
    init_epochs: Optional[int] = None
    init_lr: Optional[float] = None
    init_milestones: Optional[list] = None
    init_weight_decay: Optional[float] = None
    lambda_a: float = 1.0
    # the parameter budget: fraction of each new extractor's parameters that pruning keeps
    # (lambda_s is then adapted during stage 1 to land there); None = manual lambda_s
    keep: Optional[float] = 0.2
    lambda_s: Optional[float] = None  # manual sparsity weight (only without keep)
    s_max: float = 400.0
    # mask temperature: "fixed" = s_max throughout (the clamp on e keeps every gate's gradient
    # alive); "epoch" = HAT/DER's schedule, s from 1/s_max to s_max within every epoch (all
    # gates ~1/2 at each epoch's start: measured several points worse, RESULTS.md "Masks")
    s_anneal: str = "fixed"
    masks: bool = True
    prune: bool = True
    mask_init: float = MASK_INIT
    mask_lr: float = MASK_LR  # plain SGD (no momentum, no decay) for the mask embeddings
    stage2: str = "retrain"
    epochs_stage2: int = 4
    lr_stage2: float = 0.1
    milestones_stage2: list = field(default_factory=list)
    temperature: float = 5.0
    top5: bool = False
    seed: int = 1993
    device: str = "auto"
    impl: str = "fast"
    # training precision: float32, or torch.autocast to bfloat16 (CPU, CUDA) / float16 (CUDA,
    # with a GradScaler); the ops, losses, masks and BatchNorm statistics stay float32
    precision: str = "32"
    # torch.compile the model trained in stage 1 / stage 2 (recompiled per stage; evaluation
    # stays eager); wall times include the compiles
    compile: bool = False
    out: str = "runs/der"
    progress: bool = True
    deterministic: bool = False
    # presets, data-parallel training, result files (defaults: one process, no extras)
    preset: Optional[str] = None  # record of the preset the values came from (see from_preset)
    epochs_scale: float = 1.0  # record: factor --epochs-scale already applied to the schedule
    color_jitter: float = 0.0  # ColorJitter(brightness=b) in stage-1/2 training batches
    accum_steps: int = 1  # micro-batches per batch (per process), BatchNorm per micro-batch
    plots: bool = True  # accuracy.png / params.png after every step (metrics.csv always)
    tensorboard: bool = False  # TensorBoard event files in OUT/tensorboard

    @classmethod
    def from_preset(cls, name: str, epochs_scale: float = 1.0, **overrides) -> "Config":
        """A preset's config (see :mod:`der_fast.presets`), its schedule scaled by
        ``epochs_scale``, then ``overrides`` taken literally."""
        try:
            d = P.preset_config(name)
        except KeyError as exc:
            raise ConfigError(exc.args[0]) from None
        d = _merge(asdict(cls()), d)
        if epochs_scale != 1.0:
            try:
                d = P.scale_schedule(d, epochs_scale)
            except (ValueError, TypeError) as exc:
                raise ConfigError(f"epochs_scale: {exc}") from None
            d["epochs_scale"] = epochs_scale
        return cls.from_dict(_merge(d, overrides))

    def __post_init__(self):
        self.validate()

    def validate(self) -> "Config":
        """Check every field against :data:`_SPECS` (type, range, finiteness), the device
        against what exists, then the rules between fields. Raises a one-line ConfigError
        naming the field and the allowed values; returns self."""
        for name, spec in _SPECS.items():
            setattr(self, name, spec.check(name, getattr(self, name)))
        try:
            canonical_name(self.dataset)
        except DataError:
            raise ConfigError(f"dataset must be one of {', '.join(DATASET_NAMES)}, got "
                              f"{self.dataset!r}") from None
        _check_device(self.device)
        for name in ("train_per_class", "test_per_class"):
            if getattr(self, name) == 0:
                setattr(self, name, None)  # 0 = all images
        if (self.memory_total is None) == (self.memory_per_class is None):
            raise ConfigError("give exactly one of memory_total / memory_per_class")
        if (self.keep is None) == (self.lambda_s is None):
            raise ConfigError("give exactly one of keep (a parameter budget) / lambda_s (a "
                              "manual sparsity weight)")
        if self.compile and self.impl != "reference":
            # torch.compile(FastDERNet) works (tests/test_compile.py) but does not pay in the
            # trainer: RESULTS.md "11. Mixed precision, torch.compile of FastDERNet"
            raise ConfigError(f"--compile works with --impl reference only (got --impl "
                              f"{self.impl}): torch.compile(FastDERNet) runs, but a compiled "
                              "stage-1 step is only 1.03-1.09x faster than FastDERNet's own "
                              "while every training stage (and the early prune) recompiles "
                              "for 2-27 s; FastDERNet is the fused alternative to "
                              "torch.compile(reference)")
        if self.prune and not self.masks:
            raise ConfigError("pruning needs masks: use --no-prune with --no-masks")
        for name in ("epochs", "init_epochs"):
            if getattr(self, name) is not None and self.warmup_epochs > getattr(self, name):
                raise ConfigError(f"warmup_epochs ({self.warmup_epochs}) cannot exceed {name} "
                                  f"({getattr(self, name)})")
        if self.accum_steps > self.batch_size:
            raise ConfigError(f"accum_steps ({self.accum_steps}) cannot exceed batch_size "
                              f"({self.batch_size})")
        return self

    def schedule(self, t: int) -> "Schedule":
        """Stage 1's schedule at step ``t``: step 0 takes each ``init_*`` value that is set.
        Without milestones the lr is divided by 10 at 60 % and 85 % of the epochs."""
        first = t == 0

        def pick(name):
            v = getattr(self, "init_" + name) if first else None
            return getattr(self, name) if v is None else v

        epochs = pick("epochs")
        milestones = pick("milestones") or [int(0.6 * epochs), int(0.85 * epochs)]
        return Schedule(epochs, pick("lr"), [m for m in milestones if m > 0],
                        pick("weight_decay"))

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        if not isinstance(d, dict):
            raise ConfigError(f"a config must be a JSON object / dict, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names, key=str)
        if unknown:
            raise ConfigError(f"unknown config keys {unknown}")
        return cls(**d)


_FLOAT32_MAX = 3.4028234663852886e38


class _Spec:
    """What one Config field accepts: ``kind`` (int, float, bool, str or list of int), an
    inclusive range ``lo``..``hi`` (``open_lo``/``open_hi`` make it exclusive), ``choices``,
    and whether None is allowed."""

    def __init__(self, kind, lo=None, hi=None, *, open_lo=False, open_hi=False, none=False,
                 choices=None):
        self.kind, self.lo, self.hi, self.open_lo, self.open_hi = kind, lo, hi, open_lo, open_hi
        self.none, self.choices = none, choices

    def allowed(self) -> str:
        if self.choices is not None:
            text = "one of " + ", ".join(map(str, self.choices))
        elif self.kind is bool:
            text = "true or false"
        elif self.kind is str:
            text = "a non-empty string"
        elif self.kind is list:
            text = f"a list of integers {self._range()}"
        else:
            what = {int: "an integer", float: "a finite number"}[self.kind]
            text = f"{self._range()} ({what})"
        return text + (" or null" if self.none else "")

    def _range(self) -> str:
        lo, hi = (f"{v:g}" if isinstance(v, float) else v for v in (self.lo, self.hi))
        if self.hi is not None:
            return f"in {'(' if self.open_lo else '['}{lo}, {hi}{')' if self.open_hi else ']'}"
        return f"{'>' if self.open_lo else '>='} {lo}"

    def _in_range(self, v) -> bool:
        if self.lo is not None and (v < self.lo or (self.open_lo and v == self.lo)):
            return False
        return self.hi is None or (v < self.hi or (not self.open_hi and v == self.hi))

    def check(self, name: str, v):
        """``v`` normalised (int -> float for float fields, tuple -> list), or ConfigError."""
        if v is None and self.none:
            return v
        ok, out = False, v
        if self.choices is not None:
            ok = isinstance(v, str) and v in self.choices
        elif self.kind is bool:
            ok = isinstance(v, bool)
        elif self.kind is str:
            ok = isinstance(v, str) and v != ""
        elif self.kind is int:
            ok = isinstance(v, int) and not isinstance(v, bool) and self._in_range(v)
        elif self.kind is float:
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                try:
                    out = float(v)
                except OverflowError:
                    out = math.inf
                ok = math.isfinite(out) and self._in_range(out)
                if ok and abs(out) > _FLOAT32_MAX:  # training arithmetic is float32
                    raise ConfigError(f"{name} must be {self.allowed()}; {v!r} overflows "
                                      f"float32, the precision it is used in (largest "
                                      f"{_FLOAT32_MAX:.4g})")
        elif self.kind is list:
            ok = isinstance(v, (list, tuple)) and all(
                isinstance(m, int) and not isinstance(m, bool) and self._in_range(m) for m in v)
            out = list(v) if ok else v
        if not ok:
            raise ConfigError(f"{name} must be {self.allowed()}, got {v!r}")
        return out


_SEED = dict(lo=0, hi=2 ** 32 - 1)  # numpy's RandomState seeds the class order
_EPOCHS = 10 ** 6
_SPECS = {
    "dataset": _Spec(str),  # any name or alias of der_fast.data (checked in validate)
    "data_root": _Spec(str, none=True),
    "download": _Spec(bool),
    "train_per_class": _Spec(int, 0, none=True),
    "test_per_class": _Spec(int, 0, none=True),
    "backbone": _Spec(str, choices=tuple(sorted(ARCHS))),
    "init_cls": _Spec(int, 0),
    "increment": _Spec(int, 1),
    "class_seed": _Spec(int, **_SEED),
    "last_step": _Spec(int, 0, none=True),
    "memory_total": _Spec(int, 1, none=True),
    "memory_per_class": _Spec(int, 1, none=True),
    "epochs": _Spec(int, 1, _EPOCHS),
    "warmup_epochs": _Spec(int, 0, _EPOCHS),
    "milestones": _Spec(list, 1, _EPOCHS),
    "batch_size": _Spec(int, 1),
    "lr": _Spec(float, 0, open_lo=True),
    "momentum": _Spec(float, 0, 1, open_hi=True),
    "weight_decay": _Spec(float, 0),
    "init_epochs": _Spec(int, 1, _EPOCHS, none=True),
    "init_lr": _Spec(float, 0, open_lo=True, none=True),
    "init_milestones": _Spec(list, 1, _EPOCHS, none=True),
    "init_weight_decay": _Spec(float, 0, none=True),
    "lambda_a": _Spec(float, 0),
    "keep": _Spec(float, 0, 1, open_lo=True, none=True),
    "lambda_s": _Spec(float, 0, none=True),
    "s_max": _Spec(float, 0, open_lo=True),
    "s_anneal": _Spec(str, choices=S_ANNEAL),
    "masks": _Spec(bool),
    "prune": _Spec(bool),
    "mask_init": _Spec(float, 0),
    "mask_lr": _Spec(float, 0, open_lo=True),
    "stage2": _Spec(str, choices=STAGE2_MODES),
    "epochs_stage2": _Spec(int, 0, _EPOCHS),
    "lr_stage2": _Spec(float, 0, open_lo=True),
    "milestones_stage2": _Spec(list, 1, _EPOCHS),
    "temperature": _Spec(float, 0, open_lo=True),
    "top5": _Spec(bool),
    "seed": _Spec(int, **_SEED),
    "device": _Spec(str),  # parsed and checked against the machine in _check_device
    "impl": _Spec(str, choices=IMPLS),
    "precision": _Spec(str, choices=PRECISIONS),
    "compile": _Spec(bool),
    "out": _Spec(str),
    "progress": _Spec(bool),
    "deterministic": _Spec(bool),
    "preset": _Spec(str, none=True, choices=tuple(sorted(P.PRESETS))),
    "epochs_scale": _Spec(float, 0, open_lo=True),
    "color_jitter": _Spec(float, 0, 1),
    "accum_steps": _Spec(int, 1),
    "plots": _Spec(bool),
    "tensorboard": _Spec(bool),
}
assert set(_SPECS) == {f.name for f in fields(Config)}, "every Config field needs a _Spec"


def _check_device(name: str) -> None:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``; CUDA ones must exist on this machine."""
    m = re.fullmatch(r"auto|cpu|cuda(?::(\d+))?", name)
    if m is None:
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if name.startswith("cuda"):
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ConfigError(f"device {name!r} requested but CUDA is not available; use "
                              "--device cpu or auto")
        if m.group(1) is not None and int(m.group(1)) >= n:
            raise ConfigError(f"device {name!r} does not exist: this machine has cuda:0.."
                              f"cuda:{n - 1}")


def _merge(base: dict, layer: dict) -> dict:
    """``base`` updated with ``layer``; a layer that sets one memory budget (total or per
    class) clears the other, so ``--memory N`` overrides a per-class preset and vice versa;
    likewise a parameter budget ``keep`` and a manual ``lambda_s``. A layer that turns masks
    off turns pruning off too, and one that sets fewer epochs (or step-0 epochs) than a lower
    layer's warm-up shortens that warm-up to the epochs (unless it sets the warm-up itself)."""
    out = dict(base)
    out.update(layer)
    for mine, other in (("memory_total", "memory_per_class"),
                        ("memory_per_class", "memory_total"),
                        ("keep", "lambda_s"), ("lambda_s", "keep")):
        if layer.get(mine) is not None and other not in layer:
            out[other] = None
    if layer.get("masks") is False and "prune" not in layer:
        out["prune"] = False
    for key in ("epochs", "init_epochs"):
        e, w = out.get(key), out.get("warmup_epochs")
        if key in layer and "warmup_epochs" not in layer and type(e) is int \
                and type(w) is int and w > e:
            out["warmup_epochs"] = e
    return out
