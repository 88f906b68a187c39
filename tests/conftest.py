"""pytest configuration for the dspark-ext tests.

Importing dspark_ext loads the compiled library (registers torch.ops.dspark.*); a missing
or stale build fails collection with the loader's explanation instead of skipping.
"""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # `import helpers`

import dspark_ext  # noqa: E402,F401  (registers torch.ops.dspark.*)


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device (skipped without one)")


@pytest.fixture(autouse=True)
def _fixed_seed():
    """Every test starts from the same global RNG state (tests also use their own generators)."""
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny tensors (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    intra-op threads only add synchronisation, which on a loaded 2-core machine costs 100x
    (results do not depend on the thread count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
