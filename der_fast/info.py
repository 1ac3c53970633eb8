"""``python -m der_fast.info``: what this installation of der_fast contains and uses.

Prints the package and torch versions, which compiled backends were built (from the generated
der_fast/_build_info.py) and can be imported (and which ops they register kernels for: the JSON
lists them, the text flags a der_fast._C without a kernel for an op), for each visible GPU
whether der_fast._C_cuda has code for it, whether Triton is available, and which implementation
each op uses on CPU and on CUDA.

Options:
  --check  exit with status 1 if a part that should have been built is missing: the C++ CPU
           extension (unless DER_FAST_BUILD_CPU=0) or one of its kernels, or the CUDA extension
           when torch has CUDA, nvcc is found and DER_FAST_BUILD_CUDA is not 0 (used by CI:
           .ci/run).
  --json   print the same information as JSON.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys


def collect() -> dict:
    import torch

    import der_fast
    from der_fast import _backend, ops

    try:
        bi = importlib.import_module("der_fast._build_info")
        build = {k.lower(): v for k, v in vars(bi).items() if k.isupper()}
    except ImportError:
        build = None
    triton_version = None
    if importlib.util.find_spec("triton") is not None:
        try:
            from importlib.metadata import version

            triton_version = version("triton")
        except Exception:  # noqa: BLE001
            triton_version = "installed"
    cuda_expected, cuda_why = _backend.cuda_expected()
    devices, coverage = [], []
    if torch.cuda.is_available():
        devices = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if ops.HAS_CUDA_EXT:
            for i, name in enumerate(devices):
                covered, why = _backend.cuda_ext_status(i)
                coverage.append({"device": f"cuda:{i} {name}", "covered": covered, "why": why})
    return {
        "der_fast": der_fast.__version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_devices": devices,
        "build": build,
        "cpu_ext": {
            "importable": ops.HAS_CPU_EXT,
            "error": ops.CPU_EXT_ERROR,
            "kernels": sorted(ops.CPU_EXT_OPS),
            # der_fast._C has a kernel for every op
            "missing_kernels": sorted(set(ops.SCHEMAS) - ops.CPU_EXT_OPS) if ops.HAS_CPU_EXT
            else [],
        },
        "cuda_ext": {
            "importable": ops.HAS_CUDA_EXT,
            "error": ops.CUDA_EXT_ERROR,
            "kernels": sorted(ops.CUDA_EXT_OPS),
        },
        "cuda_ext_on_devices": coverage,
        "triton": {"version": triton_version, "used": ops.HAS_TRITON},
        "cuda_expected": {"expected": cuda_expected, "why": cuda_why},
        "cpu_expected": _backend.build_cpu_setting(),
        "ops": {
            op: {dev: ops.implementation(op, dev) for dev in ("cpu", "cuda")}
            for op in ("masked_gate", "bn_gate", "concat_linear_head", "conv3x3_bordered")
        },
    }


def problems(info: dict) -> list[str]:
    out = []
    if info["cpu_expected"] and not info["cpu_ext"]["importable"]:
        out.append(f"the C++ CPU extension der_fast._C is missing ({info['cpu_ext']['error']})")
    if info["cpu_ext"]["missing_kernels"]:
        out.append(
            "the C++ CPU extension der_fast._C has no kernel for "
            f"{', '.join(info['cpu_ext']['missing_kernels'])} (rebuild der_fast)"
        )
    if info["cuda_expected"]["expected"] and not info["cuda_ext"]["importable"]:
        out.append(
            "the CUDA extension der_fast._C_cuda should have been built "
            f"({info['cuda_expected']['why']}) but is missing ({info['cuda_ext']['error']})"
        )
    return out


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def render(info: dict) -> str:
    b = info["build"] or {}
    lines = [
        f"der_fast {info['der_fast']}  (python {info['python']})",
        (
            f"torch {info['torch']}  (CUDA {info['torch_cuda'] or 'none'}; "
            f"GPUs: {', '.join(info['cuda_devices']) or 'none visible'})"
        ),
        "",
        "backends:",
    ]
    if not b:
        lines.append(
            "  (no build record der_fast/_build_info.py: the extensions were not built by setup.py)"
        )
    built_at = f", built {b['built_at']} in {b['build_seconds']} s" if b else ""
    lines.append(
        f"  cpu  C++ extension  der_fast._C       built: {_yes(b.get('built_cpu', False))}, "
        f"importable: {_yes(info['cpu_ext']['importable'])}{built_at}"
    )
    if info["cpu_ext"]["missing_kernels"]:
        lines.append(f"    NO KERNEL for: {', '.join(info['cpu_ext']['missing_kernels'])}")
    cuda_detail = ""
    if b.get("built_cuda"):
        cuda_detail = (
            f" (archs {';'.join(b.get('cuda_archs', []))}"
            + (f" from {b['cuda_archs_from']}" if b.get("cuda_archs_from") else "")
            + f", nvcc {b.get('nvcc_version')} in "
            f"{b.get('cuda_home')}, found via {b.get('cuda_home_found_by')})"
        )
    elif b:
        cuda_detail = f" ({b.get('cuda_reason') or 'not built'})"
    lines.append(
        f"  cuda C++ extension  der_fast._C_cuda  built: {_yes(b.get('built_cuda', False))}, "
        f"importable: {_yes(info['cuda_ext']['importable'])}{cuda_detail}"
    )
    for d in info["cuda_ext_on_devices"]:
        state = "has code for it" if d["covered"] else "NO CODE for it: PyTorch fallback"
        lines.append(f"  {d['device']}: der_fast._C_cuda {state} ({d['why']})")
    tv = info["triton"]["version"]
    lines.append(
        f"  triton              {tv or 'not installed'}"
        + (" (used for masked_gate on CUDA)" if info["triton"]["used"] else "")
    )
    lines.append(
        f"  CUDA part expected on this machine: {_yes(info['cuda_expected']['expected'])} "
        f"({info['cuda_expected']['why']})"
    )
    lines += ["", "ops (implementation used):"]
    for op, where in info["ops"].items():
        lines.append(f"  {op:<20} cpu:  {where['cpu']}")
        lines.append(f"  {'':<20} cuda: {where['cuda']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m der_fast.info", description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="fail if an expected backend is missing")
    p.add_argument("--json", action="store_true", help="print JSON")
    args = p.parse_args(argv)
    info = collect()
    print(json.dumps(info, indent=2, default=str) if args.json else render(info))
    if args.check:
        bad = problems(info)
        for msg in bad:
            print(f"CHECK FAILED: {msg}", file=sys.stderr)
        if bad:
            return 1
        print("check: ok", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
