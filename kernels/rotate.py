"""Rotate head vectors into the space INT4 pages are stored in, in one pass.

Both prefill paths attend to a rotating layout's cached prefix in the pages' stored space
(``sglang_sawint4.backend``, ``sglang_sawint4.flashinfer_prefill``): the prefix is
dequantized as stored, and the new tokens' q and k are rotated there (k also loses the
stored key center), v and the output too when V is rotated (``to_stored_space``,
``from_stored_space``).  A torch ``x.float() @ H`` does it in three memory passes; these
kernels read each row once, rotate it on the tensor cores (exact from bf16/fp16, the store
kernel's ``load_rotated_halves``) and write it once.  ``to_stored_space`` moves q, k and v in
one launch: a small prefill runs it in every layer, and there a launch costs the host more
than the rotation costs the GPU.
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from sglang_sawint4 import format as fmt
from sglang_sawint4.kernels.format_jit import load_rotated_halves, store_halves, subtract_center
from sglang_sawint4.kernels.launch import DirectLaunch, check_center, check_written_like

BLOCK_T = 16  # rows per program: the tensor cores' 16-row M


@triton.jit
def _rotate_tile(x_ptr, x_st, x_sh, o_ptr, o_st, o_sh, center_ptr, head, offs_t, mask_t,
                 ROTATE: tl.constexpr, BLOCK_ROT: tl.constexpr, CENTER: tl.constexpr, HALF: tl.constexpr):
    """Rows ``offs_t`` of one head: out = H x (x itself unless ROTATE; minus the stored
    center when CENTER)."""
    x_lo, x_hi = load_rotated_halves(x_ptr, offs_t, mask_t, x_st, head * x_sh, ROTATE, BLOCK_ROT, HALF)
    if CENTER:  # the center arrives rotated
        x_lo, x_hi = subtract_center(x_lo, x_hi, center_ptr, head, HALF)
    store_halves(o_ptr, offs_t, mask_t, o_st, head * o_sh, x_lo, x_hi, HALF)


@triton.jit(do_not_specialize=["num_rows"])
def _rotate_rows_kernel(x_ptr, x_st, x_sh, o_ptr, o_st, o_sh, center_ptr, num_rows,
                        BLOCK_ROT: tl.constexpr, CENTER: tl.constexpr, BLOCK: tl.constexpr, HALF: tl.constexpr):
    offs_t = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    _rotate_tile(x_ptr, x_st, x_sh, o_ptr, o_st, o_sh, center_ptr, tl.program_id(1), offs_t, offs_t < num_rows,
                 True, BLOCK_ROT, CENTER, HALF)


_rotate_rows_launch = DirectLaunch(_rotate_rows_kernel)


@triton.jit(do_not_specialize=["num_rows", "num_q_heads", "num_kv_heads"])
def _rotate_qkv_kernel(q_ptr, q_st, q_sh, k_ptr, k_st, k_sh, v_ptr, v_st, v_sh,
                       qo_ptr, qo_st, qo_sh, ko_ptr, ko_st, ko_sh, vo_ptr, vo_st, vo_sh,
                       center_ptr, num_rows, num_q_heads, num_kv_heads, ROTATE_V: tl.constexpr,
                       BLOCK_ROT: tl.constexpr, CENTER: tl.constexpr, BLOCK: tl.constexpr, HALF: tl.constexpr):
    """One launch for q, k and v: grid axis 1 runs over q's heads, then k's, then v's
    (rotated when ROTATE_V, else copied; absent from the grid when v needs neither)."""
    offs_t = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask_t = offs_t < num_rows
    head = tl.program_id(1)
    if head < num_q_heads:
        _rotate_tile(q_ptr, q_st, q_sh, qo_ptr, qo_st, qo_sh, center_ptr, head, offs_t, mask_t, True, BLOCK_ROT,
                     False, HALF)
    elif head < num_q_heads + num_kv_heads:
        _rotate_tile(k_ptr, k_st, k_sh, ko_ptr, ko_st, ko_sh, center_ptr, head - num_q_heads, offs_t, mask_t,
                     True, BLOCK_ROT, CENTER, HALF)
    else:
        _rotate_tile(v_ptr, v_st, v_sh, vo_ptr, vo_st, vo_sh, center_ptr, head - num_q_heads - num_kv_heads, offs_t,
                     mask_t, ROTATE_V, BLOCK_ROT, False, HALF)


_rotate_qkv_launch = DirectLaunch(_rotate_qkv_kernel)


def rotate_rows(x: torch.Tensor, layout: fmt.Int4Format, stored_center: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Each head vector of ``x`` times the layout's block-diagonal Hadamard, minus ``stored_center``.

    Args:
        x: [num_rows, num_heads, head_dim] bf16/fp16/fp32, channel stride 1 (any row and
            head strides, e.g. a view of a fused qkv tensor).
        layout: a rotating format (``block_size`` set).
        stored_center: None, or [num_heads, head_dim] float32 contiguous: a key center in
            the stored space (``format.stored_center``), subtracted after the rotation.
    Returns [num_rows, num_heads, head_dim] contiguous, x's dtype: ``format.rotate(x) - c``.
    """
    _check_rotatable("x", x, layout)
    num_rows, num_heads, d = x.shape
    check_center(stored_center, num_heads, d)
    out = torch.empty((num_rows, num_heads, d), dtype=x.dtype, device=x.device)
    if num_rows == 0:
        return out
    _rotate_rows_launch[(triton.cdiv(num_rows, BLOCK_T), num_heads)](
        x, x.stride(0), x.stride(1), out, out.stride(0), out.stride(1),
        stored_center if stored_center is not None else out, num_rows,
        BLOCK_ROT=layout.block_size, CENTER=stored_center is not None, BLOCK=BLOCK_T, HALF=d // 2, num_warps=4,
    )
    return out


