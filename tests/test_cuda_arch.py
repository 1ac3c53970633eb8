"""Builds that run on any recent GPU: the architectures compiled for (der_fast._backend), the
check that der_fast._C_cuda has code for a device, and the fallback to the PyTorch reference
(with one warning, and said by `python -m der_fast.info`) where it has not. The GPU and the
build record are simulated."""

from __future__ import annotations

import warnings

import pytest
import torch

from der_fast import _backend, info, ops
from der_fast.ops import _library


@pytest.mark.parametrize("cap,archs,covered", [
    ((9, 0), ["9.0"], True),
    ((8, 6), ["9.0"], False),
    ((8, 6), ["8.0"], True),  # an sm_80 cubin runs on 8.x, x >= 0
    ((8, 0), ["8.6"], False),
    ((8, 9), ["8.0", "9.0+PTX"], True),
    ((10, 0), ["8.0", "9.0"], False),  # no PTX: nothing for a newer major
    ((10, 0), ["8.0", "9.0+PTX"], True),  # PTX of 9.0, compiled by the driver
    ((12, 0), ["9.0+PTX"], True),
    ((8, 6), ["9.0+PTX"], False),  # PTX only runs on its arch or newer
    ((9, 0), ["9.0a"], True),
    ((9, 1), ["9.0a"], False),  # architecture-specific code: that arch only
    ((7, 5), _backend.parse_cuda_archs(_backend.PORTABLE_CUDA_ARCHS), False),
])
def test_arch_covered(cap, archs, covered):
    assert _backend.arch_covered(cap, archs) is covered


@pytest.mark.parametrize("cap", [(8, 0), (8, 6), (8, 7), (8, 9), (9, 0), (10, 0), (12, 0)])
def test_portable_archs_cover_ampere_ada_hopper_and_newer(cap):
    assert _backend.arch_covered(cap, _backend.parse_cuda_archs(_backend.PORTABLE_CUDA_ARCHS))


def test_build_archs(monkeypatch):
    monkeypatch.delenv(_backend.ENV_CUDA_ARCHS, raising=False)
    archs, why = _backend.build_cuda_archs(capabilities=[])
    assert archs == _backend.parse_cuda_archs(_backend.PORTABLE_CUDA_ARCHS) and "no GPU" in why
    assert _backend.build_cuda_archs(capabilities=[(8, 6)])[0] == ["8.6"]
    assert _backend.build_cuda_archs(capabilities=[(9, 0), (8, 0), (9, 0)])[0] == ["8.0", "9.0"]
    # a GPU newer than nvcc knows: the newest arch nvcc has, with PTX for the driver to compile
    supported = ["7.5", "8.0", "8.6", "8.9", "9.0"]
    assert _backend.build_cuda_archs([(12, 0)], supported)[0] == ["9.0+PTX"]
    assert _backend.build_cuda_archs([(8, 6)], supported)[0] == ["8.6"]
    with pytest.raises(RuntimeError, match="nvcc supports no architecture"):
        _backend.build_cuda_archs([(7, 0)], supported)
    monkeypatch.setenv(_backend.ENV_CUDA_ARCHS, "8.0;10.0+PTX")
    assert _backend.build_cuda_archs(capabilities=[(8, 6)]) == (
        ["8.0", "10.0+PTX"], f"${_backend.ENV_CUDA_ARCHS}")


def test_nvcc_knows_the_portable_archs():
    home, _ = _backend.find_cuda_home()
    if home is None:
        pytest.skip("no CUDA toolkit")
    known = _backend.nvcc_archs(home)
    assert known, "nvcc --list-gpu-arch said nothing"
    for arch in _backend.parse_cuda_archs(_backend.PORTABLE_CUDA_ARCHS):
        assert arch.replace("+PTX", "") in known, (arch, known)


@pytest.fixture
def gpu(monkeypatch):
    """A simulated sm_86 GPU and a der_fast._C_cuda recorded as built for ``archs``."""

    def setup(archs):
        monkeypatch.setattr(_backend, "built_cuda_archs", lambda: list(archs))
        monkeypatch.setattr(_backend, "device_capability", lambda index: (8, 6))
        monkeypatch.setattr(_backend, "_CUDA_EXT_ON_DEVICE", {})
        monkeypatch.setattr(_backend, "_CUDA_EXT_WARNED", [])
        monkeypatch.setattr(_library, "HAS_CUDA_EXT", True)
        monkeypatch.setattr(torch.version, "cuda", torch.version.cuda or "13.0")
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "Simulated RTX 3090")

    return setup


def test_missing_arch_falls_back_with_one_warning(gpu):
    gpu(["9.0"])
    dev = torch.device("cuda", 0)
    with pytest.warns(RuntimeWarning, match="no code for sm_86") as rec:
        assert _library._resolve_backend("concat_linear_head", "auto", dev) == "ref"
    assert len([w for w in rec if "sm_86" in str(w.message)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process: no second warning
        assert _library._resolve_backend("concat_linear_head", "auto", dev) == "ref"
        assert _library._resolve_backend("concat_linear_head", "auto", torch.device("cuda")) \
            == "ref"
        # Triton compiles for the device: masked_gate is unaffected
        assert _library._resolve_backend("masked_gate", "auto", dev) == "op"
    with pytest.raises(RuntimeError, match="backend='cuda' was requested but .*sm_86"):
        _library._resolve_backend("concat_linear_head", "cuda", dev)
    impl = ops.implementation("concat_linear_head", "cuda")
    assert impl.startswith("ref (PyTorch fallback") and "sm_86" in impl


def test_covered_arch_uses_the_extension(gpu):
    gpu(["8.0", "9.0+PTX"])
    dev = torch.device("cuda", 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _library._resolve_backend("concat_linear_head", "auto", dev) == "op"
        assert _library._resolve_backend("concat_linear_head", "cuda", dev) == "op"
    assert ops.implementation("concat_linear_head", "cuda") == "cuda (der_fast._C_cuda)"


def test_no_build_record_is_assumed_covered(monkeypatch):
    monkeypatch.setattr(_backend, "built_cuda_archs", lambda: None)
    assert _backend.cuda_ext_runs_on((8, 6))[0]


def test_info_says_which_gpu_falls_back(gpu):
    gpu(["9.0"])
    text = info.render(info.collect())
    assert "cuda:0 Simulated RTX 3090: der_fast._C_cuda NO CODE for it" in text
    assert "cuda: ref (PyTorch fallback; der_fast._C_cuda has no code for sm_86" in text
