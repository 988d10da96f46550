"""Triton device-side helpers for the format defined in ``sglang_sawint4.format``.

Every kernel builds its Hadamard tiles and (un)packs nibbles through these
functions; ``tests/test_format_jit.py`` checks them against the torch definitions.
"""

import triton
import triton.language as tl

from sglang_sawint4 import format as fmt

# Constants the kernels share with the torch reference (plain Python ints/floats,
# captured by @triton.jit as compile-time globals).
INT4_MAX = tl.constexpr(fmt.INT4_MAX)
HALF_RANGE = tl.constexpr(fmt.INT4_MAX / 2)
SCALE_EPS = tl.constexpr(fmt.SCALE_EPS)
META_SCALE = tl.constexpr(fmt.META_SCALE)
META_OFFSET = tl.constexpr(fmt.META_OFFSET)


@triton.jit
def hadamard_tile(rows, cols, BLOCK: tl.constexpr):
    """Tile of the unnormalized block-diagonal Sylvester Hadamard matrix.

    rows: [R] int channel indices, cols: [C] int channel indices.
    Returns [R, C] int32 in {-1, 0, +1}: (-1)^popcount((r % B) & (c % B)) inside a
    diagonal block, 0 outside.  Generated in registers, so no kernel loads a matrix.
    """
    x = (rows[:, None] & (BLOCK - 1)) & (cols[None, :] & (BLOCK - 1))
    # parity of the low 8 bits (BLOCK <= 128 uses 7)
    x = x ^ (x >> 4)
    x = x ^ (x >> 2)
    x = x ^ (x >> 1)
    sign = 1 - 2 * (x & 1)
    same_block = (rows[:, None] // BLOCK) == (cols[None, :] // BLOCK)
    return tl.where(same_block, sign, 0)


@triton.jit
def round_half_up(x):
    """The rounding the format uses (``format.round_code``): floor(x + 0.5)."""
    return tl.floor(x + 0.5)


@triton.jit
def quant_params(x_lo, x_hi, SYMMETRIC: tl.constexpr):
    """Per-row (scale, offset) of two half-rows, rounded to the stored fp16.

    x_lo, x_hi: [T, HALF] float32.  Returns scale [T], offset [T] float32 whose
    values are exactly representable in fp16 (what readers will see).
    """
    if SYMMETRIC:
        amax = tl.maximum(tl.max(tl.abs(x_lo), axis=1), tl.max(tl.abs(x_hi), axis=1))
        scale = tl.maximum(amax / HALF_RANGE, SCALE_EPS).to(tl.float16).to(tl.float32)
        offset = (0.0 - scale * HALF_RANGE).to(tl.float16).to(tl.float32)
    else:
        lo = tl.minimum(tl.min(x_lo, axis=1), tl.min(x_hi, axis=1))
        hi = tl.maximum(tl.max(x_lo, axis=1), tl.max(x_hi, axis=1))
        scale = tl.maximum((hi - lo) / INT4_MAX, SCALE_EPS).to(tl.float16).to(tl.float32)
        offset = lo.to(tl.float16).to(tl.float32)
    return scale, offset


@triton.jit
def quantize_codes(x, scale, offset):
    """[T, C] float32 -> [T, C] float32 codes in [0, 15]."""
    q = round_half_up((x - offset[:, None]) / scale[:, None])
    return tl.minimum(tl.maximum(q, 0.0), INT4_MAX)


@triton.jit
def pack_nibbles(q_lo, q_hi):
    """Codes of channels [0, D/2) and [D/2, D) -> split-half packed uint8."""
    return q_lo.to(tl.uint8) | (q_hi.to(tl.uint8) << 4)


@triton.jit
def unpack_lo(packed):
    return packed & 0x0F


@triton.jit
def unpack_hi(packed):
    return packed >> 4


@triton.jit
def rotation_norm(BLOCK: tl.constexpr):
    """1 / sqrt(BLOCK): the normalization of the orthonormal Hadamard block."""
    return 1.0 / tl.sqrt(tl.full([], BLOCK, tl.float32))


@triton.jit
def rotate_halves(x_lo, x_hi, HALF: tl.constexpr, BLOCK_ROT: tl.constexpr):
    """Block-diagonal Hadamard of rows given as their two halves; returns float32 halves.

    x_lo, x_hi: [T, HALF] (channels [0, HALF) and [HALF, 2 HALF)), bf16/fp16/fp32.
    Blocks no larger than HALF never straddle the halves: each half is rotated by the
    same HALF x HALF tile.  A full-width block uses Sylvester's recursion
    H_2n = [[H_n, H_n], [H_n, -H_n]]: two half-size products, then one butterfly on the
    float32 results.  bf16/fp16 operands times +-1 signs accumulate exactly in fp32 on
    the tensor cores in one pass; fp32 operands use tf32x3 (three tf32 passes,
    fp32-accurate; plain "ieee" fp32 dots run on the CUDA cores and were 3x slower).
    Half-size tiles keep shared memory small enough for head_dim 256 in fp32.
    """
    half = tl.arange(0, HALF)
    tile = BLOCK_ROT if BLOCK_ROT <= HALF else HALF
    if x_lo.dtype == tl.float32:
        s = hadamard_tile(half, half, tile).to(tl.float32)
        p = tl.dot(x_lo, s, input_precision="tf32x3", out_dtype=tl.float32)
        q = tl.dot(x_hi, s, input_precision="tf32x3", out_dtype=tl.float32)
    else:
        s = hadamard_tile(half, half, tile).to(x_lo.dtype)
        p = tl.dot(x_lo, s, out_dtype=tl.float32)
        q = tl.dot(x_hi, s, out_dtype=tl.float32)
    inv = rotation_norm(BLOCK_ROT)
    if BLOCK_ROT <= HALF:
        return p * inv, q * inv
    else:
        return (p + q) * inv, (p - q) * inv


@triton.jit
def load_rotated_halves(x_ptr, offs_t, mask_t, stride_t, head_off, ROTATE: tl.constexpr,
                        BLOCK_ROT: tl.constexpr, HALF: tl.constexpr):
    """Load [T, D] rows as two float32 halves [T, HALF], rotated if ROTATE."""
    half = tl.arange(0, HALF)
    base = x_ptr + offs_t[:, None].to(tl.int64) * stride_t + head_off
    x_lo = tl.load(base + half[None, :], mask=mask_t[:, None], other=0.0)
    x_hi = tl.load(base + HALF + half[None, :], mask=mask_t[:, None], other=0.0)
    if ROTATE:
        return rotate_halves(x_lo, x_hi, HALF, BLOCK_ROT)  # from the input dtype: exact
    return x_lo.to(tl.float32), x_hi.to(tl.float32)


@triton.jit
def subtract_center(x_lo, x_hi, center_ptr, head, HALF: tl.constexpr):
    """x - c for halves [T, HALF] of one head, c the head's row of a [heads, 2 HALF] float32
    center.  On rotated rows c arrives rotated: H (x - c) = H x - H c, so the rotation stays
    exact on the input dtype and the subtraction is one fp32 operation."""
    half = tl.arange(0, HALF)
    c = center_ptr + head * (2 * HALF)
    return x_lo - tl.load(c + half)[None, :], x_hi - tl.load(c + HALF + half)[None, :]


@triton.jit
def store_halves(o_ptr, offs_t, mask_t, stride_t, head_off, x_lo, x_hi, HALF: tl.constexpr):
    """Store float32 halves [T, HALF] as [T, D] rows in ``o_ptr``'s dtype (the inverse of
    ``load_rotated_halves`` without a rotation)."""
    half = tl.arange(0, HALF)
    out = o_ptr + offs_t[:, None].to(tl.int64) * stride_t + head_off
    out_ty = o_ptr.dtype.element_ty
    tl.store(out + half[None, :], x_lo.to(out_ty), mask=mask_t[:, None])
    tl.store(out + HALF + half[None, :], x_hi.to(out_ty), mask=mask_t[:, None])


@triton.jit
def code_bias(DTYPE: tl.constexpr):
    """The constant :func:`biased_codes` adds to every code in DTYPE (0.0 for float32).

    128.0 (bf16) and 1024.0 (fp16) are the powers of two where those formats' mantissa
    step is 1, so OR-ing a 4-bit code into the mantissa makes bias + code exactly.
    """
    if DTYPE == tl.bfloat16:
        return 128.0
    elif DTYPE == tl.float16:
        return 1024.0
    else:
        return 0.0


@triton.jit
def _bias_plus(codes, DTYPE: tl.constexpr):
    """Integer codes in [0, 15] -> code_bias(DTYPE) + codes in DTYPE, built as the PTX paths
    build them: the code OR-ed into the mantissa of the bias (bf16 0x4300 = 128, fp16
    0x6400 = 1024); float32 has no bias."""
    if DTYPE == tl.bfloat16:
        return (codes.to(tl.uint16) | 0x4300).to(tl.bfloat16, bitcast=True)
    elif DTYPE == tl.float16:
        return (codes.to(tl.uint16) | 0x6400).to(tl.float16, bitcast=True)
    else:
        return codes.to(DTYPE)


# PTX for biased_codes' fast path: 4 packed bytes in, 8 codes out as bias + code
# (bf16x2 / f16x2 words).  prmt spreads bytes b0,b1 (b2,b3) into the low bytes of the
# two half-words; one lop3 then keeps a nibble and ORs in the bias exponent: about
# one instruction per code, against ~5 for unpack + convert + subtract per element.
_BIASED_CODES_PTX = """
{
    .reg .b32 z, t0, t1, u0, u1;
    mov.b32 z, 0;
    prmt.b32 t0, $4, z, 0x4140;
    prmt.b32 t1, $4, z, 0x4342;
    lop3.b32 $0, t0, 0x000F000F, BIAS, 0xEA;
    lop3.b32 $1, t1, 0x000F000F, BIAS, 0xEA;
    shr.b32 u0, t0, 4;
    shr.b32 u1, t1, 4;
    lop3.b32 $2, u0, 0x000F000F, BIAS, 0xEA;
    lop3.b32 $3, u1, 0x000F000F, BIAS, 0xEA;
}
"""
BIASED_CODES_PTX_BF16 = tl.constexpr(_BIASED_CODES_PTX.replace("BIAS", "0x43004300"))
BIASED_CODES_PTX_FP16 = tl.constexpr(_BIASED_CODES_PTX.replace("BIAS", "0x64006400"))


@triton.jit
def biased_codes(packed, DTYPE: tl.constexpr, USE_PTX: tl.constexpr, KEEP_LAYOUT: tl.constexpr = False):
    """Split-half packed bytes -> (low-nibble, high-nibble) codes as ``code_bias(DTYPE) + c``.

    packed: uint8 tensor.  Returns two tensors of packed's shape in DTYPE whose values
    are exactly bias + code (bias 128 for bf16, 1024 for fp16, 0 otherwise).  Callers
    fold the bias into the per-token offset instead of subtracting it per element.
    USE_PTX selects the inline-PTX path (NVIDIA GPUs); the portable path (interpreter,
    other targets) computes the same values with Triton ops.

    KEEP_LAYOUT (PTX path): unpack in the layout the bytes were loaded in.  Triton
    otherwise moves a later tl.dot operand conversion in front of this (pure) function,
    onto the bytes; that is what it should do when the bytes are already in the operand's
    order (keys: a token's channels), but not when the dot reduces over tokens (values):
    every thread then reads 4 tokens' bytes with 4 one-byte shared-memory loads and
    reassembles them.  Marking the asm impure pins it to the loaded (row-major) bytes, and
    Triton moves the unpacked codes with ldmatrix.trans instead.
    """
    if USE_PTX and DTYPE == tl.bfloat16:
        lo, hi = tl.inline_asm_elementwise(BIASED_CODES_PTX_BF16, "=r,=r,=r,=r,r", [packed],
                                           dtype=(tl.bfloat16, tl.bfloat16), is_pure=not KEEP_LAYOUT, pack=4)
    elif USE_PTX and DTYPE == tl.float16:
        lo, hi = tl.inline_asm_elementwise(BIASED_CODES_PTX_FP16, "=r,=r,=r,=r,r", [packed],
                                           dtype=(tl.float16, tl.float16), is_pure=not KEEP_LAYOUT, pack=4)
    else:
        lo = _bias_plus(unpack_lo(packed), DTYPE)
        hi = _bias_plus(unpack_hi(packed), DTYPE)
    return lo, hi


# PTX for biased_code_quads' fast path: two 16-bit words in (one 32-bit register, the
# word of two consecutive elements in its halves), four bf16x2 / f16x2 words out.  Each
# output keeps one nibble of both words' (shift, then mask and OR in the bias exponent):
# 7 instructions per 8 codes, and the result is already in the order the input was.
_BIASED_CODE_QUADS_PTX = """
{
    .reg .b32 t;
    lop3.b32 $0, $4, 0x000F000F, BIAS, 0xEA;
    shr.b32 t, $4, 8;
    lop3.b32 $1, t, 0x000F000F, BIAS, 0xEA;
    shr.b32 t, $4, 4;
    lop3.b32 $2, t, 0x000F000F, BIAS, 0xEA;
    shr.b32 t, $4, 12;
    lop3.b32 $3, t, 0x000F000F, BIAS, 0xEA;
}
"""
BIASED_CODE_QUADS_PTX_BF16 = tl.constexpr(_BIASED_CODE_QUADS_PTX.replace("BIAS", "0x43004300"))
BIASED_CODE_QUADS_PTX_FP16 = tl.constexpr(_BIASED_CODE_QUADS_PTX.replace("BIAS", "0x64006400"))


@triton.jit
def _nibble_codes(words, SHIFT: tl.constexpr, DTYPE: tl.constexpr):
    """Portable path of biased_code_quads: one nibble of each 16-bit word as bias + code."""
    return _bias_plus((words.to(tl.uint16, bitcast=True) >> SHIFT) & 0xF, DTYPE)


@triton.jit
def biased_code_quads(words, DTYPE: tl.constexpr, USE_PTX: tl.constexpr):
    """Split-half packed data read as 16-bit words -> its four nibble planes as ``code_bias(DTYPE) + c``.

    words: int16 tensor [..., W], word j of a row holding packed bytes 2j (low byte) and
    2j + 1 of it (``packed_words``), i.e. the codes of channels 2j, 2j + 1 (low nibbles)
    and H + 2j, H + 2j + 1 (high nibbles), H = head_dim / 2.
    Returns (even, odd, high_even, high_odd): four tensors of words' shape in DTYPE with
    the codes of channels 2j, 2j + 1, H + 2j and H + 2j + 1.

    Why words and not bytes: a tl.dot operand of 16-bit elements pairs neighbouring
    elements along its reduction axis in one register.  Reading 16-bit words, Triton
    fills those registers straight from shared memory with ldmatrix (ldmatrix.trans when
    the reduction runs over tokens, as for values), and this (pure) function turns each
    register into four operand registers in place.  From bytes, the pairs had to be
    assembled from one-byte loads, or the unpacked codes transposed through shared memory.
    """
    if USE_PTX and DTYPE == tl.bfloat16:
        even, odd, high_even, high_odd = tl.inline_asm_elementwise(
            BIASED_CODE_QUADS_PTX_BF16, "=r,=r,=r,=r,r", [words], dtype=(tl.bfloat16,) * 4, is_pure=True, pack=2)
    elif USE_PTX and DTYPE == tl.float16:
        even, odd, high_even, high_odd = tl.inline_asm_elementwise(
            BIASED_CODE_QUADS_PTX_FP16, "=r,=r,=r,=r,r", [words], dtype=(tl.float16,) * 4, is_pure=True, pack=2)
    else:
        even = _nibble_codes(words, 0, DTYPE)
        odd = _nibble_codes(words, 8, DTYPE)
        high_even = _nibble_codes(words, 4, DTYPE)
        high_odd = _nibble_codes(words, 12, DTYPE)
    return even, odd, high_even, high_odd


@triton.jit
def load_meta(meta_words, mask):
    """(scale, offset) float32 from one 32-bit load per row of a meta tensor viewed as int32.

    meta_words: pointers into ``meta.view(torch.int32)``; scale is the low half-word
    (index META_SCALE = 0 on a little-endian GPU), offset the high one.
    """
    w = tl.load(meta_words, mask=mask, other=0)
    scale = (w & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    offset = ((w >> 16) & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    return scale, offset
