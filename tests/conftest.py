import os
import sys
from pathlib import Path

import pytest
import torch

# The repository root goes last on sys.path: `benchmarks` (the harness shared by the exactness
# tests and the benchmarks, the parity scripts) is imported from it, while `der_fast` stays the
# installed package, with its compiled kernels. (`python -m pytest` from a checkout puts the
# root first, which would import the source tree's der_fast and run every op on its PyTorch
# fallback; pytest's `pythonpath` ini option would put it first too: it inserts at the head.)
_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _ROOT] + [str(_ROOT)]

# Subprocesses started by the tests (`python -m der_fast.train`, torchrun) must import the same
# der_fast as this process: the installed package, with its compiled kernels. Without this,
# `python -m` puts the current directory (a source checkout) first on sys.path, and a checkout
# without built extensions would silently run the pure-PyTorch fallbacks instead.
os.environ.setdefault("PYTHONSAFEPATH", "1")


@pytest.fixture
def seed():
    """Seed torch's global RNG (tests draw random data, never only zeros/ones)."""
    torch.manual_seed(0)
    return 0


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny nets: the CPUs are shared, and oversubscribed
    threads slow them ~10x (``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def world_of_one(tmp_path):
    """An initialised one-process (gloo) torch.distributed group for the test's duration."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0,
                            world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
