"""The kernel benchmark's A/B variant parser (the timing itself needs a GPU)."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
import bench_kernels  # noqa: E402


@pytest.mark.parametrize("text, cfg, waves", [
    ("maxnreg=128", {"maxnreg": 128}, 4),
    ("block_n=64,maxnreg=96,waves=2", {"block_n": 64, "maxnreg": 96}, 2),
    ("num_warps=8,num_stages=2", {"num_warps": 8, "num_stages": 2}, 4),
    ("block_h=4,waves=8", {"block_h": 4}, 8),
])
def test_parse_variant(text, cfg, waves):
    assert bench_kernels.parse_variant(text) == (cfg, waves)


@pytest.mark.parametrize("text", ["maxreg=128", "block_n=x", "waves", "block_n=-64"])
def test_parse_variant_refuses_unknown_keys_and_values(text):
    with pytest.raises(SystemExit, match="bad --ab-variants item"):
        bench_kernels.parse_variant(text)
