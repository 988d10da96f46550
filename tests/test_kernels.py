"""Triton kernels vs float64 torch references (interpreter mode on CPU)."""

import pytest
import torch

from helpers import keys_with_outliers, rel_err
from sglang_sawint4 import format as fmt
from sglang_sawint4.kernels import decode
from sglang_sawint4.kernels.decode import (
    decode_attention_reference,
    int4_decode_attention,
    int4_decode_attention_reference,
)
from sglang_sawint4.kernels.dequant import dequantize_pages, dequantize_pages_reference
from sglang_sawint4.kernels.rotate import from_stored_space, rotate_rows, to_stored_space
from sglang_sawint4.kernels.store import (rotate_quantize_store, rotate_quantize_store_and_stage,
                                          rotate_quantize_store_reference)

LAYOUTS = [
    fmt.Int4Format(64),                                # plain INT4
    fmt.Int4Format(64, 16),                            # BDR-16, K only
    fmt.Int4Format(128, 128),                          # the served default
    fmt.Int4Format(128, 32, rotate_v=True),            # K and V rotated
    fmt.Int4Format(128, 64, symmetric=True),           # symmetric grid
    fmt.Int4Format(256, 128, rotate_v=True),
]
IDS = [f"d{l.head_dim}-b{l.block_size}-{'kv' if l.rotate_v else 'k'}{'-sym' if l.symmetric else ''}" for l in LAYOUTS]


def _pool(num_slots, heads, d, device):
    return [t.to(device) for t in (*fmt.allocate_layer(num_slots, heads, d), *fmt.allocate_layer(num_slots, heads, d))]


def _poison(bufs):
    for t in bufs:
        t.fill_(0xAB if t.dtype == torch.uint8 else float("nan"))


def _store(layout, num_tokens, heads, num_slots, gen, device, dtype=torch.float16, fused_qkv=False, center=None):
    """Random K/V stored at random slots; ``center`` ([heads, d], original space) is
    subtracted from the keys by the kernel (and the keys get that constant added, so
    centering has something to remove)."""
    d = layout.head_dim
    k = keys_with_outliers(num_tokens, heads, d, gen, dtype=dtype)
    if center is not None:
        k = (k.float() + center).to(dtype)
    v = torch.randn(num_tokens, heads, d, generator=gen).to(dtype)
    if fused_qkv:
        # k and v as strided views of one fused projection output, as in SGLang models
        qkv = torch.randn(num_tokens, (2 * heads + 2 * heads) * d, generator=gen).to(dtype)
        qkv[:, 2 * heads * d: 3 * heads * d] = k.reshape(num_tokens, -1)
        qkv[:, 3 * heads * d:] = v.reshape(num_tokens, -1)
        k = qkv[:, 2 * heads * d: 3 * heads * d].view(num_tokens, heads, d)
        v = qkv[:, 3 * heads * d:].view(num_tokens, heads, d)
    loc = torch.randperm(num_slots, generator=gen)[:num_tokens]  # non-contiguous slots
    bufs = _pool(num_slots, heads, d, device)
    _poison(bufs)
    stored = None if center is None else fmt.stored_center(center, layout).to(device)
    rotate_quantize_store(k.to(device), v.to(device), loc.to(device), *bufs, layout, k_center=stored)
    return k, v, loc, bufs


def _bias_center(heads, d, gen):
    """A constant key vector like a large k_proj bias: a few channels far from zero."""
    c = torch.zeros(heads, d)
    c[:, torch.randperm(d, generator=gen)[:6]] = 40.0 * torch.randn(heads, 6, generator=gen).sign()
    return c


