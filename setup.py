"""Build script for der_fast.

Extensions (torch.utils.cpp_extension, ninja):
  der_fast._C       C++ (CPU) kernels (the schemas are defined in Python); always built
                    (set DER_FAST_BUILD_CPU=0 for a pure-Python install that uses the
                    PyTorch fallbacks).
  der_fast._C_cuda  CUDA C++ kernels (csrc/cuda/*.cu); built when torch has CUDA
                    (torch.version.cuda) and a CUDA toolkit with nvcc is found. No GPU is needed
                    to build it.

Switches (environment variables):
  DER_FAST_BUILD_CUDA=auto|0|1  auto (default): build CUDA when possible, else warn;
                                1: require it (fail without nvcc / CUDA torch); 0: skip it.
  DER_FAST_CUDA_ARCHS           GPU architectures to compile for, ';'-separated, e.g.
                                "8.0;9.0;10.0+PTX" ("+PTX" also embeds PTX, which the driver
                                compiles for newer GPUs). Default: the compute capability of
                                the GPUs visible at build time; without one, the portable list
                                der_fast/_backend.py:PORTABLE_CUDA_ARCHS (Ampere, Ada, Hopper,
                                PTX for newer). At run time an op of der_fast._C_cuda on a GPU
                                the build has no code for uses the PyTorch reference (one
                                warning).
  DER_FAST_BUILD_CPU=1|0        build der_fast._C (default 1).
  DER_FAST_CUDA_HOME / CUDA_HOME / CUDA_PATH
                                CUDA toolkit location; otherwise found from the real nvcc on
                                PATH (wrapper scripts and symlinks are followed) or
                                /usr/local/cuda*. See der_fast/_backend.py:find_cuda_home.
  MAX_JOBS                      parallel compile jobs (ninja).

What was built is recorded in der_fast/_build_info.py (generated; `python -m der_fast.info`).
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import time
import warnings
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
os.chdir(ROOT)


def _load_backend():
    spec = importlib.util.spec_from_file_location(
        "_der_fast_backend_for_setup", ROOT / "der_fast" / "_backend.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _version() -> str:
    text = (ROOT / "der_fast" / "__init__.py").read_text()
    m = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", text, re.MULTILINE)
    if not m:
        raise RuntimeError("could not find __version__ in der_fast/__init__.py")
    return m.group(1)


VERSION = _version()
backend = _load_backend()

INSTALL_REQUIRES = [
    "torch==2.14.1",
    "torchvision==0.29.1",
    "triton",
    "numpy",
    "tqdm",
    "pytest",
    "pytest-benchmark",
    "ninja",
    "matplotlib",
]


def _nvcc_version(cuda_home: str) -> str:
    try:
        out = subprocess.run(
            [str(Path(cuda_home) / "bin" / "nvcc"), "--version"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError) as err:
        raise RuntimeError(f"der_fast: nvcc in {cuda_home} does not run: {err}") from err
    m = re.search(r"release ([\d.]+)", out)
    return m.group(1) if m else out.strip().splitlines()[-1]


def configure():
    """-> (ext_modules, cmdclass). torch is a build requirement (pyproject.toml)."""
    import torch

    record: dict = {
        "version": VERSION,
        "cpu_requested": backend.build_cpu_setting(),
        "cuda_setting": backend.build_cuda_setting(),
        "cuda_reason": "",
        "cuda_home": None,
        "cuda_home_found_by": None,
        "nvcc_version": None,
        "cuda_archs": [],
        "cuda_archs_from": None,
        "openmp": False,
    }
    cuda_setting = record["cuda_setting"]
    cuda_home, how = backend.find_cuda_home()
    want_cuda = False
    if cuda_setting == "0":
        record["cuda_reason"] = "DER_FAST_BUILD_CUDA=0"
    elif not torch.version.cuda:
        record["cuda_reason"] = "torch was built without CUDA"
    elif cuda_home is None:
        record["cuda_reason"] = f"no CUDA toolkit: {how}"
    else:
        want_cuda = True
    if not want_cuda:
        msg = f"der_fast: not building the CUDA extension ({record['cuda_reason']})"
        if cuda_setting == "1":
            raise RuntimeError(msg + " but DER_FAST_BUILD_CUDA=1 requires it")
        if cuda_setting == "auto":
            warnings.warn(msg + "; on CUDA the ops use Triton / PyTorch fallbacks", stacklevel=1)
    else:
        # torch.utils.cpp_extension guesses CUDA_HOME when it is imported, from `which nvcc`;
        # where nvcc is a wrapper script (/usr/local/bin/nvcc here) that guess (/usr/local) is
        # wrong, so set the toolkit we found before importing it (and patch it afterwards in
        # case it was imported already).
        os.environ["CUDA_HOME"] = cuda_home
        record.update(
            cuda_home=cuda_home, cuda_home_found_by=how, nvcc_version=_nvcc_version(cuda_home)
        )

    from torch.utils import cpp_extension
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    if want_cuda:
        cpp_extension.CUDA_HOME = cuda_home

    openmp = "OpenMP" in torch.__config__.parallel_info()
    record["openmp"] = openmp
    # -ffp-contract=off: no fused multiply-adds, so the kernels round exactly like the PyTorch
    # reference (x * scale + shift as two roundings); GCC contracts by default in C++.
    cxx_flags = [
        "-O3",
        "-g0",
        "-DNDEBUG",
        "-ffp-contract=off",
        "-Wno-unused-function",
        "-Wno-psabi",
    ]
    link_flags = []
    if openmp:  # at::parallel_for is inlined into our code: it needs -fopenmp to run in parallel
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    include_dirs = [str(ROOT / "csrc")]

    ext_modules = []
    if record["cpu_requested"]:
        ext_modules.append(
            CppExtension(
                "der_fast._C",
                sources=[
                    "csrc/der_fast.cpp",
                    "csrc/masked_gate.cpp",
                    "csrc/bn_gate.cpp",
                    "csrc/concat_linear_head.cpp",
                    "csrc/conv3x3_bordered.cpp",
                ],
                include_dirs=include_dirs,
                extra_compile_args={"cxx": cxx_flags},
                extra_link_args=link_flags,
            )
        )
    if want_cuda:
        archs, archs_from = backend.build_cuda_archs(supported=backend.nvcc_archs(cuda_home))
        record.update(cuda_archs=archs, cuda_archs_from=archs_from)
        ext_modules.append(
            CUDAExtension(
                "der_fast._C_cuda",
                sources=["csrc/cuda/concat_linear_head.cu"],
                include_dirs=include_dirs,
                extra_compile_args={
                    "cxx": ["-O3", "-g0", "-DNDEBUG"],
                    # explicit -gencode flags: torch then adds none of its own (without them and
                    # without a visible GPU it would compile for every architecture it knows)
                    "nvcc": ["-O3", "-DNDEBUG", "-lineinfo", *backend.gencode_flags(archs)],
                },
            )
        )

    class BuildExt(BuildExtension):
        """Times the build, tolerates a failing CUDA compile in auto mode (warning; the build
        check `python -m der_fast.info --check` still flags it) and writes
        der_fast/_build_info.py."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as err:
                if ext.name != "der_fast._C_cuda" or cuda_setting == "1":
                    raise
                record["cuda_reason"] = f"CUDA compile failed: {type(err).__name__}: {err}"
                warnings.warn(
                    f"der_fast: {record['cuda_reason']}; continuing without it", stacklevel=1
                )

        def run(self):
            t0 = time.perf_counter()
            super().run()
            seconds = time.perf_counter() - t0
            built = {e.name: Path(self.get_ext_fullpath(e.name)).is_file() for e in self.extensions}
            rec = dict(record)
            rec.update(
                built_cpu=built.get("der_fast._C", False),
                built_cuda=built.get("der_fast._C_cuda", False),
                build_seconds=round(seconds, 1),
                torch_version=torch.__version__,
                torch_cuda=torch.version.cuda,
                compiler_flags=cxx_flags,
                built_at=time.strftime("%Y-%m-%d %H:%M:%S"),
            )
            text = (
                '"""Generated by setup.py at build time: what der_fast\'s build contains. '
                'Do not edit."""\n\n' + "".join(f"{k.upper()} = {v!r}\n" for k, v in rec.items())
            )
            if self.inplace:
                target = ROOT / "der_fast" / "_build_info.py"
            else:
                target = Path(self.build_lib) / "der_fast" / "_build_info.py"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
            print(f"der_fast: built {built} in {seconds:.1f} s; wrote {target}")

    return ext_modules, {"build_ext": BuildExt.with_options(use_ninja=True)}


ext_modules, cmdclass = configure()


packages = find_packages(include=["der_fast", "der_fast.*"]) + ["der_fast.kernels"]

setup(
    name="der_fast",
    version=VERSION,
    description=(
        "DER (Dynamically Expandable Representation) class-incremental learning: a plain "
        "PyTorch reference and a fused fast path with custom CPU/CUDA/Triton ops"
    ),
    long_description=next(
        (p.read_text() for p in (ROOT / "README.md", ROOT / "DEVNOTES.md") if p.exists()), ""
    ),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=sorted(set(packages)),
    package_dir={"der_fast.kernels": "kernels"},
    package_data={"der_fast": ["assets/*"]},
    include_package_data=True,
    install_requires=INSTALL_REQUIRES,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
