"""Hostile input (issue 14): every case is a one-line error naming the problem, the right exit
status, no traceback, and an output directory that is unchanged or holds the last good
checkpoint. In-process (der_fast.train.main / plot.main / presets.main with capsys); checks
fire before any data is loaded except where a run is really needed (tiny runs)."""

import errno
import json
import os
import re
import signal
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from der_fast import plot, presets
from der_fast import train as T
from der_fast.train import outputs, pipeline
from helpers import call_cli, snapshot

TINY = ["--data-root", "embedded", "--train-per-class", "20", "--test-per-class", "5",
        "--init-cls", "10", "--increment", "10", "--epochs", "1", "--epochs-stage2", "1",
        "--batch-size", "32", "--memory", "20", "--no-progress", "--no-plots"]


def _assert_one_error(err: str, message: str) -> None:
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1, err
    assert message in lines[0], err


def _train(argv, capsys, message, code=2, out=None):
    out = Path(out) if out is not None else None
    before = snapshot(out) if out is not None else None
    got, err = call_cli(T.main, argv, capsys)
    assert got == code, err
    _assert_one_error(err, message)
    if out is not None and code == 2:
        assert snapshot(out) == before  # unchanged
    return err


# ------------------------------------------------------------------ flags (validation only)
FLAG_CASES = [
    (["--epochs-scale", "1e308"], "non-finite schedule"),
    (["--device", "nonsense"], "device must be auto, cpu, cuda or cuda:N"),
    (["--device", "cuda:-1"], "device must be auto, cpu, cuda or cuda:N"),
    (["--device", "meta"], "device must be auto, cpu, cuda or cuda:N"),
    (["--device", "mps"], "device must be auto, cpu, cuda or cuda:N"),
    (["--device", "cuda:99"], "cuda:99"),
    (["--momentum", "-1"], "momentum must be in [0, 1)"),
    (["--momentum", "5"], "momentum must be in [0, 1)"),
    (["--seed", "-1"], "seed must be in [0, 4294967295]"),
    (["--seed", "100000000000000000000000"], "seed must be in"),
    (["--class-seed", "-5"], "class_seed must be in"),
    (["--lambda-s", "nan"], "lambda_s must be >= 0 (a finite number)"),
    (["--lambda-a", "nan"], "lambda_a must be >= 0 (a finite number)"),
    (["--temperature", "inf"], "temperature must be > 0 (a finite number)"),
    (["--weight-decay", "-1"], "weight_decay must be >= 0"),
    (["--milestones", "-5", "0"], "milestones must be a list of integers in [1,"),
    (["--milestones-stage2", "0"], "milestones_stage2 must be a list of integers"),
    (["--warmup-epochs", "100", "--epochs", "1"], "warmup_epochs (100) cannot exceed epochs"),
    (["--memory-per-class", "0"], "memory_per_class must be >= 1"),
    (["--memory", "0"], "memory_total must be >= 1"),
    (["--out", ""], "out must be a non-empty string"),
    (["--lr", "nan"], "lr must be > 0 (a finite number)"),
    (["--lr", "inf"], "lr must be > 0"),
    (["--lr", "1e300"], "1e+300 overflows float32"),
    (["--lambda-a", "4e38"], "lambda_a must be >= 0 (a finite number); 4e+38 overflows float32"),
    (["--s-max", "inf"], "s_max must be > 0"),
    (["--mask-init", "nan"], "mask_init must be >= 0"),
    (["--mask-lr", "0"], "mask_lr must be > 0"),
    (["--lr-stage2", "inf"], "lr_stage2 must be > 0"),
    (["--keep", "1.5"], "keep must be in (0, 1]"),
    (["--batch-size", "0"], "batch_size must be >= 1"),
    (["--epochs", "0"], "epochs must be in [1, 1000000]"),
    (["--train-per-class", "-1"], "train_per_class must be >= 0"),
    (["--no-masks", "--prune"], "pruning needs masks"),
    (["--resume", "somewhere", "--overwrite"], "do not combine it with --resume"),
]
if not torch.cuda.is_available():
    FLAG_CASES.append((["--device", "cuda"], "CUDA is not available"))


