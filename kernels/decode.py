"""Split-KV decode attention over INT4 pages (one query token per request).

Stage 1 (one program per request, KV head and split) attends the GQA group of
query heads of one KV head to a contiguous slice of the request's tokens:

* q is rotated in the prologue (q' = H q; H is generated in registers), because
  (Hq).(Hk) = q.k and rotating q once is cheaper than un-rotating every key;
* keys are never dequantized to a [N, D] float tile: with k = s * c + o,
  q'.k = s * (q'.c) + o * sum(q'), so the tensor cores multiply q' by the raw
  4-bit codes (exact in bf16/fp16) and the scale/offset are applied per token;
* values likewise: sum_n p_n (s_n c_n + o_n) = (p * s) @ c + (p . o);
* every product is computed transposed: scores as [tokens, query heads] = K q^T and the
  output as [channels, query heads] = V^T p, so tokens and channels sit on the tensor
  cores' M (16 rows) and the GQA group on N (8 columns).  Untransposed, a GQA group of 4
  would fill 4 of 16 rows and each thread would hold two copies of every score element;
* pages are read as 16-bit words (``format.packed_words``), which ``biased_code_quads``
  turns into four nibble planes (channels 2j, 2j + 1, H + 2j, H + 2j + 1, H = D / 2):
  Triton loads the words from shared memory straight into the tensor cores' operand
  registers with ldmatrix (keys as [tokens, words], values loaded as [words, tokens]
  with ldmatrix.trans), the unpack runs on those registers in place, and every dot runs
  per plane.  q is split into the same planes in the prologue and the output planes are
  interleaved back in the epilogue.  A value plane spans head_dim / 4 rows of M; where
  that is fewer than the warps' 16-row tiles (head_dim 64 at 2 warps) the warps would
  repeat each other's unpacking, and values are read as bytes (``biased_codes``);
* one warp per program at head_dim 64 and 128, two at 256 (``NUM_WARPS``), 64-token
  tiles.  Triton gives all dots of one loop the same warp layout (warps along M here);
  with one warp the softmax's maximum and the sums after the loop need no cross-warp
  reduction (nor its barriers), and no plane is narrower than the warps' 16-row tiles.  At
  head_dim 256 one warp would need more than 255 registers; two warps split each
  64-channel value plane exactly.  More, smaller programs fit on an SM (kernels/splits.py).
  For few requests, whose capped split counts leave SMs idle, ``default_tiling`` takes
  128-token tiles at 4 warps instead (values then as bytes);
* exp2, with sm_scale * log2(e) folded into the per-token score terms;
* sum(p) and the value offset term are accumulated per score element and reduced over
  tokens once after the loop, instead of a cross-warp reduction per tile;
* each tile's p @ c product starts from zero and is added to the running accumulator in
  registers (tl.fma, which Triton does not fold into the dot): the accumulators carry
  bias * sum(p * scale), far above the output when values have a near-zero mean, and
  accumulated across tiles inside the tensor cores (whose fp32 additions are not IEEE
  round-to-nearest) they drift with the split length; in registers the error stays at bf16
  rounding's (tests/test_kernels.py::test_decode_long_splits_stay_at_bf16_error);
* the codes reach the tensor cores as bias + c (bias 128 in bf16, 1024 in fp16: one
  bit operation per code, see ``biased_codes``); the bias is removed once per token
  through the offset terms, computed from the same rounded operands the tensor cores
  see, so it cancels exactly instead of costing a subtraction per element.

Stage 2 (one program per request and query head) merges the splits with their
log-sum-exp and, when V was stored rotated, applies H^T once to the result.
Buffers follow SGLang's Triton backend, so CUDA graphs can capture it.
"""

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from sglang_sawint4 import format as fmt
from sglang_sawint4.kernels.launch import check_layer_buffers, row_head_args, use_ptx
from sglang_sawint4.kernels.format_jit import (
    biased_code_quads,
    biased_codes,
    code_bias,
    hadamard_tile,
    load_meta,
    rotate_halves,
    rotation_norm,
)

