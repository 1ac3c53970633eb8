"""Build checks: the compiled parts that should exist do, the schemas are defined once (in
Python; csrc/ only registers kernels), the CUDA toolkit finder works, `python -m der_fast.info`
runs, and der_fast.ops works (quietly falling back to PyTorch) when the extensions are missing.

test_cuda_extension_built_when_expected is the CI check: it fails when torch has CUDA, nvcc is
found and DER_FAST_BUILD_CUDA != 0, but der_fast._C_cuda was not built (same logic as
`python -m der_fast.info --check`).
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from der_fast import _backend, ops

CSRC = Path(__file__).resolve().parents[1] / "csrc"

def _env():
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))


def _build_info() -> str:
    try:
        from der_fast import _build_info

        return ", ".join(f"{k}={v!r}" for k, v in vars(_build_info).items() if k.isupper())
    except ImportError:
        return "no der_fast/_build_info.py (extensions not built by setup.py)"


def test_cpu_extension_built():
    if not _backend.build_cpu_setting():
        pytest.skip("DER_FAST_BUILD_CPU=0")
    assert ops.HAS_CPU_EXT, (
        f"der_fast._C is missing ({ops.CPU_EXT_ERROR}); build with "
        f"`python setup.py build_ext --inplace` or `pip install .`. Build record: {_build_info()}"
    )
    assert ops.CPU_EXT_OPS == set(ops.SCHEMAS), (
        f"der_fast._C has no kernel for {sorted(set(ops.SCHEMAS) - ops.CPU_EXT_OPS)}"
    )


def test_cuda_extension_built_when_expected():
    expected, why = _backend.cuda_expected()
    if not expected:
        pytest.skip(f"CUDA extension not expected: {why}")
    assert ops.HAS_CUDA_EXT, (
        f"the CUDA extension der_fast._C_cuda should have been built ({why}) but cannot be "
        f"imported ({ops.CUDA_EXT_ERROR}). Build record: {_build_info()}"
    )


def test_schemas_defined_once():
    """ops.SCHEMAS (Python) defines every der_fast:: op; csrc/ defines none and registers kernels
    only for ops in SCHEMAS."""
    definition = re.compile(r"\bTORCH_LIBRARY(_FRAGMENT)?\s*\(|\bm\.def\s*\(|set_python_module")
    sources = sorted(p for p in CSRC.rglob("*") if p.suffix in (".cpp", ".cu", ".h", ".cuh"))
    assert sources, f"no C++ sources in {CSRC}"
    impls = set()
    for path in sources:
        text = path.read_text()
        found = [m.group(0) for m in definition.finditer(text)]
        assert not found, f"{path.relative_to(CSRC.parent)} defines schemas: {found}"
        impls.update(re.findall(r'\bm\.impl\(\s*"(\w+)"', text))
    assert impls, "no m.impl(...) found in csrc/"
    unknown = impls - set(ops.SCHEMAS)
    assert not unknown, f"csrc/ registers kernels for ops without a schema: {unknown}"
    # at run time: every der_fast:: name the dispatcher knows (from a schema or from a kernel
    # registration) is one of SCHEMAS, defined as written there
    known = {n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names()
             if n.startswith("der_fast::")}
    assert known == set(ops.SCHEMAS), known ^ set(ops.SCHEMAS)
    for name, text in ops.SCHEMAS.items():
        registered = getattr(torch.ops.der_fast, name).default._schema
        assert str(registered) == str(torch._C.parse_schema("der_fast::" + text)), name


def test_info_runs():
    proc = subprocess.run(
        [sys.executable, "-m", "der_fast.info"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    for word in ("der_fast", "torch", "masked_gate", "concat_linear_head", "der_fast._C"):
        assert word in proc.stdout


def test_find_cuda_home_follows_wrapper(tmp_path, monkeypatch):
    """nvcc on PATH may be a wrapper script (like /usr/local/bin/nvcc here); the toolkit is
    where the real nvcc lives, not the wrapper's parent (torch's guess)."""
    kit = tmp_path / "cuda-13.9"
    (kit / "bin").mkdir(parents=True)
    (kit / "include").mkdir()
    (kit / "include" / "cuda_runtime.h").write_text("")
    real = kit / "bin" / "nvcc"
    real.write_text("#!/bin/sh\necho real\n")
    real.chmod(real.stat().st_mode | stat.S_IEXEC)
    wrap_dir = tmp_path / "wrapper" / "bin"
    wrap_dir.mkdir(parents=True)
    wrapper = wrap_dir / "nvcc"
    wrapper.write_text(f'#!/bin/sh\nexec {real} "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    for var in ("DER_FAST_CUDA_HOME", "CUDA_HOME", "CUDA_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PATH", str(wrap_dir))
    home, how = _backend.find_cuda_home()
    assert home == str(kit.resolve()), (home, how)
    # an explicit CUDA_HOME wins, but only if it really is a toolkit
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "wrapper"))
    assert _backend.find_cuda_home()[0] == str(kit.resolve())
    monkeypatch.setenv("CUDA_HOME", str(kit))
    assert _backend.find_cuda_home() == (str(kit.resolve()), "$CUDA_HOME")


def test_cuda_arch_flags(monkeypatch):
    assert _backend.parse_cuda_archs("9.0") == ["9.0"]
    assert _backend.parse_cuda_archs("8.0;9.0a 10.0+PTX") == ["8.0", "9.0a", "10.0+PTX"]
    assert _backend.gencode_flags(["9.0", "10.0+PTX"]) == [
        "-gencode=arch=compute_90,code=sm_90",
        "-gencode=arch=compute_100,code=sm_100",
        "-gencode=arch=compute_100,code=compute_100",
    ]
    with pytest.raises(ValueError, match="DER_FAST_CUDA_ARCHS"):
        _backend.parse_cuda_archs("sm_90")
    monkeypatch.delenv("DER_FAST_CUDA_ARCHS", raising=False)
    assert _backend.build_cuda_archs(capabilities=[])[0] == _backend.parse_cuda_archs(
        _backend.PORTABLE_CUDA_ARCHS)
    monkeypatch.setenv("DER_FAST_BUILD_CUDA", "0")
    assert _backend.cuda_expected() == (False, "DER_FAST_BUILD_CUDA=0")


_NO_EXT_SCRIPT = textwrap.dedent(
    r"""
    import sys
    sys.modules["der_fast._C"] = None       # make the compiled extensions unimportable
    sys.modules["der_fast._C_cuda"] = None
    import torch
    from der_fast import ops
    assert not ops.HAS_CPU_EXT and not ops.HAS_CUDA_EXT
    assert not ops.CPU_EXT_OPS and not ops.HAS_BORDERED_RESNET
    # the PyTorch fallback is a CPU kernel too; CPU_EXT_OPS tells the compiled ones apart
    assert torch._C._dispatch_has_kernel_for_dispatch_key("der_fast::masked_gate", "CPU")
    assert ops.implementation("masked_gate", "cpu").startswith("ref")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 3, 3, generator=g).to(memory_format=torch.channels_last).requires_grad_()
    sc, sh, e = (torch.randn(5, generator=g).requires_grad_() for _ in range(3))
    r = torch.randn(2, 5, 3, 3, generator=g).requires_grad_()
    y = ops.masked_gate(x, sc, sh, e, 2.0, r)
    yr = ops.masked_gate_ref(x, sc, sh, e, 2.0, r)
    torch.testing.assert_close(y, yr)
    for a, b in zip(torch.autograd.grad(y.square().sum(), [x, sc, sh, e, r]),
                    torch.autograd.grad(yr.square().sum(), [x, sc, sh, e, r])):
        torch.testing.assert_close(a, b)
    feats = [torch.randn(2, 3, 2, 2, generator=g), torch.randn(2, 4, 2, 2, generator=g).requires_grad_()]
    W, b = torch.randn(6, 7, generator=g).requires_grad_(), torch.randn(6, generator=g).requires_grad_()
    Wa = torch.randn(5, 4, generator=g).requires_grad_()
    out = ops.concat_linear_head(feats, W, b, Wa)
    ref = ops.concat_linear_head_ref(feats, W, b, Wa)
    for a, c in zip(out, ref):
        torch.testing.assert_close(a, c)
    ins = [feats[1], W, b, Wa]
    for a, c in zip(torch.autograd.grad(out[0].sum() + out[1].square().sum(), ins),
                    torch.autograd.grad(ref[0].sum() + ref[1].square().sum(), ins)):
        torch.testing.assert_close(a, c)
    torch.library.opcheck(torch.ops.der_fast.masked_gate.default, (x, sc, sh, e, 2.0, r))
    try:
        ops.masked_gate(x, sc, sh, e, 2.0, r, backend="cpp")
    except RuntimeError as err:
        assert "not available" in str(err)
    else:
        raise AssertionError("backend='cpp' without the extension did not raise")
    xb = ops.border(torch.randn(2, 3, 6, 5, generator=g))
    wc, bc = torch.randn(4, 3, 3, 3, generator=g), torch.randn(4, generator=g)
    torch.testing.assert_close(ops.conv3x3_bordered(xb, wc, bc),
                               ops.conv3x3_bordered_ref(xb, wc, bc))
    from der_fast.fast import FastDERNet
    net = FastDERNet("resnet32", frozen_plan="direct")
    net.update_fc(2)
    net.update_fc(4)
    with torch.no_grad():
        net.eval()(torch.randn(2, 3, 8, 8, generator=g))
    assert net.plan()["frozen_last_run"] == ["loop", "loop"], net.plan()  # no slow fallback
    from der_fast.fast import fold_extractor, run_bordered
    try:
        run_bordered(fold_extractor(net.convnets[0]), torch.randn(2, 3, 8, 8))
    except RuntimeError as err:
        assert "compiled CPU extension" in str(err)
    else:
        raise AssertionError("run_bordered without the extension did not raise")
    assert ops.conv3x3_isa() == "unavailable"
    print("FALLBACK_OK")
    """
)


def test_ops_fall_back_without_extensions():
    proc = subprocess.run(
        [sys.executable, "-c", _NO_EXT_SCRIPT],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0 and "FALLBACK_OK" in proc.stdout, proc.stdout + proc.stderr[-4000:]
