import pytest
import torch


@pytest.fixture
def seed():
    """Seed torch's global RNG (tests draw random data, never only zeros/ones)."""
    torch.manual_seed(0)
    return 0
