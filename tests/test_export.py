"""python -m der_fast.export (issue 28, item 7): a run's model as a torch.export program that
torch alone loads (checked in a process where der_fast cannot be imported), equal to the
rebuilt DERNet's eval outputs; partial runs; every refusal leaves the run and --out untouched."""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from der_fast import export as E
from der_fast import train as T
from der_fast.data import dataset_info
from der_fast.reference import DERNet

# 2 steps (2 + 8 classes), one epoch per stage, the default (fast) impl
TINY = ["--data-root", "embedded", "--train-per-class", "8", "--test-per-class", "4",
        "--init-cls", "2", "--increment", "8", "--epochs", "1", "--epochs-stage2", "1",
        "--batch-size", "16", "--memory", "20", "--no-progress", "--no-plots"]
TOL = E.TOL_ULPS * torch.finfo(torch.float32).eps

# run in a fresh interpreter where `import der_fast` fails: load, run, save the outputs
LOADER = """
import json, sys
sys.modules["der_fast"] = None
import torch
prog, inputs, out = sys.argv[1:]
extra = {"der_fast.json": ""}
m = torch.export.load(prog, extra_files=extra).module()
with torch.no_grad():
    outs = [m(x) for x in torch.load(inputs)]
try:
    m(torch.zeros(2, 3, 28, 28))
    wrong = "accepted"
except Exception as exc:
    wrong = type(exc).__name__
bad = [k for k in sys.modules if k.startswith("der_fast.")
       or (k == "der_fast" and sys.modules[k] is not None)]
torch.save({"outs": outs, "meta": json.loads(extra["der_fast.json"]), "wrong": wrong,
            "der_fast_modules": bad}, out)
"""


