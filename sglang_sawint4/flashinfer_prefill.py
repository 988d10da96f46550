"""Prefill/extend on INT4 KV pages through SGLang's FlashInfer backend.

With ``--kv-quant`` and ``--attention-backend flashinfer`` (the launcher's default where this
path can run) SGLang gets
:func:`create_int4_flashinfer_backend`: SGLang's own ``HybridAttnBackend`` with

* prefill/extend: :class:`Int4FlashInferPrefillBackend`, a ``FlashInferAttnBackend`` whose
  extend attends the new tokens to their cached INT4 prefix (radix-cache hits, earlier
  chunks) through FlashInfer's paged prefill over a BF16 *staging* buffer the prefix is
  dequantized into, and to themselves exactly;
* decode: ``Int4TritonAttnBackend`` (our INT4 decode kernel, CUDA graphs as before).

The staging buffer has a fixed number of rows (``--kv-quant-prefill-staging-rows``),
allocated when the backend is built and taken out of the KV pool's memory (the pool patch
subtracts it).  A batch whose prefix rows exceed it stages each distinct slot once
(requests sharing a radix-cache prefix read the same staging rows as their pages).  Then:

* the common batch, whose staged prefix and new tokens fit the buffer together
  (``combine_with_new_rows``), writes the new tokens' exact K/V after the prefix and runs
  one causal paged prefill over both: a small prefill is host-bound, and this is as few
  calls per layer as SGLang's BF16 extend makes (which runs a ragged and a paged call and
  merges them);
* a batch without room for its new tokens runs FlashInfer's ragged causal prefill over them
  and, piece by piece (``sglang_sawint4.prefix_pieces``: dequantize a piece, attend, merge,
  repeat), its prefix, merging the partial results by their base-2 log-sum-exp
  (FlashInfer's ``merge_state``); so no request mix can grow the buffer.

A rotating layout's prefix is staged as stored (rotated, keys centered) and a batch with a
cached prefix attends in that space, as the Triton path does: its new tokens' q, k (and v
when V is rotated) move there (``to_stored_space``, O(new tokens); in a combined batch the
KV store's own launch, ``rotate_quantize_store_and_stage``) instead of every staged
row being un-rotated (O(prefix rows), the tensor cores once per row and layer); the output
comes back with ``from_stored_space``.  A plain layout is stored in the original space:
its staging adds a centered layer's key center back.  A batch without a cached prefix
attends the new tokens as they are (ragged).

Layers the policy keeps in BF16 run SGLang's FlashInfer extend unchanged (the pool hands
them BF16 pages).
"""

from __future__ import annotations

import logging
from typing import List

import torch
from sglang.kernels.ops.attention.utils import create_flashinfer_kv_indices_triton
from sglang.srt.layers.attention.flashinfer_backend import (FlashInferAttnBackend, PrefillMetadata,
                                                             is_in_tc_piecewise_cuda_graph)
from sglang.srt.layers.attention.hybrid_attn_backend import HybridAttnBackend
from sglang.srt.mem_cache.memory_pool import KVWriteLoc

from sglang_sawint4.attention_check import AttentionChecker
from sglang_sawint4.backend import Int4TritonAttnBackend, check_int4_layer, compile_store_and_stage
from sglang_sawint4.kernels.dequant import dequantize_pages
from sglang_sawint4.kernels.rotate import from_stored_space, to_stored_space
from sglang_sawint4.pool import Int4KVAccessError, Int4TokenToKVPool
from sglang_sawint4.prefix_pieces import (CombinedPages, PrefixPiece, PrefixPlan, combine_with_new_rows, offsets,
                                          plan_prefix_pieces)

logger = logging.getLogger("sglang_sawint4")

# Pieces planned once per batch (each on its own FlashInfer wrapper, shared by every
# layer).  A batch with more pieces re-plans the rest in every layer, in turn on
# OVERFLOW_WRAPPERS wrappers: FlashInfer's plan fills a pinned host buffer that an
# asynchronous copy moves to the GPU when the stream reaches it, so a wrapper is re-planned
# only once the run after its previous plan has finished (a CUDA event), never while the
# GPU, running layers behind the host, has yet to copy that plan.
PLANNED_PIECES = 4
OVERFLOW_WRAPPERS = 2


