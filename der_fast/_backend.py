"""Build/backend helpers shared by setup.py, der_fast.ops, der_fast.info and the build check.

Standard library only at import time: setup.py loads this file by path (before der_fast is
importable) to find the CUDA toolkit the same way the build check does.

Finding CUDA (``find_cuda_home``), first match wins:
  1. $DER_FAST_CUDA_HOME, $CUDA_HOME, $CUDA_PATH (must contain bin/nvcc)
  2. the real location of ``nvcc`` on $PATH: symlinks are resolved, and a shell wrapper script
     (like /usr/local/bin/nvcc: ``exec /usr/local/cuda-13.0/bin/nvcc "$@"``) is followed to the
     nvcc it executes; the toolkit is the directory above its bin/
  3. /usr/local/cuda, then the newest /usr/local/cuda-*, /opt/cuda
A candidate counts only if it has bin/nvcc and include/cuda_runtime.h, so a wrapper directory
such as /usr/local (torch's own guess from `which nvcc`) is rejected.
"""

from __future__ import annotations

import glob
import importlib
import importlib.util
import os
import re
import shutil
import sys
from pathlib import Path

ENV_BUILD_CUDA = "DER_FAST_BUILD_CUDA"  # auto | 0 | 1
ENV_BUILD_CPU = "DER_FAST_BUILD_CPU"  # 1 (default) | 0
ENV_CUDA_ARCHS = "DER_FAST_CUDA_ARCHS"  # e.g. "9.0" or "8.0;9.0;10.0+PTX"
# Built when no GPU is visible at build time: a cubin for sm_80 (runs on every 8.x: Ampere
# A100 / RTX 30xx / A10, Ada RTX 40xx / L4 / L40), one for sm_90 (Hopper) and PTX of 9.0, which
# the driver compiles for newer GPUs (Blackwell). Kept to two cubins: each architecture adds
# to every `pip install` (compile times in benchmarks/RESULTS.md).
PORTABLE_CUDA_ARCHS = "8.0;9.0+PTX"


def _is_toolkit(root: str | os.PathLike | None) -> bool:
    if not root:
        return False
    p = Path(root)
    return (p / "bin" / "nvcc").is_file() and (p / "include" / "cuda_runtime.h").is_file()


def _follow_wrapper(path: Path, depth: int = 0) -> Path:
    """Resolve symlinks, then follow a small shell wrapper that execs another nvcc."""
    path = path.resolve()
    if depth > 4:
        return path
    try:
        if path.stat().st_size < 4096:
            head = path.read_bytes()[:4096]
            if head.startswith(b"#!"):
                text = head.decode("utf-8", "replace")
                for m in re.finditer(r"(/[^\s\"'$;|&]*?/nvcc)\b", text):
                    cand = Path(m.group(1))
                    if cand.is_file() and cand.resolve() != path:
                        return _follow_wrapper(cand, depth + 1)
    except OSError:
        pass
    return path


def find_cuda_home() -> tuple[str | None, str]:
    """Return (toolkit root or None, how it was found)."""
    for var in ("DER_FAST_CUDA_HOME", "CUDA_HOME", "CUDA_PATH"):
        val = os.environ.get(var)
        if val and _is_toolkit(val):
            return str(Path(val).resolve()), f"${var}"
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = _follow_wrapper(Path(nvcc))
        root = real.parent.parent
        if _is_toolkit(root):
            how = "nvcc on PATH" if real == Path(nvcc) else f"nvcc on PATH ({nvcc} -> {real})"
            return str(root), how
    cands = ["/usr/local/cuda"]
    cands += sorted(glob.glob("/usr/local/cuda-*"), key=_version_key, reverse=True)
    cands += ["/opt/cuda"]
    for c in cands:
        if _is_toolkit(c):
            return str(Path(c).resolve()), f"default location {c}"
    return None, "not found (no $CUDA_HOME/$CUDA_PATH, no nvcc on PATH, no /usr/local/cuda*)"


def _version_key(p: str) -> tuple:
    return tuple(int(x) for x in re.findall(r"\d+", p)) or (0,)


def build_cuda_setting() -> str:
    v = os.environ.get(ENV_BUILD_CUDA, "auto").strip().lower()
    if v in ("", "auto"):
        return "auto"
    if v in ("0", "false", "off", "no"):
        return "0"
    if v in ("1", "true", "on", "yes"):
        return "1"
    raise ValueError(f"{ENV_BUILD_CUDA} must be auto, 0 or 1, got {v!r}")


