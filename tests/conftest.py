"""Test setup: run Triton kernels in interpreter mode on machines without a GPU."""

import os

import pytest

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover - torch missing is a setup error shown by imports
    _HAS_CUDA = False

if not _HAS_CUDA:
    # Must be set before triton is imported anywhere.
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if _HAS_CUDA else "cpu"


@pytest.fixture
def device():
    return DEVICE


def _seed(request) -> int:
    """A seed from the test's id: inputs differ between tests, and each test sees the same
    inputs on every run; printed, so a failure shows it."""
    import zlib

    seed = zlib.crc32(request.node.nodeid.encode())
    print(f"seed {seed} ({request.node.nodeid})")
    return seed


@pytest.fixture(autouse=True)
def seeded_global_rng(request):
    """torch's global generator, for tests that draw without a generator of their own."""
    import torch

    torch.manual_seed(_seed(request))


@pytest.fixture
def rng(request):
    """A seeded generator per test (see _seed)."""
    import torch

    return torch.Generator().manual_seed(_seed(request))