@pytest.mark.parametrize("layout", LAYOUTS, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_store_matches_reference(layout, dtype, rng, device):
    num_slots, heads = 96, 2
    k, v, loc, bufs = _store(layout, 37, heads, num_slots, rng, device, dtype=dtype, fused_qkv=True)
    ref = _pool(num_slots, heads, layout.head_dim, "cpu")
    _poison(ref)
    rotate_quantize_store_reference(k, v, loc, *ref, layout)
    written = torch.zeros(num_slots, dtype=torch.bool)
    written[loc] = True
    for got, exp in zip(bufs, ref):
        got = got.cpu()
        if got.dtype == torch.uint8:
            # untouched slots keep the poison; written ones hold the reference codes,
            # up to a code flip where fp32 and fp64 rotations round across a boundary
            assert torch.all(got[~written] == 0xAB)
            diff = (fmt.unpack(got[written]).int() - fmt.unpack(exp[written]).int()).abs()
            assert diff.max() <= 1 and diff.float().mean() < 1e-3
        else:
            assert torch.isnan(got[~written]).all()
            assert torch.allclose(got[written].float(), exp[written].float(), rtol=2e-3, atol=1e-4)


@pytest.mark.parametrize("layout", [LAYOUTS[0], LAYOUTS[2], LAYOUTS[3], LAYOUTS[5]], ids=[IDS[0], IDS[2], IDS[3], IDS[5]])
def test_store_with_key_center_matches_reference(layout, rng, device):
    num_slots, heads = 64, 2
    center = _bias_center(heads, layout.head_dim, rng)
    k, v, loc, bufs = _store(layout, 29, heads, num_slots, rng, device, dtype=torch.float32, center=center)
    ref = _pool(num_slots, heads, layout.head_dim, "cpu")
    rotate_quantize_store_reference(k, v, loc, *ref, layout, k_center=center)
    for got, exp in zip(bufs, ref):
        got = got.cpu()[loc]
        if got.dtype == torch.uint8:
            diff = (fmt.unpack(got).int() - fmt.unpack(exp[loc]).int()).abs()
            assert diff.max() <= 1 and diff.float().mean() < 1e-3
        else:
            assert torch.allclose(got.float(), exp[loc].float(), rtol=2e-3, atol=1e-3)
    # what the center buys: keys riding on a constant read back far closer to themselves
    kd, km = bufs[0].cpu()[loc], bufs[1].cpu()[loc]
    centered = fmt.decode(kd, km, layout, is_value=False, center=center)
    plain = fmt.fake_quantize(k, layout, is_value=False)
    assert rel_err(centered, k) < 0.75 * rel_err(plain, k)  # worst of 30 seeds x 4 layouts: 0.63


def test_store_refuses_a_badly_shaped_center(rng, device):
    layout = fmt.Int4Format(64, 64)
    bufs = _pool(8, 2, 64, device)
    k = torch.randn(3, 2, 64, device=device)
    for bad in (torch.zeros(2, 32, device=device), torch.zeros(2, 64, dtype=torch.float16, device=device)):
        with pytest.raises(ValueError, match="key center must be"):
            rotate_quantize_store(k, k, torch.arange(3, device=device), *bufs, layout, k_center=bad)


def test_store_round_trip_error_bound(rng, device):
    layout = fmt.Int4Format(128, 128)
    k, v, loc, bufs = _store(layout, 40, 2, 64, rng, device, dtype=torch.float32)
    k_hat = fmt.decode(bufs[0].cpu()[loc], bufs[1].cpu()[loc], layout, is_value=False)
    rotated = fmt.rotate(k.double(), 128)
    step = (rotated.amax(-1) - rotated.amin(-1)) / 15
    assert torch.all((fmt.rotate(k_hat, 128) - rotated).abs() <= step[..., None] * 0.51 + 1e-2)


def test_store_empty_batch_is_a_no_op(device):
    layout = fmt.Int4Format(64)
    bufs = _pool(8, 2, 64, device)
    _poison(bufs)
    empty = torch.empty(0, 2, 64, device=device)
    rotate_quantize_store(empty, empty, torch.empty(0, dtype=torch.int64, device=device), *bufs, layout)
    assert torch.all(bufs[0] == 0xAB)


@pytest.mark.parametrize(
    "bad,match",
    [
        (dict(k=torch.zeros(4, 2, 32)), "k must be"),
        (dict(k=torch.zeros(4, 2, 64, dtype=torch.int32)), "bf16/fp16/fp32"),
        (dict(loc=torch.zeros(3, dtype=torch.int64)), "loc must be"),
        (dict(loc=torch.zeros(4, dtype=torch.float32)), "int32/int64"),
        (dict(k_data=torch.zeros(8, 2, 64, dtype=torch.uint8)), "k data must be"),
        (dict(k_meta=torch.zeros(8, 2, 2, dtype=torch.float32)), "k meta must be"),
    ],
)
def test_store_bad_input_is_refused(bad, match, device):
    layout = fmt.Int4Format(64)
    kd, km, vd, vm = fmt.allocate_layer(8, 2, 64) + fmt.allocate_layer(8, 2, 64)
    args = dict(k=torch.zeros(4, 2, 64), v=torch.zeros(4, 2, 64), loc=torch.arange(4),
                k_data=kd, k_meta=km, v_data=vd, v_meta=vm)
    args.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        rotate_quantize_store(**{n: t.to(device) for n, t in args.items()}, layout=layout)


def _requests(gen, num_slots, lens, shared_prefix=0):
    """kv_indptr/kv_indices of a batch; the first `shared_prefix` slots of every
    request are the same slots (a radix-cache hit shared by several requests)."""
    perm = torch.randperm(num_slots, generator=gen)
    prefix, pos, idx = perm[:shared_prefix], shared_prefix, []
    for n in lens:
        own = perm[pos: pos + n - min(n, shared_prefix)]
        pos += own.numel()
        idx.append(torch.cat([prefix[: min(n, shared_prefix)], own]))
        assert idx[-1].numel() == n, "not enough slots for these requests"
    indptr = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    return indptr, torch.cat(idx).to(torch.int32)


def _q_dtypes():
    # bf16 only on a GPU: the CPU interpreter's bf16 arithmetic is not trustworthy
    return [torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("layout", LAYOUTS, ids=IDS)
@pytest.mark.parametrize("group", [1, 4, 7])
@pytest.mark.parametrize("q_dtype", _q_dtypes(), ids=str)
def test_decode_matches_reference(layout, group, q_dtype, rng, device):
    d, heads, num_slots, max_splits = layout.head_dim, 2, 200, 4
    _, _, _, bufs = _store(layout, num_slots, heads, num_slots, rng, device)
    lens = [1, 70, 33, 129]
    indptr, indices = _requests(rng, num_slots, lens, shared_prefix=20)
    batch = len(lens)
    q = torch.randn(batch, heads * group, d, generator=rng).to(q_dtype)
    o = torch.full_like(q, float("nan")).to(device)
    logits = torch.empty(batch, heads * group, max_splits, d, device=device)
    lse_parts = torch.empty(batch, heads * group, max_splits, device=device)
    splits = torch.tensor([1, 4, 2, 3], dtype=torch.int32, device=device)
    lse = torch.full((batch, heads * group), float("nan"), device=device)
    scale = d ** -0.5
    int4_decode_attention(q.to(device), *bufs, o, indptr.to(device), indices.to(device), logits, lse_parts,
                          splits, max_splits, scale, layout, lse_out=lse)
    ref = int4_decode_attention_reference(q, *bufs, indptr, indices, scale, layout)
    assert not torch.isnan(o).any()
    assert rel_err(o, ref) < (3e-3 if q_dtype == torch.float16 else 1.5e-2)
    # LSE of the scaled scores, for merging partial attentions
    k = fmt.decode(bufs[0].cpu(), bufs[1].cpu(), layout, is_value=False).repeat_interleave(group, 1)
    for b in range(batch):
        rows = k[indices[indptr[b]: indptr[b + 1]].long()]
        ref_lse = torch.logsumexp(torch.einsum("hd,nhd->hn", q[b].double(), rows) * scale, -1)
        # bf16 q carries 2^-8 relative rounding into every score
        assert torch.allclose(lse[b].cpu().double(), ref_lse, atol=2e-2 if q_dtype == torch.float16 else 6e-2)


@pytest.mark.parametrize("block_n, block_h, num_warps", [(16, None, 2), (64, None, 2), (64, 4, 2), (16, 8, 4),
                                                        (64, None, 4), (32, None, 1)])
def test_decode_tiling_variants_match_reference(block_n, block_h, num_warps, rng, device):
    """Several tiles per split, partial last tiles, a split holding one token and
    requests of length 1; query-head tiles of the GQA group's width (4) too; at 1 warp
    head_dim 64 reads values as words (decode.value_words), at 2 and 4 as bytes."""
    layout = fmt.Int4Format.for_method("int4-bdr", 64, 32, "k")
    heads, group, num_slots, max_splits = 2, 4, 300, 3
    _, _, _, bufs = _store(layout, num_slots, heads, num_slots, rng, device)
    lens = [1, 130, 67, 2]
    indptr, indices = _requests(rng, num_slots, lens, shared_prefix=10)
    batch = len(lens)
    q = torch.randn(batch, heads * group, 64, generator=rng).to(torch.float16)
    o = torch.full_like(q, float("nan")).to(device)
    logits = torch.empty(batch, heads * group, max_splits, 64, device=device)
    lse_parts = torch.empty(batch, heads * group, max_splits, device=device)
    splits = torch.tensor([1, 3, 2, 2], dtype=torch.int32, device=device)
    int4_decode_attention(q.to(device), *bufs, o, indptr.to(device), indices.to(device), logits, lse_parts,
                          splits, max_splits, 0.125, layout, block_n=block_n, block_h=block_h, num_warps=num_warps)
    ref = int4_decode_attention_reference(q, *bufs, indptr, indices, 0.125, layout)
    assert rel_err(o, ref) < 3e-3


def test_decode_low_parallelism_tiling_matches_reference(rng, device):
    """The tiling decode.default_tiling picks for few (request, KV head) pairs at head_dim
    128 (128 tokens x 4 warps: values read as bytes, value_words) against the reference."""
    layout = fmt.Int4Format.for_method("int4-bdr", 128, 128, "kv")
    block_n, num_warps = decode.LOW_PARALLELISM_TILING[128]
    assert not decode.value_words(128, num_warps)
    heads, group, num_slots, max_splits = 2, 4, 400, 2
    _, _, _, bufs = _store(layout, num_slots, heads, num_slots, rng, device)
    lens = [300, 1]
    indptr, indices = _requests(rng, num_slots, lens)
    q = torch.randn(len(lens), heads * group, 128, generator=rng).to(torch.float16)  # _q_dtypes: fp16 on a CPU
    o = torch.full_like(q, float("nan")).to(device)
    logits = torch.empty(len(lens), heads * group, max_splits, 128, device=device)
    lse_parts = torch.empty(len(lens), heads * group, max_splits, device=device)
    splits = torch.tensor([2, 1], dtype=torch.int32, device=device)
    int4_decode_attention(q.to(device), *bufs, o, indptr.to(device), indices.to(device), logits, lse_parts,
                          splits, max_splits, 128 ** -0.5, layout, block_n=block_n, num_warps=num_warps)
    ref = int4_decode_attention_reference(q, *bufs, indptr, indices, 128 ** -0.5, layout)
    assert rel_err(o, ref) < 3e-3


def test_default_tiling_switches_for_few_request_head_pairs(monkeypatch):
    monkeypatch.setattr(decode, "_sm_count", lambda device: 132)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    default_128 = (decode.BLOCK_N, decode.default_num_warps(128))
    assert decode.default_tiling(128, 1 * 8, cuda) == decode.LOW_PARALLELISM_TILING[128]
    assert decode.default_tiling(128, 8 * 8, cuda) == decode.LOW_PARALLELISM_TILING[128]  # 64 <= 0.5 x 132
    assert decode.default_tiling(128, 16 * 8, cuda) == default_128
    assert decode.default_tiling(128, 8, cpu) == default_128  # the interpreter: no SM count
    assert decode.default_tiling(64, 8, cuda) == (decode.BLOCK_N, decode.default_num_warps(64))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="tensor-core accumulation: a GPU property")
@pytest.mark.parametrize("splits", [1, 8])
def test_decode_long_splits_stay_at_bf16_error(splits, device):
    """32k tokens in 1 or 8 splits, values of near-zero mean (offset ~ -7.5 scale): the
    value accumulators carry code_bias * sum(p * scale), far above the output.  Accumulated
    inside the tensor cores across 256 tiles, that drifted to a 5% error at 1 split (35% at
    128k); added in registers per tile, the error is bf16 rounding's."""
    torch.manual_seed(0)
    layout, ctx, heads, group, d = fmt.Int4Format(128, 128), 32768, 2, 4, 128
    kd, km = fmt.allocate_layer(ctx, heads, d, device)
    vd, vm = fmt.allocate_layer(ctx, heads, d, device)
    for data, meta in ((kd, km), (vd, vm)):
        data.random_(0, 256)
        scale = torch.rand(ctx, heads, device=device) * 0.3 + 0.3
        meta.copy_(torch.stack([scale, -7.5 * scale + 0.1 * torch.randn_like(scale)], -1))
    q = torch.randn(1, heads * group, d, device=device).bfloat16()
    indptr = torch.tensor([0, ctx], dtype=torch.int32, device=device)
    indices = torch.arange(ctx, dtype=torch.int32, device=device)
    o = torch.full_like(q, float("nan"))
    logits = torch.empty(1, heads * group, 8, d, device=device)
    lse_parts = torch.empty(1, heads * group, 8, device=device)
    int4_decode_attention(q, kd, km, vd, vm, o, indptr, indices, logits, lse_parts,
                          torch.tensor([splits], dtype=torch.int32, device=device), 8, d ** -0.5, layout)
    k = fmt.decode(kd, km, layout, is_value=False)
    v = fmt.decode(vd, vm, layout, is_value=True)
    ref = decode_attention_reference(q, k, v, indptr, indices, d ** -0.5)
    bf16 = decode_attention_reference(q, k.bfloat16().double(), v.bfloat16().double(), indptr, indices, d ** -0.5)
    assert rel_err(o, ref) < 1.5 * rel_err(bf16.bfloat16(), ref) + 1e-3


def test_decode_empty_batch_and_bad_shapes(device):
    layout = fmt.Int4Format(64)
    bufs = _pool(8, 2, 64, device)
    q = torch.empty(0, 4, 64, device=device)
    logits = torch.empty(0, 4, 2, 64, device=device)
    int4_decode_attention(q, *bufs, q.clone(), torch.zeros(1, dtype=torch.int32, device=device),
                          torch.empty(0, dtype=torch.int32, device=device), logits,
                          torch.empty(0, 4, 2, device=device), torch.empty(0, dtype=torch.int32, device=device),
                          2, 0.1, layout)
    q = torch.zeros(1, 3, 64, device=device)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        int4_decode_attention(q, *bufs, q.clone(), torch.tensor([0, 1], dtype=torch.int32, device=device),
                              torch.zeros(1, dtype=torch.int32, device=device), torch.empty(1, 3, 2, 64, device=device),
                              torch.empty(1, 3, 2, device=device), torch.ones(1, dtype=torch.int32, device=device),
                              2, 0.1, layout)
    with pytest.raises(ValueError, match="head_dim"):
        int4_decode_attention(torch.zeros(1, 4, 128, device=device), *bufs, torch.zeros(1, 4, 128, device=device),
                              None, None, None, None, None, 2, 0.1, layout)
    q = torch.zeros(1, 8, 64, device=device)  # GQA group 4 over the pool's 2 KV heads
    for block_h in (2, 6):
        with pytest.raises(ValueError, match="power of two >= the GQA group 4"):
            int4_decode_attention(q, *bufs, q.clone(), torch.tensor([0, 1], dtype=torch.int32, device=device),
                                  torch.zeros(1, dtype=torch.int32, device=device),
                                  torch.empty(1, 8, 2, 64, device=device), torch.empty(1, 8, 2, device=device),
                                  torch.ones(1, dtype=torch.int32, device=device), 2, 0.1, layout, block_h=block_h)


@pytest.mark.parametrize("layout", LAYOUTS, ids=IDS)
def test_dequantize_pages_matches_reference(layout, rng, device):
    num_slots, heads = 80, 2
    _, _, _, bufs = _store(layout, num_slots, heads, num_slots, rng, device)
    indices = torch.randint(0, num_slots, (45,), generator=rng)  # repeats allowed (shared pages)
    k_out = torch.full((50, heads, layout.head_dim), float("nan"), dtype=torch.float16, device=device)
    v_out = torch.full_like(k_out, float("nan"))
    dequantize_pages(*bufs, indices.to(device), k_out, v_out, layout)
    rk, rv = dequantize_pages_reference(*bufs, indices, layout)
    assert rel_err(k_out[:45], rk) < 2e-3 and rel_err(v_out[:45], rv) < 2e-3
    assert torch.isnan(k_out[45:].float()).all()  # rows past n untouched


def _centered_pages(layout, rng, device, num_slots=48, heads=2):
    """Keys with a center stored (fp32 input) in every slot: (k, center, loc, bufs, k_out, v_out)."""
    center = _bias_center(heads, layout.head_dim, rng)
    k, _, loc, bufs = _store(layout, num_slots, heads, num_slots, rng, device, dtype=torch.float32, center=center)
    k_out = torch.empty((num_slots, heads, layout.head_dim), dtype=torch.float32, device=device)
    return k, center, loc, bufs, k_out, torch.empty_like(k_out)


@pytest.mark.parametrize("layout", LAYOUTS, ids=IDS)
def test_dequantize_pages_as_stored_keeps_rotation_and_key_center(layout, rng, device):
    """unrotate=False: the pages as stored (the Triton extend path attends there)."""
    _, center, loc, bufs, k_out, v_out = _centered_pages(layout, rng, device)
    dequantize_pages(*bufs, loc.to(device), k_out, v_out, layout, unrotate=False)
    rk, rv = dequantize_pages_reference(*bufs, loc, layout, unrotate=False)
    assert rel_err(k_out, rk) < 1e-4 and rel_err(v_out, rv) < 1e-4
    stored_k = fmt.decode(bufs[0].cpu()[loc], bufs[1].cpu()[loc], layout, is_value=False, unrotate=False)
    assert torch.equal(rk, stored_k)
    if layout.rotate_k:  # really the rotated space: far from the un-rotated keys
        assert rel_err(k_out, dequantize_pages_reference(*bufs, loc, layout)[0]) > 0.1
    with pytest.raises(ValueError, match="original space only"):
        dequantize_pages(*bufs, loc.to(device), k_out, v_out, layout, k_center=center.to(device), unrotate=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("layout", LAYOUTS[1:], ids=IDS[1:])
def test_rotate_rows_matches_format_rotation(layout, dtype, rng, device):
    """New tokens moved into the stored space: rotated, minus the stored key center; rows
    read through a fused-qkv view (row stride past the heads)."""
    rows, heads, d = 37, 3, layout.head_dim
    fused = torch.randn(rows, 2 * heads * d, generator=rng).to(dtype).to(device)
    x = fused[:, heads * d:].view(rows, heads, d)  # on the device: .to() would copy it contiguous
    assert not x.is_contiguous()
    center = _bias_center(heads, d, rng)
    stored = fmt.stored_center(center, layout)
    for c in (None, stored):
        out = rotate_rows(x, layout, stored_center=None if c is None else c.to(device))
        ref = fmt.rotate(x.cpu().double(), layout.block_size) - (0 if c is None else c.double())
        assert out.dtype == dtype and out.is_contiguous()
        assert rel_err(out, ref) < (2e-3 if dtype == torch.float16 else 1e-5)
    assert rotate_rows(x[:0], layout).shape == (0, heads, d)
    with pytest.raises(ValueError, match="rotating layout"):
        rotate_rows(x, fmt.Int4Format(d))


@pytest.mark.parametrize("rows", [37, 1])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=IDS)
def test_to_stored_space_moves_q_k_v_as_the_format_stores_them(layout, dtype, rows, rng, device):
    """The new tokens' q, k, v read through one fused-qkv tensor (as a layer hands them over)
    in the stored space: q and k rotated where keys are, k minus the stored key center, v
    rotated where values are; from_stored_space brings an output back."""
    hq, hk, d = 4, 2, layout.head_dim
    fused = torch.randn(rows, (hq + 2 * hk) * d, generator=rng).to(dtype).to(device)
    q, k, v = (fused[:, a * d: b * d].view(rows, -1, d) for a, b in ((0, hq), (hq, hq + hk), (hq + hk, hq + 2 * hk)))
    stored = fmt.stored_center(_bias_center(hk, d, rng), layout)
    tol = 1e-5 if dtype == torch.float32 else 2e-3

    def rotated(x, is_rotated):
        x = x.cpu().double()
        return fmt.rotate(x, layout.block_size) if is_rotated else x

    # kv_out: k and v written into rows 3.. of staging buffers, the rows around them untouched
    stage = [torch.full((rows + 5, hk, d), float("nan"), dtype=dtype, device=device) for _ in range(2)]
    for c, kv_out in ((None, None), (stored, None), (stored, tuple(x[3: 3 + rows] for x in stage))):
        outs = to_stored_space(q, k, v, layout, None if c is None else c.to(device), kv_out=kv_out)
        refs = (rotated(q, layout.rotate_k), rotated(k, layout.rotate_k) - (0 if c is None else c.double()),
                rotated(v, layout.rotate_v))
        for name, out, ref, x in zip("qkv", outs, refs, (q, k, v)):
            assert out.shape == x.shape and out.dtype == dtype and out.is_contiguous(), name
            assert rel_err(out, ref) < tol, name
        if kv_out is not None:
            assert outs[1].data_ptr() == kv_out[0].data_ptr() and outs[2].data_ptr() == kv_out[1].data_ptr()
            assert all(x[:3].isnan().all() and x[3 + rows:].isnan().all() for x in stage)
    o = torch.randn(rows, hq, d, generator=rng).to(dtype).to(device)
    assert rel_err(from_stored_space(o, layout), rotated(o, layout.rotate_v)) < tol
    assert all(x.shape[0] == 0 for x in to_stored_space(q[:0], k[:0], v[:0], layout))
    if layout.rotate_k:
        with pytest.raises(ValueError, match="same rows"):
            to_stored_space(q, k[:-1], v, layout)
    with pytest.raises(ValueError, match="kv_out's v"):
        to_stored_space(q, k, v, layout, kv_out=(stage[0][:rows], stage[1][:rows].to(torch.bfloat16)))


@pytest.mark.parametrize("centered,center_rows", [(False, True), (True, True), (True, False)],
                         ids=["plain-keys", "centered-rows", "uncentered-rows"])
@pytest.mark.parametrize("rows", [37, 1])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=IDS)
def test_store_and_stage_is_store_then_to_stored_space(layout, dtype, rows, centered, center_rows, rng, device):
    """One launch writes what the store and ``to_stored_space`` write, bit for bit: the pages
    (quantized from the same rotation), the staging rows between untouched neighbours, and q;
    the rows keep the key center unless ``center_rows`` (the pages never do)."""
    hq, hk, d, num_slots = 4, 2, layout.head_dim, 64
    fused = torch.randn(rows, (hq + 2 * hk) * d, generator=rng)
    fused[:, hq * d: (hq + hk) * d] += 3.0 * torch.randn(hk * d, generator=rng)  # keys riding on a constant
    fused = fused.to(dtype).to(device)
    q, k, v = (fused[:, a * d: b * d].view(rows, -1, d) for a, b in ((0, hq), (hq, hq + hk), (hq + hk, hq + 2 * hk)))
    center = fmt.stored_center(_bias_center(hk, d, rng), layout).to(device) if centered else None
    loc = torch.randperm(num_slots, generator=rng)[:rows].to(device)
    pages, pages_ref = _pool(num_slots, hk, d, device), _pool(num_slots, hk, d, device)
    stage, stage_ref = ([torch.full((rows + 5, hk, d), float("nan"), dtype=dtype, device=device) for _ in range(2)]
                        for _ in range(2))
    for bufs in (pages, pages_ref):
        _poison(bufs)

    q_out = rotate_quantize_store_and_stage(q, k, v, loc, *pages, layout, center, stage[0][3: 3 + rows],
                                            stage[1][3: 3 + rows], center_rows)
    rotate_quantize_store(k, v, loc, *pages_ref, layout, k_center=center)
    q_ref = to_stored_space(q, k, v, layout, center if center_rows else None,
                            kv_out=(stage_ref[0][3: 3 + rows], stage_ref[1][3: 3 + rows]))[0]
    assert q_out.shape == q.shape and q_out.is_contiguous() and q_out.dtype == dtype
    assert torch.equal(q_out, q_ref)
    for got, exp in zip((*pages, *stage), (*pages_ref, *stage_ref)):  # poison (NaN) where neither wrote
        assert torch.equal(got.isnan(), exp.isnan()) and torch.equal(got.nan_to_num(), exp.nan_to_num())
    # a plain layout's rows without the center are k and v as given
    if not layout.rotate_k and not (centered and center_rows):
        assert torch.equal(stage[0][3: 3 + rows], k) and torch.equal(stage[1][3: 3 + rows], v)