@pytest.mark.parametrize("extra, message", FLAG_CASES, ids=[" ".join(c[0]) for c in FLAG_CASES])
def test_bad_flag(extra, message, capsys, tmp_path):
    out = tmp_path / "o"
    argv = [*TINY, "--out", str(out), *extra]
    if "--resume" in extra:
        (tmp_path / "somewhere").mkdir()
        outputs.save_ckpt(tmp_path / "somewhere", {"config": asdict(T.Config()), "model": {}})
        argv = ["--resume", str(tmp_path / "somewhere"), "--overwrite"]
    _train(argv, capsys, message)
    assert not out.exists()  # refused before the output directory was made


# ------------------------------------------------------------------ --config files
CONFIG_CASES = [
    ({"epochs": "1"}, "epochs must be in [1, 1000000] (an integer), got '1'"),
    ({"epochs": 1.5}, "epochs must be in [1, 1000000] (an integer), got 1.5"),
    ({"batch_size": None}, "batch_size must be >= 1 (an integer), got None"),
    ({"lr": "0.1"}, "lr must be > 0 (a finite number), got '0.1'"),
    ({"memory_total": "20"}, "memory_total must be >= 1 (an integer) or null, got '20'"),
    ({"milestones": 5}, "milestones must be a list of integers"),
    ({"seed": 1.5}, "seed must be in [0,"),
    ({"out": 5}, "out must be a non-empty string, got 5"),
    ({"masks": "no", "prune": "no"}, "masks must be true or false, got 'no'"),
    ({"top5": 1}, "top5 must be true or false"),
    ({"backbone": "vgg"}, "backbone must be one of resnet18, resnet18_cifar, resnet32"),
    ({"dataset": "mnist"}, "dataset must be one of fashion_mnist"),
    ({"preset": 5}, "unknown preset 5"),
    ({"epochz": 1}, "unknown config keys ['epochz']"),
]


@pytest.mark.parametrize("content, message", CONFIG_CASES,
                         ids=[json.dumps(c[0]) for c in CONFIG_CASES])
def test_bad_config_file(content, message, capsys, tmp_path):
    out = tmp_path / "o"
    tiny = dict(data_root="embedded", train_per_class=20, test_per_class=5, init_cls=10,
                increment=10, epochs=1, epochs_stage2=1, batch_size=32, memory_total=20,
                progress=False, plots=False, out=str(out))
    f = tmp_path / "c.json"
    f.write_text(json.dumps({**tiny, **content}))
    _train(["--config", str(f)], capsys, message)
    assert not out.exists()


@pytest.mark.parametrize("raw, message", [
    (bytes(range(256)) * 4, "cannot read config"),  # random bytes: not UTF-8
    (b'{"lambda_s": NaN, "keep": null}', "NaN is not valid JSON"),
    (b'{"lr": Infinity}', "Infinity is not valid JSON"),
    (b"[1, 2]", "must hold a JSON object"),
    (b'{"epochs": ', "cannot read config"),
], ids=["random-bytes", "NaN", "Infinity", "list", "truncated"])
def test_unreadable_config_file(raw, message, capsys, tmp_path):
    f = tmp_path / "c.json"
    f.write_bytes(raw)
    _train([*TINY, "--out", str(tmp_path / "o"), "--config", str(f)], capsys, message)
    assert not (tmp_path / "o").exists()


def test_python_api_validates_like_the_cli():
    for kw, message in [(dict(lambda_s=float("nan"), keep=None), "lambda_s must be >= 0"),
                        (dict(device="mps"), "device must be"),
                        (dict(epochs=True), "epochs must be"),
                        (dict(momentum=5), "momentum must be in [0, 1)")]:
        with pytest.raises(T.ConfigError, match=re.escape(message)):
            T.Config(**kw)
    cfg = T.Config()
    cfg.temperature = float("inf")
    with pytest.raises(T.ConfigError, match="temperature"):
        cfg.validate()
    with pytest.raises(T.ConfigError, match="momentum"):
        T.Config.from_preset("cifar100-b0-10", momentum=-1)


def test_no_masks_implies_no_pruning(tmp_path):
    cfg, _ = T.config_from_args(["--no-masks"])
    assert not cfg.masks and not cfg.prune
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"masks": False}))
    cfg, _ = T.config_from_args(["--config", str(f)])
    assert not cfg.masks and not cfg.prune
    # a preset's warm-up is shortened to fewer epochs given as a flag (like --epochs-scale)
    cfg, _ = T.config_from_args(["--preset", "cifar100-b0-10", "--epochs", "3"])
    assert (cfg.epochs, cfg.warmup_epochs) == (3, 3)


