import math

import pytest
import torch

from sglang_sawint4 import format as fmt


@pytest.mark.parametrize("b", [1, 2, 16, 32, 64, 128])
def test_hadamard_is_orthonormal_and_symmetric(b):
    h = fmt.hadamard_matrix(b)
    assert torch.allclose(h, h.T)
    assert torch.allclose(h @ h, torch.eye(b, dtype=torch.float64), atol=1e-12)
    assert torch.all(h.abs() == 1 / math.sqrt(b))


def test_block_hadamard_is_block_diagonal():
    m = fmt.block_hadamard_matrix(128, 32)
    assert torch.count_nonzero(m[:32, 32:]) == 0
    assert torch.allclose(m[32:64, 32:64], fmt.hadamard_matrix(32))


@pytest.mark.parametrize("d,b", [(64, 16), (128, 64), (256, 128), (128, 128)])
def test_rotate_is_its_own_inverse_and_matches_matrix(d, b, rng):
    x = torch.randn(5, 3, d, generator=rng, dtype=torch.float64)
    assert torch.allclose(fmt.rotate(fmt.rotate(x, b), b), x, atol=1e-12)
    assert torch.allclose(fmt.rotate(x, b), x @ fmt.block_hadamard_matrix(d, b), atol=1e-12)


def test_rotation_spreads_an_outlier_channel():
    x = torch.zeros(128, dtype=torch.float64)
    x[5] = 100.0
    r = fmt.rotate(x, 128)
    assert torch.allclose(r.abs(), torch.full_like(r, 100 / math.sqrt(128)))


@pytest.mark.parametrize("b,d", [(48, 128), (256, 128), (12, 64), (128, 64)])
def test_bad_block_sizes_are_refused(b, d):
    with pytest.raises(fmt.FormatError):
        fmt.Int4Format(head_dim=d, block_size=b)


@pytest.mark.parametrize("d", [32, 80, 96, 100])
def test_unsupported_head_dim_is_refused(d):
    with pytest.raises(fmt.FormatError, match="head_dim"):
        fmt.Int4Format(head_dim=d)


def test_for_method():
    assert fmt.Int4Format.for_method("int4", 128) == fmt.Int4Format(128, None)
    assert fmt.Int4Format.for_method("int4-bdr", 64).block_size == 64
    assert fmt.Int4Format.for_method("int4-bdr", 256).block_size == 128
    kv = fmt.Int4Format.for_method("int4-bdr", 128, block_size=32, rotate="kv")
    assert kv.rotate_k and kv.rotate_v and kv.block_size == 32
    with pytest.raises(fmt.FormatError, match="unknown"):
        fmt.Int4Format.for_method("int3", 128)
    with pytest.raises(fmt.FormatError, match="rotate"):
        fmt.Int4Format.for_method("int4-bdr", 128, rotate="v")
    with pytest.raises(fmt.FormatError):
        fmt.Int4Format(head_dim=128, block_size=None, rotate_v=True)


def test_bytes_per_token_head():
    # 2 x (64 packed bytes + fp16 scale + fp16 offset) = 136 B vs 512 B for BF16: 3.76x
    assert fmt.Int4Format(128).bytes_per_token_head() == 136
    assert fmt.Int4Format(64).bytes_per_token_head() == 72


@pytest.mark.parametrize("d", [64, 128, 256])
def test_pack_unpack_round_trip(d, rng):
    codes = torch.randint(0, 16, (7, 2, d), generator=rng, dtype=torch.uint8)
    packed = fmt.pack(codes)
    assert packed.shape == (7, 2, d // 2) and packed.dtype == torch.uint8
    assert torch.equal(fmt.unpack(packed), codes)
    # split-half: byte i = channel i (low nibble) | channel i + d/2 (high nibble)
    assert int(packed[0, 0, 1]) == int(codes[0, 0, 1]) | (int(codes[0, 0, 1 + d // 2]) << 4)


@pytest.mark.parametrize("symmetric", [False, True])
def test_quantization_error_is_at_most_half_a_step(symmetric, rng):
    x = torch.randn(50, 4, 128, generator=rng, dtype=torch.float64) * 3
    codes, scale, offset = fmt.quantize(x, symmetric=symmetric)
    assert codes.max() <= 15
    err = (fmt.dequantize(codes, scale, offset, torch.float64) - x).abs()
    # half a step, plus the fp16 rounding of the stored offset / scale x 15
    bound = scale.double()[..., None] * (0.5 + 15 * 2**-10) + offset.double().abs()[..., None] * 2**-10
    assert torch.all(err <= bound + 1e-9)


def test_constant_vector_is_exact():
    x = torch.full((3, 2, 64), 0.75, dtype=torch.float64)
    codes, scale, offset = fmt.quantize(x)
    assert torch.equal(fmt.dequantize(codes, scale, offset, torch.float64), x)


def test_fake_quantize_bdr_beats_plain_on_outlier_channels(rng):
    from helpers import keys_with_outliers, rel_err

    k = keys_with_outliers(64, 2, 128, rng, dtype=torch.float64)
    plain = fmt.fake_quantize(k, fmt.Int4Format(128), is_value=False)
    bdr = fmt.fake_quantize(k, fmt.Int4Format(128, 128), is_value=False)
    # The outliers set the grid: without rotation the step is ~range/15 for every channel.
    assert rel_err(bdr, k) < 0.5 * rel_err(plain, k)
