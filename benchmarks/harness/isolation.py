"""Isolation between benchmark cases: a case starts with no inductor compile workers, no
compiled graphs and no garbage left by earlier cases, and with the configured intra-op thread
count, so the order of the cases does not change a result (benchmarks/case_order.py shows it).

Inductor compiles in worker processes by default (``compile_threads`` = the CPU count); the
pool outlives the compile and its processes compete with later cases for the CPUs.
:func:`set_compile_threads` makes inductor compile in the benchmark's own process instead
(``TORCHINDUCTOR_COMPILE_THREADS=1`` unless the user set it) and :func:`fresh_case` shuts down
any pool that was started anyway. Every case also gets an empty inductor cache directory, so
torch.compile's first call is a cold compile, as in a new user's first run, not a lookup of
what an earlier case or run left on disk.
"""

from __future__ import annotations

import atexit
import gc
import os
import shutil
import tempfile
from typing import Optional

import torch

from .constants import COMPILE_THREADS_ENV
from .env import apply_threads

CACHE_DIR_ENV = "TORCHINDUCTOR_CACHE_DIR"
_case_cache: dict = {"dir": None}  # this case's inductor cache directory


def set_compile_threads(n: Optional[int] = None) -> None:
    """Inductor's compile worker count: ``n``, else TORCHINDUCTOR_COMPILE_THREADS if set, else 1
    (compile in this process, no worker pool). Set in the environment (read when
    torch._inductor.config is first imported) and in an already imported config."""
    if n is None:
        n = int(os.environ.get(COMPILE_THREADS_ENV, "1"))
    os.environ[COMPILE_THREADS_ENV] = str(n)
    import torch._inductor.config as inductor_config

    inductor_config.compile_threads = n


def _shutdown_compile_workers() -> None:
    try:
        from torch._inductor.async_compile import shutdown_compile_workers
    except ImportError:  # pragma: no cover - older torch without the pool
        return
    shutdown_compile_workers()


def _remove_case_cache() -> None:
    if _case_cache["dir"] is not None:
        shutil.rmtree(_case_cache["dir"], ignore_errors=True)
        _case_cache["dir"] = None


def _empty_inductor_cache() -> None:
    """A new empty inductor cache directory (the previous case's removed) and no in-memory
    caches of compiled code."""
    from torch._inductor.utils import clear_caches

    _remove_case_cache()
    _case_cache["dir"] = tempfile.mkdtemp(prefix="der_fast_bench_inductor_")
    os.environ[CACHE_DIR_ENV] = _case_cache["dir"]
    clear_caches()


atexit.register(_remove_case_cache)


def fresh_case(device: torch.device) -> None:
    """What runs between two cases: forget compiled graphs (torch._dynamo.reset: frees them),
    start an empty inductor cache (the next compile is a cold one), stop compile workers,
    collect garbage, free the CUDA cache, and set the configured intra-op thread count."""
    torch._dynamo.reset()
    _empty_inductor_cache()
    _shutdown_compile_workers()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    apply_threads()