def _run(argv):
    cfg, resume = T.config_from_args(argv)
    T.run(cfg, resume=resume, log=lambda *a: None)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A finished 2-step run and a run stopped after step 0 (the finished one is the stopped
    one, copied and resumed: one step 0 trained for both)."""
    base = tmp_path_factory.mktemp("export")
    part, full = base / "part", base / "run"
    _run(TINY + ["--out", str(part), "--last-step", "0"])
    shutil.copytree(part, full)
    _run(["--resume", str(full), "--last-step", "1", "--no-progress"])
    return full, part


def _dernet(run):
    state = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=False)
    net = DERNet("resnet32", in_channels=1)
    net.load_state_dict(state["model"])
    return net.eval(), state


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_cli_export_loads_without_der_fast(runs, tmp_path):
    run = runs[0]
    before = {f.name: _digest(f) for f in run.iterdir()}
    prog = tmp_path / "model.pt2"
    proc = subprocess.run([sys.executable, "-m", "der_fast.export", str(run), "--out", str(prog)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "warning" not in proc.stderr and f"exported step 1 of {run}" in proc.stdout
    diff = float(proc.stdout.split("max |exported - DERNet| = ")[1].split()[0])
    assert 0 <= diff <= TOL * 100  # logits of a tiny run are far below 100
    assert {f.name: _digest(f) for f in run.iterdir()} == before  # the run is untouched
    xs = [torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(n)) for n in (1, 7)]
    torch.save(xs, tmp_path / "inputs.pt")
    res = subprocess.run([sys.executable, "-I", "-c", LOADER, str(prog),
                          str(tmp_path / "inputs.pt"), str(tmp_path / "outs.pt")],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    got = torch.load(tmp_path / "outs.pt")
    assert got["der_fast_modules"] == [] and got["wrong"] != "accepted"
    net, state = _dernet(run)
    for x, o in zip(xs, got["outs"]):
        with torch.no_grad():
            want = net(x)["logits"]
        assert isinstance(o, torch.Tensor) and o.shape == (x.shape[0], 10)
        assert (o - want).abs().max().item() <= TOL * max(1.0, want.abs().max().item())
    # the run's own (fast) model agrees too, to float32 rounding of a different kernel order
    from der_fast.fast import FastDERNet
    fast = FastDERNet("resnet32", in_channels=1)
    fast.load_state_dict(state["model"])
    with torch.no_grad():
        torch.testing.assert_close(got["outs"][1], fast.eval()(xs[1])["logits"],
                                   rtol=1e-4, atol=1e-4)
    meta = got["meta"]
    metrics = json.loads((run / "metrics.json").read_text())
    info = dataset_info("fashion_mnist")
    assert meta["step"] == 1 and meta["finished"] and meta["steps_total"] == 2
    assert meta["n_classes"] == 10 and meta["task_sizes"] == [2, 8]
    assert meta["logit_classes"] == metrics["class_order"]
    assert meta["input"]["shape"] == ["batch", 1, 28, 28]
    assert meta["input"]["mean"] == list(info.mean) and meta["input"]["std"] == list(info.std)
    assert meta["outputs"] == ["logits"] and meta["max_abs_diff"] <= diff
    assert meta["top1"] == metrics["steps"][-1]["top1"]


def test_partial_run_exports_last_completed_step_with_features(runs, tmp_path, capsys):
    part = runs[1]
    prog = part / "model.pt2"  # inside the run dir: allowed, the run's files stay
    assert E.main([str(part), "--features"]) == 0
    cap = capsys.readouterr()
    assert "unfinished" in cap.err and "step, 0" in cap.err
    assert f"exported step 0 of {part}" in cap.out and "logits and features" in cap.out
    extra = {E.META: ""}
    m = torch.export.load(prog, extra_files=extra).module()
    meta = json.loads(extra[E.META])
    assert (meta["step"], meta["finished"], meta["n_classes"]) == (0, False, 2)
    net, _ = _dernet(part)
    for n in (1, 3):
        x = torch.randn(n, 1, 28, 28)
        with torch.no_grad():
            logits, feats = m(x)
            want = net(x)
        assert logits.shape == (n, 2) and feats.shape == (n, meta["feature_dim"])
        torch.testing.assert_close(logits, want["logits"], rtol=0, atol=TOL)
        torch.testing.assert_close(feats, want["features"], rtol=0, atol=TOL * 10)


def test_mismatch_refused_and_overwrite(runs, tmp_path, capsys, monkeypatch):
    run, prog = runs[0], tmp_path / "m.pt2"
    prog.write_bytes(b"old")
    real = E._reference
    monkeypatch.setattr(E, "_reference", lambda *a: tuple(o + 1e-3 for o in real(*a)))
    assert E.main([str(run), "--out", str(prog), "--overwrite"]) == 3
    assert "differs from the model" in capsys.readouterr().err
    assert prog.read_bytes() == b"old" and sorted(os.listdir(tmp_path)) == ["m.pt2"]
    monkeypatch.setattr(E, "_reference", real)
    assert E.main([str(run), "--out", str(prog)]) == 2  # exists, no --overwrite
    assert "--overwrite" in capsys.readouterr().err and prog.read_bytes() == b"old"
    assert E.main([str(run), "--out", str(prog), "--overwrite"]) == 0
    assert torch.export.load(prog).module()(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert sorted(os.listdir(tmp_path)) == ["m.pt2"]


def _edit_ckpt(src, dst, **changes):
    shutil.copytree(src, dst)
    state = torch.load(dst / "checkpoint.pt", map_location="cpu", weights_only=False)
    state.update(changes)
    torch.save(state, dst / "checkpoint.pt")
    return dst


def test_bad_inputs(runs, tmp_path, capsys, monkeypatch):
    run = runs[0]
    ok = str(tmp_path / "ok.pt2")

    def fails(argv, status, *words):
        assert E.main(argv) == status
        err = capsys.readouterr().err
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
        for w in words:
            assert w in err, err

    fails([str(tmp_path / "nope"), "--out", ok], 2, "does not exist")
    (tmp_path / "empty").mkdir()
    fails([str(tmp_path / "empty"), "--out", ok], 2, "not a der_fast run")
    corrupt = tmp_path / "corrupt"
    shutil.copytree(run, corrupt)
    (corrupt / "checkpoint.pt").write_bytes(b"not a checkpoint")
    fails([str(corrupt), "--out", ok], 2, "corrupt")
    state = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=False)
    mid = _edit_ckpt(run, tmp_path / "mid", next=(1, 1), steps=state["steps"][:1])
    fails([str(mid), "--out", ok], 2, "half-way", f"--resume {mid}", "--last-step 1")
    first = _edit_ckpt(run, tmp_path / "first", next=(0, 1), steps=[])
    fails([str(first), "--out", ok], 2, "not completed step 0")
    bad_model = _edit_ckpt(run, tmp_path / "badmodel", model={"fc.weight": torch.zeros(2, 2)})
    fails([str(bad_model), "--out", ok], 2, "does not load")
    digests = {f.name: _digest(f) for f in run.iterdir()}
    for name in ("checkpoint.pt", "metrics.json", "config.json", "metrics.csv"):
        fails([str(run), "--out", str(run / name), "--overwrite"], 2, "run's own")
    fails([str(run), "--out", str(run), "--overwrite"], 2, "run's own directory")
    assert {f.name: _digest(f) for f in run.iterdir()} == digests
    fails([str(run), "--out", str(tmp_path / "m.pth")], 2, ".pt2")
    (tmp_path / "dir.pt2").mkdir()
    fails([str(run), "--out", str(tmp_path / "dir.pt2"), "--overwrite"], 2, "is a directory")

    def broken(*a, **k):
        raise RuntimeError("unsupported op\nmore")

    monkeypatch.setattr(torch.export, "export", broken)
    fails([str(run), "--out", ok], 4, "torch.export failed", "unsupported op")
    assert not os.path.exists(ok)
