"""Config: every knob of a run, its validation, and preset / dict construction."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Optional

from .. import presets as P
from ..backbones import ARCHS
from ..masks import MASK_INIT, MASK_LR

STAGE2_MODES = ("retrain", "weight_align", "none")
IMPLS = ("reference", "fast")
S_ANNEAL = ("epoch", "fixed")


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
    memory_total: Optional[int] = 200
    memory_per_class: Optional[int] = None
    epochs: int = 4
    warmup_epochs: int = 0
    milestones: list = field(default_factory=list)  # stage-1 epochs where lr *= 0.1
    batch_size: int = 64
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lambda_a: float = 1.0
    # the parameter budget: fraction of each new extractor's parameters that pruning keeps
    # (lambda_s is then adapted during stage 1 to land there); None = manual lambda_s
    keep: Optional[float] = 0.2
    lambda_s: Optional[float] = None  # manual sparsity weight (only without keep)
    s_max: float = 400.0
    # mask temperature schedule: "epoch" = HAT/DER (s from 1/s_max to s_max within every epoch),
    # "fixed" = s = s_max throughout (the clamp on e keeps the gates' gradients alive)
    s_anneal: str = "epoch"
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
            d = P.scale_schedule(d, epochs_scale)
            d["epochs_scale"] = epochs_scale
        return cls.from_dict(_merge(d, overrides)).validate()

    def validate(self) -> "Config":
        if self.backbone not in ARCHS:
            raise ConfigError(f"unknown backbone {self.backbone!r}; choose one of {sorted(ARCHS)}")
        if self.impl not in IMPLS:
            raise ConfigError(f"unknown impl {self.impl!r}; choose one of {IMPLS}")
        if self.stage2 not in STAGE2_MODES:
            raise ConfigError(f"unknown stage2 {self.stage2!r}; choose one of {STAGE2_MODES}")
        if (self.memory_total is None) == (self.memory_per_class is None):
            raise ConfigError("give exactly one of memory_total / memory_per_class")
        for name in ("epochs", "batch_size", "increment"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("epochs_stage2", "warmup_epochs", "init_cls"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.s_anneal not in S_ANNEAL:
            raise ConfigError(f"s_anneal must be one of {S_ANNEAL}, got {self.s_anneal!r}")
        if self.lr <= 0 or self.lr_stage2 <= 0 or self.s_max <= 0 or self.temperature <= 0:
            raise ConfigError("lr, lr_stage2, s_max and temperature must be > 0")
        if self.lambda_a < 0:
            raise ConfigError("lambda_a must be >= 0")
        if (self.keep is None) == (self.lambda_s is None):
            raise ConfigError("give exactly one of keep (a parameter budget) / lambda_s (a "
                              "manual sparsity weight)")
        if self.lambda_s is not None and not self.lambda_s >= 0:
            raise ConfigError(f"lambda_s must be >= 0, got {self.lambda_s}")
        if self.keep is not None and not 0.0 < self.keep <= 1.0:
            raise ConfigError(f"keep must be in (0, 1], got {self.keep}")
        if not self.mask_lr > 0:
            raise ConfigError(f"mask_lr must be > 0, got {self.mask_lr}")
        if self.prune and not self.masks:
            raise ConfigError("pruning needs masks: use --no-prune with --no-masks")
        if self.accum_steps < 1:
            raise ConfigError(f"accum_steps must be >= 1, got {self.accum_steps}")
        if not 0.0 <= self.color_jitter <= 1.0:
            raise ConfigError(f"color_jitter (brightness) must be in [0, 1], got "
                              f"{self.color_jitter}")
        if not self.epochs_scale > 0:
            raise ConfigError(f"epochs_scale must be > 0, got {self.epochs_scale}")
        if self.preset is not None and self.preset not in P.PRESETS:
            raise ConfigError(f"unknown preset {self.preset!r}; choose one of "
                              f"{', '.join(sorted(P.PRESETS))}")
        if self.accum_steps > self.batch_size:
            raise ConfigError(f"accum_steps ({self.accum_steps}) cannot exceed batch_size "
                              f"({self.batch_size})")
        for name in ("train_per_class", "test_per_class"):
            if getattr(self, name) == 0:
                setattr(self, name, None)  # 0 = all images
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 0 (0 = all)")
        return self

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown config keys {unknown}")
        return cls(**d)


def _merge(base: dict, layer: dict) -> dict:
    """``base`` updated with ``layer``; a layer that sets one memory budget (total or per
    class) clears the other, so ``--memory N`` overrides a per-class preset and vice versa;
    likewise a parameter budget ``keep`` and a manual ``lambda_s``."""
    out = dict(base)
    out.update(layer)
    for mine, other in (("memory_total", "memory_per_class"),
                        ("memory_per_class", "memory_total"),
                        ("keep", "lambda_s"), ("lambda_s", "keep")):
        if layer.get(mine) is not None and other not in layer:
            out[other] = None
    return out
