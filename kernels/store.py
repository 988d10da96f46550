"""KV store path: rotate, quantize, pack and scatter K and V in one launch.

``rotate_quantize_store`` writes the pages.  ``rotate_quantize_store_and_stage`` also writes
the new tokens' exact K/V into FlashInfer prefill staging rows and moves q into the space
those rows are in, in the same launch: a prefill over a cached prefix is host-bound, and
this is the launch ``to_stored_space`` would otherwise add in every layer.
"""


from typing import Optional

import torch
import triton
import triton.language as tl

from sglang_sawint4 import format as fmt
from sglang_sawint4.kernels.launch import (DirectLaunch, check_center, check_layer_buffers, check_written_like,
                                           row_head_args)
from sglang_sawint4.kernels.format_jit import (
    META_OFFSET,
    META_SCALE,
    load_rotated_halves,
    pack_nibbles,
    quant_params,
    quantize_codes,
    store_halves,
    subtract_center,
)

# Tokens per program: >= 16 so the rotation can run on the tensor cores (tl.dot).
BLOCK_T = 16


# What the store-and-stage kernel writes to the staging rows besides the pages: nothing, the
# rows as they came in (rotated where the layout rotates them) before the key center comes
# off (a plain layout's staging is in the original space), or after (a rotating layout's is
# as stored)
STAGE_NONE, STAGE_UNCENTERED, STAGE_AS_STORED = (tl.constexpr(i) for i in range(3))


@triton.jit
def _quantize_store_rows(x_ptr, stride_xt, stride_xh, data_ptr, stride_dt, stride_dh,
                         meta_ptr, stride_mt, stride_mh, loc_ptr, center_ptr, t0, head, num_tokens,
                         stage_ptr, stride_st, stride_sh,
                         ROTATE: tl.constexpr, BLOCK_ROT: tl.constexpr, CENTER: tl.constexpr,
                         SYMMETRIC: tl.constexpr, BLOCK: tl.constexpr, HALF: tl.constexpr, STAGE: tl.constexpr):
    offs_t = t0 + tl.arange(0, BLOCK)
    mask_t = offs_t < num_tokens
    x_lo, x_hi = load_rotated_halves(x_ptr, offs_t, mask_t, stride_xt, head * stride_xh,
                                     ROTATE, BLOCK_ROT, HALF)
    if STAGE == STAGE_UNCENTERED:
        store_halves(stage_ptr, offs_t, mask_t, stride_st, head * stride_sh, x_lo, x_hi, HALF)
    if CENTER:  # the center arrives rotated
        x_lo, x_hi = subtract_center(x_lo, x_hi, center_ptr, head, HALF)
    if STAGE == STAGE_AS_STORED:
        store_halves(stage_ptr, offs_t, mask_t, stride_st, head * stride_sh, x_lo, x_hi, HALF)
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
                             km_sh, loc_ptr, k_center_ptr, t0, head, num_tokens, k_ptr, 0, 0, ROTATE_K, BLOCK_ROT,
                             CENTER_K, SYMMETRIC, BLOCK, HALF, STAGE_NONE)
    else:
        _quantize_store_rows(v_ptr, stride_vt, stride_vh, vd_ptr, vd_st, vd_sh, vm_ptr, vm_st,
                             vm_sh, loc_ptr, k_center_ptr, t0, head, num_tokens, v_ptr, 0, 0, ROTATE_V, BLOCK_ROT,
                             False, SYMMETRIC, BLOCK, HALF, STAGE_NONE)


_rotate_quantize_store_launch = DirectLaunch(_rotate_quantize_store_kernel)


@triton.jit(do_not_specialize=["num_tokens", "num_kv_heads"])
def _store_and_stage_kernel(
    q_ptr, q_st, q_sh, k_ptr, k_st, k_sh, v_ptr, v_st, v_sh,
    kd_ptr, kd_st, kd_sh, km_ptr, km_st, km_sh, vd_ptr, vd_st, vd_sh, vm_ptr, vm_st, vm_sh,
    qo_ptr, qo_st, qo_sh, ks_ptr, ks_st, ks_sh, vs_ptr, vs_st, vs_sh,
    loc_ptr, k_center_ptr, num_tokens, num_kv_heads,
    ROTATE_K: tl.constexpr, ROTATE_V: tl.constexpr, BLOCK_ROT: tl.constexpr, CENTER_K: tl.constexpr,
    SYMMETRIC: tl.constexpr, BLOCK: tl.constexpr, HALF: tl.constexpr, STAGE_K: tl.constexpr,
):
    """The store kernel's K and V programs, each also writing its rows to the staging rows,
    and on grid axis 1 past the KV heads (axis 2 = 0 only) q's heads, moved as keys are."""
    t0 = tl.program_id(0) * BLOCK
    head = tl.program_id(1)
    if head < num_kv_heads:
        if tl.program_id(2) == 0:
            _quantize_store_rows(k_ptr, k_st, k_sh, kd_ptr, kd_st, kd_sh, km_ptr, km_st, km_sh, loc_ptr,
                                 k_center_ptr, t0, head, num_tokens, ks_ptr, ks_st, ks_sh, ROTATE_K, BLOCK_ROT,
                                 CENTER_K, SYMMETRIC, BLOCK, HALF, STAGE_K)
        else:
            _quantize_store_rows(v_ptr, v_st, v_sh, vd_ptr, vd_st, vd_sh, vm_ptr, vm_st, vm_sh, loc_ptr,
                                 k_center_ptr, t0, head, num_tokens, vs_ptr, vs_st, vs_sh, ROTATE_V, BLOCK_ROT,
                                 False, SYMMETRIC, BLOCK, HALF, STAGE_UNCENTERED)
    elif tl.program_id(2) == 0:
        offs_t = t0 + tl.arange(0, BLOCK)
        mask_t = offs_t < num_tokens
        qh = head - num_kv_heads
        q_lo, q_hi = load_rotated_halves(q_ptr, offs_t, mask_t, q_st, qh * q_sh, ROTATE_K, BLOCK_ROT, HALF)
        store_halves(qo_ptr, offs_t, mask_t, qo_st, qh * qo_sh, q_lo, q_hi, HALF)


