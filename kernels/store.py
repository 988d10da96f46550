"""KV store path: rotate, quantize, pack and scatter K and V in one launch."""


from typing import Optional

import torch
import triton
import triton.language as tl

from sglang_sawint4 import format as fmt
from sglang_sawint4.kernels.launch import DirectLaunch, check_center, check_layer_buffers, row_head_args
from sglang_sawint4.kernels.format_jit import (
    META_OFFSET,
    META_SCALE,
    load_rotated_halves,
    pack_nibbles,
    quant_params,
    quantize_codes,
)

# Tokens per program: >= 16 so the rotation can run on the tensor cores (tl.dot).
BLOCK_T = 16


@triton.jit
def _quantize_store_rows(x_ptr, stride_xt, stride_xh, data_ptr, stride_dt, stride_dh,
                         meta_ptr, stride_mt, stride_mh, loc_ptr, center_ptr, t0, head, num_tokens,
                         ROTATE: tl.constexpr, BLOCK_ROT: tl.constexpr, CENTER: tl.constexpr,
                         SYMMETRIC: tl.constexpr, BLOCK: tl.constexpr, HALF: tl.constexpr):
    offs_t = t0 + tl.arange(0, BLOCK)
    mask_t = offs_t < num_tokens
    x_lo, x_hi = load_rotated_halves(x_ptr, offs_t, mask_t, stride_xt, head * stride_xh,
                                     ROTATE, BLOCK_ROT, HALF)
    if CENTER:
        # H (x - c) = H x - H c: the center arrives rotated, so the rotation above stays
        # exact on the input dtype and the subtraction is one fp32 operation
        half = tl.arange(0, HALF)
        c = center_ptr + head * (2 * HALF)
        x_lo = x_lo - tl.load(c + half)[None, :]
        x_hi = x_hi - tl.load(c + HALF + half)[None, :]
    scale, offset = quant_params(x_lo, x_hi, SYMMETRIC)
    packed = pack_nibbles(quantize_codes(x_lo, scale, offset), quantize_codes(x_hi, scale, offset))
    loc = tl.load(loc_ptr + offs_t, mask=mask_t, other=0).to(tl.int64)
    half = tl.arange(0, HALF)
    tl.store(data_ptr + loc[:, None] * stride_dt + head * stride_dh + half[None, :],
             packed, mask=mask_t[:, None])
    meta = meta_ptr + loc * stride_mt + head * stride_mh
    tl.store(meta + META_SCALE, scale.to(tl.float16), mask=mask_t)
    tl.store(meta + META_OFFSET, offset.to(tl.float16), mask=mask_t)


# num_tokens unspecialized: every batch size would otherwise compile its divisibility class
# (and size 1) separately, some for the first time in the middle of serving
@triton.jit(do_not_specialize=["num_tokens"])
def _rotate_quantize_store_kernel(
    k_ptr, stride_kt, stride_kh, v_ptr, stride_vt, stride_vh,
    kd_ptr, kd_st, kd_sh, km_ptr, km_st, km_sh,
    vd_ptr, vd_st, vd_sh, vm_ptr, vm_st, vm_sh,
    loc_ptr, k_center_ptr, num_tokens,
    ROTATE_K: tl.constexpr, ROTATE_V: tl.constexpr, BLOCK_ROT: tl.constexpr, CENTER_K: tl.constexpr,
    SYMMETRIC: tl.constexpr, BLOCK: tl.constexpr, HALF: tl.constexpr,
):
    t0 = tl.program_id(0) * BLOCK
    head = tl.program_id(1)
    if tl.program_id(2) == 0:
        _quantize_store_rows(k_ptr, stride_kt, stride_kh, kd_ptr, kd_st, kd_sh, km_ptr, km_st,
                             km_sh, loc_ptr, k_center_ptr, t0, head, num_tokens, ROTATE_K, BLOCK_ROT,
                             CENTER_K, SYMMETRIC, BLOCK, HALF)
    else:
        _quantize_store_rows(v_ptr, stride_vt, stride_vh, vd_ptr, vd_st, vd_sh, vm_ptr, vm_st,
                             vm_sh, loc_ptr, k_center_ptr, t0, head, num_tokens, ROTATE_V, BLOCK_ROT,
                             False, SYMMETRIC, BLOCK, HALF)