# ------------------------------------------------------------------ the output directory
def test_fresh_run_never_overwrites_a_run(capsys, tmp_path):
    out = tmp_path / "done"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"precious")
    (out / "metrics.json").write_text("{}")
    _train([*TINY, "--out", str(out)], capsys, f"--resume {out}", out=out)
    err = _train([*TINY, "--out", str(out)], capsys, "--overwrite", out=out)
    assert "already holds a run" in err
    (out / "checkpoint.pt").unlink()  # metrics alone are protected too
    _train([*TINY, "--out", str(out)], capsys, "already holds a run", out=out)


def _ckpt(out: Path, **entries):
    cfg, _ = T.config_from_args([*TINY, "--out", str(out)])
    state = {"config": asdict(cfg), "model": {}, "memory": {"total": 20, "per_class": None,
                                                            "exemplars": {}},
             "steps": [], "next": (0, 0)}
    state.update(entries)
    state = {k: v for k, v in state.items() if v is not None}
    out.mkdir(exist_ok=True)
    outputs.save_ckpt(out, state)


@pytest.mark.parametrize("entries, message", [
    (dict(memory=None), "is incomplete: it lacks memory"),
    (dict(next=None, steps=None), "lacks steps, next"),
    (dict(memory={"exemplars": 3}), "memory entry is malformed"),
    (dict(next=(99, 0), steps=[{}] * 99), "past the last step: position step 99 stage 0"),
    (dict(next=(1, 1), steps=[{}]), "past the last step"),
    (dict(next=(0, 5)), "is inconsistent: position"),
    (dict(next=(0, 0), steps=[{}, {}]), "2 step rows"),
    (dict(next=(0, 1), memory={"total": 20, "per_class": None, "exemplars": {3: [1]}}),
     "memory holds classes [3] that step 0 has not reached"),
    (dict(model={"bogus": torch.zeros(1)}), "its model does not load"),
], ids=["no-memory", "no-steps-next", "bad-memory", "past-end", "past-end-stage",
        "bad-stage", "rows", "memory-ahead", "model"])
def test_resume_on_a_bad_checkpoint(entries, message, capsys, tmp_path):
    out = tmp_path / "run"
    _ckpt(out, **entries)
    _train(["--resume", str(out)], capsys, message, out=out)


# ------------------------------------------------------------------ data checked up front
def _idx(path: Path, a: np.ndarray) -> None:
    a = np.ascontiguousarray(a, dtype=np.uint8)
    header = bytes([0, 0, 8, a.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in a.shape)
    path.write_bytes(header + a.tobytes())


def test_class_missing_from_the_data(capsys, tmp_path):
    root = tmp_path / "fm"
    root.mkdir()
    ytr = np.repeat([c for c in range(10) if c != 7], 3)  # class 7 has no training images
    yte = np.repeat(np.arange(10), 2)
    _idx(root / "train-images-idx3-ubyte", np.zeros((len(ytr), 28, 28)))
    _idx(root / "train-labels-idx1-ubyte", ytr)
    _idx(root / "t10k-images-idx3-ubyte", np.zeros((len(yte), 28, 28)))
    _idx(root / "t10k-labels-idx1-ubyte", yte)
    out = tmp_path / "o"
    argv = [*TINY, "--data-root", str(root), "--out", str(out)]
    _train(argv, capsys, "no train images of class(es) 7 (Sneaker)")
    assert not (out / "checkpoint.pt").exists()


def _imagefolder(root: Path) -> None:
    from PIL import Image

    for split in ("train", "val"):
        for c in ("cat", "dog"):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (8, 8), (i * 50, 0, 0)).save(d / f"{i}.png")


def test_unreadable_image_is_named_before_training(capsys, tmp_path):
    root = tmp_path / "imgs"
    _imagefolder(root)
    bad = root / "train" / "dog" / "notes.png"
    bad.write_text("not an image")
    out = tmp_path / "o"
    _train(["--dataset", "imagefolder", "--data-root", str(root), "--init-cls", "2",
            "--increment", "2", "--memory", "4", "--epochs", "1", "--epochs-stage2", "0",
            "--no-progress", "--no-plots", "--device", "cpu", "--out", str(out)],
           capsys, f"1 unreadable image file(s), e.g. {bad}")
    assert not (out / "checkpoint.pt").exists()


