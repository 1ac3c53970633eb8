"""README claims that no other test checked (issue 27, item 5). Each test quotes the passage it
checks and fails if the claim is false; the passages now live in docs/, each test names its
file. Tiny runs on the shipped Fashion-MNIST subset.

Covered elsewhere, not repeated here: one SIGINT in-process -> status 130 and the hint
(tests/test_bad_input.py), SIGKILL / SIGTERM mid-step then --resume (tests/test_resume.py),
--tensorboard without the package as a ConfigError from T.run (tests/test_train.py)."""

import io
import json
import math
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from der_fast import data as D
from der_fast import train as T
from der_fast.fast import FastDERNet
from der_fast.reference import DERNet
from der_fast.train import pipeline, stages
from der_fast.train.evaluate import evaluate

# 3 steps (2 + 4 + 4 classes), one epoch per stage (tests/test_train.py's TINY)
TINY = ["--data-root", "embedded", "--train-per-class", "24", "--test-per-class", "10",
        "--init-cls", "2", "--increment", "4", "--epochs", "1", "--epochs-stage2", "1",
        "--batch-size", "16", "--memory", "20", "--no-progress", "--no-plots"]
RUN = TINY + ["--top5", "--deterministic"]  # the shared run, in and out of this process
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # subprocesses: one thread, like `base`
QUIET = dict(log=lambda *a: None)
# in this process too: one thread (the same float sums as the subprocesses; shared CPUs)
pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(out, argv=TINY, **kw):
    cfg, _ = T.config_from_args(list(argv) + ["--out", str(out)])
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg.validate()


@pytest.fixture(autouse=True)
def _restore_deterministic():
    """run() turns torch.use_deterministic_algorithms on for good (--deterministic)."""
    before = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(before)


@pytest.fixture(scope="module")
def base(tmp_path_factory, one_thread):
    """The uninterrupted RUN in this process, at one thread like the subprocesses (the same
    kernels, the same float sums). Returns its directory and, per stage 1, whether
    torch's deterministic algorithms were on."""
    out, det, real = tmp_path_factory.mktemp("base"), [], pipeline.stage1
    before = torch.are_deterministic_algorithms_enabled()
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(pipeline, "stage1", lambda *a, **k: det.append(
                torch.are_deterministic_algorithms_enabled()) or real(*a, **k))
            T.run(_cfg(out, RUN), **QUIET)
    finally:
        torch.use_deterministic_algorithms(before)
    return out, det


def _free(key) -> bool:  # differ between runs by design: wall times, the folder, the machine
    return "time" in str(key) or key in ("out", "env")


