"""Split an extend batch's cached prefixes into pieces that fit a fixed BF16 staging buffer.

The FlashInfer prefill path (``sglang_sawint4.flashinfer_prefill``) attends each request's
new tokens to its cached prefix by dequantizing the prefix's INT4 pages into a staging
buffer of ``max_rows`` rows and running FlashInfer on it.  A batch's prefixes, laid end to
end in request order (the order of SGLang's ``kv_indices``), are cut every ``max_rows``
rows; each cut is a *piece*: a contiguous range of prefix rows, the contiguous range of
requests it touches and those requests' contiguous query rows.  A request longer than
one piece spans several; its partial results are merged by their log-sum-exp.  So no
request mix needs more than ``max_rows`` staging rows, and the common batch (all
prefixes within ``max_rows``) is one piece.

Pure host-side arithmetic on the lengths SGLang keeps on the host; no tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Tuple


@dataclass(frozen=True)
class PrefixPiece:
    """One staging fill.

    Attributes:
        rows: (start, end) into the batch's concatenated prefix rows (``kv_indices``).
        reqs: (start, end) request range whose queries attend to this piece.
        q_rows: (start, end) rows of the batch's new tokens (the queries of ``reqs``).
        qo_indptr: [reqs + 1] query offsets, relative to ``q_rows[0]``.
        kv_indptr: [reqs + 1] staging-row offsets: request ``reqs[0] + i`` reads staging
            rows ``kv_indptr[i]:kv_indptr[i + 1]`` (possibly none).
    """

    rows: Tuple[int, int]
    reqs: Tuple[int, int]
    q_rows: Tuple[int, int]
    qo_indptr: Tuple[int, ...]
    kv_indptr: Tuple[int, ...]

    @property
    def num_rows(self) -> int:
        return self.rows[1] - self.rows[0]


def _offsets(lengths: Sequence[int]) -> List[int]:
    out = [0]
    for n in lengths:
        out.append(out[-1] + int(n))
    return out


def plan_prefix_pieces(prefix_lens: Sequence[int], extend_lens: Sequence[int], max_rows: int) -> List[PrefixPiece]:
    """Pieces covering every cached prefix row of a batch, each at most ``max_rows`` rows.

    Args:
        prefix_lens: [batch] cached prefix tokens per request (SGLang's extend_prefix_lens).
        extend_lens: [batch] new tokens per request (SGLang's extend_seq_lens).
        max_rows: staging rows available (> 0).
    Returns [] when no request has a prefix.
    """
    if max_rows <= 0:
        raise ValueError(f"max_rows must be positive, got {max_rows}")
    if len(prefix_lens) != len(extend_lens):
        raise ValueError(f"{len(prefix_lens)} prefix lengths but {len(extend_lens)} extend lengths")
    if any(int(n) < 0 for n in prefix_lens) or any(int(n) < 0 for n in extend_lens):
        raise ValueError("lengths must be non-negative")
    kv_off, q_off = _offsets(prefix_lens), _offsets(extend_lens)
    total = kv_off[-1]
    pieces = []
    first = 0  # first request that may still have rows at or after `start`
    for start in range(0, total, max_rows):
        end = min(start + max_rows, total)
        while kv_off[first + 1] <= start:  # requests wholly before this piece
            first += 1
        last = first
        while last + 1 < len(prefix_lens) and kv_off[last + 1] < end:
            last += 1
        reqs = range(first, last + 1)
        kv_lens = [max(0, min(kv_off[b + 1], end) - max(kv_off[b], start)) for b in reqs]
        q_start, q_end = q_off[first], q_off[last + 1]
        pieces.append(PrefixPiece(
            rows=(start, end), reqs=(first, last + 1), q_rows=(q_start, q_end),
            qo_indptr=tuple(q_off[b] - q_start for b in range(first, last + 2)),
            kv_indptr=tuple(_offsets(kv_lens)),
        ))
    return pieces
