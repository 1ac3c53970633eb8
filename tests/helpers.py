"""Assertions and loaders shared by the tests (import as ``from helpers import ...``: pytest
puts tests/ on sys.path)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch


def load_benchmark(name: str):
    """The script ``benchmarks/<name>.py`` as a module (benchmarks/ is not a package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_close(actual, expected, atol, rtol, what):
    """Like torch.testing.assert_close, but tolerances scale with the data and the message
    names the worst element (index, actual, expected)."""
    assert actual.shape == expected.shape, (
        f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    )
    a = actual.detach().double().cpu()
    b = expected.detach().double().cpu()
    scale = max(1.0, b.abs().max().item()) if b.numel() else 1.0
    err = (a - b).abs()
    bad = err > atol * scale + rtol * b.abs()
    if bad.any():
        flat = int(torch.argmax(torch.where(bad, err, torch.zeros_like(err))))
        where = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), a.shape))
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{a.numel()} elements differ; worst at index {where}: "
            f"actual={a[where].item():.9g} expected={b[where].item():.9g} "
            f"(|diff|={err[where].item():.3g}, atol={atol * scale:.3g}, rtol={rtol})"
        )


def needs_cpu_ext(why: str = "der_fast._C not built"):
    """Skip marker for tests of the compiled CPU ops that skips only where the build was told
    not to make them (DER_FAST_BUILD_CPU=0): where the extension was expected but is missing,
    the tests run, and fail."""
    import pytest

    from der_fast import _backend, ops

    return pytest.mark.skipif(not ops.HAS_CPU_EXT and not _backend.build_cpu_setting(),
                              reason=f"{why} (DER_FAST_BUILD_CPU=0)")


def call_cli(fn, argv, capsys):
    """``(exit status, stderr)`` of a CLI ``main(argv)`` (argparse's SystemExit included)."""
    try:
        code = fn(argv)
    except SystemExit as exc:  # argparse
        code = exc.code
    return code, capsys.readouterr().err


def snapshot(d: Path) -> dict:
    """Every file under ``d`` (relative path -> bytes); {} when ``d`` does not exist."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()} \
        if d.exists() else {}


def grown_dernet(t: int, seed: int, s: float | None = None, per_step: int = 3):
    """A float32 resnet32 DERNet at step ``t``: extractors 0..t-1 pruned (random masks, small
    e), extractor t fresh with masks; ``per_step`` classes per step; ``set_s(s)`` if given."""
    from der_fast import DERNet

    torch.manual_seed(seed)
    model = DERNet("resnet32", use_masks=True)
    for step in range(t + 1):
        if step:
            with torch.no_grad():
                for e in model.convnets[-1].mask_e.values():
                    e.copy_(torch.randn(e.shape) * 0.01)
            model.set_s(400.0)
            model.prune()
        model.update_fc(per_step * (step + 1))
    if s is not None:
        model.set_s(s)
    return model
