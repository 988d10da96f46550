"""The device-side helpers must implement exactly the format module's definitions."""

import pytest
import torch
import triton
import triton.language as tl

from sglang_sawint4 import format as fmt
from sglang_sawint4.kernels.format_jit import hadamard_tile, pack_nibbles, unpack_hi, unpack_lo


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