def test_store_and_stage_refuses_bad_staging_rows_and_q(rng, device):
    layout = fmt.Int4Format(64, 64)
    pages = _pool(8, 2, 64, device)
    k = torch.randn(3, 2, 64, device=device)
    rows = torch.empty(3, 2, 64, device=device)
    q = torch.randn(3, 4, 64, device=device)
    with pytest.raises(ValueError, match="v_rows must be"):
        rotate_quantize_store_and_stage(q, k, k, torch.arange(3, device=device), *pages, layout, None, rows,
                                        rows[:2], True)
    with pytest.raises(ValueError, match="q must be"):
        rotate_quantize_store_and_stage(q.half(), k, k, torch.arange(3, device=device), *pages, layout, None, rows,
                                        rows, True)
    empty = torch.empty(0, 2, 64, device=device)
    assert rotate_quantize_store_and_stage(q[:0], empty, empty, torch.arange(0, device=device), *pages, layout, None,
                                           empty, empty, True).shape == (0, 4, 64)


@pytest.mark.parametrize("layout", [LAYOUTS[0], LAYOUTS[2], LAYOUTS[5]], ids=[IDS[0], IDS[2], IDS[5]])
def test_dequantize_pages_adds_the_key_center_back(layout, rng, device):
    k, center, loc, bufs, k_out, v_out = _centered_pages(layout, rng, device)
    dequantize_pages(*bufs, loc.to(device), k_out, v_out, layout, k_center=center.to(device))
    rk, rv = dequantize_pages_reference(*bufs, loc, layout, k_center=center)
    assert rel_err(k_out, rk) < 1e-4 and rel_err(v_out, rv) < 1e-4
    assert rel_err(k_out, k) < 0.1  # the original keys, center included


