"""The rotated-INT4 KV format: the one place that defines it.

Everything that reads or writes INT4 KV pages (the Triton kernels, the torch
references, the SGLang pool, the accuracy harness) imports the definitions here.

Layout per layer, token-indexed like SGLang's ``MHATokenToKVPool``::

    data: [num_slots, num_kv_heads, head_dim // 2] uint8
          byte i holds channel i in the low nibble and channel i + head_dim // 2
          in the high nibble ("split-half" packing).
    meta: [num_slots, num_kv_heads, 2] float16
          (scale, offset) with  x_hat = scale * q + offset,  q in [0, 15].

Split-half packing (the paper's code does the same) lets a kernel use the two
nibble planes as the two halves of the head vector, so ``q . k`` becomes two
half-width dot products with no interleaving shuffle.

Quantization is per token, per KV head, over the whole head_dim, applied after
an optional block-diagonal Hadamard rotation (Sylvester construction scaled by
1/sqrt(b), so H = H^T = H^-1):

* asymmetric: scale = (max - min) / 15, offset = min, q = round((x - min) / scale)
* symmetric:  scale = absmax / 7.5, offset = -7.5 * scale, q = round(x / scale + 7.5)
  (centred grid: 16 levels symmetric around zero, no wasted level)

Both store the same (scale, offset) pair, so every reader is the same.

Keys may be *centered*: a constant vector c (per layer and KV head) is subtracted before
the rotation, so a key is stored as H (k - c).  Attention needs no correction for it:
q . (k - c) = q . k - q . c shifts every score of a query by the same amount, which the
softmax cancels.  Only readers that mix cached keys with exact ones (the extend path's
new tokens) add c back.  c removes constant channels (a large ``k_proj`` bias) that would
otherwise stretch every token's INT4 range.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

#: Number of quantization levels of an unsigned 4-bit code.
INT4_LEVELS = 16
INT4_MAX = INT4_LEVELS - 1
#: Storage dtypes.
DATA_DTYPE = torch.uint8
META_DTYPE = torch.float16
#: Index of scale / offset in the last axis of a meta tensor.
META_SCALE = 0
META_OFFSET = 1
META_FIELDS = 2
#: Floor on the scale, so a constant vector (max == min) quantizes to q = 0 and
#: dequantizes exactly to its value instead of dividing by zero.  Far under the
#: smallest normal fp16 step of realistic K/V ranges, but representable in fp16.
SCALE_EPS = 1e-6

ALLOWED_BLOCK_SIZES = (16, 32, 64, 128)
SUPPORTED_HEAD_DIMS = (64, 128, 256)
METHODS = ("none", "int4", "int4-bdr")
ROTATE_TARGETS = ("k", "kv")


class FormatError(ValueError):
    """A configuration of the format that cannot be represented."""


@dataclass(frozen=True)
class Int4Format:
    """Everything a reader or writer needs to agree on.

    Attributes:
        head_dim: channels per head (both K and V; the INT4 path needs equal dims).
        block_size: Hadamard block b, or None for plain (unrotated) INT4.
        rotate_v: rotate V as well as K (K is always rotated when block_size is set).
        symmetric: symmetric grid instead of the default asymmetric (min/max) one.
    """

    head_dim: int
    block_size: Optional[int] = None
    rotate_v: bool = False
    symmetric: bool = False

    def __post_init__(self):
        validate_head_dim(self.head_dim)
        if self.block_size is not None:
            validate_block_size(self.block_size, self.head_dim)
        elif self.rotate_v:
            raise FormatError("rotate_v=True needs a Hadamard block_size")

    @property
    def rotate_k(self) -> bool:
        return self.block_size is not None

    @property
    def packed_dim(self) -> int:
        return self.head_dim // 2

    def bytes_per_token_head(self) -> int:
        """Bytes one token costs per KV head for K and V together."""
        return 2 * (self.packed_dim + META_FIELDS * torch.finfo(META_DTYPE).bits // 8)

    @classmethod
    def for_method(
        cls,
        method: str,
        head_dim: int,
        block_size: Optional[int] = None,
        rotate: str = "k",
        symmetric: bool = False,
    ) -> "Int4Format":
        """Build the format of a served method name (``int4`` or ``int4-bdr``).

        ``block_size=None`` with ``int4-bdr`` picks the default
        ``min(128, head_dim)`` (the paper's served config is b = 128, K only).
        """
        if method not in METHODS or method == "none":
            raise FormatError(
                f"unknown INT4 KV method {method!r}; expected one of {METHODS[1:]}"
            )
        if rotate not in ROTATE_TARGETS:
            raise FormatError(f"rotate must be one of {ROTATE_TARGETS}, got {rotate!r}")
        if method == "int4":
            return cls(head_dim=head_dim, block_size=None, symmetric=symmetric)
        b = default_block_size(head_dim) if block_size is None else block_size
        return cls(head_dim=head_dim, block_size=b, rotate_v=(rotate == "kv"), symmetric=symmetric)


def bf16_bytes_per_token_head(head_dim: int) -> int:
    """Bytes one token costs per KV head for K and V in BF16 (an unquantized layer)."""
    return 2 * head_dim * torch.finfo(torch.bfloat16).bits // 8


def kv_bytes_per_token(num_kv_heads: int, layers, layout: "Int4Format", bf16_layers=()) -> int:
    """KV bytes one token costs over ``layers`` (layer ids) and ``num_kv_heads`` heads: INT4
    layers in ``layout``, ``bf16_layers`` in BF16 (what SGLang's memory profiler calls the cell size)."""
    bf16 = bf16_bytes_per_token_head(layout.head_dim)
    return num_kv_heads * sum(bf16 if l in bf16_layers else layout.bytes_per_token_head() for l in layers)


def validate_head_dim(head_dim: int) -> None:
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise FormatError(
            f"head_dim={head_dim} is not supported by the INT4 KV kernels; "
            f"supported: {SUPPORTED_HEAD_DIMS}"
        )


def validate_block_size(block_size: int, head_dim: int) -> None:
    if block_size not in ALLOWED_BLOCK_SIZES:
        raise FormatError(
            f"Hadamard block size {block_size} is not allowed; use one of "
            f"{ALLOWED_BLOCK_SIZES} (a power of two dividing head_dim)"
        )
    if head_dim % block_size != 0:
        raise FormatError(
            f"Hadamard block size {block_size} does not divide head_dim={head_dim}"
        )


def blocks_dividing(head_dim: int) -> list:
    """The allowed Hadamard blocks that divide head_dim, smallest first."""
    return [b for b in ALLOWED_BLOCK_SIZES if head_dim % b == 0]


def default_block_size(head_dim: int) -> int:
    return min(128, head_dim)


# --------------------------------------------------------------------------- #
# Rotation
# --------------------------------------------------------------------------- #
def hadamard_sign(i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """Entry (i, j) of the unnormalized Sylvester Hadamard matrix: (-1)^popcount(i & j).

    This is the definition the Triton kernels evaluate in registers
    (``kernels/format_jit.py:hadamard_sign``) instead of loading a matrix.
    """
    x = i & j
    parity = torch.zeros_like(x)
    while bool((x != 0).any()):
        parity ^= x & 1
        x = x >> 1
    return 1 - 2 * parity


def hadamard_matrix(block_size: int, dtype=torch.float64, device="cpu") -> torch.Tensor:
    """Orthonormal Sylvester Hadamard matrix H_b (symmetric, H @ H = I)."""
    if block_size < 1 or block_size & (block_size - 1):
        raise FormatError(f"Hadamard block size must be a power of two, got {block_size}")
    idx = torch.arange(block_size, device=device)
    sign = hadamard_sign(idx[:, None], idx[None, :])
    return sign.to(dtype) / math.sqrt(block_size)


def block_hadamard_matrix(
    head_dim: int, block_size: int, dtype=torch.float64, device="cpu"
) -> torch.Tensor:
    """[head_dim, head_dim] block-diagonal matrix with H_b on the diagonal."""
    validate_block_size(block_size, head_dim)
    h = hadamard_matrix(block_size, dtype=dtype, device=device)
    return torch.block_diag(*([h] * (head_dim // block_size)))


def rotate(x: torch.Tensor, block_size: Optional[int]) -> torch.Tensor:
    """Apply the block-diagonal rotation along the last axis (its own inverse)."""
    if block_size is None:
        return x
    d = x.shape[-1]
    validate_block_size(block_size, d)
    h = hadamard_matrix(block_size, dtype=x.dtype, device=x.device)
    xb = x.reshape(*x.shape[:-1], d // block_size, block_size)
    return (xb @ h).reshape(x.shape)


# --------------------------------------------------------------------------- #
# Quantization (torch references)
# --------------------------------------------------------------------------- #
def round_code(x: torch.Tensor) -> torch.Tensor:
    """Rounding of the format: floor(x + 0.5) (half up, cheap in every kernel)."""
    return torch.floor(x + 0.5)


def quantize(x: torch.Tensor, symmetric: bool = False) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token-wise INT4 over the last axis.

    Args:
        x: [..., head_dim] float tensor (already rotated if rotation is wanted).
    Returns:
        codes  [..., head_dim] uint8 in [0, 15],
        scale  [...] float16,
        offset [...] float16.
    The codes are computed from the fp16-rounded (scale, offset) that get stored,
    so that dequantization with the stored values is the best grid point.
    """
    xf = x.float()
    if symmetric:
        absmax = xf.abs().amax(dim=-1)
        scale = (absmax / (INT4_MAX / 2)).clamp_min(SCALE_EPS).to(META_DTYPE)
        offset = (-(INT4_MAX / 2) * scale.float()).to(META_DTYPE)
    else:
        lo = xf.amin(dim=-1)
        hi = xf.amax(dim=-1)
        scale = ((hi - lo) / INT4_MAX).clamp_min(SCALE_EPS).to(META_DTYPE)
        offset = lo.to(META_DTYPE)
    codes = round_code((xf - offset.float()[..., None]) / scale.float()[..., None])
    codes = codes.clamp(0, INT4_MAX).to(DATA_DTYPE)
    return codes, scale, offset


def dequantize(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """Inverse of :func:`quantize`: scale * q + offset, computed in float32."""
    return (codes.float() * scale.float()[..., None] + offset.float()[..., None]).to(dtype)


def pack(codes: torch.Tensor) -> torch.Tensor:
    """[..., d] codes in [0, 15] -> [..., d // 2] uint8, split-half packing."""
    d = codes.shape[-1]
    if d % 2:
        raise FormatError(f"cannot pack an odd number of channels ({d})")
    half = d // 2
    lo = codes[..., :half].to(torch.uint8)
    hi = codes[..., half:].to(torch.uint8)
    return lo | (hi << 4)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """[..., d // 2] uint8 -> [..., d] codes (inverse of :func:`pack`)."""
    lo = packed & 0x0F
    hi = packed >> 4
    return torch.cat([lo, hi], dim=-1)


def packed_words(data: torch.Tensor) -> torch.Tensor:
    """[..., d // 2] uint8 packed data -> [..., d // 4] int16 view of the same bytes.

    Word j holds bytes 2j (low half, on the little-endian GPUs and CPUs torch runs on)
    and 2j + 1: the codes of channels 2j, 2j + 1 (low nibbles) and d/2 + 2j, d/2 + 2j + 1
    (high nibbles).  Kernels read pages this way (``format_jit.biased_code_quads``).
    """
    if data.dtype != DATA_DTYPE or data.shape[-1] % 2 or data.stride(-1) != 1:
        raise FormatError(f"packed data must be uint8, contiguous in an even last axis; got {tuple(data.shape)} "
                          f"{data.dtype} with strides {data.stride()}")
    return data.view(torch.int16)


def _check_center(center: Optional[torch.Tensor], is_value: bool) -> None:
    if center is not None and is_value:
        raise FormatError("only keys are centered (a value center would shift the attention output)")


def encode(x: torch.Tensor, fmt: Int4Format, is_value: bool,
           center: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Center (keys, optional), rotate (per ``fmt``), quantize and pack one K or V tensor.

    Args:
        x: [num_tokens, num_kv_heads, head_dim] float (any leading axes).
        center: None, or the key center, broadcastable against x (e.g. [num_kv_heads,
            head_dim]), in the original space.
    Returns:
        data [num_tokens, num_kv_heads, head_dim // 2] uint8,
        meta [num_tokens, num_kv_heads, 2] float16.
    """
    _check_center(center, is_value)
    xd = x.double() if center is None else x.double() - center.double()
    rotated = fmt.rotate_v if is_value else fmt.rotate_k
    xr = rotate(xd, fmt.block_size) if rotated else xd
    codes, scale, offset = quantize(xr, symmetric=fmt.symmetric)
    return pack(codes), torch.stack([scale, offset], dim=-1)


def decode(data: torch.Tensor, meta: torch.Tensor, fmt: Int4Format, is_value: bool, unrotate: bool = True,
           center: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Unpack and dequantize to float64; undo the rotation if ``unrotate``; add the key
    ``center`` back (in the space returned: rotated too when the rotation is kept)."""
    _check_center(center, is_value)
    x = dequantize(unpack(data), meta[..., META_SCALE], meta[..., META_OFFSET], dtype=torch.float64)
    rotated = fmt.rotate_v if is_value else fmt.rotate_k
    if rotated and unrotate:
        x = rotate(x, fmt.block_size)
    if center is not None:
        c = center.double().to(x.device)
        x = x + (rotate(c, fmt.block_size) if rotated and not unrotate else c)
    return x


def stored_center(center: torch.Tensor, fmt: Int4Format) -> torch.Tensor:
    """The key center in the space keys are stored in (rotated when K is), float32: what
    the store kernel subtracts after its rotation, H (k - c) = H k - H c."""
    c = center.double()
    return (rotate(c, fmt.block_size) if fmt.rotate_k else c).float().contiguous()


def fake_quantize(x: torch.Tensor, fmt: Int4Format, is_value: bool,
                  center: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Round trip through the stored format, returned in x's dtype and original space."""
    data, meta = encode(x, fmt, is_value, center)
    return decode(data, meta, fmt, is_value, center=center).to(x.dtype)


def allocate_layer(num_slots: int, num_kv_heads: int, head_dim: int, device="cpu"):
    """Empty (data, meta) buffers of one layer for K or V."""
    validate_head_dim(head_dim)
    data = torch.zeros((num_slots, num_kv_heads, head_dim // 2), dtype=DATA_DTYPE, device=device)
    meta = torch.zeros((num_slots, num_kv_heads, META_FIELDS), dtype=META_DTYPE, device=device)
    return data, meta