def staging_bytes(rows: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Device bytes of the K and V staging buffers."""
    return 2 * rows * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


class Int4FlashInferPrefillBackend(FlashInferAttnBackend):
    """Extend/prefill over INT4 pages: FlashInfer ragged causal attention for the new tokens,
    FlashInfer paged attention over the dequantized prefix, merged by log-sum-exp."""

    def __init__(self, model_runner, staging_rows: int):
        pool = model_runner.token_to_kv_pool
        if not isinstance(pool, Int4TokenToKVPool):
            raise Int4KVAccessError(
                f"Int4FlashInferPrefillBackend needs the INT4 KV pool, got {type(pool).__name__}")
        if staging_rows <= 0:
            raise ValueError(f"staging_rows must be positive, got {staging_rows}")
        super().__init__(model_runner)
        for bad, why in (
            (self.dispatch_reason is not None, "sliding-window or cross attention"),
            (self.is_multimodal, "multimodal models on the FlashInfer prefill path (use --attention-backend triton)"),
            (self.enable_mis, "multi-item scoring"),
            (self.enable_deterministic, "--enable-deterministic-inference"),
            (self.use_paged, "SGLANG_FLASHINFER_USE_PAGED"),
        ):
            if bad:
                raise Int4KVAccessError(f"INT4 KV cache does not support {why}")
        self.int4_pool = pool
        self.int4_format = pool.int4_format
        self.staging_rows = staging_rows
        updater = self.indices_updater_prefill
        self._heads = (updater.num_qo_heads, updater.num_kv_heads, updater.head_dim)
        dtype, device = model_runner.dtype, model_runner.device
        shape = (staging_rows, updater.num_kv_heads, updater.head_dim)
        self._k_stage = torch.empty(shape, dtype=dtype, device=device)
        self._v_stage = torch.empty(shape, dtype=dtype, device=device)
        logger.info("sglang-sawint4: FlashInfer prefill on INT4 pages, staging %d prefix rows (%.0f MiB)",
                    staging_rows, staging_bytes(staging_rows, updater.num_kv_heads, updater.head_dim, dtype) / 2**20)
        # a combined batch's store: its variants compiled now, not in the middle of serving
        compile_store_and_stage(pool, center_rows=self.int4_format.rotate_k)
        self._piece_wrappers: List = []
        self._overflow: List = []  # (wrapper, event after its last run), used in turn
        self._overflow_next = 0
        # recorded after the first run of the planned wrappers in a batch: their plans have
        # been copied to the GPU, so the next batch may plan them again
        self._planned_copied = torch.cuda.Event() if torch.cuda.is_available() else None
        self._planned_pending = False
        self._pieces: List[PrefixPiece] = []
        self._plan: PrefixPlan = None
        self._combined: CombinedPages = None  # the batch as one causal paged call, where it fits
        self._prefix = None  # (qo_indptr, kv_indptr, kv_indices, prefix rows) of the batch
        self._checker = AttentionChecker.from_env()  # None unless --kv-quant-debug-check-attention

    # -- plan ---------------------------------------------------------------------------
    def _new_wrapper(self):
        from flashinfer import BatchPrefillWithPagedKVCacheWrapper

        return BatchPrefillWithPagedKVCacheWrapper(self.workspace_buffer, "NHD", backend=self.prefill_backend)

    def _plan_staged(self, wrapper, qo_indptr, kv_indptr, pages: torch.Tensor, causal: bool) -> None:
        """Plan ``wrapper`` over staging rows from host-side offsets (no device sync): page
        size 1, ``pages`` (device int32) the staging rows, ``kv_indptr`` cutting them per request."""
        num_qo_heads, num_kv_heads, head_dim = self._heads
        bs = len(qo_indptr) - 1
        # seq_lens: what FlashInfer derives from kv_indptr at page size 1 (a request without
        # pages counts 1), handed over pinned so that its copy does not wait either
        seq_lens = [max(b - a, 1) for a, b in zip(kv_indptr[:-1], kv_indptr[1:])]
        wrapper.begin_forward(
            _host_int32(qo_indptr), _host_int32(kv_indptr), pages, _host_int32([1] * bs),
            num_qo_heads, num_kv_heads, head_dim, 1, causal=causal,
            q_data_type=self._k_stage.dtype, kv_data_type=self._k_stage.dtype, non_blocking=True,
            seq_lens=_host_int32(seq_lens),
        )

    def _plan_piece(self, wrapper, piece: PrefixPiece) -> None:
        """Plan ``wrapper`` for one piece: its queries over its staging rows, non-causal."""
        self._plan_staged(wrapper, piece.qo_indptr, piece.kv_indptr,
                          self._plan.pages[piece.pages[0]: piece.pages[1]], causal=False)

    def _plan_combined(self, wrapper, combined: CombinedPages) -> None:
        """Plan ``wrapper`` for the whole batch, causal, over its staged prefix and new rows."""
        self._plan_staged(wrapper, combined.qo_indptr, combined.kv_indptr, combined.pages, causal=True)

    def init_forward_metadata(self, forward_batch):
        self._pieces, self._plan, self._prefix, self._combined = [], None, None, None
        mode = forward_batch.forward_mode
        if mode.is_decode_or_idle() or mode.is_target_verify():
            return super().init_forward_metadata(forward_batch)
        self._wait_for_plan_copies()
        prefix_cpu = forward_batch.extend_prefix_lens_cpu
        extend_cpu = forward_batch.extend_seq_lens_cpu
        host_lens = prefix_cpu is not None and extend_cpu is not None
        # Without BF16 layers SGLang's own wrappers are read for the ragged call only, and
        # their plan copies its device-side offsets to the host (a wait for the GPU to finish
        # what runs before this batch, every prefill batch): plan from the host lengths here.
        own = host_lens and not self.int4_pool.bf16_layers and not _capturing()
        if not own:
            super().init_forward_metadata(forward_batch)
        if not host_lens:  # gpu-only scheduling: one sync
            prefix_cpu = forward_batch.extend_prefix_lens.tolist()
            extend_cpu = forward_batch.extend_seq_lens.tolist()
        bs = forward_batch.batch_size
        self._plan_prefix(prefix_cpu, extend_cpu, forward_batch.req_pool_indices[:bs],
                          forward_batch.extend_prefix_lens[:bs], forward_batch.extend_seq_lens[:bs])
        if own:
            use_ragged = not is_in_tc_piecewise_cuda_graph()
            if use_ragged and self._combined is None:
                self._plan_ragged(extend_cpu)
            self.forward_metadata = PrefillMetadata(self.prefill_wrappers_paged, use_ragged,
                                                    not any(int(n) for n in prefix_cpu))

    def _plan_ragged(self, extend_cpu) -> None:
        """Plan SGLang's ragged wrapper (the new tokens among themselves, causal) from host
        offsets: no wait for the device."""
        num_qo_heads, num_kv_heads, head_dim = self._heads
        qo_indptr = _host_int32(offsets(extend_cpu))
        self.prefill_wrapper_ragged.begin_forward(qo_indptr, qo_indptr, num_qo_heads, num_kv_heads, head_dim,
                                                  causal=True, q_data_type=self._k_stage.dtype, non_blocking=True)
        self._planned_pending = True

    def _wait_for_plan_copies(self) -> None:
        """Before planning a batch: the copies of the previous batch's plans have run.

        FlashInfer's plan fills a pinned host buffer per wrapper that an asynchronous copy
        moves to the GPU when the stream reaches it; re-planning before that copy ran would
        hand the previous batch this one's plan.  The event is recorded after the previous
        batch's first use of its planned wrappers; a batch planned but never run waits for
        the stream."""
        if self._planned_copied is None:
            return
        if self._planned_pending:
            torch.cuda.current_stream().synchronize()
            self._planned_pending = False
        else:
            self._planned_copied.synchronize()

    def _mark_planned_run(self) -> None:
        """Record the planned wrappers' event after their first run in a batch."""
        if self._planned_pending:
            self._planned_copied.record()
            self._planned_pending = False

    def _plan_prefix(self, prefix_cpu, extend_cpu, req_pool_indices, prefix_lens, extend_lens) -> None:
        """Cut the batch's cached prefixes into pieces and plan the first PLANNED_PIECES.

        prefix_cpu, extend_cpu: [batch] host lengths; req_pool_indices, prefix_lens,
        extend_lens: the same on the device ([batch] int32/int64).  A batch whose prefix rows
        exceed the staging rows waits for the device here (``plan_prefix_pieces`` counts its
        distinct slots).
        """
        n_prefix = sum(int(n) for n in prefix_cpu)
        if n_prefix == 0 and self._checker is None:
            return
        if n_prefix and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise Int4KVAccessError("INT4 KV prefill on FlashInfer cannot plan a cached prefix inside a CUDA graph "
                                    "capture; use --disable-prefill-cuda-graph")
        bs = len(prefix_cpu)
        device = req_pool_indices.device
        kv_indptr = torch.zeros(bs + 1, dtype=torch.int32, device=device)
        kv_indptr[1:] = torch.cumsum(prefix_lens, dim=0)
        qo_indptr = torch.zeros(bs + 1, dtype=torch.int32, device=device)
        qo_indptr[1:] = torch.cumsum(extend_lens, dim=0)
        # the prefixes' slot ids, request after request (the rows the pieces cut)
        kv_indices = torch.empty(max(n_prefix, 1), dtype=torch.int32, device=device)
        req_to_token = self.req_to_token_pool.req_to_token
        create_flashinfer_kv_indices_triton[(bs,)](
            req_to_token, req_pool_indices, prefix_lens, kv_indptr, None, kv_indices, req_to_token.shape[1])
        self._prefix = (qo_indptr, kv_indptr, kv_indices, n_prefix)
        if n_prefix == 0:
            return
        self._set_plan(plan_prefix_pieces(kv_indices, prefix_cpu, extend_cpu, self.staging_rows), prefix_cpu,
                       extend_cpu)
        planned = 1 if self._combined is not None else min(len(self._pieces), PLANNED_PIECES)
        while len(self._piece_wrappers) < planned:
            self._piece_wrappers.append(self._new_wrapper())
        if len(self._pieces) > PLANNED_PIECES and not self._overflow:
            self._overflow = [(self._new_wrapper(), torch.cuda.Event()) for _ in range(OVERFLOW_WRAPPERS)]
        if self._combined is not None:
            self._plan_combined(self._piece_wrappers[0], self._combined)
        for wrapper, piece in zip(self._piece_wrappers, self._pieces[:PLANNED_PIECES]):
            self._plan_piece(wrapper, piece)
        self._planned_pending = True

    def _set_plan(self, plan: PrefixPlan, prefix_cpu, extend_cpu) -> None:
        """Run the batch as one combined call where it fits, else piece by piece."""
        self._plan = plan
        self._combined = combine_with_new_rows(plan, prefix_cpu, extend_cpu, self.staging_rows)
        self._pieces = [] if self._combined is not None else plan.pieces

    def init_forward_metadata_out_graph(self, forward_batch, in_capture: bool = False):
        if not forward_batch.forward_mode.is_decode_or_idle():
            raise Int4KVAccessError(
                "INT4 KV prefill on FlashInfer does not run inside a full prefill CUDA graph; "
                "use the default prefill CUDA graph backend or --disable-prefill-cuda-graph")
        super().init_forward_metadata_out_graph(forward_batch, in_capture)

    def _attend_combined(self, q, k_stage, v_stage, sm_scale: float):
        """o of the batch's queries over their staged prefixes and new rows (causal), on the
        wrapper ``_plan_combined`` planned."""
        o = self._piece_wrappers[0].forward(q, (k_stage, v_stage), causal=True, sm_scale=sm_scale,
                                            logits_soft_cap=0.0)
        self._mark_planned_run()
        return o

    def _attend_piece(self, i: int, piece: PrefixPiece, q, k_stage, v_stage, sm_scale: float):
        """(o, lse) of the piece's queries over its staging rows, on its planned wrapper or,
        past PLANNED_PIECES, on an overflow wrapper re-planned here."""
        if i < PLANNED_PIECES:
            wrapper = self._piece_wrappers[i]
            out = wrapper.forward_return_lse(q, (k_stage, v_stage), causal=False, sm_scale=sm_scale,
                                             logits_soft_cap=0.0)
            if i == min(len(self._pieces), PLANNED_PIECES) - 1:
                self._mark_planned_run()
            return out
        wrapper, event = self._overflow[self._overflow_next % OVERFLOW_WRAPPERS]
        self._overflow_next += 1
        event.synchronize()  # the copy of this wrapper's previous plan has run (no-op if never recorded)
        self._plan_piece(wrapper, piece)
        out = wrapper.forward_return_lse(q, (k_stage, v_stage), causal=False, sm_scale=sm_scale, logits_soft_cap=0.0)
        event.record()
        return out

    # -- run ------------------------------------------------------------------------------
    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, sinks=None, **kwargs):
        check_int4_layer(layer, sinks, kwargs.get("score_mod"))
        if k is None or v is None:
            raise Int4KVAccessError("INT4 KV cache cannot hand stored K/V back to layers that share KV")
        hq, hk, d = layer.tp_q_head_num, layer.tp_k_head_num, layer.qk_head_dim
        q3 = q.reshape(-1, hq, d)  # a view of the fused qkv where it is one: to_stored_space reads it strided
        k3, v3 = k.view(-1, hk, d), v.view(-1, hk, d)
        pool = self.int4_pool
        if pool.is_bf16_layer(layer.layer_id):
            o = super().forward_extend(q, k, v, layer, forward_batch, save_kv_cache)
        else:
            if not self.forward_metadata.use_ragged:
                raise Int4KVAccessError("INT4 KV prefill on FlashInfer needs its ragged prefill path, which "
                                        "this batch turned off (tc_piecewise prefill CUDA graph?)")
            if self._combined is not None and save_kv_cache:
                # the store writes the new K/V into the staging rows and moves q as well
                o = self._int4_extend_combined(q3, k3, v3, layer, store_loc=forward_batch.out_cache_loc)
            else:
                if save_kv_cache:
                    pool.set_kv_buffer(layer, KVWriteLoc(forward_batch.out_cache_loc, None), k, v)
                o = self._int4_extend(q3, k3, v3, layer)
        if self._checker is not None:
            self._check(layer, q3, k3, v3, o)
        return o.view(-1, hq * layer.v_head_dim)

    def _int4_extend(self, q, k, v, layer) -> torch.Tensor:
        """q: [new_tokens, num_q_heads, head_dim]; k, v: [new_tokens, num_kv_heads, head_dim]
        (channel stride 1, any row and head strides).  Returns [new_tokens, num_q_heads,
        head_dim] in q's dtype."""
        ragged = self.prefill_wrapper_ragged
        if self._combined is not None:
            return self._int4_extend_combined(q, k, v, layer)
        if not self._pieces:
            o = ragged.forward(q.contiguous(), k, v, causal=True, sm_scale=layer.scaling, logits_soft_cap=0.0)
            self._mark_planned_run()
            return o
        layout, pool = self.int4_format, self.int4_pool
        as_stored = layout.block_size is not None
        if as_stored:
            q, k, v = to_stored_space(q, k, v, layout, pool.key_center(layer.layer_id, stored=True))
        else:
            q = q.contiguous()
        o, lse = ragged.forward_return_lse(q, k, v, causal=True, sm_scale=layer.scaling, logits_soft_cap=0.0)

        def stage(slots):
            self._stage_prefix(layer.layer_id, slots)
            return self._k_stage, self._v_stage

        def attend(i, piece, q_piece, k_stage, v_stage):
            return self._attend_piece(i, piece, q_piece, k_stage, v_stage, layer.scaling)

        o = attend_prefix_pieces(q, o, lse, self._plan, stage, attend, merge_partial_attention)
        return from_stored_space(o, layout) if as_stored else o

    def _stage_prefix(self, layer_id: int, slots: torch.Tensor) -> None:
        """Dequantize ``slots`` ([n] int32) of an INT4 layer into staging rows 0 .. n - 1: as
        stored for a rotating layout, in the original space (key center added back) for a
        plain one."""
        as_stored = self.int4_format.block_size is not None
        dequantize_pages(*self.int4_pool.get_int4_layer(layer_id), slots, self._k_stage, self._v_stage,
                         self.int4_format, k_center=None if as_stored else self.int4_pool.key_center(layer_id),
                         unrotate=not as_stored)

    def _int4_extend_combined(self, q, k, v, layer, store_loc=None) -> torch.Tensor:
        """``_int4_extend`` of a batch that ``combine_with_new_rows`` fits in the staging rows:
        the prefix is dequantized into rows 0.., the new tokens' K/V (exact, moved into the
        stored space with q) are written after it, and one causal paged call attends both:
        no ragged call, no merge.  With ``store_loc`` ([new_tokens] slots) the new K/V are
        stored to the pages by the same launch that writes the staging rows and moves q."""
        layout, combined, pool = self.int4_format, self._combined, self.int4_pool
        rows = slice(combined.new_row_base, combined.new_row_base + q.shape[0])
        k_rows, v_rows = self._k_stage[rows], self._v_stage[rows]
        if store_loc is not None:
            q = pool.store_and_stage(layer.layer_id, store_loc, q, k, v, k_rows, v_rows, center_rows=layout.rotate_k)
        else:
            # a plain layout's new keys stay uncentered (its staging adds the center back):
            # to_stored_space then only copies k and v into the staging rows
            center = pool.key_center(layer.layer_id, stored=True) if layout.rotate_k else None
            q = to_stored_space(q, k, v, layout, center, kv_out=(k_rows, v_rows))[0]
        self._stage_prefix(layer.layer_id, self._plan.stage_slots)
        o = self._attend_combined(q, self._k_stage, self._v_stage, layer.scaling)
        return from_stored_space(o, layout)

    def forward_decode(self, *args, **kwargs):
        raise Int4KVAccessError("INT4 KV decode runs on the INT4 Triton kernel, not on FlashInfer")

    # -- --kv-quant-debug-check-attention ----------------------------------------------------
    def _check(self, layer, q, k, v, o):
        if self._prefix is None:
            return
        qo_indptr, kv_indptr, kv_indices, n_prefix = self._prefix
        self._checker.check_extend(self.int4_pool, layer, q, k, v, o, qo_indptr, kv_indptr, kv_indices, n_prefix,
                                   path="flashinfer")