@pytest.mark.parametrize("layout", [LAYOUTS[0], LAYOUTS[2], LAYOUTS[3]], ids=[IDS[0], IDS[2], IDS[3]])
def test_decode_over_centered_keys_needs_no_correction(layout, rng, device):
    """Softmax shift invariance: pages of centered keys, read by the unchanged decode kernel,
    give attention over the keys they represent (center added back)."""
    d, heads, group, num_slots = layout.head_dim, 2, 4, 96
    center = _bias_center(heads, d, rng)
    _, _, loc, bufs = _store(layout, num_slots, heads, num_slots, rng, device, dtype=torch.float32, center=center)
    q = (0.3 * torch.randn(2, heads * group, d, generator=rng)).half()
    indptr = torch.tensor([0, 40, 96], dtype=torch.int32)
    o = torch.empty(2, heads * group, d, dtype=torch.float16, device=device)
    int4_decode_attention(q.to(device), *bufs, o, indptr.to(device), loc.int().to(device),
                          torch.empty(2, heads * group, 4, d, device=device), torch.empty(2, heads * group, 4, device=device),
                          torch.full((2,), 4, dtype=torch.int32, device=device), 4, d ** -0.5, layout)
    cpu = [t.cpu() for t in bufs]
    k = fmt.decode(cpu[0], cpu[1], layout, is_value=False, center=center)
    v = fmt.decode(cpu[2], cpu[3], layout, is_value=True)
    ref = decode_attention_reference(q, k, v, indptr, loc.int(), d ** -0.5)
    assert rel_err(o, ref) < 1e-2


