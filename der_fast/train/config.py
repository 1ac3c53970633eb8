"""Config: every knob of a run, declared once per field (default, typed validation
:class:`Spec`, command-line flag), and preset / dict construction."""

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
    """A training stage's SGD schedule: stage 1's of a step (:meth:`Config.schedule`), or
    stage 2's (built by :func:`~der_fast.train.stages.stage2`)."""

    epochs: int
    lr: float
    milestones: list  # epochs where lr is divided by 10
    weight_decay: float
    warmup: int = 0  # epochs of linear lr warm-up


class ConfigError(ValueError):
    """A bad configuration (clear message, non-zero exit from the CLI)."""


_FLOAT32_MAX = 3.4028234663852886e38


class Spec:
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


def _knob(default, spec: Spec, *flags: str, help: Optional[str] = None,
          metavar: Optional[str] = None, choices=None, hidden: tuple = ()):
    """A Config field, declared once: its default, what it accepts (``spec``) and its
    command-line flags (``der_fast.train.cli`` adds them in field order).

    ``flags``: the option strings; a bool field's ``--no-*`` flags store False, its others
    True. ``help`` (on the first flag; ``{default}`` is replaced by the field's default),
    ``metavar``; ``choices``: the flag's choices where they are not ``spec.choices``;
    ``hidden``: more flags of a bool field, accepted but not listed in ``--help``."""
    meta = {"spec": spec, "flags": flags, "help": help, "metavar": metavar,
            "choices": choices, "hidden": hidden}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


_SEED = dict(lo=0, hi=2 ** 32 - 1)  # numpy's RandomState seeds the class order
_EPOCHS = 10 ** 6