def assert_same(a, b, where="") -> None:
    """``a`` and ``b`` equal bit for bit (tensors by torch.equal), times and paths apart."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        keys = sorted((k for k in a if not _free(k)), key=str)
        assert keys == sorted((k for k in b if not _free(k)), key=str), where
        for k in keys:
            assert_same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), where
    else:
        assert type(a) is type(b) and a == b, f"{where}: {a!r} != {b!r}"


def assert_same_run(a: Path, b: Path) -> None:
    """metrics.json and checkpoint.pt of two run directories equal bit for bit."""
    assert_same(json.loads((a / "metrics.json").read_text()),
                json.loads((b / "metrics.json").read_text()), "metrics.json")
    assert_same(torch.load(a / "checkpoint.pt", weights_only=False),
                torch.load(b / "checkpoint.pt", weights_only=False), "checkpoint.pt")


def _train(*args):
    return subprocess.run([sys.executable, "-m", "der_fast.train", *args], env=ENV,
                          capture_output=True, text=True, timeout=300)


# ------------------------------------------------------------------ 1. top-5
class _TableModel:
    """A model whose logits for test image i are ``table[i]`` (i travels in pixel 0)."""

    def __init__(self, table):
        self.table, self.eval = table, lambda: self

    def __call__(self, x):
        return {"logits": self.table[x[:, 0, 0, 0].long()], "features": None}


class _Data:
    """The test images 0..n-1 with labels ``y``, one task per list in ``steps``."""

    def __init__(self, y, steps):
        self.y, self.steps = y, steps
        self.test_indices, self.labels = lambda t: np.arange(len(y)), lambda split: y

    def batches(self, split, idx, batch_size, device=None):
        for lo in range(0, len(idx), batch_size):
            i = torch.as_tensor(idx[lo:lo + batch_size])
            yield i.double().reshape(-1, 1, 1, 1), torch.as_tensor(self.y)[i]


def _hand_topk(logits, y, k):
    """Hit iff fewer than k classes score strictly higher than the true one (no topk)."""
    true = logits[torch.arange(len(y)), y]
    return 100.0 * float(((logits > true[:, None]).sum(1) < k).double().mean())


@pytest.mark.parametrize("n_classes", [12, 4])
def test_top5_is_the_topk_of_the_logits(n_classes):
    """docs/outputs.md: metrics.json holds per step "top-1 (top-5)" (--top5). evaluate() on known
    logits: top5 = share of images whose class is among the 5 highest logits (all of them
    with <= 5 classes), by hand and by torch.topk; none without --top5."""
    g = torch.Generator().manual_seed(n_classes)
    n = 203  # not a multiple of the batch
    table = torch.randn(n, n_classes, generator=g, dtype=torch.float64)
    y = torch.randint(0, n_classes, (n,), generator=g).numpy()
    steps = [list(range(lo, min(lo + 4, n_classes))) for lo in range(0, n_classes, 4)]
    cfg = types.SimpleNamespace(test_per_class=None, batch_size=8, top5=True)
    res = evaluate(_TableModel(table), _Data(y, steps), len(steps) - 1, cfg, "cpu")
    yt = torch.as_tensor(y)
    hit = (table.topk(min(5, n_classes), 1).indices == yt[:, None]).any(1)
    # evaluate() averages in float32: the exact share to ~1e-7 relative
    assert _hand_topk(table, yt, 5) == 100.0 * float(hit.double().mean())
    assert res["top5"] == pytest.approx(_hand_topk(table, yt, 5), rel=1e-6)
    assert res["top1"] == pytest.approx(_hand_topk(table, yt, 1), rel=1e-6)
    assert res["top1"] <= res["top5"]
    if n_classes <= 5:
        assert res["top5"] == 100.0
    else:
        assert 30 < res["top5"] < 70  # random logits, 12 classes: ~5/12; a real check
    cfg.top5 = False
    assert "top5" not in evaluate(_TableModel(table), _Data(y, steps), 0, cfg, "cpu")


def test_top5_of_a_run_matches_its_checkpoint(base):
    """A real run's top-5 per step: >= top-1, 100 with 2 classes, summarised; the last step's
    top-1/top-5 recomputed by hand from the final checkpoint's logits on its test images."""
    out, _ = base
    m = json.loads((out / "metrics.json").read_text())
    steps = m["steps"]
    assert [s["n_classes"] for s in steps] == [2, 6, 10]
    for s in steps:
        assert s["top1"] <= s["top5"] <= 100.0
    assert steps[0]["top5"] == 100.0 and steps[-1]["top5"] < 100.0
    assert m["summary"]["avg_incremental_top5"] == pytest.approx(
        np.mean([s["top5"] for s in steps]), rel=1e-12)
    assert m["summary"]["last_top5"] == steps[-1]["top5"]
    net = FastDERNet("resnet32", in_channels=1)
    net.load_state_dict(torch.load(out / "checkpoint.pt", weights_only=False)["model"])
    net.eval()
    data = D.IncrementalData("fashion_mnist", 2, 4, root="embedded", seed=1993,
                             max_train_per_class=24)
    y_all = data.labels("test")
    idx = np.sort(np.concatenate([np.flatnonzero(y_all == c)[:10] for c in range(10)]))
    with torch.no_grad():  # the run's batches (2 x 16); the module's one_thread fixture
        xy = [(net(x)["logits"].float(), y) for x, y in data.batches("test", idx, 32)]
    logits, y = torch.cat([a for a, _ in xy]), torch.cat([b for _, b in xy])
    assert len(y) == steps[-1]["n_test"] == 100 and logits.shape[1] == 10
    # the same model, images, batches and threads: the same logits (shares: float32 means)
    assert steps[-1]["top1"] == pytest.approx(_hand_topk(logits, y, 1), rel=1e-6)
    assert steps[-1]["top5"] == pytest.approx(_hand_topk(logits, y, 5), rel=1e-6)


