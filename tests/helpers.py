"""Assertions, data and model builders shared by the tests (import as ``from helpers import
...``: pytest puts tests/ on sys.path)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from der_fast.reference import DERNet


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


def run_python(script: str, *args: str, env: dict, timeout: float) -> subprocess.CompletedProcess:
    """``python -c script args...`` in a fresh process; stdout / stderr captured as text, the
    exit status left to the caller."""
    return subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)


def triton_interpreter_results(script: str, *args: str, timeout: float):
    """Runs ``script`` in a process with TRITON_INTERPRET=1 set before triton is imported (this
    process's sys.path as its PYTHONPATH) and returns the JSON it printed after ``RESULTS``;
    the test fails with the process's output if it exits non-zero."""
    env = dict(
        os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(p for p in sys.path if p)
    )
    proc = run_python(script, *args, env=env, timeout=timeout)
    assert proc.returncode == 0, f"interpreter run failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULTS"))
    return json.loads(line[len("RESULTS") :])


# ------------------------------------------------------------------------------ op tests
def node_seed(request) -> int:
    """A seed from the test's id (parameters included)."""
    return zlib.crc32(request.node.nodeid.encode())


def node_generator(request) -> torch.Generator:
    """A generator seeded from the test id: fresh, reproducible random data per test."""
    return torch.Generator().manual_seed(node_seed(request))


def to_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """``t``'s values in the memory layout ``layout``: "contiguous", "channels_last" (4-D only;
    others stay contiguous) or "strided" (a view with stride 2 in the last dimension)."""
    if layout == "channels_last" and t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # same values, non-contiguous storage
        big = torch.empty(t.shape[:-1] + (2 * t.shape[-1],), dtype=t.dtype)
        big[..., ::2] = t
        return big[..., ::2]
    return t.contiguous()


@torch.no_grad()
def _randomize_bn(bn: torch.nn.BatchNorm2d, gen: torch.Generator) -> None:
    """Random affine parameters and running statistics, in place (moderate scales)."""
    bn.weight.uniform_(0.5, 1.5, generator=gen)
    bn.bias.uniform_(-0.3, 0.3, generator=gen)
    bn.running_mean.uniform_(-0.3, 0.3, generator=gen)
    bn.running_var.uniform_(0.5, 2.0, generator=gen)


def random_bn(C, gen, dtype=torch.float64, momentum=0.1, train=True) -> torch.nn.BatchNorm2d:
    """An nn.BatchNorm2d with random affine parameters and running statistics."""
    bn = torch.nn.BatchNorm2d(C, momentum=momentum)
    _randomize_bn(bn, gen)
    return bn.to(dtype).train(train)


def bn_gate_data(gen, shape, layout, with_e, with_r, dtype=torch.float64):
    """bn_gate's inputs (z, e or None, residual or None) and an upstream gradient gy; z has
    per-channel offsets and scales, so that the batch statistics matter."""
    C = shape[1]
    z = torch.randn(shape, generator=gen) * (torch.rand(C, generator=gen) * 2 + 0.5).view(
        1, C, 1, 1) + torch.randn(C, generator=gen).view(1, C, 1, 1)
    e = torch.randn(C, generator=gen) if with_e else None
    r = torch.randn(shape, generator=gen) if with_r else None
    gy = torch.randn(shape, generator=gen)
    cast = lambda t: None if t is None else t.to(dtype)
    z, e, r, gy = cast(z), cast(e), cast(r), cast(gy)
    z = to_layout(z, layout)
    if r is not None:
        r = to_layout(r, layout)
    return z, e, r, gy


# ------------------------------------------------------------------------------ FastDERNet tests
ULP = 2.0 ** -23
ULPS = 48  # the rule of tests/test_exactness.py: 2x the reference + 48 ulps
# Input sizes: small, but every BatchNorm still sees >= 8 values per channel in train mode
# (with 2 values, x_hat = +-1 whatever x is and the input gradient is pure rounding noise).
SIZES = {"resnet32": 16, "resnet18_cifar": 16, "resnet18": 64}


