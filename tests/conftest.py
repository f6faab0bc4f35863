import os

import pytest
import torch


@pytest.fixture
def gen():
    """A torch.Generator with a fresh seed per test (printed, so a failure can be replayed
    with CPR_D2_TEST_SEED=<seed>)."""
    seed = int(os.environ.get("CPR_D2_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    print(f"random seed: {seed} (replay with CPR_D2_TEST_SEED={seed})")
    return torch.Generator().manual_seed(seed)


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
