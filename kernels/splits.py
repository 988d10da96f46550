"""Split counts for :func:`int4_decode_attention`: how many KV splits each request gets.

SGLang's Triton backend sizes splits for its own decode kernel (its
``get_num_kv_splits``: a token grid against ``SMs x log2(max_len / 64)``).  For
ours that overshoots: stage 1 holds ``RESIDENT_PROGRAMS_PER_SM`` programs per SM at
once, and a launch of (batch x KV heads x splits) programs runs best when they all fit
in one such wave.  At batch 32 x 8k (32 q / 8 KV heads, head_dim 128, 132 SMs) this gives
4 splits (1,024 programs, one wave of 1,056), where SGLang's rule gives 2 and the launch
leaves half of the SMs' program slots empty.

The rule, per decode step (device-side, so CUDA graphs capture it):

* fill: ``resident // (batch x KV heads)`` splits (at least 1), so the launch fills
  the SMs once; no split shorter than ``MIN_SPLIT_TOKENS``;
* balance (SGLang's, kept): when request lengths differ by more than 25%, a request
  gets about ``len / shortest`` splits, so one long request does not run alone;
* each request takes the larger of the two, at most ``max_kv_splits``.
"""

import torch
import triton
import triton.language as tl

# Stage-1 programs an SM holds at once, per head_dim: 65,536 registers / (registers per
# thread x threads per program), within the shared memory (sglang_sawint4.bench.kernel_report
# at decode.NUM_WARPS: 1 warp and 167 registers at head_dim 64, 1 warp and 238 at 128, 2 warps
# and 210 at 256; 6-37 KB of shared memory).  Other head_dims: 2.
RESIDENT_PROGRAMS_PER_SM = {64: 12, 128: 8, 256: 4}
# Fewest tokens a split is given (four 64-token tiles): shorter splits cost more in
# stage 2 and per-program set-up than they add in parallelism.
MIN_SPLIT_TOKENS = 256
# Requests per launch of the split kernel's single program (powers of two above this
# recompile; SGLang's own split kernel uses the same floor).
_MIN_SCHEDULE = 256


def resident_programs(head_dim: int, sm_count: int) -> int:
    """Stage-1 programs the whole GPU holds at once."""
    return RESIDENT_PROGRAMS_PER_SM.get(head_dim, 2) * sm_count


@triton.jit
def _num_kv_splits_kernel(
    num_kv_splits_ptr, seq_lens_ptr, num_seq, num_group, num_kv_heads, max_kv_splits, resident,
    MIN_SPLIT: tl.constexpr, MAX_NUM_SEQ: tl.constexpr,
):
    offs = tl.arange(0, MAX_NUM_SEQ)
    mask = offs < num_seq
    lens = tl.load(seq_lens_ptr + offs, mask=mask, other=0)
    max_len = tl.maximum(tl.max(lens), 1)
    min_len = tl.maximum(tl.min(tl.where(mask, lens, max_len)), 1)
    if max_len * 8 < min_len * 10:  # within 25%: one length for all (SGLang's rule)
        min_len = max_len
    balance = tl.minimum(tl.cdiv(max_len, min_len), max_kv_splits)
    chunk_balance = tl.cdiv(max_len, balance)
    fill = resident // (num_seq * num_group * num_kv_heads)
    fill = tl.minimum(tl.minimum(fill, max_kv_splits), tl.cdiv(max_len, MIN_SPLIT))
    fill = tl.maximum(fill, 1)
    chunk_fill = tl.cdiv(max_len, fill)
    splits = tl.maximum(tl.cdiv(lens, chunk_balance), tl.cdiv(lens, chunk_fill))
    splits = tl.minimum(tl.maximum(splits, 1), max_kv_splits)
    # one entry per (request, group) query token, as SGLang lays num_kv_splits out
    for g in range(0, num_group):
        tl.store(num_kv_splits_ptr + offs * num_group + g, splits.to(tl.int32), mask=mask)


def int4_num_kv_splits(num_kv_splits: torch.Tensor, seq_lens: torch.Tensor, num_kv_heads: int,
                       max_kv_splits: int, head_dim: int, sm_count: int) -> torch.Tensor:
    """Fill num_kv_splits for a decode step of :func:`int4_decode_attention`.

    Args:
        num_kv_splits: [num_seq * num_group] int32, written (num_group > 1 only for
            SGLang's speculative layouts: each request's entry repeated).
        seq_lens: [num_seq] int32/int64 KV lengths.
        num_kv_heads: KV heads of this rank (stage 1 runs one program per KV head).
        max_kv_splits: the scratch's split capacity (SGLang's --triton-attention-num-kv-splits).
        head_dim, sm_count: what sets how many stage-1 programs run at once.
    Returns num_kv_splits.  One program, no host synchronization: CUDA-graph safe.
    """
    num_seq = seq_lens.shape[0]
    if num_seq == 0:
        return num_kv_splits
    num_group = num_kv_splits.shape[0] // num_seq
    if num_group * num_seq != num_kv_splits.shape[0]:
        raise ValueError(f"num_kv_splits has {num_kv_splits.shape[0]} entries, not a multiple of "
                         f"{num_seq} requests")
    if num_kv_splits.dtype != torch.int32:
        raise ValueError(f"num_kv_splits must be int32, got {num_kv_splits.dtype}")
    if max_kv_splits < 1 or num_kv_heads < 1:
        raise ValueError(f"max_kv_splits ({max_kv_splits}) and num_kv_heads ({num_kv_heads}) must be >= 1")
    _num_kv_splits_kernel[(1,)](
        num_kv_splits, seq_lens, num_seq, num_group, num_kv_heads, max_kv_splits,
        resident_programs(head_dim, sm_count),
        MIN_SPLIT=MIN_SPLIT_TOKENS, MAX_NUM_SEQ=max(_MIN_SCHEDULE, triton.next_power_of_2(num_seq)),
    )
    return num_kv_splits


def num_kv_splits_reference(seq_lens, num_kv_heads: int, max_kv_splits: int, head_dim: int,
                            sm_count: int, num_group: int = 1) -> list:
    """Plain-Python statement of :func:`int4_num_kv_splits` (a list of ints, one per entry)."""
    lens = [int(n) for n in seq_lens]
    max_len = max(max(lens), 1)
    min_len = max(min(lens), 1)
    if max_len * 8 < min_len * 10:
        min_len = max_len
    balance = min(-(-max_len // min_len), max_kv_splits)
    chunk_balance = -(-max_len // balance)
    fill = resident_programs(head_dim, sm_count) // (len(lens) * num_group * num_kv_heads)
    fill = max(min(fill, max_kv_splits, -(-max_len // MIN_SPLIT_TOKENS)), 1)
    chunk_fill = -(-max_len // fill)
    out = []
    for n in lens:
        s = min(max(-(-n // chunk_balance), -(-n // chunk_fill), 1), max_kv_splits)
        out += [s] * num_group
    return out
