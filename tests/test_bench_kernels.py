"""The kernel benchmark's A/B variant parser and split counts (the timing itself needs a GPU)."""


import pytest

from sglang_sawint4.bench import kernels as bench_kernels


@pytest.mark.parametrize("text, cfg, waves", [
    ("maxnreg=128", {"maxnreg": 128}, None),
    ("block_n=64,maxnreg=96,waves=2", {"block_n": 64, "maxnreg": 96}, 2),
    ("num_warps=8,num_stages=2", {"num_warps": 8, "num_stages": 2}, None),
    ("block_h=4,waves=8", {"block_h": 4}, 8),
])
def test_parse_variant(text, cfg, waves):
    assert bench_kernels.parse_variant(text) == (cfg, waves)


@pytest.mark.parametrize("text", ["maxreg=128", "block_n=x", "waves", "block_n=-64"])
def test_parse_variant_refuses_unknown_keys_and_values(text):
    with pytest.raises(SystemExit, match="bad --ab-variants item"):
        bench_kernels.parse_variant(text)


def test_benchmark_splits_are_the_served_rule_unless_waves_given():
    from sglang_sawint4.kernels.splits import num_kv_splits_reference

    for batch, context in ((1, 131072), (32, 8192), (256, 32768)):
        assert bench_kernels.num_kv_splits(batch, context, 132) == num_kv_splits_reference(
            [context] * batch, bench_kernels.HK, bench_kernels.SERVED_MAX_SPLITS, bench_kernels.D, 132)[0]
    assert bench_kernels.num_kv_splits(32, 8192, 132, waves=4) == 3  # ceil(4 x 132 / 256)