# Stage-1 tiling: 64-token tiles, 3 stages, warps per head_dim (others: 2); the fastest of
# the tilings measured on an H200 (docs/results.md).
BLOCK_N = 64
NUM_WARPS = {64: 1, 128: 1, 256: 2}
NUM_STAGES = 3
# Stage-1 register cap per head_dim (PTX .maxnreg; sglang_sawint4.bench.kernel_report), none:
# one warp takes 167 registers at head_dim 64 and 238 at 128 (12 and 8 programs per SM; a cap
# of 128 would spill at head_dim 128), two warps at 256 take 210 (4 per SM).
# kernels/splits.py sizes splits by the programs per SM.
MAXNREG = {}
# Few (request, KV head) pairs, e.g. one long request: the split count is capped (SGLang's
# --triton-attention-num-kv-splits, default 8), so one-warp programs leave most of the GPU
# idle.  Up to LOW_PARALLELISM_PAIRS_PER_SM pairs per SM, stage 1 runs this head_dim's
# tiling instead (on an H200 at head_dim 128 it halves the time of one long request; from
# about one pair per SM one warp is faster).  Not measured at other head_dims.
LOW_PARALLELISM_PAIRS_PER_SM = 0.5
LOW_PARALLELISM_TILING = {128: (128, 4)}  # head_dim: (block_n, num_warps)
# Query-head columns per stage-1 program (the N of the score and output tiles): the GQA
# group rounded up to a power of two, at least MIN_BLOCK_H, the tensor cores' 8 columns
# (Triton pads narrower tiles itself).
MIN_BLOCK_H = 8
# Output columns handled per step of the V un-rotation in stage 2.
UNROTATE_CHUNK = 32


@triton.jit
def _interleave(even, odd):
    """[R, C] even and odd columns -> [R, 2C] (column 2j from even[:, j], 2j + 1 from odd[:, j])."""
    return tl.reshape(tl.join(even, odd), [even.shape[0], 2 * even.shape[1]])


