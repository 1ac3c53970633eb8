"""The training pipeline and its CLI: a tiny real run, metrics.json, resume, bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from der_fast import train as T

TINY = ["--data-root", "embedded", "--train-per-class", "24", "--test-per-class", "10",
        "--init-cls", "2", "--increment", "4", "--epochs", "1", "--epochs-stage2", "1",
        "--batch-size", "16", "--memory", "20", "--no-progress"]


def _tiny_cfg(out, **kw):
    cfg, _ = T.config_from_args(TINY + ["--out", str(out)])
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg.validate()


def test_aux_targets_mapping():
    y = torch.tensor([0, 3, 4, 5, 7, 2])
    got = T.aux_targets(y, n_old=4)
    assert got.tolist() == [0, 0, 1, 2, 4, 0]


def test_forgetting_hand_case():
    hist = [[90.0], [80.0, 70.0], [60.0, 75.0, 50.0]]
    # task 0: best 90 -> 60 (30); task 1: best 70 -> 75 (-5); mean 12.5
    assert T.forgetting(hist) == pytest.approx(12.5)
    assert T.forgetting([[50.0]]) == 0.0


def test_lr_schedule():
    assert T._lr_at(0, 0.1, 2, [5]) == pytest.approx(0.05)
    assert T._lr_at(1, 0.1, 2, [5]) == pytest.approx(0.1)
    assert T._lr_at(5, 0.1, 2, [5, 8]) == pytest.approx(0.01)
    assert T._lr_at(9, 0.1, 0, [5, 8]) == pytest.approx(0.001)


def test_cli_tiny_run_writes_valid_metrics(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "der_fast.train", *TINY, "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "average incremental top-1" in proc.stdout
    m = json.loads((out / "metrics.json").read_text())
    steps = m["steps"]
    assert [s["n_classes"] for s in steps] == [2, 6, 10]
    for s in steps:
        assert 0.0 <= s["top1"] <= 100.0
        assert len(s["per_task_top1"]) == s["step"] + 1
        assert s["params"] <= s["params_unpruned"]
        assert s["time_stage1_s"] > 0 and s["memory_size"] <= 20
        assert len(s["extractor_params"]) == s["step"] + 1
        assert s["n_test"] == 10 * s["n_classes"]
    summ = m["summary"]
    assert summ["avg_incremental_top1"] == pytest.approx(np.mean([s["top1"] for s in steps]))
    assert summ["last_top1"] == steps[-1]["top1"]
    assert m["config"]["increment"] == 4 and m["config"]["memory_total"] == 20
    assert sorted(m["class_order"]) == list(range(10))
    assert m["env"]["torch"] == torch.__version__


def test_resume_reproduces_uninterrupted_run(tmp_path):
    full = T.run(_tiny_cfg(tmp_path / "a"), log=lambda *a: None)
    # interrupt: keep the checkpoint written after step 1's stage 1, then resume from it
    cfg = _tiny_cfg(tmp_path / "b")

    class Stop(Exception):
        pass

    orig = T._save_ckpt

    def save_then_stop(out, state):
        orig(out, state)
        if tuple(state["next"]) == (1, 1):
            raise Stop

    T._save_ckpt = save_then_stop
    try:
        with pytest.raises(Stop):
            T.run(cfg, log=lambda *a: None)
    finally:
        T._save_ckpt = orig
    ck = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)
    assert tuple(ck["next"]) == (1, 1) and len(ck["steps"]) == 1
    resumed = T.run(_tiny_cfg(tmp_path / "b"), resume=True, log=lambda *a: None)
    for a, b in zip(full["steps"], resumed["steps"]):
        assert a["top1"] == pytest.approx(b["top1"])
        assert a["params"] == b["params"]
        assert a["loss_stage1"] == pytest.approx(b["loss_stage1"], rel=1e-4)


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    out = tmp_path / "c"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(T.ConfigError, match="corrupt"):
        T.run(_tiny_cfg(out), resume=True, log=lambda *a: None)


def test_mismatched_checkpoint_is_a_clear_error(tmp_path):
    out = tmp_path / "d"
    cfg = _tiny_cfg(out)
    cfg.epochs_stage2 = 0
    out.mkdir()
    T._save_ckpt(out, {"config": {**T.asdict(cfg), "lr": 0.5}, "model": {}})
    with pytest.raises(T.ConfigError, match="another config"):
        T.run(cfg, resume=True, log=lambda *a: None)


def _cli(args, tmp_path):
    return subprocess.run([sys.executable, "-m", "der_fast.train", *args,
                           "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args, message", [
    (["--dataset", "mnist"], "invalid choice"),
    (["--backbone", "vgg"], "invalid choice"),
    (["--increment", "3"], "divide"),
    (["--memory", "5"], "smaller than the number of classes"),
    (["--dataset", "cifar100", "--data-root", "/nonexistent/dir"], "nonexistent"),
    (["--no-masks"], "pruning needs masks"),
])
def test_bad_input_gives_clear_message(args, message, tmp_path):
    proc = _cli(["--data-root", "embedded", *args] if "--data-root" not in args else args,
                tmp_path)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_corrupt_dataset_file_is_a_clear_error(tmp_path):
    raw = tmp_path / "fm"
    raw.mkdir()
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                 "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (raw / name).write_bytes(os.urandom(64))
    proc = _cli(["--data-root", str(raw)], tmp_path)
    assert proc.returncode != 0
    assert "idx" in proc.stderr.lower() and "Traceback" not in proc.stderr


def test_unwritable_output_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cfg = _tiny_cfg(blocker / "sub")
    with pytest.raises(T.ConfigError, match="not writable"):
        T.run(cfg, log=lambda *a: None)


def test_config_file_and_unknown_keys(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"epochs": 7, "lambda_s": 0.5}))
    cfg, _ = T.config_from_args(["--config", str(f), "--epochs", "2"])
    assert cfg.epochs == 2 and cfg.lambda_s == 0.5
    f.write_text(json.dumps({"epochz": 7}))
    with pytest.raises(T.ConfigError, match="epochz"):
        T.config_from_args(["--config", str(f)])
    assert Path(f).exists()
