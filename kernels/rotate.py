"""Rotate head vectors into the space INT4 pages are stored in, in one pass.

Both prefill paths attend to a rotating layout's cached prefix in the pages' stored space
(``sglang_sawint4.backend``, ``sglang_sawint4.flashinfer_prefill``): the prefix is
dequantized as stored, and the new tokens' q and k are rotated there (k also loses the
stored key center), v and the output too when V is rotated (``to_stored_space``,
``from_stored_space``).  A torch ``x.float() @ H`` does it in three memory passes; this
kernel reads each row once, rotates it on the tensor cores (exact from bf16/fp16, the
store kernel's ``load_rotated_halves``) and writes it once.
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from sglang_sawint4 import format as fmt
from sglang_sawint4.kernels.format_jit import load_rotated_halves
from sglang_sawint4.kernels.launch import check_center

BLOCK_T = 16  # rows per program: the tensor cores' 16-row M


@triton.jit(do_not_specialize=["num_rows"])
def _rotate_rows_kernel(x_ptr, x_st, x_sh, o_ptr, o_st, o_sh, center_ptr, num_rows,
                        BLOCK_ROT: tl.constexpr, CENTER: tl.constexpr, BLOCK: tl.constexpr, HALF: tl.constexpr):
    offs_t = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    head = tl.program_id(1)
    mask_t = offs_t < num_rows
    x_lo, x_hi = load_rotated_halves(x_ptr, offs_t, mask_t, x_st, head * x_sh, True, BLOCK_ROT, HALF)
    half = tl.arange(0, HALF)
    if CENTER:  # H (x - c) = H x - H c: the center arrives rotated
        c = center_ptr + head * (2 * HALF)
        x_lo = x_lo - tl.load(c + half)[None, :]
        x_hi = x_hi - tl.load(c + HALF + half)[None, :]
    out = o_ptr + offs_t[:, None].to(tl.int64) * o_st + head * o_sh
    out_ty = o_ptr.dtype.element_ty
    tl.store(out + half[None, :], x_lo.to(out_ty), mask=mask_t[:, None])
    tl.store(out + HALF + half[None, :], x_hi.to(out_ty), mask=mask_t[:, None])


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
    if layout.block_size is None:
        raise ValueError("rotate_rows needs a rotating layout (block_size set)")
    d = layout.head_dim
    if x.dim() != 3 or x.shape[-1] != d or x.stride(-1) != 1:
        raise ValueError(f"x must be [num_rows, num_heads, {d}] with unit channel stride, got {tuple(x.shape)}")
    num_rows, num_heads = x.shape[0], x.shape[1]
    check_center(stored_center, num_heads, d)
    out = torch.empty((num_rows, num_heads, d), dtype=x.dtype, device=x.device)
    if num_rows == 0:
        return out
    _rotate_rows_kernel[(triton.cdiv(num_rows, BLOCK_T), num_heads)](
        x, x.stride(0), x.stride(1), out, out.stride(0), out.stride(1),
        stored_center if stored_center is not None else out, num_rows,
        BLOCK_ROT=layout.block_size, CENTER=stored_center is not None, BLOCK=BLOCK_T, HALF=d // 2, num_warps=4,
    )
    return out


def to_stored_space(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: fmt.Int4Format,
                    stored_center: Optional[torch.Tensor] = None):
    """New tokens' attention inputs in the space a layer's pages are stored in.

    Args:
        q: [tokens, num_q_heads, head_dim]; k, v: [tokens, num_kv_heads, head_dim]
            (bf16/fp16/fp32, channel stride 1).
        stored_center: None, or the layer's key center in the stored space
            ([num_kv_heads, head_dim] float32, ``pool.key_center(layer, stored=True)``).
    Returns (q, k, v), contiguous, in their dtype: q and k rotated when keys are, k minus the
    center, v rotated when values are.  Attention over them and the pages read as stored
    (``dequantize_pages(..., unrotate=False)``) is attention in the original space: H is
    orthogonal, and a key center shifts every score of a query alike once the new keys
    carry it too.  Its output is rotated as V is (``from_stored_space``).
    """
    if layout.rotate_k:
        q, k = rotate_rows(q, layout), rotate_rows(k, layout, stored_center=stored_center)
    elif stored_center is not None:
        k = (k.float() - stored_center).to(k.dtype)
    if layout.rotate_v:
        v = rotate_rows(v, layout)
    return q.contiguous(), k.contiguous(), v.contiguous()


def from_stored_space(o: torch.Tensor, layout: fmt.Int4Format) -> torch.Tensor:
    """Attention output [tokens, num_q_heads, head_dim] over stored-space values, back in the
    original space: rotated again when V is (the normalized block Hadamard is its own
    inverse), else ``o`` itself."""
    return rotate_rows(o, layout) if layout.rotate_v else o