_rotate_quantize_store_launch = DirectLaunch(_rotate_quantize_store_kernel)


def _check_rows(name: str, x: torch.Tensor, num_heads: int, head_dim: int) -> torch.Tensor:
    if x.dim() == 2:
        x = x.view(x.shape[0], num_heads, head_dim)
    if x.dim() != 3 or x.shape[1:] != (num_heads, head_dim):
        raise ValueError(f"{name} must be [num_tokens, {num_heads}, {head_dim}], got {tuple(x.shape)}")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"{name} must be bf16/fp16/fp32, got {x.dtype}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    return x


def rotate_quantize_store(
    k: torch.Tensor,
    v: torch.Tensor,
    loc: torch.Tensor,
    k_data: torch.Tensor,
    k_meta: torch.Tensor,
    v_data: torch.Tensor,
    v_meta: torch.Tensor,
    layout: fmt.Int4Format,
    k_center: Optional[torch.Tensor] = None,
) -> None:
    """Quantize new tokens' K and V and scatter them into one layer's INT4 buffers.

    Args:
        k, v: [num_tokens, num_kv_heads, head_dim] (or [num_tokens, num_kv_heads *
            head_dim]) bf16/fp16/fp32; the row stride may be anything (e.g. a view
            of a fused qkv tensor), the channel stride must be 1.
        loc: [num_tokens] int32/int64 slot index of each token.
        k_data, v_data: [num_slots, num_kv_heads, head_dim // 2] uint8.
        k_meta, v_meta: [num_slots, num_kv_heads, 2] float16 (scale, offset).
        layout: the format (rotation block, which of K/V rotated, symmetric grid).
        k_center: None, or [num_kv_heads, head_dim] float32 contiguous: the key center
            in the stored space (``format.stored_center``), subtracted from every key.
    One launch for K and V of all tokens; no host synchronization (CUDA-graph safe).
    """
    d = layout.head_dim
    num_heads = k_data.shape[1] if k_data.dim() == 3 else -1
    check_layer_buffers(k_data, k_meta, num_heads, d, "k")
    check_layer_buffers(v_data, v_meta, num_heads, d, "v")
    k = _check_rows("k", k, num_heads, d)
    v = _check_rows("v", v, num_heads, d)
    if loc.dim() != 1 or loc.shape[0] != k.shape[0] or v.shape[0] != k.shape[0]:
        raise ValueError(
            f"loc must be [num_tokens] matching k/v; got loc {tuple(loc.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if loc.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"loc must be int32/int64, got {loc.dtype}")
    check_center(k_center, num_heads, d)
    num_tokens = k.shape[0]
    if num_tokens == 0:
        return
    grid = (triton.cdiv(num_tokens, BLOCK_T), num_heads, 2)
    _rotate_quantize_store_launch[grid](
        *row_head_args(k, v, k_data, k_meta, v_data, v_meta), loc,
        k_center if k_center is not None else loc, num_tokens,
        ROTATE_K=layout.rotate_k, ROTATE_V=layout.rotate_v,
        BLOCK_ROT=layout.block_size or 1, CENTER_K=k_center is not None, SYMMETRIC=layout.symmetric,
        BLOCK=BLOCK_T, HALF=d // 2,
        num_warps=4,
    )


def rotate_quantize_store_reference(k, v, loc, k_data, k_meta, v_data, v_meta, layout: fmt.Int4Format,
                                    k_center=None) -> None:
    """Torch reference of :func:`rotate_quantize_store` (float64 rotation); ``k_center`` is
    the key center in the original space ([num_kv_heads, head_dim])."""
    num_heads = k_data.shape[1]
    k = k.reshape(k.shape[0], num_heads, layout.head_dim)
    v = v.reshape(v.shape[0], num_heads, layout.head_dim)
    for x, data, meta, is_value in ((k, k_data, k_meta, False), (v, v_data, v_meta, True)):
        packed, m = fmt.encode(x, layout, is_value, None if is_value else k_center)
        data[loc.long()] = packed
        meta[loc.long()] = m
