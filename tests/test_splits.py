"""The decode split-count rule: device kernel vs its Python statement, and what it decides."""

import pytest
import torch

from sglang_sawint4.kernels.splits import int4_num_kv_splits, num_kv_splits_reference

H100_SMS = 132


def _kernel(lens, num_kv_heads=8, max_kv_splits=16, head_dim=128, sm_count=H100_SMS, num_group=1,
            device="cpu"):
    seq_lens = torch.tensor(lens, dtype=torch.int64, device=device)
    out = torch.full((len(lens) * num_group,), -1, dtype=torch.int32, device=device)
    int4_num_kv_splits(out, seq_lens, num_kv_heads, max_kv_splits, head_dim, sm_count)
    return out.cpu().tolist()


@pytest.mark.parametrize("lens, heads, max_splits, head_dim, group", [
    ([8192] * 32, 8, 16, 128, 1),             # one wave of 1,056 programs: 4 splits
    ([8192] * 64, 8, 16, 128, 1),
    ([8192] * 300, 8, 16, 128, 1),            # more requests than the scheduling floor (256)
    ([1024], 8, 8, 128, 1),                   # short: MIN_SPLIT_TOKENS caps it
    ([1], 2, 8, 64, 1),
    ([100, 8000, 7000, 3], 4, 8, 256, 1),     # unequal lengths: SGLang's balancing
    ([5000, 5100, 4900], 8, 16, 64, 2),       # within 25%: one length; two entries per request
    ([32768] * 5, 8, 8, 96, 1),               # a head_dim without a table entry
])
def test_kernel_matches_reference(lens, heads, max_splits, head_dim, group, device):
    got = _kernel(lens, heads, max_splits, head_dim, num_group=group, device=device)
    assert got == num_kv_splits_reference(lens, heads, max_splits, head_dim, H100_SMS, num_group=group)


def test_rule_fills_one_wave_of_resident_programs():
    # 32 requests x 8 KV heads on 132 SMs x 8 programs: 4 splits fill 1,024 of 1,056 slots
    assert num_kv_splits_reference([8192] * 32, 8, 16, 128, H100_SMS) == [4] * 32
    assert num_kv_splits_reference([8192] * 16, 8, 16, 128, H100_SMS) == [8] * 16
    assert num_kv_splits_reference([8192] * 64, 8, 16, 128, H100_SMS) == [2] * 64
    # a full wave without splitting, and beyond it: never fewer than 1
    assert num_kv_splits_reference([8192] * 128, 8, 16, 128, H100_SMS) == [1] * 128
    assert num_kv_splits_reference([8192] * 256, 8, 16, 128, H100_SMS) == [1] * 256
    # head_dim 256 holds 4 programs per SM: half the splits
    assert num_kv_splits_reference([8192] * 16, 8, 16, 256, H100_SMS) == [4] * 16
    # capped by max_kv_splits and by MIN_SPLIT_TOKENS (256)
    assert num_kv_splits_reference([32768], 8, 8, 128, H100_SMS) == [8]
    assert num_kv_splits_reference([600], 8, 16, 128, H100_SMS) == [3]


def test_rule_balances_unequal_lengths():
    # one long request among short ones is split about len / shortest times
    # (128 requests fill the SMs already, so the fill rule alone would give 1 each)
    splits = num_kv_splits_reference([1000] * 127 + [8000], 8, 16, 128, H100_SMS)
    assert splits == [1] * 127 + [8]


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="multiple"):
        int4_num_kv_splits(torch.zeros(5, dtype=torch.int32), torch.ones(2, dtype=torch.int64), 8, 8, 128, 132)
    with pytest.raises(ValueError, match="int32"):
        int4_num_kv_splits(torch.zeros(2, dtype=torch.int64), torch.ones(2, dtype=torch.int64), 8, 8, 128, 132)
    with pytest.raises(ValueError, match=">= 1"):
        int4_num_kv_splits(torch.zeros(2, dtype=torch.int32), torch.ones(2, dtype=torch.int64), 8, 0, 128, 132)
