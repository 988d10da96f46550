"""Stage an extend batch's cached prefixes, each distinct slot once, in pieces that fit a
fixed BF16 staging buffer.

The FlashInfer prefill path (``sglang_sawint4.flashinfer_prefill``) attends each request's
new tokens to its cached prefix by dequantizing the prefix's INT4 slots into a staging
buffer of ``max_rows`` rows and running FlashInfer's paged prefill over it (page size 1:
a request's pages are staging rows).  Requests that share a radix-cache prefix share its
slots, so when a batch's prefix rows exceed the buffer each slot is staged once however many
requests read it: 32 requests over one 8k-token prefix stage 8k rows, not 256k.  (A batch
whose rows fit is staged row by row: no wait for the device to count distinct slots.)

The batch's distinct slots, in the order of their first use (request after request, as
SGLang's ``kv_indices`` lists them), are cut every ``max_rows``; each cut is a *piece*.  A
request's rows that fall in a piece are its pages for that piece (a prefix longer than a
piece spans several; its partial results are merged by their log-sum-exp).  So no request
mix needs more than ``max_rows`` staging rows, and the common batch is one piece.  With
first-use order a request's rows in a piece are the ones it shares with earlier requests
or its own next rows, so the requests a piece touches are mostly consecutive.  A one-piece
batch whose new tokens fit after its staged rows runs as one causal paged call over both
(:func:`combine_with_new_rows`: each request's pages are its prefix rows, then its own new
tokens' rows).

:func:`plan_prefix_pieces` does the device-side bookkeeping (past ``max_rows`` prefix rows
one ``torch.unique`` and, past one piece, a small host copy of per-piece counts) and the
host-side planning; it runs on any device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch


@dataclass(frozen=True)
class PrefixPiece:
    """One staging fill.

    Attributes:
        stage: (start, end) into the plan's ``stage_slots``: the slots dequantized into
            staging rows 0 .. end - start.
        pages: (start, end) into the plan's ``pages``: the piece's page list.
        reqs: (start, end) request range whose queries attend to this piece.
        q_rows: (start, end) rows of the batch's new tokens (the queries of ``reqs``).
        qo_indptr: [reqs + 1] query offsets, relative to ``q_rows[0]``.
        kv_indptr: [reqs + 1] page offsets relative to ``pages[0]``: request ``reqs[0] + i``
            reads the staging rows ``pages[pages[0] + kv_indptr[i] : pages[0] + kv_indptr[i + 1]]``
            (possibly none).
    """

    stage: Tuple[int, int]
    pages: Tuple[int, int]
    reqs: Tuple[int, int]
    q_rows: Tuple[int, int]
    qo_indptr: Tuple[int, ...]
    kv_indptr: Tuple[int, ...]

    @property
    def num_rows(self) -> int:
        """Staging rows this piece fills."""
        return self.stage[1] - self.stage[0]


@dataclass(frozen=True)
class PrefixPlan:
    """The batch's pieces and the device arrays they index.

    Attributes:
        pieces: in order; empty when no request has a cached prefix.
        stage_slots: [distinct prefix slots] int32, in first-use order.
        pages: [prefix rows] int32 staging row (within its piece) of every prefix row, grouped
            by piece, then by request, then in position order.
    """

    pieces: List[PrefixPiece]
    stage_slots: torch.Tensor
    pages: torch.Tensor


def offsets(lengths: Sequence[int]) -> List[int]:
    """[0, l0, l0 + l1, ...]: the indptr of a list of lengths."""
    out = [0]
    for n in lengths:
        out.append(out[-1] + int(n))
    return out


def _check_lengths(prefix_lens: Sequence[int], extend_lens: Sequence[int], max_rows: int) -> None:
    if max_rows <= 0:
        raise ValueError(f"max_rows must be positive, got {max_rows}")
    if len(prefix_lens) != len(extend_lens):
        raise ValueError(f"{len(prefix_lens)} prefix lengths but {len(extend_lens)} extend lengths")
    if any(int(n) < 0 for n in prefix_lens) or any(int(n) < 0 for n in extend_lens):
        raise ValueError("lengths must be non-negative")


def pieces_from_counts(counts: Sequence[Sequence[int]], extend_lens: Sequence[int], num_slots: int,
                       max_rows: int) -> List[PrefixPiece]:
    """Host-side planning.

    Args:
        counts: [pieces][batch] prefix rows of each request whose slot falls in each piece.
        extend_lens: [batch] new tokens per request.
        num_slots: distinct prefix slots of the batch; piece k stages those ranked
            k * max_rows .. (k + 1) * max_rows - 1 in first-use order.
    """
    q_off = offsets(extend_lens)
    pieces, page_start = [], 0
    for k, row in enumerate(counts):
        touched = [b for b, n in enumerate(row) if n]
        if not touched:
            continue
        first, last = touched[0], touched[-1] + 1
        kv_indptr = tuple(offsets(row[first:last]))
        q_start, q_end = q_off[first], q_off[last]
        pieces.append(PrefixPiece(
            stage=(k * max_rows, min((k + 1) * max_rows, num_slots)),
            pages=(page_start, page_start + kv_indptr[-1]),
            reqs=(first, last), q_rows=(q_start, q_end),
            qo_indptr=tuple(q_off[b] - q_start for b in range(first, last + 1)),
            kv_indptr=kv_indptr,
        ))
        page_start += kv_indptr[-1]
    return pieces


def host_to_device(values, device, dtype=torch.int64) -> torch.Tensor:
    """``torch.tensor(values)`` on ``device`` without waiting for it: a blocking copy from
    host memory (``torch.tensor(values, device=cuda)``) first waits for every kernel queued
    on the stream, which a plan made while the GPU runs the previous batch must not do.  On
    CUDA the values go through pinned memory and an asynchronous copy (PyTorch keeps that
    memory until the copy has run)."""
    if torch.device(device).type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


def plan_prefix_pieces(kv_indices: torch.Tensor, prefix_lens: Sequence[int], extend_lens: Sequence[int],
                       max_rows: int) -> PrefixPlan:
    """Pieces covering every cached prefix row of a batch, each staging at most ``max_rows``
    distinct slots.

    Args:
        kv_indices: [sum(prefix_lens)] slot ids of the prefixes, request after request.
        prefix_lens: [batch] cached prefix tokens per request (SGLang's extend_prefix_lens).
        extend_lens: [batch] new tokens per request (SGLang's extend_seq_lens).
        max_rows: staging rows available (> 0).
    A batch whose prefix rows fit ``max_rows`` is staged row by row, without waiting for the
    device; a larger one waits for its distinct-slot count (``torch.unique``) and, past one
    piece, for the per-piece counts.
    """
    _check_lengths(prefix_lens, extend_lens, max_rows)
    total = sum(int(n) for n in prefix_lens)
    device = kv_indices.device
    if kv_indices.numel() < total:
        raise ValueError(f"{kv_indices.numel()} prefix slot ids for {total} prefix rows")
    if total == 0:
        empty = torch.empty(0, dtype=torch.int32, device=device)
        return PrefixPlan([], empty, empty)
    slots = kv_indices[:total]
    if total <= max_rows:  # every row fits: staged as they come, without waiting for the device
        pieces = pieces_from_counts([list(prefix_lens)], extend_lens, total, max_rows)
        return PrefixPlan(pieces, slots.to(torch.int32), torch.arange(total, dtype=torch.int32, device=device))
    distinct, inverse = torch.unique(slots, return_inverse=True)
    num_slots = distinct.numel()
    rows = torch.arange(total, device=device)
    first_use = torch.full((num_slots,), total, dtype=torch.int64, device=device)
    first_use.scatter_reduce_(0, inverse, rows, reduce="amin")
    order = torch.argsort(first_use)  # distinct slots by first use
    rank_of = torch.empty_like(order)
    rank_of[order] = torch.arange(num_slots, device=device)
    rank = rank_of[inverse]  # [total] first-use rank of each row's slot
    stage_slots = distinct[order].to(torch.int32)
    if num_slots <= max_rows:  # one piece: every request reads all its rows from it
        pieces = pieces_from_counts([list(prefix_lens)], extend_lens, num_slots, max_rows)
        return PrefixPlan(pieces, stage_slots, rank.to(torch.int32))
    piece = rank // max_rows
    num_pieces = -(-num_slots // max_rows)
    bs = len(prefix_lens)
    request = torch.repeat_interleave(torch.arange(bs, device=device),
                                      host_to_device([int(n) for n in prefix_lens], device), output_size=total)
    counts = torch.zeros(num_pieces * bs, dtype=torch.int64, device=device)
    counts.index_add_(0, piece * bs + request, torch.ones_like(piece))
    # group rows by piece, keeping request and position order
    in_piece = (rank - piece * max_rows)[torch.sort(piece, stable=True).indices]
    pieces = pieces_from_counts(counts.view(num_pieces, bs).tolist(), extend_lens, num_slots, max_rows)
    return PrefixPlan(pieces, stage_slots, in_piece.to(torch.int32))


@dataclass(frozen=True)
class CombinedPages:
    """A one-piece batch whose new tokens' K/V fit in the staging rows after its prefix:
    each request attends to its prefix and its own new tokens in one causal paged call.

    Attributes:
        new_row_base: staging row of the batch's first new token (the prefix's distinct
            slots fill rows 0 .. new_row_base - 1); new token j is row new_row_base + j.
        qo_indptr: [batch + 1] query offsets (the new tokens, request after request).
        kv_indptr: [batch + 1] page offsets: request b reads ``pages[kv_indptr[b]:kv_indptr[b + 1]]``.
        pages: [prefix rows + new tokens] int32 staging rows: per request its prefix
            rows in position order, then its new tokens' rows (causal alignment at the end).
    """

    new_row_base: int
    qo_indptr: Tuple[int, ...]
    kv_indptr: Tuple[int, ...]
    pages: torch.Tensor


def combine_with_new_rows(plan: PrefixPlan, prefix_lens: Sequence[int], extend_lens: Sequence[int],
                          max_rows: int):
    """The batch as one causal paged prefill over its staged prefix and new tokens, or None.

    None when the plan has more than one piece, or its staged rows and the new tokens
    together exceed ``max_rows`` (the batch then runs piece by piece, merged with the new
    tokens' own attention).  No wait for the device: the pages are put together there.
    """
    _check_lengths(prefix_lens, extend_lens, max_rows)
    if len(plan.pieces) != 1:
        return None
    base, n_new = plan.pieces[0].num_rows, sum(int(n) for n in extend_lens)
    if base + n_new > max_rows:
        return None
    q_off, kv_off = offsets(extend_lens), offsets(prefix_lens)
    total = kv_off[-1]
    if plan.pages.numel() != total:
        raise ValueError(f"a plan of {plan.pages.numel()} prefix pages for {total} prefix rows")
    # source row of each combined entry: request b's prefix pages are entries kv_off[b].. of
    # plan.pages (shifted by the new rows before them), its new rows entries total + q_off[b]..
    shift, lengths = [], []
    for b in range(len(prefix_lens)):
        shift += [-q_off[b], total - kv_off[b + 1]]
        lengths += [int(prefix_lens[b]), int(extend_lens[b])]
    device = plan.pages.device
    n = total + n_new
    shift_dev, lengths_dev = host_to_device([shift, lengths], device)
    source = torch.arange(n, device=device) + torch.repeat_interleave(shift_dev, lengths_dev, output_size=n)
    rows = torch.cat([plan.pages, torch.arange(base, base + n_new, dtype=torch.int32, device=device)])
    return CombinedPages(base, tuple(q_off), tuple(a + b for a, b in zip(kv_off, q_off)), rows[source])
