"""No run is ever lost, every bad input a clear error (issue 29): plot never writes over a
run's files, --overwrite removes the old run only once the new one passed every check, OUT is
locked while a trainer writes it, --resume never rewrites another run or goes backwards, a
truncated image is named before training, a broken stdout stops nothing, a 1-image batch on a
1x1 feature map is dropped, a failed update_fc changes nothing, and a checkpoint that loads but
is wrong is refused."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from der_fast import data as D
from der_fast import plot
from der_fast import train as T
from der_fast.train import outputs
from helpers import call_cli, snapshot

pytestmark = pytest.mark.usefixtures("one_thread")

# two steps of 5 classes, a few images each, 1 epoch
TINY = ["--data-root", "embedded", "--train-per-class", "6", "--test-per-class", "2",
        "--init-cls", "5", "--increment", "5", "--epochs", "1", "--epochs-stage2", "1",
        "--batch-size", "16", "--memory", "20", "--no-progress", "--no-plots", "--device", "cpu"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def _refused(fn, argv, capsys, message, *unchanged):
    """``fn(argv)`` exits 2 with one error line holding ``message``, no traceback, and every
    directory of ``unchanged`` exactly as it was (no lock file left either)."""
    before = [snapshot(d) for d in unchanged]
    code, err = call_cli(fn, argv, capsys)
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1 and message in lines[0], err
    assert [snapshot(d) for d in unchanged] == before
    return lines[0]


def _fake_run(d: Path) -> Path:
    """A run directory's files (any bytes: only their survival is checked)."""
    (d / "tensorboard").mkdir(parents=True)
    (d / "tensorboard" / "events.out").write_bytes(b"events")
    (d / "checkpoint.pt").write_bytes(b"precious")
    (d / "metrics.json").write_text(json.dumps({"steps": [{"n_classes": 5, "top1": 50.0}]}))
    for f in ("metrics.csv", "config.json"):
        (d / f).write_text("precious")
    return d


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A real run stopped after step 0 of 2 (position step 1, stage 0)."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    assert T.main([*TINY, "--out", str(out), "--last-step", "0"]) == 0
    return out


# ------------------------------------------------------------------ 1. plot
@pytest.mark.parametrize("flag, name", [
    ("--out", "checkpoint.pt"), ("--csv", "metrics.json"), ("--csv", "metrics.csv"),
    ("--out", "config.json"), ("--out", "tensorboard/events.out"), ("--out", "accuracy.png"),
    ("--out", "checkpoint.pt.tmp")])
def test_plot_never_writes_over_a_run(flag, name, capsys, tmp_path):
    run = _fake_run(tmp_path / "run")
    other = _fake_run(tmp_path / "other")  # a run not given to plot is protected too
    for home in (run, other):
        argv = [str(run), flag, str(home / name)]
        if flag == "--csv":
            argv += ["--out", str(tmp_path / "x.png")]
        err = _refused(plot.main, argv, capsys, f"{flag} {home / name} would replace a file of "
                       f"the run in {home}", run, other)
        assert "another name" in err
    assert not (tmp_path / "x.png").exists()


def test_plot_writes_next_to_a_run(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    run = _fake_run(tmp_path / "run")
    before = snapshot(run)
    assert plot.main([str(run / "metrics.json"), "--out", str(run / "compare.png"),
                      "--csv", str(run / "all.csv")]) == 0
    after = snapshot(run)
    assert set(after) - set(before) == {"compare.png", "all.csv"}
    assert {k: after[k] for k in before} == before
    _refused(plot.main, [str(run), "--out", str(tmp_path / "a"), "--csv", str(tmp_path / "a")],
             capsys, "--out and --csv name the same file")


# ------------------------------------------------------------------ 2. --overwrite
def test_overwrite_keeps_the_old_run_until_the_new_one_is_valid(capsys, tmp_path):
    out = _fake_run(tmp_path / "run")
    for extra, message in [(["--data-root", str(tmp_path / "typo")], "is not a directory"),
                           (["--last-step", "7"], "past the protocol's last step"),
                           (["--memory", "3"], "memory_total 3 is smaller")]:
        _refused(T.main, [*TINY, "--out", str(out), "--overwrite", *extra], capsys, message, out)
    assert T.main([*TINY, "--out", str(out), "--overwrite", "--last-step", "0"]) == 0
    assert (out / "checkpoint.pt").read_bytes() != b"precious"
    assert len(json.loads((out / "metrics.json").read_text())["steps"]) == 1
    assert not (out / ".lock").exists()


# ------------------------------------------------------------------ 3. the lock on OUT
def _holder(path: Path, then_sleep: float):
    """A process holding an flock on ``path`` (its PID written in it)."""
    code = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
            "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'%d\\n' % os.getpid()); "
            "print('locked', flush=True); time.sleep(float(sys.argv[2]))")
    p = subprocess.Popen([sys.executable, "-c", code, str(path), str(then_sleep)],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    return p


def test_a_second_trainer_is_refused_naming_the_first(capsys, tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "der_fast.train", *TINY, "--out", str(out),
                              "--epochs", "100000"], env=ENV, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / ".lock").exists() or not (out / ".lock").read_text().strip():
            if first.poll() is not None:
                pytest.fail(f"the first trainer ended: {first.stderr.read()}")
            assert time.monotonic() < deadline, "the first trainer never locked its --out"
            time.sleep(0.2)
        for argv in ([*TINY, "--out", str(out)], [*TINY, "--out", str(out), "--overwrite"]):
            code, err = call_cli(T.main, argv, capsys)
            assert code == 2 and "Traceback" not in err, err
            assert f"is in use by another trainer (PID {first.pid} holds {out / '.lock'})" in err
    finally:
        first.send_signal(signal.SIGTERM)  # stops at the next batch
        _, err = first.communicate(timeout=300)
    assert first.returncode == 143, err
    assert not (out / ".lock").exists()  # released on the signal


