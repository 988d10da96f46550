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


@pytest.fixture
def rng(request):
    """A seeded generator per test: the seed comes from the test's id (inputs differ between
    tests, each test sees the same inputs on every run) and is printed, so a failure shows it."""
    import zlib

    import torch

    seed = zlib.crc32(request.node.nodeid.encode())
    print(f"rng seed {seed} ({request.node.nodeid})")
    return torch.Generator().manual_seed(seed)
