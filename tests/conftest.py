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
def rng():
    """A fresh, seeded generator per test (inputs differ between tests)."""
    import torch

    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    return g