def _outlier_attention_errors(gen, device):
    d, heads, group, num_slots = 128, 2, 4, 256
    k = keys_with_outliers(num_slots, heads, d, gen, outlier_channels=(3, 17, 70), magnitude=20.0)
    v = torch.randn(num_slots, heads, d, generator=gen)
    q = torch.randn(2, heads * group, d, generator=gen)
    q[:, :, [3, 17, 70]] *= 0.05  # queries barely look at the outliers: the rest carries the signal
    indptr = torch.tensor([0, 128, 256], dtype=torch.int32)
    indices = torch.randperm(num_slots, generator=gen).int()
    scale = d ** -0.5
    exact = decode_attention_reference(q, k, v, indptr, indices, scale)
    errs = {}
    for name, layout in {"int4": fmt.Int4Format(d), "int4-bdr": fmt.Int4Format(d, 128)}.items():
        bufs = _pool(num_slots, heads, d, device)
        rotate_quantize_store(k.half().to(device), v.half().to(device), torch.arange(num_slots, device=device), *bufs, layout)
        o = torch.empty(2, heads * group, d, dtype=torch.float16, device=device)
        int4_decode_attention(q.half().to(device), *bufs, o, indptr.to(device), indices.to(device),
                              torch.empty(2, heads * group, 2, d, device=device),
                              torch.empty(2, heads * group, 2, device=device),
                              torch.full((2,), 2, dtype=torch.int32, device=device), 2, scale, layout)
        errs[name] = rel_err(o, exact)
    return errs


def test_bdr_attention_is_closer_to_exact_than_plain_int4(device):
    """The method's claim on keys with outlier channels, through the served kernels.

    Measured with this setup over seeds 0-19 (CPU, interpreter): plain INT4 error
    0.41-0.55, BDR-128 0.26-0.32, ratio BDR/plain 0.52-0.79 (mean 0.61).  Three
    fixed seeds keep the statistical claim deterministic.
    """
    ratios = []
    for seed in (0, 1, 2):
        errs = _outlier_attention_errors(torch.Generator().manual_seed(seed), device)
        assert errs["int4-bdr"] < 0.34, errs
        assert errs["int4-bdr"] < 0.8 * errs["int4"], errs
        ratios.append(errs["int4-bdr"] / errs["int4"])
    assert sum(ratios) / len(ratios) < 0.7, ratios