def test_a_lock_left_by_a_killed_trainer_blocks_nothing(capsys, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = _holder(out / ".lock", 60)
    code, err = call_cli(T.main, [*TINY, "--out", str(out)], capsys)
    assert code == 2 and f"(PID {holder.pid} holds" in err, err
    holder.kill()  # SIGKILL: no clean-up, the file stays with a dead PID
    holder.wait()
    assert (out / ".lock").read_text().strip() == str(holder.pid)
    assert T.main([*TINY, "--out", str(out), "--last-step", "0"]) == 0
    assert not (out / ".lock").exists()


# ------------------------------------------------------------------ 4. --resume
def _edited(src: Path, dst: Path, edit) -> Path:
    """A copy of ``src``'s checkpoint in ``dst``, changed by ``edit(state)``."""
    dst.mkdir()
    state = torch.load(src / "checkpoint.pt", map_location="cpu", weights_only=False)
    edit(state)
    outputs.save_ckpt(dst, state)
    return dst


def test_resume_into_another_out_is_refused(capsys, tmp_path, stopped_run):
    other = _fake_run(tmp_path / "other")
    _refused(T.main, ["--resume", str(stopped_run), "--out", str(other)], capsys,
             f"--resume {stopped_run} continues the run in {stopped_run} and writes there: "
             f"drop --out {other}", stopped_run, other)
    # the same directory spelled otherwise is fine as far as --out goes
    cfg, resume = T.config_from_args(["--resume", str(stopped_run),
                                      "--out", str(stopped_run) + "/."])
    assert resume and cfg.out == str(stopped_run) + "/."


def test_resume_with_a_last_step_behind_the_run_changes_nothing(capsys, tmp_path,
                                                                stopped_run):
    """A whole run (no last step) interrupted after step 0, resumed with --last-step 0: an
    error, nothing written (a run that stopped at its own --last-step resumes as a no-op)."""
    run = _edited(stopped_run, tmp_path / "run", lambda s: s["config"].update(last_step=None))
    _refused(T.main, ["--resume", str(run), "--last-step", "0"], capsys,
             f"last_step 0: the run in {run} has already finished step 0; extend it with "
             "--last-step 1..1", run)
    before = snapshot(stopped_run)
    assert T.main(["--resume", str(stopped_run)]) == 0  # stopped at its last step 0
    assert snapshot(stopped_run)["checkpoint.pt"] == before["checkpoint.pt"]


# ------------------------------------------------------------------ 9. checkpoints that load
def _wide_fc(state):
    w = state["model"]["fc.weight"]
    state["model"]["fc.weight"] = torch.cat([w, w[:3]])
    state["model"]["fc.bias"] = torch.zeros(len(w) + 3)


def _narrow_fc_in(state):
    state["model"]["fc.weight"] = state["model"]["fc.weight"][:, :-1]


def _aux_rows(state):
    state["model"]["aux_fc.weight"] = state["model"]["aux_fc.weight"][:-1]
    state["model"]["aux_fc.bias"] = state["model"]["aux_fc.bias"][:-1]


def _task_sizes(state):
    state["model"]["_extra_state"] = dict(state["model"]["_extra_state"], task_sizes=[4])


def _memory(exemplars):
    def edit(state):
        state["memory"] = dict(state["memory"], exemplars=exemplars(state))
    return edit


def _class_7_under_0(state):  # images of a class not learnt yet, filed under a learnt one
    data = D.IncrementalData("fashion_mnist", 5, 5, root="embedded", max_train_per_class=6)
    ex = dict(state["memory"]["exemplars"])
    ex[0] = [int(i) for i in np.flatnonzero(data.train_y == 7)[:2]]
    return ex


@pytest.mark.parametrize("edit, message", [
    (_wide_fc, "its model has fc.weight (8, {d}) / fc.bias (8,), expected (5, {d}) / (5,)"),
    (_narrow_fc_in, "its model has fc.weight (5, {d_1}) / fc.bias (5,), expected (5, {d})"),
    (_aux_rows, "its model has aux_fc.weight (5, {d}) / aux_fc.bias (5,), expected (6, {d})"),
    (_task_sizes, "task sizes [4], the protocol's are [5]"),
    (_memory(lambda s: {**s["memory"]["exemplars"], 7: [0]}),
     "memory holds classes [7] that step 1 has not reached"),
    (_memory(lambda s: {**s["memory"]["exemplars"], -1: [0]}), "memory holds classes [-1]"),
    (_memory(lambda s: {c: v for c, v in s["memory"]["exemplars"].items() if int(c) != 3}),
     "memory lacks classes [3] learnt before step 1"),
    (_memory(_class_7_under_0), "files images under class 0 that are not training images"),
    (_memory(lambda s: {**s["memory"]["exemplars"], 0: [10 ** 6]}), "under class 0"),
], ids=["fc-wide", "fc-in", "aux-rows", "task-sizes", "memory-ahead", "memory-negative",
        "memory-lacks", "memory-other-class", "memory-index"])
def test_resume_refuses_a_checkpoint_that_loads_but_is_wrong(edit, message, capsys, tmp_path,
                                                             stopped_run):
    bad = _edited(stopped_run, tmp_path / "bad", edit)
    # the features of step 0's extractor, pruned
    d = torch.load(stopped_run / "checkpoint.pt", weights_only=False)["model"]["fc.weight"].shape[1]
    _refused(T.main, ["--resume", str(bad)], capsys, message.format(d=d, d_1=d - 1), bad)


# ------------------------------------------------------------------ 5. truncated images
def _imagefolder(root: Path, fmt: str) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("cat", "dog"):
            (root / split / c).mkdir(parents=True)
            for i in range(2):
                a = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)  # noise: no tiny file
                Image.fromarray(a).save(root / split / c / f"{i}.{fmt}")
    bad = root / "train" / "dog" / f"1.{fmt}"
    raw = bad.read_bytes()
    bad.write_bytes(raw[:len(raw) // 2])  # the header is intact: only decoding shows it
    with Image.open(bad) as im:
        assert im.size == (48, 48)
    return bad


@pytest.mark.parametrize("fmt", ["jpg", "png"])
def test_truncated_image_is_named_before_training(fmt, capsys, tmp_path):
    bad = _imagefolder(tmp_path / "imgs", fmt)
    out = tmp_path / "o"
    _refused(T.main, ["--dataset", "imagefolder", "--data-root", str(tmp_path / "imgs"),
                      "--init-cls", "2", "--increment", "2", "--memory", "4", "--epochs", "1",
                      "--epochs-stage2", "0", "--no-progress", "--no-plots", "--device", "cpu",
                      "--out", str(out)], capsys, f"1 unreadable image file(s), e.g. {bad}")
    assert not (out / "checkpoint.pt").exists()


def test_an_image_broken_after_the_check_stops_the_run_with_one_line(capsys, tmp_path,
                                                                     monkeypatch):
    """Should the up-front check miss it (a file replaced after the check): a one-line error
    naming the file, no PIL traceback mid-step."""
    bad = _imagefolder(tmp_path / "imgs", "jpg")
    monkeypatch.setattr(D.incremental, "check_image_files", lambda *a, **k: None)
    _refused(T.main, ["--dataset", "imagefolder", "--data-root", str(tmp_path / "imgs"),
                      "--init-cls", "2", "--increment", "2", "--memory", "4", "--epochs", "1",
                      "--epochs-stage2", "0", "--batch-size", "4", "--no-progress",
                      "--no-plots", "--device", "cpu", "--out", str(tmp_path / "o")],
             capsys, f"imagefolder: cannot read image {bad} (OSError: image file is truncated")


def test_an_image_broken_after_the_check_is_a_named_data_error(tmp_path):
    bad = _imagefolder(tmp_path / "imgs", "png")
    ds = D.load_imagefolder(tmp_path / "imgs", image_size=16)
    k = ds.train_paths.index(str(bad))
    tds = D.TransformDataset(ds, "train")
    assert tds[0][0].shape == (3, 16, 16)
    with pytest.raises(D.DataError, match=f"cannot read image {bad} .*remove or replace it"):
        tds[k]


# ------------------------------------------------------------------ 6. a broken stdout
def _finished(out: Path) -> None:
    m = json.loads((out / "metrics.json").read_text())
    assert [s["n_classes"] for s in m["steps"]] == [5, 10]
    assert tuple(torch.load(out / "checkpoint.pt", weights_only=False)["next"]) == (2, 0)
    assert not (out / ".lock").exists()


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
def test_a_full_stdout_stops_nothing(tmp_path):
    out = tmp_path / "run"
    with open("/dev/full", "w") as full:
        p = subprocess.run([sys.executable, "-m", "der_fast.train", *TINY, "--out", str(out)],
                           stdout=full, stderr=subprocess.PIPE, text=True, env=ENV, timeout=600)
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
    _finished(out)


def test_a_pipe_closed_early_stops_nothing(tmp_path):
    """``| head -1``: the reader goes away after the first line."""
    out = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-m", "der_fast.train", *TINY, "--out", str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    assert p.stdout.readline().startswith("DER on fashion_mnist")
    p.stdout.close()
    err = p.stderr.read()
    assert p.wait(timeout=600) == 0 and "Traceback" not in err, err
    _finished(out)


# ------------------------------------------------------------------ 7. 1-image batches
@pytest.mark.parametrize("batch, accum", [(29, 1), (9, 2)], ids=["last-batch-1", "micro-1"])
def test_resnet18_on_28_pixels_drops_a_1_image_batch(batch, accum, tmp_path):
    """30 images in batches of 29 (a last batch of 1; recalibrate_bn too), or of 9 in 2
    micro-batches (a last batch of 3: a micro-batch of 1): the final map is 1x1."""
    out = tmp_path / "run"
    argv = [*TINY, "--backbone", "resnet18", "--train-per-class", "3", "--init-cls", "10",
            "--increment", "10", "--batch-size", str(batch), "--accum-steps", str(accum),
            "--out", str(out)]
    assert T.main(argv) == 0
    assert len(json.loads((out / "metrics.json").read_text())["steps"]) == 1


@pytest.mark.parametrize("extra, least", [(["--batch-size", "1"], 2),
                                          (["--batch-size", "3", "--accum-steps", "2"], 4)])
def test_a_batch_size_too_small_for_a_1x1_map_is_refused(extra, least, capsys, tmp_path):
    _refused(T.main, [*TINY, "--backbone", "resnet18", "--out", str(tmp_path / "o"), *extra],
             capsys, f"backbone resnet18 reduces 28x28 images to a 1x1 feature map, where "
             f"BatchNorm needs at least 2 images per micro-batch: batch_size {extra[1]} must "
             f"be at least 2 x processes x accum_steps = {least}")
    assert not (tmp_path / "o" / "checkpoint.pt").exists()


# ------------------------------------------------------------------ 8. update_fc
@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_a_failed_update_fc_changes_nothing(impl):
    from der_fast.train.pipeline import _model_class

    model = _model_class(impl)("resnet32", in_channels=1, use_masks=False)
    model.update_fc(2)
    before = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    for bad, kind, message in [(10.5, TypeError, "nb_classes must be an integer, got 10.5"),
                               (True, TypeError, "must be an integer, got True"),
                               ("6", TypeError, "must be an integer, got '6'"),
                               (2, ValueError, "must exceed the 2 classes already seen, got 2"),
                               (-1, ValueError, "got -1")]:
        with pytest.raises(kind, match=message.replace("(", r"\(")):
            model.update_fc(bad)
        assert len(model.convnets) == 1 and model.task_sizes == [2]
        assert model.fc.weight.shape == (2, 64) and model.aux_fc.weight.shape == (3, 64)
        after = model.state_dict()
        assert set(after) == set(before) | {"_extra_state"}
        assert all(torch.equal(after[k], v) for k, v in before.items())
    model.update_fc(np.int64(6))  # numpy integers are integers
    assert model.task_sizes == [2, 4] and model.fc.weight.shape == (6, 128)