def build_cpu_setting() -> bool:
    return os.environ.get(ENV_BUILD_CPU, "1").strip().lower() not in ("0", "false", "off", "no")


def parse_cuda_archs(spec: str) -> list[str]:
    """'9.0' / '8.0;9.0a 10.0+PTX' -> ['9.0', '9.0a', '10.0+PTX']"""
    archs = [a for a in re.split(r"[;,\s]+", spec.strip()) if a]
    for a in archs:
        if not re.fullmatch(r"\d+\.\d+[af]?(\+PTX)?", a):
            raise ValueError(f"{ENV_CUDA_ARCHS}: bad architecture {a!r} (want e.g. 9.0 or 9.0+PTX)")
    return archs


def visible_capabilities() -> list[tuple[int, int]]:
    """Compute capabilities of the GPUs torch sees (empty without torch, CUDA or a GPU)."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        return []
    if not torch.version.cuda or not torch.cuda.is_available():
        return []
    return sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})


def build_cuda_archs(capabilities: list[tuple[int, int]] | None = None,
                     supported: list[str] | None = None) -> tuple[list[str], str]:
    """-> (architectures to compile for, where the choice came from).

    ``$DER_FAST_CUDA_ARCHS`` if set; else the visible GPUs' capabilities (``capabilities``,
    default :func:`visible_capabilities`), each one nvcc cannot target (``supported``:
    ``["8.0", "9.0", ...]`` from :func:`nvcc_archs`, ``None`` = do not check) replaced by the
    newest one below it that it can, with PTX; else ``PORTABLE_CUDA_ARCHS``."""
    spec = os.environ.get(ENV_CUDA_ARCHS, "").strip()
    if spec:
        return parse_cuda_archs(spec), f"${ENV_CUDA_ARCHS}"
    caps = visible_capabilities() if capabilities is None else capabilities
    if not caps:
        return parse_cuda_archs(PORTABLE_CUDA_ARCHS), "no GPU visible: portable default"
    archs = []
    for major, minor in sorted(set(caps)):
        arch = f"{major}.{minor}"
        if supported is not None and arch not in supported:
            older = [a for a in supported if _arch_num(a) < _arch_num(arch)]
            if not older:
                raise RuntimeError(f"der_fast: nvcc supports no architecture <= sm_{major}{minor}")
            arch = max(older, key=_arch_num) + "+PTX"
        if arch not in archs:
            archs.append(arch)
    names = ", ".join(f"{a}.{b}" for a, b in sorted(set(caps)))
    return archs, f"visible GPU (compute capability {names})"


def nvcc_archs(cuda_home: str) -> list[str] | None:
    """Architectures ``nvcc --list-gpu-arch`` can compile for, as ``["7.5", "8.0", ...]``
    (``None`` if it cannot say)."""
    import subprocess

    try:
        out = subprocess.run([str(Path(cuda_home) / "bin" / "nvcc"), "--list-gpu-arch"],
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    nums = re.findall(r"compute_(\d+)", out)
    return [f"{n[:-1]}.{n[-1]}" for n in nums] or None


def _arch_num(arch: str) -> tuple[int, int]:
    """'8.6' / '9.0a+PTX' -> (8, 6) / (9, 0)"""
    m = re.match(r"(\d+)\.(\d+)", arch)
    return int(m.group(1)), int(m.group(2))


def arch_covered(capability: tuple[int, int], built_archs: list[str]) -> bool:
    """Whether code built for ``built_archs`` runs on a GPU of ``capability`` (major, minor).

    CUDA's rules: a cubin for sm_XY runs on X.Z with Z >= Y (same major); an
    architecture-specific one (``9.0a``) only on X.Y itself; PTX for compute_XY is compiled by
    the driver for any X.Y or newer."""
    cap = tuple(capability)
    for arch in built_archs:
        base = arch.replace("+PTX", "")
        num = _arch_num(base)
        if arch.endswith("+PTX") and cap >= num:
            return True
        if base.endswith("a"):
            if cap == num:
                return True
        elif cap[0] == num[0] and cap[1] >= num[1]:
            return True
    return False


def built_cuda_archs() -> list[str] | None:
    """The architectures der_fast._C_cuda was compiled for, from der_fast/_build_info.py
    (``None`` without a build record: an extension built some other way)."""
    try:
        info = importlib.import_module("der_fast._build_info")
    except ImportError:
        return None
    return list(getattr(info, "CUDA_ARCHS", []) or [])


def device_capability(index: int) -> tuple[int, int]:
    import torch

    return tuple(torch.cuda.get_device_capability(index))


def cuda_ext_runs_on(capability: tuple[int, int]) -> tuple[bool, str]:
    """Whether der_fast._C_cuda has code for a GPU of ``capability``; -> (covered, why).
    Without a build record it is assumed to."""
    archs = built_cuda_archs()
    name = f"sm_{capability[0]}{capability[1]}"
    if archs is None:
        return True, f"{name}: no build record (der_fast/_build_info.py), assumed covered"
    if arch_covered(capability, archs):
        return True, f"{name} covered by the build ({';'.join(archs)})"
    return False, (f"der_fast._C_cuda has no code for {name} (built for "
                   f"{';'.join(archs) or 'nothing'}); rebuild with "
                   f"{ENV_CUDA_ARCHS}={capability[0]}.{capability[1]}")


_CUDA_EXT_ON_DEVICE: dict = {}  # device index -> (covered, why), decided on first use
_CUDA_EXT_WARNED: list = []


def cuda_ext_status(index: int | None = None) -> tuple[bool, str]:
    """:func:`cuda_ext_runs_on` for CUDA device ``index`` (None: the current one), decided
    once per device and process."""
    import torch

    if index is None:
        index = torch.cuda.current_device()
    if index not in _CUDA_EXT_ON_DEVICE:
        _CUDA_EXT_ON_DEVICE[index] = cuda_ext_runs_on(device_capability(index))
    return _CUDA_EXT_ON_DEVICE[index]


def use_cuda_ext(index: int | None = None) -> bool:
    """Whether the ops of der_fast._C_cuda may run on CUDA device ``index``. Where the build has
    no code for it: one warning per process, and the ops use their PyTorch reference."""
    covered, why = cuda_ext_status(index)
    if not covered and not _CUDA_EXT_WARNED:
        _CUDA_EXT_WARNED.append(True)
        import warnings

        warnings.warn(f"der_fast: {why}; its ops use the PyTorch reference on this GPU "
                      "(slower; `python -m der_fast.info` shows what runs where)",
                      RuntimeWarning, stacklevel=3)
    return covered


def gencode_flags(archs: list[str]) -> list[str]:
    flags = []
    for a in archs:
        base = a.replace("+PTX", "")
        num = base.replace(".", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if a.endswith("+PTX"):
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return flags


def cuda_expected() -> tuple[bool, str]:
    """Whether a build on this machine is expected to contain the CUDA extension."""
    setting = build_cuda_setting()
    if setting == "0":
        return False, f"{ENV_BUILD_CUDA}=0"
    try:
        import torch
    except ImportError:  # pragma: no cover
        return False, "torch not importable"
    if not torch.version.cuda:
        return False, "torch has no CUDA (torch.version.cuda is None)"
    home, how = find_cuda_home()
    if home is None:
        return False, f"nvcc not found: {how}"
    return True, f"torch CUDA {torch.version.cuda}, toolkit {home} ({how})"


def load_kernel_module(name: str):
    """Import der_fast.kernels.<name>.

    kernels/ is installed as the subpackage der_fast.kernels (setup.py package_dir). In a
    source checkout used in place (`setup.py build_ext --inplace`, PYTHONPATH=.) that mapping
    does not exist, so fall back to loading <repo>/kernels as der_fast.kernels.
    """
    try:
        return importlib.import_module(f"der_fast.kernels.{name}")
    except ModuleNotFoundError as err:
        if err.name not in ("der_fast.kernels", f"der_fast.kernels.{name}"):
            raise
        src = Path(__file__).resolve().parent.parent / "kernels"
        if "der_fast.kernels" not in sys.modules and (src / "__init__.py").is_file():
            spec = importlib.util.spec_from_file_location(
                "der_fast.kernels", src / "__init__.py", submodule_search_locations=[str(src)]
            )
            mod = importlib.util.module_from_spec(spec)
            sys.modules["der_fast.kernels"] = mod
            spec.loader.exec_module(mod)
        return importlib.import_module(f"der_fast.kernels.{name}")
