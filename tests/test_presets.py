"""Presets of the published protocols, --epochs-scale, and how they combine with --config and
flags. All in-process (no training), fast."""

import json
from dataclasses import asdict

import pytest

from der_fast import data as D
from der_fast import presets as P
from der_fast import train as T


def cfg_of(*argv):
    cfg, _ = T.config_from_args(list(argv))
    return cfg


@pytest.mark.parametrize("name, steps, init, inc", [
    ("cifar100-b0-5", 5, 20, 20), ("cifar100-b0-10", 10, 10, 10),
    ("cifar100-b0-20", 20, 5, 5), ("cifar100-b50-5", 6, 50, 10),
    ("cifar100-b50-10", 11, 50, 5), ("imagenet100-b0-10", 10, 10, 10),
])
def test_every_preset_resolves_to_the_published_protocol(name, steps, init, inc):
    cfg = cfg_of("--preset", name)
    assert cfg.preset == name and cfg.epochs_scale == 1.0
    assert (cfg.init_cls, cfg.increment) == (init, inc)
    assert len(D.make_steps(100, cfg.init_cls, cfg.increment)) == steps
    # shared by every protocol (DER.md): SGD 0.9 / 5e-4, 10-epoch warm-up, stage 2 30 @ 0.1
    assert (cfg.lr, cfg.momentum, cfg.weight_decay) == (0.1, 0.9, 5e-4)
    assert cfg.warmup_epochs == 10 and cfg.class_seed == 1993
    assert (cfg.stage2, cfg.epochs_stage2, cfg.lr_stage2, cfg.milestones_stage2) == \
        ("retrain", 30, 0.1, [15])
    assert cfg.masks and cfg.prune and cfg.lambda_a == 1.0
    assert cfg.train_per_class is None and cfg.test_per_class is None  # full data sets
    if name.startswith("cifar100"):
        assert cfg.dataset == "cifar100" and cfg.backbone == "resnet18_cifar"
        assert (cfg.epochs, cfg.milestones, cfg.batch_size) == (170, [100, 120], 128)
        assert cfg.temperature == 5.0 and not cfg.top5
        assert cfg.color_jitter == pytest.approx(63 / 255)
    else:
        assert cfg.dataset == "imagenet100" and cfg.backbone == "resnet18"
        assert (cfg.epochs, cfg.milestones, cfg.batch_size) == (220, [60, 120, 160], 256)
        assert cfg.temperature == 1.0 and cfg.top5 and cfg.color_jitter == 0.0
    if "b50" in name:
        assert (cfg.memory_total, cfg.memory_per_class) == (None, 20)
    else:
        assert (cfg.memory_total, cfg.memory_per_class) == (2000, None)


def test_no_arguments_is_the_old_default_run():
    assert asdict(cfg_of()) == asdict(T.Config().validate())
    assert cfg_of().preset is None


def test_flags_override_preset_values():
    cfg = cfg_of("--preset", "cifar100-b0-10", "--epochs", "3", "--lr", "0.05",
                 "--backbone", "resnet32", "--no-top5", "--temperature", "2",
                 "--milestones-stage2", "4", "5", "--color-jitter", "0")
    assert (cfg.epochs, cfg.lr, cfg.backbone, cfg.temperature) == (3, 0.05, "resnet32", 2.0)
    assert cfg.milestones_stage2 == [4, 5] and cfg.color_jitter == 0.0
    assert cfg.milestones == [100, 120]  # untouched values stay the preset's
    assert not cfg_of("--preset", "imagenet100-b0-10", "--no-top5").top5


def test_memory_flags_replace_the_presets_budget():
    cfg = cfg_of("--preset", "cifar100-b50-5", "--memory", "500")
    assert (cfg.memory_total, cfg.memory_per_class) == (500, None)
    cfg = cfg_of("--preset", "cifar100-b0-10", "--memory-per-class", "10")
    assert (cfg.memory_total, cfg.memory_per_class) == (None, 10)
    with pytest.raises(T.ConfigError, match="exactly one"):
        cfg_of("--memory", "500", "--memory-per-class", "10")


def test_epochs_scale_keeps_the_schedule_shape():
    cfg = cfg_of("--preset", "cifar100-b0-10", "--epochs-scale", "0.1")
    assert (cfg.epochs, cfg.warmup_epochs, cfg.milestones) == (17, 1, [10, 12])
    assert (cfg.epochs_stage2, cfg.milestones_stage2) == (3, [2])
    assert cfg.epochs_scale == 0.1
    tiny = cfg_of("--preset", "imagenet100-b0-10", "--epochs-scale", "0.001")
    assert (tiny.epochs, tiny.warmup_epochs, tiny.epochs_stage2) == (1, 1, 1)  # >= 1 epoch
    assert tiny.milestones == [1, 1, 1]  # kept: the final lr stays 1e-3 of the peak
    # flags are literal: not scaled
    cfg = cfg_of("--preset", "cifar100-b0-10", "--epochs-scale", "0.1", "--epochs", "5",
                 "--epochs-stage2", "1")
    assert (cfg.epochs, cfg.epochs_stage2, cfg.milestones) == (5, 1, [10, 12])
    # without a preset the defaults' schedule is scaled
    assert cfg_of("--epochs-scale", "0.5").epochs == 2
    assert P.scale_schedule({"epochs": 10, "warmup_epochs": 0, "epochs_stage2": 0}, 0.3) == \
        {"epochs": 3, "warmup_epochs": 0, "epochs_stage2": 0}