@triton.jit
def _decode_stage1(
    q_ptr, stride_qb, stride_qh,
    kw_ptr, kw_st, kw_sh, km_ptr, km_st, km_sh,
    vd_ptr, vd_st, vd_sh, vm_ptr, vm_st, vm_sh,
    kv_indptr, kv_indices, num_kv_splits,
    logits_ptr, st_lb, st_lh, st_ls, lse_ptr, st_eb, st_eh,
    sm_scale,
    GROUP: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK: tl.constexpr,
    HALF: tl.constexpr, ROTATE_K: tl.constexpr, BLOCK_ROT: tl.constexpr, USE_PTX: tl.constexpr,
    V_WORDS: tl.constexpr,
):
    # KV head is the fastest grid axis: the programs of one token block's heads run
    # together and read the same token rows (kv_heads x 68 B at d=128) at about the
    # same time, instead of one 64-byte gather per head spread over the whole launch.
    kv_head = tl.program_id(0)
    b = tl.program_id(1)
    split = tl.program_id(2)

    kv_start = tl.load(kv_indptr + b)
    seq_len = tl.load(kv_indptr + b + 1) - kv_start
    n_splits = tl.load(num_kv_splits + b)
    per_split = tl.cdiv(seq_len, n_splits)
    split_start = per_split * split
    split_end = tl.minimum(split_start + per_split, seq_len)

    if split_end > split_start:
        QUART: tl.constexpr = HALF // 2
        offs_h = tl.arange(0, BLOCK_H)
        mask_h = offs_h < GROUP
        heads = kv_head * GROUP + offs_h
        half = tl.arange(0, HALF)
        quart = tl.arange(0, QUART)
        q_base = q_ptr + b * stride_qb + heads[:, None] * stride_qh
        q_lo = tl.load(q_base + half[None, :], mask=mask_h[:, None], other=0.0)
        q_hi = tl.load(q_base + HALF + half[None, :], mask=mask_h[:, None], other=0.0)
        if ROTATE_K:
            q_lo, q_hi = rotate_halves(q_lo, q_hi, HALF, BLOCK_ROT)
        else:
            q_lo, q_hi = q_lo.to(tl.float32), q_hi.to(tl.float32)
        dot_dtype = q_ptr.dtype.element_ty
        bias = code_bias(dot_dtype)
        q_lo_c = q_lo.to(dot_dtype)
        q_hi_c = q_hi.to(dot_dtype)
        # sum of the rounded q the tensor cores multiply: the key bias cancels exactly
        q_sum = tl.sum(q_lo_c.to(tl.float32), axis=1) + tl.sum(q_hi_c.to(tl.float32), axis=1)
        # q in the key planes' channel order (biased_code_quads), as [channels / 4, heads]
        # operands of the transposed score product
        q_even, q_odd = tl.split(tl.reshape(q_lo_c, [BLOCK_H, QUART, 2]))
        q_high_even, q_high_odd = tl.split(tl.reshape(q_hi_c, [BLOCK_H, QUART, 2]))
        q_even_t, q_odd_t = tl.trans(q_even), tl.trans(q_odd)
        q_high_even_t, q_high_odd_t = tl.trans(q_high_even), tl.trans(q_high_odd)
        # scores in the log2 domain: exp2 needs no multiply per element
        LOG2E: tl.constexpr = 1.4426950408889634
        qk_scale = sm_scale * LOG2E

        m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
        # output accumulators [channels, heads]; sum(p) and the V offset term per [token, head]
        if V_WORDS:
            acc_even = tl.zeros([QUART, BLOCK_H], dtype=tl.float32)
            acc_odd = tl.zeros([QUART, BLOCK_H], dtype=tl.float32)
            acc_high_even = tl.zeros([QUART, BLOCK_H], dtype=tl.float32)
            acc_high_odd = tl.zeros([QUART, BLOCK_H], dtype=tl.float32)
        else:
            acc_lo = tl.zeros([HALF, BLOCK_H], dtype=tl.float32)
            acc_hi = tl.zeros([HALF, BLOCK_H], dtype=tl.float32)
        off_cols = tl.zeros([BLOCK, BLOCK_H], dtype=tl.float32)
        l_cols = tl.zeros([BLOCK, BLOCK_H], dtype=tl.float32)

        for start in range(split_start, split_end, BLOCK):
            offs_n = start + tl.arange(0, BLOCK)
            mask_n = offs_n < split_end
            loc = tl.load(kv_indices + kv_start + offs_n, mask=mask_n, other=0).to(tl.int64)

            kw = tl.load(kw_ptr + loc[:, None] * kw_st + kv_head * kw_sh + quart[None, :],
                         mask=mask_n[:, None], other=0)
            k_scale, k_off = load_meta(km_ptr + loc * km_st + kv_head * km_sh, mask_n)
            k_even, k_odd, k_high_even, k_high_odd = biased_code_quads(kw, dot_dtype, USE_PTX)
            qc = tl.dot(k_even, q_even_t, out_dtype=tl.float32)
            qc += tl.dot(k_odd, q_odd_t, out_dtype=tl.float32)
            qc += tl.dot(k_high_even, q_high_even_t, out_dtype=tl.float32)
            qc += tl.dot(k_high_odd, q_high_odd_t, out_dtype=tl.float32)
            # q.(s (c + bias) + o - bias s) = s q.(c + bias) + (o - bias s) sum(q), per token
            k_mul = k_scale * qk_scale
            k_add = (k_off - bias * k_scale) * qk_scale
            s = qc * k_mul[:, None] + k_add[:, None] * q_sum[None, :]
            s = tl.where(mask_n[:, None], s, float("-inf"))

            m_new = tl.maximum(m_i, tl.max(s, axis=0))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[None, :])

            # value data are loaded before the value meta, and both before the unpack: with the
            # meta first, head_dim 64 took 7-9% longer on an H200, hence two branches on
            # V_WORDS here, not one
            if V_WORDS:
                # loaded as [words, tokens], the operand's own shape: Triton then fills the
                # operand registers with ldmatrix.trans and the unpack runs on them in place
                # (loaded as [tokens, words] and transposed after the unpack, the unpacked
                # planes made a round trip through shared memory)
                vw = tl.load(vd_ptr + loc[None, :] * vd_st + kv_head * vd_sh + quart[:, None],
                             mask=mask_n[None, :], other=0)
            else:
                vp = tl.load(vd_ptr + loc[:, None] * vd_st + kv_head * vd_sh + half[None, :],
                             mask=mask_n[:, None], other=0)
            v_scale, v_off = load_meta(vm_ptr + loc * vm_st + kv_head * vm_sh, mask_n)
            ps = (p * v_scale[:, None]).to(dot_dtype)
            if V_WORDS:
                v_even, v_odd, v_high_even, v_high_odd = biased_code_quads(vw, dot_dtype, USE_PTX)
                acc_even = tl.fma(acc_even, alpha[None, :], tl.dot(v_even, ps, out_dtype=tl.float32))
                acc_odd = tl.fma(acc_odd, alpha[None, :], tl.dot(v_odd, ps, out_dtype=tl.float32))
                acc_high_even = tl.fma(acc_high_even, alpha[None, :], tl.dot(v_high_even, ps, out_dtype=tl.float32))
                acc_high_odd = tl.fma(acc_high_odd, alpha[None, :], tl.dot(v_high_odd, ps, out_dtype=tl.float32))
            else:
                # unpacked as loaded, then moved to the operand layout (see biased_codes)
                v_lo, v_hi = biased_codes(vp, dot_dtype, USE_PTX, KEEP_LAYOUT=True)
                acc_lo = tl.fma(acc_lo, alpha[None, :], tl.dot(tl.trans(v_lo), ps, out_dtype=tl.float32))
                acc_hi = tl.fma(acc_hi, alpha[None, :], tl.dot(tl.trans(v_hi), ps, out_dtype=tl.float32))
            # sum_n ps_n (c_n + bias) - bias sum_n ps_n, with the rounded ps of the dot
            off_cols = off_cols * alpha[None, :] + p * v_off[:, None] - bias * ps.to(tl.float32)
            l_cols = l_cols * alpha[None, :] + p
            m_i = m_new
        acc_off = tl.sum(off_cols, axis=0)
        l_i = tl.sum(l_cols, axis=0)
        if V_WORDS:
            acc_lo = _interleave(tl.trans(acc_even), tl.trans(acc_odd))
            acc_hi = _interleave(tl.trans(acc_high_even), tl.trans(acc_high_odd))
        else:
            acc_lo = tl.trans(acc_lo)
            acc_hi = tl.trans(acc_hi)

        out_base = logits_ptr + b * st_lb + heads[:, None] * st_lh + split * st_ls
        tl.store(out_base + half[None, :], (acc_lo + acc_off[:, None]) / l_i[:, None], mask=mask_h[:, None])
        tl.store(out_base + HALF + half[None, :], (acc_hi + acc_off[:, None]) / l_i[:, None], mask=mask_h[:, None])
        tl.store(lse_ptr + b * st_eb + heads * st_eh + split, m_i / LOG2E + tl.log(l_i), mask=mask_h)