# ------------------------------------------------------------------ 2. --s-anneal
@pytest.mark.parametrize("mode", ["epoch", "fixed"])
def test_s_anneal_sets_s_per_batch(tmp_path, monkeypatch, mode):
    """docs/cli.md: `--s-anneal fixed|epoch`: "s at s_max throughout, or HAT/DER's annealing within
    every epoch". The s each stage-1 batch is computed with (and compensated with) is
    1/s_max + (s_max - 1/s_max) b / (B - 1) for batch b of B in every epoch, or s_max; BN
    re-estimation and evaluation run at s_max. (A manual lambda_s: no early pruning.)"""
    s_max, seen, comp, recal = 400.0, {}, {}, {}
    real_loss, real_comp, real_recal = (stages.stage1_loss, DERNet.compensate_mask_grads,
                                        stages.recalibrate_bn)

    def loss(model, *a, **k):
        seen.setdefault(len(model.convnets) - 1, []).append(model.convnets[-1].s)
        return real_loss(model, *a, **k)

    def compensate(self, s, smax):
        comp.setdefault(len(self.convnets) - 1, []).append(s)
        return real_comp(self, s, smax)

    def recalibrate(model, *a, **k):
        recal[len(model.convnets) - 1] = model.convnets[-1].s
        return real_recal(model, *a, **k)

    monkeypatch.setattr(stages, "stage1_loss", loss)
    monkeypatch.setattr(DERNet, "compensate_mask_grads", compensate)
    monkeypatch.setattr(stages, "recalibrate_bn", recalibrate)
    T.run(_cfg(tmp_path, s_anneal=mode, keep=None, lambda_s=0.01, epochs=2, last_step=1,
               s_max=s_max), **QUIET)
    # batches per epoch: step 0 48 images, step 1 96 + 20 exemplars, batch 16
    for t, n_batches in ((0, 3), (1, 8)):
        if mode == "epoch":
            one = [1 / s_max + (s_max - 1 / s_max) * b / (n_batches - 1)
                   for b in range(n_batches)]
            assert one[0] == 1 / s_max and one[-1] == pytest.approx(s_max, rel=1e-15)
        else:
            one = [s_max] * n_batches
        assert seen[t] == pytest.approx(one * 2, rel=1e-15, abs=0), t
        assert comp[t] == pytest.approx(one * 2, rel=1e-15, abs=0), t
        assert recal[t] == s_max


# ------------------------------------------------------------------ 3. --stage2 none
def test_stage2_none_keeps_the_stage1_classifier(tmp_path, monkeypatch):
    """docs/cli.md: `--stage2 retrain|weight_align|none`. With none no classifier re-training or
    weight aligning runs: no loss_stage2 / weight_align_gamma, and the classifier a step ends
    with is bit for bit the one stage 1 left (the checkpoint after stage 1)."""
    fcs, real = {}, pipeline.save_ckpt

    def save(out, state):
        fcs[tuple(state["next"])] = {k: v.clone() for k, v in state["model"].items()
                                     if k.startswith("fc.")}
        real(out, state)

    def never(*a, **k):
        raise AssertionError("stage 2 ran with --stage2 none")

    monkeypatch.setattr(pipeline, "save_ckpt", save)
    monkeypatch.setattr(pipeline, "stage2", never)
    monkeypatch.setattr(DERNet, "weight_align", never)
    monkeypatch.setattr(DERNet, "reset_fc", never)
    m = T.run(_cfg(tmp_path, stage2="none"), **QUIET)
    assert len(m["steps"]) == 3
    for s in m["steps"]:
        assert "loss_stage2" not in s and "weight_align_gamma" not in s
        assert s["time_stage2_s"] < 0.5  # measured around nothing (it is still reported)
        t = s["step"]
        assert fcs[(t, 1)].keys() == {"fc.weight", "fc.bias"}
        assert_same(fcs[(t + 1, 0)], fcs[(t, 1)], f"step {t} fc")


