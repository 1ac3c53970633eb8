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
ENV_CUDA_ARCHS = "DER_FAST_CUDA_ARCHS"  # e.g. "9.0" (default) or "8.0;9.0;10.0+PTX"
DEFAULT_CUDA_ARCHS = "9.0"


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


def parse_cuda_archs(spec: str | None = None) -> list[str]:
    """'9.0' / '8.0;9.0a 10.0+PTX' -> ['9.0', '9.0a', '10.0+PTX']"""
    spec = os.environ.get(ENV_CUDA_ARCHS, DEFAULT_CUDA_ARCHS) if spec is None else spec
    archs = [a for a in re.split(r"[;,\s]+", spec.strip()) if a]
    for a in archs:
        if not re.fullmatch(r"\d+\.\d+[af]?(\+PTX)?", a):
            raise ValueError(f"{ENV_CUDA_ARCHS}: bad architecture {a!r} (want e.g. 9.0 or 9.0+PTX)")
    return archs


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