@triton.jit
def _decode_stage2(
    logits_ptr, st_lb, st_lh, st_ls, lse_ptr, st_eb, st_eh,
    kv_indptr, num_kv_splits, o_ptr, stride_ob, stride_oh, final_lse_ptr,
    D: tl.constexpr, ROTATE_V: tl.constexpr, BLOCK_ROT: tl.constexpr,
    CHUNK: tl.constexpr, WRITE_LSE: tl.constexpr,
):
    b = tl.program_id(0)
    head = tl.program_id(1)
    num_heads = tl.num_programs(1)
    seq_len = tl.load(kv_indptr + b + 1) - tl.load(kv_indptr + b)
    n_splits = tl.load(num_kv_splits + b)
    per_split = tl.cdiv(seq_len, n_splits)
    offs_d = tl.arange(0, D)

    e_max = float("-inf")
    e_sum = 0.0
    acc = tl.zeros([D], dtype=tl.float32)
    for split in range(0, n_splits):
        if per_split * split < seq_len:
            part = tl.load(logits_ptr + b * st_lb + head * st_lh + split * st_ls + offs_d)
            lse = tl.load(lse_ptr + b * st_eb + head * st_eh + split)
            n_max = tl.maximum(lse, e_max)
            old = tl.exp(e_max - n_max)
            w = tl.exp(lse - n_max)
            acc = acc * old + w * part
            e_sum = e_sum * old + w
            e_max = n_max
    # An empty request (seq_len 0) has no keys: output zeros.  Keyed on the length, not
    # on e_sum, so a NaN from corrupted pages still reaches the output instead of a zero.
    out = tl.where(seq_len > 0, acc / e_sum, 0.0)
    o_base = o_ptr + b * stride_ob + head * stride_oh
    if ROTATE_V:
        inv = rotation_norm(BLOCK_ROT)
        for c in tl.static_range(D // CHUNK):
            cols = c * CHUNK + tl.arange(0, CHUNK)
            sign = hadamard_tile(offs_d, cols, BLOCK_ROT).to(tl.float32)
            col = tl.sum(out[:, None] * sign, axis=0) * inv
            tl.store(o_base + cols, col.to(o_ptr.dtype.element_ty))
    else:
        tl.store(o_base + offs_d, out.to(o_ptr.dtype.element_ty))
    if WRITE_LSE:
        tl.store(final_lse_ptr + b * num_heads + head, e_max + tl.log(e_sum))


def int4_decode_attention(
    q: torch.Tensor,
    k_data: torch.Tensor,
    k_meta: torch.Tensor,
    v_data: torch.Tensor,
    v_meta: torch.Tensor,
    o: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    attn_logits: torch.Tensor,
    attn_lse: torch.Tensor,
    num_kv_splits: torch.Tensor,
    max_kv_splits: int,
    sm_scale: float,
    layout: fmt.Int4Format,
    lse_out: Optional[torch.Tensor] = None,
    block_n: Optional[int] = None,
    num_warps: Optional[int] = None,
    num_stages: int = NUM_STAGES,
    maxnreg: Optional[int] = -1,
    block_h: Optional[int] = None,
) -> torch.Tensor:
    """Decode attention of one query token per request over INT4 KV pages.

    Args:
        q: [batch, num_q_heads, head_dim] bf16/fp16/fp32 (unrotated).
        k_data, v_data: [num_slots, num_kv_heads, head_dim // 2] uint8.
        k_meta, v_meta: [num_slots, num_kv_heads, 2] float16.
        o: [batch, num_q_heads, head_dim] output, written in the original space.
        kv_indptr: [batch + 1] int32, request b owns kv_indices[indptr[b]:indptr[b+1]].
        kv_indices: [>= indptr[-1]] int32/int64 slot ids.
        attn_logits: [>= batch, num_q_heads, max_kv_splits, head_dim] float32 scratch.
        attn_lse: [>= batch, num_q_heads, max_kv_splits] float32 scratch.
        num_kv_splits: [>= batch] int32, splits used per request (1..max_kv_splits).
        lse_out: optional [batch, num_q_heads] float32, the natural-log LSE of the
            scaled scores (for merging with another partial attention).
        block_n, num_warps, num_stages: stage-1 tiling (tokens per iteration, ...);
            block_n / num_warps None: ``default_tiling``'s for this launch.
        maxnreg: stage-1 register cap per thread (PTX ``.maxnreg``), which sets how many
            programs share an SM; -1: ``MAXNREG``'s for this head_dim, None: no cap.
        block_h: query-head columns per stage-1 program, a power of two >= the GQA group
            (None: ``default_block_h``).
    Returns o.  No host synchronization: CUDA-graph safe.
    """
    if q.dim() != 3 or o.shape != q.shape:
        raise ValueError(f"q and o must both be [batch, heads, head_dim]; got {tuple(q.shape)}, {tuple(o.shape)}")
    batch, num_q_heads, d = q.shape
    if d != layout.head_dim:
        raise ValueError(f"q head_dim {d} != format head_dim {layout.head_dim}")
    num_kv_heads = k_data.shape[1]
    check_layer_buffers(k_data, k_meta, num_kv_heads, d, "k")
    check_layer_buffers(v_data, v_meta, num_kv_heads, d, "v")
    if num_q_heads % num_kv_heads:
        raise ValueError(f"num_q_heads {num_q_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    if attn_logits.dtype != torch.float32 or attn_logits.shape[1:] != (num_q_heads, max_kv_splits, d):
        raise ValueError(f"attn_logits must be [>=batch, {num_q_heads}, {max_kv_splits}, {d}] float32")
    if q.stride(-1) != 1 or o.stride(-1) != 1:
        raise ValueError("q and o must be contiguous in the last axis")
    if batch == 0:
        return o
    if maxnreg == -1:
        maxnreg = MAXNREG.get(d)
    if block_n is None or num_warps is None:
        auto_block_n, auto_warps = default_tiling(d, batch * num_kv_heads, q.device)
        block_n = auto_block_n if block_n is None else block_n
        num_warps = auto_warps if num_warps is None else num_warps
    group = num_q_heads // num_kv_heads
    if block_h is None:
        block_h = default_block_h(group)
    elif block_h < group or block_h & (block_h - 1):
        raise ValueError(f"block_h {block_h} must be a power of two >= the GQA group {group}")
    # (scale, offset) fp16 pairs are read as one 32-bit word per token (load_meta)
    km32, vm32 = meta_words(k_meta), meta_words(v_meta)
    v_words = value_words(d, num_warps)
    _decode_stage1[(num_kv_heads, batch, max_kv_splits)](
        *row_head_args(q, fmt.packed_words(k_data), km32, fmt.packed_words(v_data) if v_words else v_data, vm32),
        kv_indptr, kv_indices, num_kv_splits,
        attn_logits, attn_logits.stride(0), attn_logits.stride(1), attn_logits.stride(2),
        attn_lse, attn_lse.stride(0), attn_lse.stride(1),
        sm_scale,
        GROUP=group, BLOCK_H=block_h, BLOCK=block_n, HALF=d // 2,
        ROTATE_K=layout.rotate_k, BLOCK_ROT=layout.block_size or 1,
        USE_PTX=use_ptx(_decode_stage1, q.device), V_WORDS=v_words,
        num_warps=num_warps, num_stages=num_stages, maxnreg=maxnreg,
    )
    _decode_stage2[(batch, num_q_heads)](
        attn_logits, attn_logits.stride(0), attn_logits.stride(1), attn_logits.stride(2),
        attn_lse, attn_lse.stride(0), attn_lse.stride(1),
        kv_indptr, num_kv_splits, o, o.stride(0), o.stride(1),
        lse_out if lse_out is not None else attn_lse,
        D=d, ROTATE_V=layout.rotate_v, BLOCK_ROT=layout.block_size or 1,
        CHUNK=min(UNROTATE_CHUNK, d), WRITE_LSE=lse_out is not None,
        num_warps=4,
    )
    return o


def default_block_h(group: int) -> int:
    """Stage-1 query-head columns for a GQA group of ``group`` query heads per KV head."""
    return max(MIN_BLOCK_H, triton.next_power_of_2(group))


def default_num_warps(head_dim: int) -> int:
    """Stage-1 warps per program for head_dim (``NUM_WARPS``, else 2)."""
    return NUM_WARPS.get(head_dim, 2)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def default_tiling(head_dim: int, pairs: int, device: torch.device) -> tuple:
    """(block_n, num_warps) of stage 1 for ``pairs`` (request, KV head) pairs on ``device``:
    ``LOW_PARALLELISM_TILING`` when they are at most ``LOW_PARALLELISM_PAIRS_PER_SM`` per SM
    (CUDA devices), else ``BLOCK_N`` and ``default_num_warps``.  Host-side and fixed per
    batch size, so each captured CUDA graph keeps one tiling."""
    low = LOW_PARALLELISM_TILING.get(head_dim)
    if low is not None and device.type == "cuda" and pairs <= LOW_PARALLELISM_PAIRS_PER_SM * _sm_count(device):
        return low
    return BLOCK_N, default_num_warps(head_dim)


def value_words(head_dim: int, num_warps: int) -> bool:
    """Whether stage 1 reads values as 16-bit words (four planes of head_dim / 4 channels).

    Only when a plane spans every warp's 16-row tensor-core tile (planes are the M of the
    transposed output product): narrower planes (head_dim 64 at 2 warps) would make warps
    repeat each other's unpacking, and values are read as bytes.
    """
    return head_dim // 4 >= 16 * num_warps


def meta_words(meta: torch.Tensor) -> torch.Tensor:
    """[slots, heads, 2] float16 -> [slots, heads] int32 view (scale | offset << 16)."""
    if meta.stride(-1) != 1 or meta.stride(-2) != 2:
        raise ValueError("meta must be contiguous in its last two axes")
    return meta.view(torch.int32).squeeze(-1)


def decode_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    sm_scale: float,
) -> torch.Tensor:
    """Float64 decode attention over dense K/V rows (any dtype), GQA aware.

    q: [batch, num_q_heads, D]; k, v: [num_slots, num_kv_heads, D].
    Returns [batch, num_q_heads, D] float64.
    """
    batch, hq, d = q.shape
    hk = k.shape[1]
    out = torch.zeros((batch, hq, d), dtype=torch.float64)
    for b in range(batch):
        idx = kv_indices[kv_indptr[b]: kv_indptr[b + 1]].long().cpu()
        if idx.numel() == 0:
            continue
        kb = k[idx].double().cpu().repeat_interleave(hq // hk, dim=1)  # [n, hq, d]
        vb = v[idx].double().cpu().repeat_interleave(hq // hk, dim=1)
        s = torch.einsum("hd,nhd->hn", q[b].double().cpu(), kb) * sm_scale
        p = torch.softmax(s, dim=-1)
        out[b] = torch.einsum("hn,nhd->hd", p, vb)
    return out


def int4_decode_attention_reference(q, k_data, k_meta, v_data, v_meta, kv_indptr, kv_indices,
                                    sm_scale: float, layout: fmt.Int4Format) -> torch.Tensor:
    """Float64 reference of :func:`int4_decode_attention`: decode the stored pages, attend."""
    k = fmt.decode(k_data.cpu(), k_meta.cpu(), layout, is_value=False)
    v = fmt.decode(v_data.cpu(), v_meta.cpu(), layout, is_value=True)
    return decode_attention_reference(q, k, v, kv_indptr.cpu(), kv_indices.cpu(), sm_scale)