def _host_int32(values) -> torch.Tensor:
    """A host int32 tensor for FlashInfer's plan, which copies it to the GPU asynchronously:
    pinned on a CUDA machine, because an asynchronous copy from pageable memory may first wait
    for the stream (the GPU finishing the previous batch)."""
    return torch.tensor(values, dtype=torch.int32, pin_memory=torch.cuda.is_available())


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def attend_prefix_pieces(q, o, lse, plan: PrefixPlan, stage, attend, merge):
    """Fold each request's attention to its cached prefix into (o, lse), piece by piece.

    Args:
        q: [new_tokens, num_q_heads, head_dim]; o, lse: the new tokens' attention among
            themselves ([new_tokens, num_q_heads, head_dim], [new_tokens, num_q_heads]).
        plan: ``plan_prefix_pieces`` of the batch.
        stage(slots) -> (k, v): the slots' K/V as dense rows (staging rows 0..n-1).
        attend(i, piece, q_rows, k, v) -> (o, lse): non-causal attention of the piece's
            queries to its pages (staging rows ``plan.pages[piece.pages[0]:piece.pages[1]]``,
            request by request as ``piece.kv_indptr`` cuts them).
        merge(o_a, lse_a, o_b, lse_b) -> (o, lse): log-sum-exp merge.
    Returns o over the new tokens and every cached prefix.
    """
    for i, piece in enumerate(plan.pieces):
        k_stage, v_stage = stage(plan.stage_slots[piece.stage[0]: piece.stage[1]])
        q0, q1 = piece.q_rows
        o_p, lse_p = attend(i, piece, q[q0:q1], k_stage, v_stage)
        if q1 - q0 == q.shape[0]:
            o, lse = merge(o_p, lse_p, o, lse)
        else:
            o[q0:q1], lse[q0:q1] = merge(o_p, lse_p, o[q0:q1], lse[q0:q1])
    return o