def _check_rotatable(name: str, x: torch.Tensor, layout: fmt.Int4Format) -> None:
    if layout.block_size is None:
        raise ValueError("rotate_rows needs a rotating layout (block_size set)")
    d = layout.head_dim
    if x.dim() != 3 or x.shape[-1] != d or x.stride(-1) != 1:
        raise ValueError(f"{name} must be [num_rows, num_heads, {d}] with unit channel stride, got {tuple(x.shape)}")


def _check_kv_out(kv_out, k, v):
    """kv_out: None, or (k_dst, v_dst) of k's and v's shapes and dtypes, unit channel stride."""
    if kv_out is not None:
        check_written_like("kv_out's k", kv_out[0], k)
        check_written_like("kv_out's v", kv_out[1], v)


def _rotate_qkv(q, k, v, layout: fmt.Int4Format, stored_center, kv_out=None):
    """``to_stored_space`` of a layout that rotates keys, in one launch."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_rotatable(name, x, layout)
    num_rows, num_kv_heads, d = k.shape
    if q.shape[0] != num_rows or v.shape[:2] != k.shape[:2]:
        raise ValueError(f"q, k, v must hold the same rows (and k, v the same heads), got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    check_center(stored_center, num_kv_heads, d)
    _check_kv_out(kv_out, k, v)
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if kv_out is not None:
        k_out, v_out = kv_out
    else:
        k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
        v_out = torch.empty(v.shape, dtype=v.dtype, device=v.device) if layout.rotate_v else v.contiguous()
    if num_rows == 0:
        return q_out, k_out, v_out
    with_v = layout.rotate_v or kv_out is not None  # else v_out is v itself
    heads = q.shape[1] + num_kv_heads * (2 if with_v else 1)
    _rotate_qkv_launch[(triton.cdiv(num_rows, BLOCK_T), heads)](
        q, q.stride(0), q.stride(1), k, k.stride(0), k.stride(1), v, v.stride(0), v.stride(1),
        q_out, q_out.stride(0), q_out.stride(1), k_out, k_out.stride(0), k_out.stride(1),
        v_out, v_out.stride(0), v_out.stride(1),
        stored_center if stored_center is not None else k_out, num_rows, q.shape[1], num_kv_heads,
        ROTATE_V=layout.rotate_v, BLOCK_ROT=layout.block_size, CENTER=stored_center is not None, BLOCK=BLOCK_T,
        HALF=d // 2, num_warps=4,
    )
    return q_out, k_out, v_out


def to_stored_space(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: fmt.Int4Format,
                    stored_center: Optional[torch.Tensor] = None, kv_out=None):
    """New tokens' attention inputs in the space a layer's pages are stored in.

    Args:
        q: [tokens, num_q_heads, head_dim]; k, v: [tokens, num_kv_heads, head_dim]
            (bf16/fp16/fp32, channel stride 1).
        stored_center: None, or the layer's key center in the stored space
            ([num_kv_heads, head_dim] float32, ``pool.key_center(layer, stored=True)``).
        kv_out: None, or (k_dst, v_dst) shaped and typed as k and v (channel stride 1, e.g.
            rows of a staging buffer): k and v are written there instead of new tensors.
    Returns (q, k, v), contiguous (k, v: ``kv_out`` when given), in their dtype: q and k
    rotated when keys are, k minus the center, v rotated when values are.  Attention over
    them and the pages read as stored (``dequantize_pages(..., unrotate=False)``) is
    attention in the original space: H is orthogonal, and a key center shifts every score of
    a query alike once the new keys carry it too.  Its output is rotated as V is
    (``from_stored_space``).
    """
    if layout.rotate_k:  # one launch: a prefill over a cached prefix runs this in every layer
        return _rotate_qkv(q, k, v, layout, stored_center, kv_out)
    _check_kv_out(kv_out, k, v)
    if stored_center is not None:
        k = (k.float() - stored_center).to(k.dtype)
    if layout.rotate_v:
        v = rotate_rows(v, layout)
    if kv_out is None:
        return q.contiguous(), k.contiguous(), v.contiguous()
    kv_out[0].copy_(k)
    kv_out[1].copy_(v)
    return q.contiguous(), kv_out[0], kv_out[1]


def from_stored_space(o: torch.Tensor, layout: fmt.Int4Format) -> torch.Tensor:
    """Attention output [tokens, num_q_heads, head_dim] over stored-space values, back in the
    original space: rotated again when V is (the normalized block Hadamard is its own
    inverse), else ``o`` itself."""
    return rotate_rows(o, layout) if layout.rotate_v else o