@pytest.mark.parametrize("scale", ["0", "-1", "nan", "inf"])
def test_bad_epochs_scale(scale):
    with pytest.raises(T.ConfigError, match="epochs"):
        cfg_of("--epochs-scale", scale)


def test_preset_inside_a_config_file(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"preset": "cifar100-b50-10", "epochs": 50, "lambda_s": 0.01}))
    cfg = cfg_of("--config", str(f), "--lr", "0.2")
    assert (cfg.init_cls, cfg.increment, cfg.memory_per_class) == (50, 5, 20)
    assert (cfg.epochs, cfg.lambda_s, cfg.lr, cfg.preset) == (50, 0.01, 0.2, "cifar100-b50-10")
    f.write_text(json.dumps({"preset": "cifar100-b7-3"}))
    with pytest.raises(T.ConfigError, match="unknown preset"):
        cfg_of("--config", str(f))


def test_unknown_preset_flag_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exc:
        cfg_of("--preset", "cifar10-b0-10")
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_resume_with_a_preset_is_refused(tmp_path):
    with pytest.raises(T.ConfigError, match="do not combine"):
        cfg_of("--resume", str(tmp_path), "--preset", "cifar100-b0-10")


def test_from_preset_api():
    cfg = T.Config.from_preset("cifar100-b0-5", epochs_scale=0.1, backbone="resnet32")
    assert (cfg.epochs, cfg.backbone, cfg.increment) == (17, "resnet32", 20)
    with pytest.raises(T.ConfigError, match="unknown preset"):
        T.Config.from_preset("nope")


def test_describe_lists_every_preset():
    text = P.describe()
    for name in P.PRESETS:
        assert name in text
    assert "step 0: 200 epochs (x0.1 at [60, 120, 160]" in P.describe(["cifar100-b50-5"])


def test_step0_schedule_defaults_to_the_later_steps():
    cfg = cfg_of("--epochs", "6", "--lr", "0.05", "--weight-decay", "1e-4")
    assert cfg.schedule(0) == cfg.schedule(3) == (6, 0.05, [3, 5], 1e-4, 0)
    cfg = cfg_of("--epochs", "6", "--milestones", "2", "4")
    assert cfg.schedule(0).milestones == cfg.schedule(1).milestones == [2, 4]


def test_step0_schedule_flags():
    cfg = cfg_of("--epochs", "4", "--init-epochs", "7", "--init-lr", "0.2",
                 "--init-milestones", "3", "5", "--init-weight-decay", "1e-3")
    assert cfg.schedule(0) == (7, 0.2, [3, 5], 1e-3, 0)
    assert cfg.schedule(1) == (4, cfg.lr, [2, 3], cfg.weight_decay, 0)
    # step 0's epochs alone: its milestones are 60 % / 85 % of its own epochs
    assert cfg_of("--init-epochs", "20").schedule(0).milestones == [12, 17]
    # explicit later-step milestones are step 0's too unless it has its own
    assert cfg_of("--init-epochs", "20", "--milestones", "2").schedule(0).milestones == [2]


@pytest.mark.parametrize("argv, match", [
    (["--init-epochs", "0"], "init_epochs"), (["--init-lr", "0"], "init_lr"),
    (["--init-weight-decay", "-1"], "init_weight_decay"),
    (["--init-milestones", "0"], "init_milestones"),
    (["--warmup-epochs", "3", "--epochs", "5", "--init-epochs", "2"], "init_epochs"),
])
def test_bad_step0_schedule(argv, match):
    with pytest.raises(T.ConfigError, match=match):
        cfg_of(*argv)


def test_presets_step0_schedules():
    # B50: the authors' "pretrain" schedule for the 50 base classes; B0: like every step
    b50 = cfg_of("--preset", "cifar100-b50-10")
    assert b50.schedule(0) == (200, 0.1, [60, 120, 160], 5e-4, 10)
    assert b50.schedule(1) == (170, 0.1, [100, 120], 5e-4, 10)
    b0 = cfg_of("--preset", "cifar100-b0-10")
    assert b0.schedule(0) == b0.schedule(1)
    # PyCIL's DER recipe
    py = cfg_of("--preset", "pycil-cifar100-b0-10")
    assert py.schedule(0) == (200, 0.1, [60, 120, 170], 5e-4, 0)
    assert py.schedule(1) == (170, 0.1, [80, 120, 150], 2e-4, 0)
    assert (py.backbone, py.stage2, py.masks, py.prune, py.warmup_epochs) == \
        ("resnet32", "weight_align", False, False, 0)
    assert (py.memory_total, py.init_cls, py.increment) == (2000, 10, 10)
    # --epochs-scale scales step 0's schedule too
    s = cfg_of("--preset", "cifar100-b50-10", "--epochs-scale", "0.1")
    assert s.schedule(0) == (20, 0.1, [6, 12, 16], 5e-4, 1)
    assert (s.epochs, s.warmup_epochs) == (17, 1)
    # a flag that shortens step 0 below the preset's warm-up shortens the warm-up
    assert cfg_of("--preset", "cifar100-b50-10", "--init-epochs", "4").warmup_epochs == 4
