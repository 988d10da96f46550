"""Dequantize the INT4 pages of a cached prefix into a dense BF16/FP16 scratch.

Used by both extend/prefill paths: the new tokens' K/V are attended in their
original precision, and only the cached prefix (radix-cache hits, earlier chunks
of a chunked prefill) is read from INT4.  The prefix is gathered through
``kv_indices`` (one launch for K and V) as stored (rotated, keys centered: both prefill
paths read a rotating layout so and move the new tokens into that space instead) or
into the original space (un-rotated, key center added back: the FlashInfer path's
staging of a plain layout's centered keys; un-rotating costs the tensor cores once per
row and layer, ~3x the as-stored read) and handed to a stock prefill kernel.  See
``docs/design-notes.md`` for why this beats a dedicated INT4 extend kernel here.
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from sglang_sawint4 import format as fmt
from sglang_sawint4.kernels.launch import DirectLaunch, check_center, check_layer_buffers, row_head_args
from sglang_sawint4.kernels.format_jit import META_OFFSET, META_SCALE, hadamard_tile, rotation_norm, unpack_hi, unpack_lo

BLOCK_T = 16


@triton.jit
def _dequant_rows(data_ptr, d_st, d_sh, meta_ptr, m_st, m_sh, out_ptr, o_st, o_sh,
                  kv_indices, center_ptr, t0, head, n, UNROTATE: tl.constexpr, BLOCK_ROT: tl.constexpr,
                  CENTER: tl.constexpr, BLOCK: tl.constexpr, HALF: tl.constexpr):
    offs_t = t0 + tl.arange(0, BLOCK)
    mask_t = offs_t < n
    loc = tl.load(kv_indices + offs_t, mask=mask_t, other=0).to(tl.int64)
    half = tl.arange(0, HALF)
    packed = tl.load(data_ptr + loc[:, None] * d_st + head * d_sh + half[None, :],
                     mask=mask_t[:, None], other=0)
    meta = meta_ptr + loc * m_st + head * m_sh
    scale = tl.load(meta + META_SCALE, mask=mask_t, other=0.0).to(tl.float32)
    offset = tl.load(meta + META_OFFSET, mask=mask_t, other=0.0).to(tl.float32)
    out_row = out_ptr + offs_t[:, None].to(tl.int64) * o_st + head * o_sh
    out_ty = out_ptr.dtype.element_ty
    if UNROTATE:
        # x = H x' with x' = s * c + o.  Blocks within a half rotate each half by one
        # HALF x HALF tile; a full-width block goes through Sylvester's butterfly
        # (x_lo, x_hi) -> (x_lo + x_hi, x_lo - x_hi) first.  Either way the operands are
        # small integers (codes, their sums/differences, +-1 signs): exact in fp16, so
        # the tensor cores rotate exactly; scale and offset are applied afterwards.
        c_lo = unpack_lo(packed).to(tl.float16)
        c_hi = unpack_hi(packed).to(tl.float16)
        if BLOCK_ROT <= HALF:
            sign = hadamard_tile(half, half, BLOCK_ROT)
            a, b = c_lo, c_hi
            off_a = offset[:, None]
            off_b = offset[:, None]
        else:
            sign = hadamard_tile(half, half, HALF)
            a, b = c_lo + c_hi, c_lo - c_hi
            off_a = 2.0 * offset[:, None]
            off_b = 0.0 * offset[:, None]
        h1 = tl.sum(sign, axis=0).to(tl.float32)[None, :]  # H applied to a row of ones
        inv = rotation_norm(BLOCK_ROT)
        ha = tl.dot(a, sign.to(tl.float16), out_dtype=tl.float32)
        hb = tl.dot(b, sign.to(tl.float16), out_dtype=tl.float32)
        x_lo = (scale[:, None] * ha + off_a * h1) * inv
        x_hi = (scale[:, None] * hb + off_b * h1) * inv
    else:
        x_lo = unpack_lo(packed).to(tl.float32) * scale[:, None] + offset[:, None]
        x_hi = unpack_hi(packed).to(tl.float32) * scale[:, None] + offset[:, None]
    if CENTER:  # keys stored centered: the extend kernel mixes them with exact new keys
        c = center_ptr + head * (2 * HALF)
        x_lo = x_lo + tl.load(c + half)[None, :]
        x_hi = x_hi + tl.load(c + HALF + half)[None, :]
    tl.store(out_row + half[None, :], x_lo.to(out_ty), mask=mask_t[:, None])
    tl.store(out_row + HALF + half[None, :], x_hi.to(out_ty), mask=mask_t[:, None])


# n and the index pointers unspecialized: the piece sizes a server meets are arbitrary, and
# each new divisibility or alignment class would compile a variant in the middle of serving
@triton.jit(do_not_specialize=["n"], do_not_specialize_on_alignment=["kv_indices", "k_center_ptr"])
def _dequantize_pages_kernel(
    kd_ptr, kd_st, kd_sh, km_ptr, km_st, km_sh,
    vd_ptr, vd_st, vd_sh, vm_ptr, vm_st, vm_sh,
    ko_ptr, ko_st, ko_sh, vo_ptr, vo_st, vo_sh,
    kv_indices, k_center_ptr, n,
    ROTATE_K: tl.constexpr, ROTATE_V: tl.constexpr, BLOCK_ROT: tl.constexpr, CENTER_K: tl.constexpr,
    BLOCK: tl.constexpr, HALF: tl.constexpr,
):
    t0 = tl.program_id(0) * BLOCK
    head = tl.program_id(1)
    if tl.program_id(2) == 0:
        _dequant_rows(kd_ptr, kd_st, kd_sh, km_ptr, km_st, km_sh, ko_ptr, ko_st, ko_sh,
                      kv_indices, k_center_ptr, t0, head, n, ROTATE_K, BLOCK_ROT, CENTER_K, BLOCK, HALF)
    else:
        _dequant_rows(vd_ptr, vd_st, vd_sh, vm_ptr, vm_st, vm_sh, vo_ptr, vo_st, vo_sh,
                      kv_indices, k_center_ptr, t0, head, n, ROTATE_V, BLOCK_ROT, False, BLOCK, HALF)


_dequantize_pages_launch = DirectLaunch(_dequantize_pages_kernel)


def dequantize_pages(
    k_data: torch.Tensor,
    k_meta: torch.Tensor,
    v_data: torch.Tensor,
    v_meta: torch.Tensor,
    kv_indices: torch.Tensor,
    k_out: torch.Tensor,
    v_out: torch.Tensor,
    layout: fmt.Int4Format,
    k_center: Optional[torch.Tensor] = None,
    unrotate: bool = True,
) -> None:
    """Gather and dequantize rows ``kv_indices`` of one layer into dense K/V.

    Args:
        k_data, v_data: [num_slots, num_kv_heads, head_dim // 2] uint8.
        k_meta, v_meta: [num_slots, num_kv_heads, 2] float16.
        kv_indices: [n] int32/int64 slot ids.
        k_out, v_out: [>= n, num_kv_heads, head_dim] bf16/fp16/fp32; row i receives
            slot kv_indices[i] in the original (un-rotated) space, or as stored (rotated
            where the layout rotates, keys centered) when ``unrotate`` is False.
        k_center: None, or [num_kv_heads, head_dim] float32 contiguous: the layer's key
            center in the original space, added back to every key row (original space only).
    """
    d = layout.head_dim
    num_heads = k_data.shape[1]
    check_layer_buffers(k_data, k_meta, num_heads, d, "k")
    check_layer_buffers(v_data, v_meta, num_heads, d, "v")
    n = kv_indices.shape[0]
    for name, out in (("k_out", k_out), ("v_out", v_out)):
        if out.dim() != 3 or out.shape[0] < n or out.shape[1:] != (num_heads, d) or out.stride(-1) != 1:
            raise ValueError(f"{name} must be [>= {n}, {num_heads}, {d}] with unit channel stride, got {tuple(out.shape)}")
    check_center(k_center, num_heads, d)
    if k_center is not None and not unrotate:
        raise ValueError("k_center is added back in the original space only; pages read as stored stay centered")
    if n == 0:
        return
    grid = (triton.cdiv(n, BLOCK_T), num_heads, 2)
    _dequantize_pages_launch[grid](
        *row_head_args(k_data, k_meta, v_data, v_meta, k_out, v_out), kv_indices,
        k_center if k_center is not None else kv_indices, n,
        ROTATE_K=unrotate and layout.rotate_k, ROTATE_V=unrotate and layout.rotate_v,
        BLOCK_ROT=layout.block_size or 1, CENTER_K=k_center is not None,
        BLOCK=BLOCK_T, HALF=d // 2, num_warps=4,
    )


def dequantize_pages_reference(k_data, k_meta, v_data, v_meta, kv_indices, layout: fmt.Int4Format, k_center=None,
                               unrotate=True):
    """Float64 reference: (k, v) [n, num_kv_heads, head_dim] in the original space (or as stored)."""
    idx = kv_indices.long().cpu()
    k = fmt.decode(k_data.cpu()[idx], k_meta.cpu()[idx], layout, is_value=False, unrotate=unrotate,
                   center=None if k_center is None else k_center.cpu())
    v = fmt.decode(v_data.cpu()[idx], v_meta.cpu()[idx], layout, is_value=True, unrotate=unrotate)
    return k, v