# ------------------------------------------------------------------ faults during a run
def test_disk_full_during_a_checkpoint_write(capsys, tmp_path, monkeypatch):
    """The second checkpoint write fails (ENOSPC): exit 4, a clear message, no temporary file
    left, the first checkpoint intact."""
    calls = []
    real = torch.save

    def full_disk(obj, f, *a, **k):
        calls.append(f)
        if len(calls) == 2:
            Path(f).write_bytes(b"partial")  # a half-written temporary file
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(obj, f, *a, **k)

    monkeypatch.setattr(outputs.torch, "save", full_disk)
    out = tmp_path / "o"
    _train([*TINY, "--out", str(out)], capsys, "No space left on device", code=4)
    assert not list(out.glob("*.tmp"))
    ck = torch.load(out / "checkpoint.pt", weights_only=False)
    assert tuple(ck["next"]) == (0, 1)


def test_metrics_write_failure(capsys, tmp_path, monkeypatch):
    def fail(path, obj):
        raise T.faults.WriteFailed(f"cannot write {path}: [Errno 28] No space left on device")

    monkeypatch.setattr(outputs, "write_json", fail)
    monkeypatch.setattr(pipeline, "write_json", fail)
    out = tmp_path / "o"
    err = _train([*TINY, "--out", str(out)], capsys, "config.json", code=4)
    assert "Traceback" not in err


def test_sigint_stops_at_the_next_boundary_and_says_how_to_resume(capsys, tmp_path,
                                                                   monkeypatch):
    real = pipeline.save_ckpt

    def save_then_ctrl_c(out, state):
        real(out, state)
        os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C sends

    monkeypatch.setattr(pipeline, "save_ckpt", save_then_ctrl_c)
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN where pytest runs in the background
    out = tmp_path / "o"
    err = _train([*TINY, "--out", str(out)], capsys, "interrupted by SIGINT", code=130)
    assert f"--resume {out}" in err
    assert tuple(torch.load(out / "checkpoint.pt", weights_only=False)["next"]) == (0, 1)
    assert signal.getsignal(signal.SIGINT) is before  # restored


def test_json_is_strict(tmp_path):
    outputs.write_json(tmp_path / "m.json", {"a": float("nan"), "b": [float("inf"), 1.0]})
    text = (tmp_path / "m.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"a": None, "b": [None, 1.0]}


# ------------------------------------------------------------------ plot and presets CLIs
def _metrics(d: Path, steps) -> Path:
    d.mkdir()
    (d / "metrics.json").write_text(json.dumps({"steps": steps}))
    return d


@pytest.mark.parametrize("steps, message", [
    ([{"step": 0, "top1": 50.0}], "steps[0].n_classes must be a number"),
    ("abc", "'steps' must be a list"),
    ([{"n_classes": 2, "top1": "x"}], "steps[0].top1 must be a number"),
    ([{"n_classes": 2, "top1": 1.0, "extractor_params": 5}], "extractor_params must be a list"),
], ids=["no-n_classes", "steps-abc", "top1-str", "params-int"])
def test_plot_rejects_bad_metrics(steps, message, capsys, tmp_path):
    run = _metrics(tmp_path / "r", steps)
    code, err = call_cli(plot.main, [str(run), "--out", str(tmp_path / "x.png")], capsys)
    assert code == 2
    _assert_one_error(err, message)
    assert not (tmp_path / "x.png").exists()


def test_plot_csv_on_an_unwritable_path(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    run = _metrics(tmp_path / "r", [{"n_classes": 2, "top1": 50.0}])
    code, err = call_cli(plot.main, [str(run), "--out", str(tmp_path / "x.png"),
                                  "--csv", str(tmp_path / "no" / "dir" / "all.csv")], capsys)
    assert code == 2
    _assert_one_error(err, "cannot write")


@pytest.mark.parametrize("argv, message", [
    (["nonsense", "--x"], "unrecognized arguments: --x"),
    (["nonsense"], "unknown preset 'nonsense'"),
])
def test_presets_cli_validates(argv, message, capsys):
    code, err = call_cli(presets.main, argv, capsys)
    assert code == 2
    _assert_one_error(err, message)
    assert presets.main(["cifar100-b0-5"]) == 0
    assert "cifar100-b0-5" in capsys.readouterr().out
