"""The device-side helpers must implement exactly the format module's definitions."""

import pytest
import torch
import triton
import triton.language as tl

from sglang_sawint4 import format as fmt
from sglang_sawint4.kernels.format_jit import (
    biased_code_quads,
    biased_codes,
    code_bias,
    hadamard_tile,
    pack_nibbles,
    unpack_hi,
    unpack_lo,
)
from sglang_sawint4.kernels.launch import use_ptx


@triton.jit
def _tile_kernel(out_ptr, D: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, D)
    tl.store(out_ptr + offs[:, None] * D + offs[None, :], hadamard_tile(offs, offs, BLOCK))


@triton.jit
def _pack_kernel(codes_ptr, packed_ptr, lo_ptr, hi_ptr, N: tl.constexpr, HALF: tl.constexpr):
    rows = tl.arange(0, N)[:, None]
    half = tl.arange(0, HALF)[None, :]
    lo = tl.load(codes_ptr + rows * 2 * HALF + half)
    hi = tl.load(codes_ptr + rows * 2 * HALF + HALF + half)
    p = pack_nibbles(lo, hi)
    tl.store(packed_ptr + rows * HALF + half, p)
    tl.store(lo_ptr + rows * HALF + half, unpack_lo(p))
    tl.store(hi_ptr + rows * HALF + half, unpack_hi(p))


@pytest.mark.parametrize("d,b", [(64, 16), (64, 64), (128, 32), (128, 128), (256, 128)])
def test_hadamard_tile_matches_format(d, b, device):
    out = torch.empty((d, d), dtype=torch.int32, device=device)
    _tile_kernel[(1,)](out, D=d, BLOCK=b)
    expected = fmt.block_hadamard_matrix(d, b) * (b ** 0.5)
    assert torch.equal(out.cpu().double(), expected.round())


def test_pack_matches_format(rng, device):
    codes = torch.randint(0, 16, (16, 64), generator=rng, dtype=torch.uint8)
    packed = torch.empty((16, 32), dtype=torch.uint8, device=device)
    lo = torch.empty_like(packed)
    hi = torch.empty_like(packed)
    _pack_kernel[(1,)](codes.to(device), packed, lo, hi, N=16, HALF=32)
    assert torch.equal(packed.cpu(), fmt.pack(codes))
    assert torch.equal(torch.cat([lo, hi], -1).cpu(), codes)


@triton.jit
def _biased_codes_kernel(packed_ptr, lo_ptr, hi_ptr, bias_ptr, N: tl.constexpr, HALF: tl.constexpr,
                         USE_PTX: tl.constexpr, KEEP_LAYOUT: tl.constexpr):
    offs = tl.arange(0, N)[:, None] * HALF + tl.arange(0, HALF)[None, :]
    lo, hi = biased_codes(tl.load(packed_ptr + offs), lo_ptr.dtype.element_ty, USE_PTX, KEEP_LAYOUT)
    tl.store(lo_ptr + offs, lo)
    tl.store(hi_ptr + offs, hi)
    tl.store(bias_ptr, code_bias(lo_ptr.dtype.element_ty))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("ptx, keep_layout", [(False, False), (True, False), (True, True)],
                         ids=["portable", "ptx", "ptx-keep-layout"])
def test_biased_codes_are_bias_plus_code(dtype, ptx, keep_layout, rng, device):
    if ptx and not use_ptx(_biased_codes_kernel, torch.device(device)):
        pytest.skip("inline PTX runs only in compiled kernels on NVIDIA GPUs")
    codes = torch.randint(0, 16, (32, 128), generator=rng, dtype=torch.uint8)
    packed = fmt.pack(codes).to(device)
    lo = torch.empty((32, 64), dtype=dtype, device=device)
    hi = torch.empty_like(lo)
    bias = torch.empty(1, dtype=torch.float32, device=device)
    _biased_codes_kernel[(1,)](packed, lo, hi, bias, N=32, HALF=64, USE_PTX=ptx, KEEP_LAYOUT=keep_layout)
    expected_bias = {torch.bfloat16: 128.0, torch.float16: 1024.0, torch.float32: 0.0}[dtype]
    assert bias.item() == expected_bias
    assert torch.equal(torch.cat([lo, hi], -1).cpu().double() - expected_bias, codes.double())


@triton.jit
def _biased_code_quads_kernel(words_ptr, out_ptr, N: tl.constexpr, W: tl.constexpr, USE_PTX: tl.constexpr):
    rows = tl.arange(0, N)[:, None]
    cols = tl.arange(0, W)[None, :]
    planes = biased_code_quads(tl.load(words_ptr + rows * W + cols), out_ptr.dtype.element_ty, USE_PTX)
    for i in tl.static_range(4):
        tl.store(out_ptr + i * N * W + rows * W + cols, planes[i])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("ptx", [False, True], ids=["portable", "ptx"])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_biased_code_quads_are_the_channel_planes(dtype, ptx, d, rng, device):
    if ptx and not use_ptx(_biased_code_quads_kernel, torch.device(device)):
        pytest.skip("inline PTX runs only in compiled kernels on NVIDIA GPUs")
    if ptx and dtype == torch.float32:
        pytest.skip("no PTX path for float32 operands")
    n, half = 16, d // 2
    codes = torch.randint(0, 16, (n, d), generator=rng, dtype=torch.uint8)
    words = fmt.packed_words(fmt.pack(codes)).to(device)
    out = torch.empty((4, n, d // 4), dtype=dtype, device=device)
    _biased_code_quads_kernel[(1,)](words, out, N=n, W=d // 4, USE_PTX=ptx)
    even = torch.arange(0, half, 2)
    expected = torch.stack([codes[:, even], codes[:, even + 1], codes[:, half + even], codes[:, half + even + 1]])
    bias = {torch.bfloat16: 128.0, torch.float16: 1024.0, torch.float32: 0.0}[dtype]
    assert torch.equal(out.cpu().double() - bias, expected.double())


def test_packed_words_refuses_what_it_cannot_view():
    with pytest.raises(fmt.FormatError, match="uint8"):
        fmt.packed_words(torch.zeros(4, 2, 32, dtype=torch.int16))
    with pytest.raises(fmt.FormatError, match="even"):
        fmt.packed_words(torch.zeros(4, 2, 33, dtype=torch.uint8))
    with pytest.raises(fmt.FormatError, match="contiguous"):
        fmt.packed_words(torch.zeros(4, 32, 2, dtype=torch.uint8).transpose(1, 2))