# ------------------------------------------------------------------ 4. --deterministic
def test_deterministic_runs_are_bit_identical(tmp_path, base):
    """docs/cli.md: "`--deterministic` turns on `torch.use_deterministic_algorithms`"; the run "is
    seeded end to end". Two --deterministic runs (this process and a fresh one, one thread
    each) give the same metrics.json numbers and checkpoint tensors, bit for bit."""
    out, det = base
    assert det == [True, True, True]  # on during every stage 1
    proc = _train(*RUN, "--out", str(tmp_path / "again"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "again" / "metrics.json").read_text())["config"][
        "deterministic"] is True
    assert_same_run(tmp_path / "again", out)


# ------------------------------------------------------------------ 5. trainable_channels_last
U48 = 48 * 2.0 ** -23  # 48 float32 ulps of a tensor's max |value| (tests/test_exactness.py)


def test_trainable_channels_last_opt_in(monkeypatch):
    """docs/design.md: "`trainable_channels_last=True` is opt-in: its float32 gradients measured ...
    farther from float64 than the reference's own". Off by default; an attribute that switches
    the trainable extractor's input layout both ways. On random resnet32 draws (the harness of
    tests/test_exactness.py, float64 reference = truth; relative error = max|err| / max|truth|):
    outputs and loss within tests/test_exactness.py's bound, 2x the float32 DERNet's own error
    + 48 ulps (measured: at most 0.5x + 48 ulps); gradients finite and within that bound of
    DERNet run in channels_last (measured <= 1.33x: the layout's rounding, nothing added);
    against the NCHW DERNet they miss the 2x bound (measured up to 3.2e4x: why it is opt-in)."""
    import copy

    from benchmarks.harness.exactness import build_draw, outputs_and_grads, random_draw, rel_errors
    from der_fast.fast import model as fast_model
    assert FastDERNet("resnet32", in_channels=1).trainable_channels_last is False
    layouts, real = [], fast_model.trainable_feature_map
    monkeypatch.setattr(fast_model, "trainable_feature_map", lambda net, x: layouts.append(
        x.is_contiguous(memory_format=torch.channels_last)) or real(net, x))
    worst_nchw = 0.0
    for seed in range(6):
        for train in (True, False):
            model, x, y, n_old = build_draw(random_draw("resnet32", seed), train)
            truth = outputs_and_grads(copy.deepcopy(model).double(), x.double(), y, n_old)
            ref = rel_errors(outputs_and_grads(copy.deepcopy(model), x, y, n_old), truth)
            ref_cl = rel_errors(outputs_and_grads(
                copy.deepcopy(model).to(memory_format=torch.channels_last),
                x.contiguous(memory_format=torch.channels_last), y, n_old), truth)
            fast = FastDERNet.from_reference(model, trainable_channels_last=True)
            assert "channels_last" in fast.plan()["trainable"]
            layouts.clear()
            got = outputs_and_grads(fast, x, y, n_old)
            assert layouts and all(layouts)
            err = rel_errors(got, truth)
            for k, e in err.items():
                where = f"draw {seed} train={train} {k}"
                if k.startswith("grad:"):
                    assert torch.isfinite(got[k]).all(), where
                    assert e <= 2 * ref_cl[k] + U48, (where, e, ref_cl[k])
                    worst_nchw = max(worst_nchw, (e - U48) / max(ref[k], 6e-8))
                else:
                    assert e <= 2 * ref[k] + U48, (where, e, ref[k])
    assert worst_nchw > 2, worst_nchw
    # the attribute, on then off: channels_last, then the NCHW path bit for bit as by default
    model, x, y, n_old = build_draw(random_draw("resnet32", 1), False)
    want = outputs_and_grads(FastDERNet.from_reference(model), x, y, n_old)
    fast = FastDERNet.from_reference(model)
    for on in (True, False):
        fast.trainable_channels_last = on
        layouts.clear()
        got = outputs_and_grads(fast, x, y, n_old)
        assert layouts == [on] * len(layouts) and layouts
    assert "as given" in fast.plan()["trainable"]
    assert_same(got, want)


