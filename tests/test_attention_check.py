"""The served-vs-reference attention check (--kv-quant-debug-check-attention)."""

import json

import pytest
import torch

from helpers import keys_with_outliers
from sglang_sawint4 import format as fmt
from sglang_sawint4.attention_check import REL_TOL, AttentionChecker, int4_attention_reference
from sglang_sawint4.kernels.decode import int4_decode_attention, int4_decode_attention_reference

LAYOUTS = [fmt.Int4Format(64), fmt.Int4Format(128, 64), fmt.Int4Format(128, 32, rotate_v=True)]
IDS = ["int4-d64", "bdr64-d128", "bdr32-kv-d128"]


def _pages(layout, num_slots, heads, gen):
    k = keys_with_outliers(num_slots, heads, layout.head_dim, gen, dtype=torch.float32)
    v = torch.randn(num_slots, heads, layout.head_dim, generator=gen)
    kd, km = fmt.encode(k, layout, is_value=False)
    vd, vm = fmt.encode(v, layout, is_value=True)
    return kd, km, vd, vm


def _batch(gen, num_slots, lens):
    indices = torch.randperm(num_slots, generator=gen)[: sum(lens)].to(torch.int32)
    return torch.tensor([0] + lens).cumsum(0).to(torch.int32), indices


@pytest.mark.parametrize("layout", LAYOUTS, ids=IDS)
def test_decode_reference_equals_the_kernel_reference(layout, rng):
    heads, group = 2, 3
    data = _pages(layout, 300, heads, rng)
    indptr, indices = _batch(rng, 300, [5, 64, 1])
    q = torch.randn(3, heads * group, layout.head_dim, generator=rng, dtype=torch.float64)
    ours = int4_attention_reference(q, torch.arange(4), indptr, indices, data, layout, 0.1)
    theirs = int4_decode_attention_reference(q, *data, indptr, indices, 0.1, layout)
    assert torch.allclose(ours, theirs, atol=1e-10)
    # attending in the rotated space (what the kernel does) is the same attention
    rotated = int4_attention_reference(q, torch.arange(4), indptr, indices, data, layout, 0.1,
                                       round_rotated_q_to=torch.float64)
    assert torch.allclose(rotated, theirs, atol=1e-9)


@pytest.mark.parametrize("layout", LAYOUTS, ids=IDS)
def test_extend_reference_is_causal_over_cache_then_new_tokens(layout, rng):
    heads, group, d = 2, 2, layout.head_dim
    data = _pages(layout, 100, heads, rng)
    prefix_lens, new_lens = [0, 7, 30], [4, 1, 6]
    indptr, indices = _batch(rng, 100, prefix_lens)
    qo_indptr = torch.tensor([0] + new_lens).cumsum(0)
    n = sum(new_lens)
    q = torch.randn(n, heads * group, d, generator=rng, dtype=torch.float64)
    k_new = torch.randn(n, heads, d, generator=rng, dtype=torch.float64)
    v_new = torch.randn(n, heads, d, generator=rng, dtype=torch.float64)
    out = int4_attention_reference(q, qo_indptr, indptr, indices, data, layout, 0.2, k_new=k_new, v_new=v_new)
    k_all = fmt.decode(data[0], data[1], layout, is_value=False)
    v_all = fmt.decode(data[2], data[3], layout, is_value=True)
    for b in range(3):
        idx = indices[indptr[b]: indptr[b + 1]].long()
        for i in range(new_lens[b]):  # token i of request b, one query at a time
            t = int(qo_indptr[b]) + i
            keys = torch.cat([k_all[idx], k_new[qo_indptr[b]: t + 1]]).repeat_interleave(group, 1)
            vals = torch.cat([v_all[idx], v_new[qo_indptr[b]: t + 1]]).repeat_interleave(group, 1)
            p = torch.softmax(torch.einsum("hd,nhd->hn", q[t], keys) * 0.2, -1)
            assert torch.allclose(out[t], torch.einsum("hn,nhd->hd", p, vals), atol=1e-10)


@pytest.mark.parametrize("layout", LAYOUTS, ids=IDS)
def test_decode_kernel_passes_the_check_and_a_corrupted_page_fails_it(layout, rng, device, tmp_path):
    heads, group, d, max_splits = 2, 4, layout.head_dim, 4
    data = [t.to(device) for t in _pages(layout, 256, heads, rng)]
    indptr, indices = _batch(rng, 256, [100, 3, 40])
    q = torch.randn(3, heads * group, d, generator=rng).to(torch.float16).to(device)
    o = torch.empty_like(q)
    logits = torch.empty(3, heads * group, max_splits, d, device=device)
    lse = torch.empty(3, heads * group, max_splits, device=device)
    splits = torch.tensor([4, 1, 2], dtype=torch.int32, device=device)
    int4_decode_attention(q, *data, o, indptr.to(device), indices.to(device), logits, lse, splits,
                          max_splits, d ** -0.5, layout)
    checker = AttentionChecker(str(tmp_path / "check.jsonl"), max_per_layer=5)
    ref = int4_attention_reference(q, torch.arange(4), indptr, indices.to(device), data, layout, d ** -0.5,
                                   round_rotated_q_to=q.dtype)
    good = checker.record("decode", 0, o, ref, batch=3)
    assert good["ok"] and good["rel_err"] < REL_TOL / 4
    # the same output checked against pages whose values were overwritten must fail
    bad_data = [t.clone() for t in data]
    bad_data[2][indices[:100].long().to(device)] ^= 0x5A
    bad_ref = int4_attention_reference(q, torch.arange(4), indptr, indices.to(device), bad_data, layout,
                                       d ** -0.5, round_rotated_q_to=q.dtype)
    bad = checker.record("decode", 0, o, bad_ref, batch=3)
    assert not bad["ok"]
    rows = [json.loads(line) for line in open(tmp_path / "check.jsonl")]
    assert [r["ok"] for r in rows] == [True, False] and rows[0]["batch"] == 3


def test_checker_limits_calls_per_layer_and_size(tmp_path):
    checker = AttentionChecker(str(tmp_path / "c.jsonl"), max_per_layer=1, max_tokens=10)
    assert checker.wanted("decode", 3, 10) and not checker.wanted("decode", 3, 11)
    assert not checker.wanted("decode", 3, 0)
    x = torch.ones(2, 2, dtype=torch.float64)
    checker.record("decode", 3, x, x)
    assert not checker.wanted("decode", 3, 5) and checker.wanted("extend", 3, 5)
    nan = checker.record("extend", 3, torch.full_like(x, float("nan")), x)
    assert not nan["ok"] and not nan["finite"]