def _randomize(net: DERNet, g: torch.Generator) -> None:
    """Random BN affine and running stats, random mask embeddings (some channels off)."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                _randomize_bn(m, g)
        for c in net.convnets:
            if c.mask_e is not None:
                for e in c.mask_e.values():
                    e.uniform_(-2.0, 4.0, generator=g)
        if net.fc is not None:
            net.fc.bias.uniform_(-0.5, 0.5, generator=g)
            net.aux_fc.bias.uniform_(-0.5, 0.5, generator=g)


@torch.no_grad()
def _calibrate(net: DERNet, g: torch.Generator) -> None:
    """Running statistics measured on random images (cumulative average over 2 batches), so
    eval-mode activations stay O(1) through depth; random BN stats let them grow ~2x per
    residual block, which makes a training trajectory chaotic even in float64."""
    hw = SIZES[net.backbone]
    mode = net.training
    for c in net.convnets:
        bns = [m for m in c.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
        c.train()
        for _ in range(2):
            c(torch.randn(8, net.in_channels, hw, hw, generator=g))
        for m in bns:
            m.momentum = 0.1
    net.train(mode)
    for c in net.convnets:
        if not any(p.requires_grad for p in c.parameters()):
            c.eval()


def make_ref(backbone="resnet32", t=2, prune=(), seed=0, s=3.0, calibrate=False,
             **kw) -> DERNet:
    """t extractors; the ones listed in ``prune`` are pruned right after their step (so
    widths differ per extractor), the others that are old keep binary (e > 0) masks."""
    from der_fast.reference import DERNet

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = DERNet(backbone, **kw)
    for i in range(t):
        net.update_fc(3 * (i + 1) + i)
        _randomize(net, g)
        if i in prune:
            net.prune()
    _randomize(net, g)
    if calibrate:
        _calibrate(net, g)
    net.set_s(s)
    return net


def rand_x(backbone, n=3, seed=1, dtype=torch.float32):
    """``n`` random images of the size the tests use for ``backbone``."""
    hw = SIZES[backbone]
    return torch.randn(n, 3, hw, hw, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def diff_at(a: torch.Tensor, b: torch.Tensor) -> str:
    """The largest |a - b|, where it is and the two values there."""
    d = (a.double() - b.double()).abs()
    i = int(d.flatten().argmax())
    idx = tuple(int(v) for v in torch.unravel_index(torch.tensor(i), d.shape)) if d.dim() else ()
    return f"max |diff| {float(d.max()):.3e} at {idx}: {float(a.flatten()[i]):.8g} vs " \
           f"{float(b.flatten()[i]):.8g}"


def assert_as_good(name, fast, ref32, ref64):
    """fast error vs float64 <= 2 x (fp32 reference error) + 48 ulps of max |float64|."""
    if ref64 is None:
        assert fast is None and ref32 is None, f"{name}: expected None"
        return
    assert fast is not None and fast.shape == ref64.shape, \
        f"{name}: shape {None if fast is None else tuple(fast.shape)} vs {tuple(ref64.shape)}"
    fast, ref32, ref64 = fast.detach(), ref32.detach(), ref64.detach()
    mag = float(ref64.abs().max())
    err_f = float((fast.double() - ref64).abs().max())
    err_r = float((ref32.double() - ref64).abs().max())
    assert err_f <= 2 * err_r + ULPS * ULP * mag, (
        f"{name}: fast error {err_f:.3e} > 2 x reference fp32 error {err_r:.3e} + "
        f"{ULPS} ulps of {mag:.3e}; fast vs float64 {diff_at(fast, ref64)}")



# ------------------------------------------------------------------------------ trainer stand-ins
class TensorData:
    """A data set for the trainer's stages: images ``x``, labels ``y`` and ``info.image_size``,
    set by a subclass. ``batches`` serves them in index order (BatchNorm re-estimation,
    evaluation); the training batches come from :func:`noisy_batches`, patched into the loop."""

    x: torch.Tensor
    y: torch.Tensor

    def batches(self, split, indices, batch_size, device=None, **_):
        for i in range(0, len(indices), batch_size):
            idx = torch.as_tensor(indices[i:i + batch_size])
            yield self.x[idx], self.y[idx]


def noisy_batches(data, indices, cfg, gen, device, chunks=1, mine=(0,)):
    """Stand-in for ``loop.train_batches``: shuffled batches from the epoch's generator, each
    with the same float64 noise in every dtype (augmentation's stand-in); with ``chunks``
    pieces, this process's pieces (``mine``) of every batch."""
    order = torch.randperm(len(indices), generator=gen)
    for i in range(0, len(order), cfg.batch_size):
        idx = order[i:i + cfg.batch_size]
        noise = 0.1 * torch.randn(data.x[idx].shape, generator=gen, dtype=torch.float64)
        x, y, n = data.x[idx] + noise.to(data.x.dtype), data.y[idx], len(idx)
        yield [(x[k * n // chunks:(k + 1) * n // chunks], y[k * n // chunks:(k + 1) * n // chunks])
               for k in mine], n