def merge_partial_attention(o_a, lse_a, o_b, lse_b):
    """Attention over two disjoint key sets merged by their log-sum-exp.

    o_a, o_b: [tokens, heads, head_dim]; lse_a, lse_b: [tokens, heads] float32, base 2 as
    FlashInfer returns them.  Returns new (o, lse).  FlashInfer's own merge (the base its
    kernels write) where its CUDA kernel takes the shape (SGLang's bound on heads per block),
    else the torch reference.
    """
    if o_a.is_cuda:
        from flashinfer import merge_state
        from sglang.srt.layers.attention.flashinfer_backend import _merge_state_max_safe_num_heads

        if o_a.shape[1] <= _merge_state_max_safe_num_heads(o_a.shape[2], o_a.element_size()):
            return merge_state(o_a, lse_a, o_b, lse_b)
    return merge_partial_attention_reference(o_a, lse_a, o_b, lse_b)


def merge_partial_attention_reference(o_a, lse_a, o_b, lse_b):
    """Torch reference of :func:`merge_partial_attention` (base-2 log-sum-exp; a side with
    lse -inf, no keys, gets weight 0)."""
    m = torch.maximum(lse_a, lse_b)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w_a, w_b = torch.exp2(lse_a - m), torch.exp2(lse_b - m)
    total = w_a + w_b
    acc = torch.promote_types(o_a.dtype, torch.float32)
    o = (o_a.to(acc) * (w_a / total)[..., None] + o_b.to(acc) * (w_b / total)[..., None]).to(o_a.dtype)
    return o, torch.log2(total) + m


def create_int4_flashinfer_backend(model_runner, staging_rows: int):
    """``--attention-backend flashinfer`` with INT4 KV: FlashInfer prefill, INT4 Triton decode."""
    return HybridAttnBackend(
        model_runner,
        prefill_backend=Int4FlashInferPrefillBackend(model_runner, staging_rows),
        decode_backend=Int4TritonAttnBackend(model_runner),
    )