_store_and_stage_launch = DirectLaunch(_store_and_stage_kernel)


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
    k, v, num_heads = _check_store_args(k, v, loc, k_data, k_meta, v_data, v_meta, layout, k_center)
    num_tokens = k.shape[0]
    if num_tokens == 0:
        return
    grid = (triton.cdiv(num_tokens, BLOCK_T), num_heads, 2)
    _rotate_quantize_store_launch[grid](
        *row_head_args(k, v, k_data, k_meta, v_data, v_meta), loc,
        k_center if k_center is not None else loc, num_tokens, **_store_constexprs(layout, k_center),
    )


def _store_constexprs(layout: fmt.Int4Format, k_center: Optional[torch.Tensor]) -> dict:
    """The compile-time arguments both store kernels take for ``layout`` (and launch options)."""
    return dict(ROTATE_K=layout.rotate_k, ROTATE_V=layout.rotate_v, BLOCK_ROT=layout.block_size or 1,
                CENTER_K=k_center is not None, SYMMETRIC=layout.symmetric, BLOCK=BLOCK_T,
                HALF=layout.head_dim // 2, num_warps=4)


def _check_store_args(k, v, loc, k_data, k_meta, v_data, v_meta, layout, k_center):
    """(k, v, num_kv_heads), k and v as [num_tokens, num_kv_heads, head_dim] views; raises
    on anything ``rotate_quantize_store`` does not take."""
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
    return k, v, num_heads


def rotate_quantize_store_and_stage(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    loc: torch.Tensor,
    k_data: torch.Tensor,
    k_meta: torch.Tensor,
    v_data: torch.Tensor,
    v_meta: torch.Tensor,
    layout: fmt.Int4Format,
    k_center: Optional[torch.Tensor],
    k_rows: torch.Tensor,
    v_rows: torch.Tensor,
    center_rows: bool,
) -> torch.Tensor:
    """``rotate_quantize_store``, and the new tokens handed to a prefill over staged pages.

    Args:
        q: [num_tokens, num_q_heads, head_dim] in k's dtype, channel stride 1 (any row and
            head strides, e.g. a view of a fused qkv tensor).
        k, v, loc, k_data, k_meta, v_data, v_meta, layout, k_center: as
            ``rotate_quantize_store`` (k_center in the stored space).
        k_rows, v_rows: [num_tokens, num_kv_heads, head_dim] in k's dtype, channel stride 1
            (rows of a staging buffer), written with the tokens' exact K and V in the space
            the prefix they join is in: rotated where the layout rotates them, and k minus
            ``k_center`` when ``center_rows`` (the stored space), else not (a plain layout
            staged in the original space, its prefix with the center added back).
    Returns q in that space (rotated where keys are), [num_tokens, num_q_heads, head_dim]
    contiguous in q's dtype.  The same values as ``rotate_quantize_store`` followed by
    ``to_stored_space(q, k, v, layout, k_center if center_rows else None, kv_out=(k_rows,
    v_rows))``, in one launch.
    """
    k, v, num_kv_heads = _check_store_args(k, v, loc, k_data, k_meta, v_data, v_meta, layout, k_center)
    num_tokens, d = k.shape[0], layout.head_dim
    if q.dim() != 3 or q.shape[0] != num_tokens or q.shape[2] != d or q.stride(-1) != 1 or q.dtype != k.dtype:
        raise ValueError(f"q must be [{num_tokens}, num_q_heads, {d}] {k.dtype} with unit channel stride, "
                         f"got {tuple(q.shape)} {q.dtype}")
    check_written_like("k_rows", k_rows, k)
    check_written_like("v_rows", v_rows, v)
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if num_tokens == 0:
        return q_out
    grid = (triton.cdiv(num_tokens, BLOCK_T), num_kv_heads + q.shape[1], 2)
    _store_and_stage_launch[grid](
        *row_head_args(q, k, v, k_data, k_meta, v_data, v_meta, q_out, k_rows, v_rows), loc,
        k_center if k_center is not None else loc, num_tokens, num_kv_heads, **_store_constexprs(layout, k_center),
        STAGE_K=(STAGE_AS_STORED if center_rows else STAGE_UNCENTERED).value,
    )
    return q_out


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
