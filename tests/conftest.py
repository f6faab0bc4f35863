import os

import numpy as np
import pytest
import torch

# Several tests compare training runs bit for bit, and float reductions can depend on the
# thread count: the suite's runs keep the threads torch (or the test) chose, whatever
# other cpr_d2 jobs run on the machine. The share of the cores (cpr_d2/utils/threads.py)
# is tested with explicit settings in tests/utils/test_threads.py.
os.environ.setdefault("CPR_D2_THREADS", "unmanaged")


def _test_seed():
    """A fresh seed, or CPR_D2_TEST_SEED; printed, so a failure can be replayed."""
    seed = int(os.environ.get("CPR_D2_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    print(f"random seed: {seed} (replay with CPR_D2_TEST_SEED={seed})")
    return seed


@pytest.fixture
def gen():
    """A torch.Generator with a fresh seed per test (printed, so a failure can be replayed
    with CPR_D2_TEST_SEED=<seed>)."""
    return torch.Generator().manual_seed(_test_seed())


@pytest.fixture
def np_rng():
    """A numpy Generator with a fresh seed per test, printed like gen's."""
    return np.random.default_rng(_test_seed())


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