@dataclass
class Config:
    """Every knob of a run; saved with the results. Defaults: the offline demo run. Each
    field declares its validation (:class:`Spec`) and its command-line flag (in this order
    in ``--help``)."""

    # record of the preset the values came from (see from_preset)
    preset: Optional[str] = _knob(
        None, Spec(str, none=True, choices=tuple(sorted(P.PRESETS))), "--preset",
        help="a published protocol's hyper-parameters (see below; python -m der_fast.presets)")
    # record: factor --epochs-scale already applied to the schedule
    epochs_scale: float = _knob(
        1.0, Spec(float, 0, open_lo=True), "--epochs-scale", metavar="F",
        help="scale the preset/config schedule by F (epochs, warm-up, milestones, stage 2; "
             "each at least 1 epoch) for shortened runs")
    # any name or alias of der_fast.data (checked in validate); the flag takes the names
    dataset: str = _knob("fashion_mnist", Spec(str), "--dataset", choices=DATASET_NAMES)
    data_root: Optional[str] = _knob(None, Spec(str, none=True), "--data-root",
                                     help="dataset folder (default: built-in / system copy)")
    download: bool = _knob(False, Spec(bool), "--download",
                           help="allow torchvision to download")
    # the default run uses the first 600/200 images per class: exactly the shipped subset, so it
    # gives the same result with or without the full Fashion-MNIST installed (0 = all images)
    train_per_class: Optional[int] = _knob(
        600, Spec(int, 0, none=True), "--train-per-class",
        help="use only the first N training images of each class ({default}; 0 = all)")
    test_per_class: Optional[int] = _knob(
        200, Spec(int, 0, none=True), "--test-per-class",
        help="evaluate on only the first N test images of each class ({default}; 0 = all)")
    backbone: str = _knob("resnet32", Spec(str, choices=tuple(sorted(ARCHS))), "--backbone")
    init_cls: int = _knob(2, Spec(int, 0), "--init-cls",
                          help="classes in step 0 (0 = same as increment)")
    increment: int = _knob(2, Spec(int, 1), "--increment", help="new classes per later step")
    class_seed: int = _knob(1993, Spec(int, **_SEED), "--class-seed",
                            help="seed of the class order ({default})")
    # stop after this step (0-based); None = the protocol's last
    last_step: Optional[int] = _knob(
        None, Spec(int, 0, none=True), "--last-step", metavar="T",
        help="stop after step T (0-based; default: the last). --resume DIR --last-step T "
             "extends a stopped run")
    memory_total: Optional[int] = _knob(200, Spec(int, 1, none=True), "--memory",
                                        help="exemplar memory, total")
    memory_per_class: Optional[int] = _knob(
        None, Spec(int, 1, none=True), "--memory-per-class",
        help="exemplar memory per class (instead of --memory)")
    epochs: int = _knob(4, Spec(int, 1, _EPOCHS), "--epochs",
                        help="stage-1 epochs per step ({default})")
    warmup_epochs: int = _knob(0, Spec(int, 0, _EPOCHS), "--warmup-epochs")
    milestones: list = _knob([], Spec(list, 1, _EPOCHS), "--milestones",
                             help="stage-1 epochs where lr is divided by 10")
    # step 0's own stage-1 schedule (PyCIL and the authors' configs train the first step with
    # other epochs / decays / weight decay than the later ones); None = the later steps' value
    init_epochs: Optional[int] = _knob(None, Spec(int, 1, _EPOCHS, none=True), "--init-epochs",
                                       help="stage-1 epochs of step 0 (default: --epochs)")
    init_lr: Optional[float] = _knob(None, Spec(float, 0, open_lo=True, none=True), "--init-lr",
                                     help="learning rate of step 0 (default: --lr)")
    init_milestones: Optional[list] = _knob(
        None, Spec(list, 1, _EPOCHS, none=True), "--init-milestones",
        help="step 0's epochs where lr is divided by 10 (default: --milestones)")
    init_weight_decay: Optional[float] = _knob(
        None, Spec(float, 0, none=True), "--init-weight-decay",
        help="weight decay of step 0 (default: --weight-decay)")
    # stage 2 re-initialises the classifier: on the default run's balanced subset (250-400
    # images) it needs about 20 epochs to converge; with 4, the last step's top-1 was 20 points
    # lower and moved by up to 7 with the stage-2 seed alone (RESULTS.md, "Stage 2 long enough
    # to converge")
    epochs_stage2: int = _knob(20, Spec(int, 0, _EPOCHS), "--epochs-stage2",
                               help="stage-2 epochs ({default})")
    lr_stage2: float = _knob(0.1, Spec(float, 0, open_lo=True), "--lr-stage2")
    milestones_stage2: list = _knob(
        [], Spec(list, 1, _EPOCHS), "--milestones-stage2",
        help="stage-2 epochs where lr is divided by 10 (default: half way)")
    batch_size: int = _knob(64, Spec(int, 1), "--batch-size",
                            help="global batch size, over all processes ({default})")
    # micro-batches per batch (per process), BatchNorm per micro-batch
    accum_steps: int = _knob(
        1, Spec(int, 1), "--accum-steps",
        help="split each (per-process) batch into N micro-batches: gradient accumulation, "
             "BatchNorm per micro-batch ({default})")
    lr: float = _knob(0.01, Spec(float, 0, open_lo=True), "--lr")
    momentum: float = _knob(0.9, Spec(float, 0, 1, open_hi=True), "--momentum")
    weight_decay: float = _knob(5e-4, Spec(float, 0), "--weight-decay")
    # ColorJitter(brightness=b) in stage-1/2 training batches
    color_jitter: float = _knob(
        0.0, Spec(float, 0, 1), "--color-jitter", metavar="B",
        help="ColorJitter brightness B for training batches ({default:g}; CIFAR presets: "
             "63/255)")
    lambda_a: float = _knob(1.0, Spec(float, 0), "--lambda-a", help="auxiliary loss weight")
    # the parameter budget: fraction of each new extractor's parameters that pruning keeps
    # (lambda_s is then adapted during stage 1 to land there); None = manual lambda_s
    keep: Optional[float] = _knob(
        0.2, Spec(float, 0, 1, open_lo=True, none=True), "--keep", metavar="R",
        help="parameter budget: the fraction of each new extractor's parameters that pruning "
             "keeps; lambda_s is adapted during stage 1 to land there ({default})")
    # manual sparsity weight (only without keep)
    lambda_s: Optional[float] = _knob(
        None, Spec(float, 0, none=True), "--lambda-s",
        help="a fixed sparsity loss weight instead of a budget (replaces --keep)")
    s_max: float = _knob(400.0, Spec(float, 0, open_lo=True), "--s-max",
                         help="mask annealing s_max ({default:g})")
    # mask temperature: "fixed" = s_max throughout (the clamp on e keeps every gate's gradient
    # alive); "epoch" = HAT/DER's schedule, s from 1/s_max to s_max within every epoch (all
    # gates ~1/2 at each epoch's start: measured several points worse, RESULTS.md "Masks")
    s_anneal: str = _knob(
        "fixed", Spec(str, choices=S_ANNEAL), "--s-anneal",
        help="mask temperature: s fixed at s_max, or annealed from 1/s_max to s_max within "
             "every epoch as in HAT/DER ({default})")
    mask_init: float = _knob(MASK_INIT, Spec(float, 0), "--mask-init",
                             help="initial mask embedding e ({default:g})")
    # plain SGD (no momentum, no decay) for the mask embeddings
    mask_lr: float = _knob(MASK_LR, Spec(float, 0, open_lo=True), "--mask-lr",
                           help="learning rate of the mask embeddings, plain SGD ({default:g})")
    masks: bool = _knob(True, Spec(bool), "--no-masks", hidden=("--masks",),
                        help="DER without masks (and without pruning)")
    prune: bool = _knob(True, Spec(bool), "--no-prune", hidden=("--prune",))
    stage2: str = _knob("retrain", Spec(str, choices=STAGE2_MODES), "--stage2",
                        help="classifier learning: paper's re-training, PyCIL's weight "
                             "aligning, or none")
    temperature: float = _knob(5.0, Spec(float, 0, open_lo=True), "--temperature")
    top5: bool = _knob(False, Spec(bool), "--top5", "--no-top5")
    seed: int = _knob(1993, Spec(int, **_SEED), "--seed",
                      help="seed of data order, initialisation and augmentation ({default}); "
                           "the class order has --class-seed")
    # parsed and checked against the machine in _check_device
    device: str = _knob("auto", Spec(str), "--device",
                        help="cpu, cuda, cuda:N or auto (under torchrun: cuda:LOCAL_RANK)")
    impl: str = _knob("fast", Spec(str, choices=IMPLS), "--impl")
    # training precision: float32, or torch.autocast to bfloat16 (CPU, CUDA) / float16 (CUDA,
    # with a GradScaler); the ops, losses, masks and BatchNorm statistics stay float32
    precision: str = _knob(
        "32", Spec(str, choices=PRECISIONS), "--precision",
        help="32 (float32), bf16 (torch.autocast to bfloat16; slower on a CPU without native "
             "bf16) or 16 (float16 autocast with a GradScaler; CUDA only) ({default})")
    # torch.compile the model trained in stage 1 / stage 2 (recompiled per stage; evaluation
    # stays eager); wall times include the compiles
    compile: bool = _knob(
        False, Spec(bool), "--compile",
        help="with --impl reference: torch.compile the model each training stage trains "
             "(recompiled whenever the model changes; compile time counts in the wall times; "
             "evaluation stays eager)")
    out: str = _knob("runs/der", Spec(str), "--out", help="output directory ({default})")
    progress: bool = _knob(True, Spec(bool), "--no-progress")
    # accuracy.png / params.png after every step (metrics.csv always)
    plots: bool = _knob(True, Spec(bool), "--no-plots",
                        help="do not write accuracy.png / params.png (metrics.csv is always "
                             "written)")
    # TensorBoard event files in OUT/tensorboard
    tensorboard: bool = _knob(False, Spec(bool), "--tensorboard",
                              help="also log to OUT/tensorboard (needs the tensorboard package)")
    deterministic: bool = _knob(False, Spec(bool), "--deterministic")

    @classmethod
    def from_preset(cls, name: str, epochs_scale: float = 1.0, **overrides) -> "Config":
        """A preset's config (see :mod:`der_fast.presets`), its schedule scaled by
        ``epochs_scale``, then ``overrides`` taken literally."""
        try:
            d = P.preset_config(name)
        except KeyError as exc:
            raise ConfigError(exc.args[0]) from None
        d = merge_layers(asdict(cls()), d)
        if epochs_scale != 1.0:
            try:
                d = P.scale_schedule(d, epochs_scale)
            except (ValueError, TypeError) as exc:
                raise ConfigError(f"epochs_scale: {exc}") from None
            d["epochs_scale"] = epochs_scale
        return cls.from_dict(merge_layers(d, overrides))

    def __post_init__(self):
        self.validate()

    def validate(self) -> "Config":
        """Check every field against its :class:`Spec` (type, range, finiteness), the device
        against what exists, then the rules between fields. Raises a one-line ConfigError
        naming the field and the allowed values; returns self."""
        for f in fields(self):
            setattr(self, f.name, f.metadata["spec"].check(f.name, getattr(self, f.name)))
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
            # trainer: RESULTS.md "Mixed precision, torch.compile of FastDERNet"
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
        Without milestones the lr is divided by 10 at 60 % and 85 % of the epochs; every
        step warms up over ``warmup_epochs``."""
        first = t == 0

        def pick(name):
            v = getattr(self, "init_" + name) if first else None
            return getattr(self, name) if v is None else v

        epochs = pick("epochs")
        milestones = pick("milestones") or [int(0.6 * epochs), int(0.85 * epochs)]
        return Schedule(epochs, pick("lr"), [m for m in milestones if m > 0],
                        pick("weight_decay"), self.warmup_epochs)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        if not isinstance(d, dict):
            raise ConfigError(f"a config must be a JSON object / dict, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names, key=str)
        if unknown:
            raise ConfigError(f"unknown config keys {unknown}")
        return cls(**d)


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


def merge_layers(base: dict, layer: dict) -> dict:
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