# ------------------------------------------------------------------ 6. TensorBoard
class _Writer:
    """Stands in for torch.utils.tensorboard.SummaryWriter: records what is logged."""
    made = []

    def __init__(self, log_dir):
        self.log_dir, self.scalars, self.closed, self.flush = log_dir, [], False, lambda: None
        _Writer.made.append(self)

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, float(value), int(step)))

    def close(self):
        self.closed = True


def test_tensorboard_logs_the_metrics(tmp_path, monkeypatch):
    """docs/outputs.md: `tensorboard/` "with `--tensorboard`": the writer logs into OUT/tensorboard,
    per step the step/* scalars of metrics.json, per epoch the stage losses (x: epochs over
    the run), and is closed at the end."""
    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = _Writer
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    _Writer.made.clear()
    m = T.run(_cfg(tmp_path, tensorboard=True, top5=True, last_step=1, epochs=2), **QUIET)
    (w,) = _Writer.made
    assert Path(w.log_dir) == tmp_path / "tensorboard" and w.closed
    got = {}
    for tag, v, x in w.scalars:
        got.setdefault(tag, []).append((x, v))
    for k in ("top1", "top5", "nme_top1", "params", "params_unpruned", "memory_size",
              "loss_stage1", "time_total_s"):
        assert got[f"step/{k}"] == [(s["step"], pytest.approx(s[k])) for s in m["steps"]], k
    assert got["step/loss_stage2"] == [(1, pytest.approx(m["steps"][1]["loss_stage2"]))]
    loss1 = got["train/loss_stage1"]
    assert [x for x, _ in loss1] == [0, 1, 2, 3]  # 2 epochs per step
    assert [loss1[1][1], loss1[3][1]] == pytest.approx([s["loss_stage1"] for s in m["steps"]])
    assert got["train/loss_stage2"] == [(1, pytest.approx(m["steps"][1]["loss_stage2"]))]


