"""Interruption loses nothing: a real process killed by a real signal in the middle of a step
resumes with --resume DIR and ends with the same metrics as an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from der_fast import train as T
from der_fast.reference import DERNet

# 2 steps (2 + 8 classes); step 1 has 9 batches, so a signal sent when metrics.json shows
# step 0 lands inside step 1
TINY = ["--data-root", "embedded", "--train-per-class", "16", "--test-per-class", "10",
        "--init-cls", "2", "--increment", "8", "--epochs", "1", "--epochs-stage2", "1",
        "--batch-size", "16", "--memory", "20", "--no-progress", "--no-plots"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # same threads in every run: same float sums


def _train(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "der_fast.train", *args], env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def _steps_done(out) -> int:
    try:
        return len(json.loads((out / "metrics.json").read_text())["steps"])
    except (OSError, ValueError, KeyError):
        return 0  # not written yet (written atomically: never half a file)


def _start_and_signal(out, sig, after_steps):
    """Start a run, wait until metrics.json holds ``after_steps`` steps (the run is then inside
    step ``after_steps``, stage 1), send ``sig``; return the finished process."""
    proc = subprocess.Popen([sys.executable, "-m", "der_fast.train", *TINY, "--out", str(out)],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while _steps_done(out) < after_steps:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"run ended or stalled before step {after_steps}: "
                        f"{proc.communicate()[1][-2000:]}")
        time.sleep(0.02)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    return proc, stdout, stderr


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The reference run, in this process with one thread like the subprocesses (the same
    kernels, so the same float sums)."""
    out = tmp_path_factory.mktemp("full")
    cfg, _ = T.config_from_args(TINY + ["--out", str(out)])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        T.run(cfg, log=lambda *a: None)
    finally:
        torch.set_num_threads(threads)
    return json.loads((out / "metrics.json").read_text())


def _same_results(a: dict, b: dict) -> None:
    assert len(a["steps"]) == len(b["steps"])
    for x, y in zip(a["steps"], b["steps"]):
        for k in ("top1", "per_task_top1", "params", "params_unpruned", "memory_size",
                  "extractor_params", "extractor_params_unpruned", "macs", "n_test"):
            assert x[k] == y[k], (x["step"], k)
        for k in ("loss_stage1", "loss_stage2", "keep", "lambda_s"):
            if k in x:
                assert x[k] == pytest.approx(y[k], rel=1e-6), (x["step"], k)
    for k in ("avg_incremental_top1", "last_top1", "forgetting", "final_params"):
        assert a["summary"][k] == pytest.approx(b["summary"][k], rel=1e-9)


def test_sigkill_mid_step_then_resume_gives_the_same_metrics(tmp_path, uninterrupted):
    out = tmp_path / "killed"
    proc, _, _ = _start_and_signal(out, signal.SIGKILL, after_steps=1)
    assert proc.returncode == -signal.SIGKILL
    assert _steps_done(out) == 1  # really killed mid-run: step 1 never finished
    ck = torch.load(out / "checkpoint.pt", weights_only=False)  # intact (atomic writes)
    assert tuple(ck["next"]) in ((1, 0), (1, 1)) and len(ck["steps"]) == 1
    resumed = _train("--resume", str(out))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout
    _same_results(json.loads((out / "metrics.json").read_text()), uninterrupted)
    assert (out / "metrics.csv").read_text().count("\n") == 1 + 2  # header + one row per step


def test_sigterm_stops_cleanly_then_resume_gives_the_same_metrics(tmp_path, uninterrupted):
    out = tmp_path / "terminated"
    proc, _, stderr = _start_and_signal(out, signal.SIGTERM, after_steps=1)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "interrupted by SIGTERM" in stderr and f"--resume {out}" in stderr
    assert "Traceback" not in stderr
    ck = torch.load(out / "checkpoint.pt", weights_only=False)
    assert tuple(ck["next"]) in ((1, 0), (1, 1)) and len(ck["steps"]) == 1
    DERNet("resnet32", in_channels=1).load_state_dict(ck["model"])  # a loadable model
    resumed = _train("--resume", str(out))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _same_results(json.loads((out / "metrics.json").read_text()), uninterrupted)