def test_tensorboard_event_files(tmp_path):
    """With the package installed: event files whose scalars read back."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    m = T.run(_cfg(tmp_path, tensorboard=True, last_step=1), **QUIET)
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert {"step/top1", "step/loss_stage1", "train/loss_stage1"} <= set(acc.Tags()["scalars"])
    assert [e.value for e in acc.Scalars("step/top1")] == pytest.approx(
        [s["top1"] for s in m["steps"]], rel=1e-6)


def test_tensorboard_missing_is_a_clear_cli_error(tmp_path, capsys, monkeypatch):
    """docs/outputs.md: "(needs the `tensorboard` package; a clear error without it)": from the CLI,
    status 2, one line naming the fix, no traceback, nothing trained (the package is made
    unimportable, whether or not it is installed)."""
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    code = T.main([*TINY, "--tensorboard", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    (line,) = [ln for ln in err.splitlines() if ln.strip()]
    assert line.startswith("error: --tensorboard needs the 'tensorboard' package")
    assert "pip install tensorboard" in line
    assert not (tmp_path / "checkpoint.pt").exists()


# ------------------------------------------------------------------ 7./8. Ctrl-C, SIGKILL
# der_fast.train's CLI with the nth checkpoint write stalled half-way through: half the bytes
# in checkpoint.pt.tmp (flushed), a marker file, then a sleep of `pause` seconds
_DRIVER = r"""
import io, os, sys, time, torch
from der_fast.train import cli
nth, pause, marker = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
real, calls = torch.save, []
def save(obj, f, *a, **k):
    calls.append(str(f).endswith("checkpoint.pt.tmp"))
    if not calls[-1] or calls.count(True) != nth:
        return real(obj, f, *a, **k)
    buf = io.BytesIO(); real(obj, buf, *a, **k); data = buf.getvalue()
    with open(f, "wb") as fh:
        fh.write(data[: len(data) // 2]); fh.flush(); os.fsync(fh.fileno())
        open(marker, "w").close(); time.sleep(pause)
        fh.write(data[len(data) // 2:])
torch.save = save
sys.exit(cli.main(sys.argv[4:]))
"""


def _stalled_run(out: Path, pause: float):
    """Start RUN; return the process once it stalls inside its 2nd checkpoint write (the one
    after step 0; checkpoint.pt is then the one after step 0's stage 1)."""
    marker = out.with_name(out.name + ".stalled")
    proc = subprocess.Popen([sys.executable, "-c", _DRIVER, "2", str(pause), str(marker), *RUN,
                             "--out", str(out)], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not marker.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the run ended or stalled early: {proc.communicate()[1][-2000:]}")
        time.sleep(0.02)
    return proc


def _resume_matches(out: Path, base_out: Path) -> None:
    proc = _train("--resume", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (out / "checkpoint.pt.tmp").exists()
    assert_same_run(out, base_out)


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_during_a_checkpoint_write(tmp_path, base, presses):
    """docs/resume.md: "Ctrl-C (`SIGINT`) does the same [stops at the next batch, finishes any
    write, says --resume DIR] with status 130 (pressed twice it stops at once; the checkpoint is
    intact either way)". A real process, Ctrl-C while a checkpoint write hangs: once, the
    write finishes (the new checkpoint) and the run stops; twice, it stops at once (long before
    the write would end), the temporary file removed, the previous checkpoint kept. Either
    way --resume ends bit for bit as the uninterrupted run."""
    out = tmp_path / "run"
    pause = 2.0 if presses == 1 else 120.0
    proc = _stalled_run(out, pause)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    if presses == 2:
        time.sleep(0.3)  # two presses, not one signal delivered twice at the same moment
        proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=150)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 130, err[-3000:]
    assert "interrupted by SIGINT" in err and f"--resume {out}" in err
    assert "Traceback" not in err
    assert not (out / "checkpoint.pt.tmp").exists()
    ck = torch.load(out / "checkpoint.pt", weights_only=False)
    if presses == 1:
        assert tuple(ck["next"]) == (1, 0) and len(ck["steps"]) == 1  # the write finished
        assert "during the end of step 0" in err
    else:
        assert elapsed < 30, elapsed  # the write would have taken 120 s more
        assert tuple(ck["next"]) == (0, 1) and not ck["steps"]  # the previous one
    DERNet("resnet32", in_channels=1).load_state_dict(ck["model"])
    _resume_matches(out, base[0])


def test_sigkill_during_a_checkpoint_write(tmp_path, base):
    """docs/resume.md: "killing the process at any moment, even with `SIGKILL` during a write,
    leaves the last complete stage's checkpoint intact" (tests/test_resume.py kills mid-step, not
    mid-write). Killed with half the new checkpoint on disk: checkpoint.pt is the previous
    one, whole; --resume ends bit for bit as the uninterrupted run."""
    out = tmp_path / "run"
    proc = _stalled_run(out, 120.0)
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    half = (out / "checkpoint.pt.tmp").read_bytes()  # killed inside the write: half a file
    with pytest.raises(Exception):
        torch.load(io.BytesIO(half), weights_only=False)
    ck = torch.load(out / "checkpoint.pt", weights_only=False)
    assert tuple(ck["next"]) == (0, 1) and not ck["steps"]
    DERNet("resnet32", in_channels=1).load_state_dict(ck["model"])
    _resume_matches(out, base[0])
