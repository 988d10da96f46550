"""SGLang's Triton attention backend reading INT4 KV pages: decode for both prefill paths, and
extend/prefill with ``--attention-backend triton``.

Why the Triton backend for decode: its metadata is already what our kernels take
(``kv_indptr`` / ``kv_indices`` over token slots, per-request ``num_kv_splits`` and persistent
split-KV scratch that CUDA-graph capture reuses), while FlashInfer keeps its indices inside
planned wrappers whose kernels cannot read INT4.  Subclassing keeps SGLang's own metadata
and CUDA-graph code unchanged; only the two attention calls (and the split count) are
replaced:

* decode: store the new token (fused rotate-quantize-store), then
  ``int4_decode_attention`` over all of the request's pages, split by our kernel's own
  split-count rule (``get_num_kv_splits``);
* extend/prefill: store the new tokens, moving their q / k / v into the space the pages are
  stored in (rotate, subtract the stored key center) in the same launch
  (``rotate_quantize_store_and_stage``), dequantize only the cached prefix (radix-cache
  hits, earlier chunks) into a BF16 scratch *as stored* (rotated, keys centered) and run
  SGLang's stock extend kernel there; a layout that rotates V rotates
  the output back.  Attention is the same in both spaces (H is orthogonal; a key center
  shifts every score of a query alike, once new keys carry it too), and moving the new
  tokens costs O(new tokens) where un-rotating the scratch costs O(batch x prefix): every
  request dequantizes its whole prefix here, shared or not.  The scratch holds the whole
  batch's prefixes; ``sglang_sawint4.flashinfer_prefill`` is the bounded FlashInfer path.

Layers the KV policy keeps in BF16 run SGLang's own Triton decode and extend unchanged
(the pool hands them BF16 buffers); the choice is per layer id, so a captured CUDA graph
holds the right kernels for each layer.
"""

from __future__ import annotations

import torch
from sglang.srt.layers.attention.triton_backend import TritonAttnBackend

from sglang_sawint4.attention_check import AttentionChecker
from sglang_sawint4.kernels.decode import int4_decode_attention
from sglang_sawint4.kernels.dequant import dequantize_pages
from sglang_sawint4.kernels.rotate import from_stored_space, to_stored_space
from sglang_sawint4.kernels.splits import int4_num_kv_splits
from sglang_sawint4.pool import Int4KVAccessError, Int4TokenToKVPool


def check_int4_layer(layer, sinks=None, score_mod=None) -> None:
    """Refuse attention features the INT4 paths do not implement (raises Int4KVAccessError)."""
    if sinks is not None or score_mod is not None:
        raise Int4KVAccessError("INT4 KV attention does not support attention sinks or score_mod")
    if layer.logit_cap and layer.logit_cap > 0:
        raise Int4KVAccessError("INT4 KV attention does not support logit soft-capping")
    if layer.is_cross_attention or (layer.sliding_window_size is not None and layer.sliding_window_size > -1):
        raise Int4KVAccessError("INT4 KV attention supports causal self-attention without sliding window only")


def compile_extend_kernels(pool: Int4TokenToKVPool) -> int:
    """Compile the kernels the prefill paths run over INT4 layers of ``pool``, on one-row
    buffers of the model's dtype: the prefix dequantize kernel for every way they read a
    layer (as stored; for a plain layout's centered layers also with the center added back:
    the FlashInfer path's staging), the Triton path's store that moves the new tokens into
    the stored space (``compile_store_and_stage``), for a rotating layout the rotation that
    moves new tokens without storing them (with and without a center) and, where V is
    rotated, the one that brings the output back.

    Both prefill paths first run them in the middle of serving (the Triton path's rotation at
    its first extend, the rest at a batch's first cached prefix): compiled there, a Triton
    compile (~0.5 s) would stall that batch and every request in it.  The kernels leave the
    row count and the index pointers unspecialized and the one-row buffers have the strides
    of the real ones, so these are the variants serving uses.  Returns the variants run.
    """
    layout = pool.int4_format
    slot = torch.zeros(1, dtype=torch.int32, device=pool.device)
    out = [torch.empty((1, pool.head_num, pool.head_dim), dtype=pool.dtype, device=pool.device) for _ in range(2)]
    rotated = layout.block_size is not None
    variants = set()  # each kernel's constexprs: ("dequant", center), ("rotate", center), ("output", False)
    for layer_id in range(pool.start_layer, pool.start_layer + pool.layer_num):
        if pool.is_bf16_layer(layer_id):
            continue
        for k_center in ((None,) if rotated else (None, pool.key_center(layer_id))):
            variant = ("dequant", k_center is not None)
            if variant not in variants:
                variants.add(variant)
                # a center goes back in the original space only, which is where a plain layout is stored
                dequantize_pages(*pool.get_int4_layer(layer_id), slot, *out, layout, k_center=k_center,
                                 unrotate=k_center is not None)
        for stored_center in ((None, pool.key_center(layer_id, stored=True)) if rotated else ()):
            variant = ("rotate", stored_center is not None)
            if variant not in variants:
                variants.add(variant)
                to_stored_space(out[0], out[0], out[1], layout, stored_center)
        if rotated and layout.rotate_v and ("output", False) not in variants:
            variants.add(("output", False))
            from_stored_space(out[0], layout)
    return len(variants) + compile_store_and_stage(pool, center_rows=True)


def compile_store_and_stage(pool: Int4TokenToKVPool, center_rows: bool) -> int:
    """Compile the store that also moves a prefill's new tokens (``rotate_quantize_store_and_stage``,
    rows with or without the key center as ``center_rows`` says) for the pool's INT4 layers,
    with and without a key center, on one-row buffers of the model's dtype: one row of zeros
    to SGLang's padding slot 0.  The row and head counts are not specialized and the buffers
    have the real ones' strides, so these are the variants serving uses.  Returns the
    variants run."""
    slot = torch.zeros(1, dtype=torch.int64, device=pool.device)  # out_cache_loc's dtype
    new, rows = ([torch.zeros((1, pool.head_num, pool.head_dim), dtype=pool.dtype, device=pool.device)
                  for _ in range(2)] for _ in range(2))
    centered = set()
    for layer_id in range(pool.start_layer, pool.start_layer + pool.layer_num):
        if pool.is_bf16_layer(layer_id) or (pool.key_center(layer_id) is not None) in centered:
            continue
        centered.add(pool.key_center(layer_id) is not None)
        pool.store_and_stage(layer_id, slot, new[0], new[0], new[1], *rows, center_rows=center_rows)
    return len(centered)


class Int4TritonAttnBackend(TritonAttnBackend):
    def __init__(self, model_runner, skip_prefill: bool = False, kv_indptr_buf=None):
        pool = model_runner.token_to_kv_pool
        if not isinstance(pool, Int4TokenToKVPool):
            raise Int4KVAccessError(
                f"Int4TritonAttnBackend needs the INT4 KV pool, got {type(pool).__name__}")
        # The parent reads get_value_buffer(0).shape[-1] to size its split-KV scratch.
        with pool.shape_probe():
            super().__init__(model_runner, skip_prefill=skip_prefill, kv_indptr_buf=kv_indptr_buf)
        self.int4_pool = pool
        self.int4_format = pool.int4_format
        for bad, why in (
            (self.use_mla, "MLA attention"),
            (self.sliding_window_size is not None and self.sliding_window_size > 0, "sliding-window attention"),
            (self.dcp_size > 1, "decode context parallelism"),
            (self.enable_deterministic, "--enable-deterministic-inference"),
        ):
            if bad:
                raise Int4KVAccessError(f"INT4 KV cache does not support {why}")
        self._prefix_identity = torch.arange(0, dtype=torch.int64, device=self.device)
        compile_extend_kernels(pool)
        self._checker = AttentionChecker.from_env()  # None unless --kv-quant-debug-check-attention

    def get_num_kv_splits(self, num_kv_splits: torch.Tensor, seq_lens: torch.Tensor):
        """Our kernel's split rule (kernels/splits.py) instead of the one SGLang sizes for its
        own decode kernel; --triton-attention-num-kv-splits stays the cap, and a static
        split count (or no SM count) keeps SGLang's behaviour."""
        if self.static_kv_splits or self.device_core_count <= 0:
            return super().get_num_kv_splits(num_kv_splits, seq_lens)
        int4_num_kv_splits(num_kv_splits, seq_lens, self.num_kv_head, self.max_kv_splits,
                           self.int4_format.head_dim, self.device_core_count)

    def _store(self, forward_batch, layer, k, v):
        self.int4_pool.set_kv_buffer(layer, self._store_loc(forward_batch), k, v)

    def _store_loc(self, forward_batch) -> torch.Tensor:
        """The new tokens' slots: the full pool's location where SGLang gives one."""
        full = self.forward_metadata.out_cache_loc_full_physical
        return forward_batch.out_cache_loc if full is None else full

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, sinks=None,
                       score_mod=None, aux_tensors=None):
        check_int4_layer(layer, sinks, score_mod)
        if self.int4_pool.is_bf16_layer(layer.layer_id):
            o = super().forward_decode(q, k, v, layer, forward_batch, save_kv_cache)
            if self._checker is not None:
                self._check_decode(layer, q.reshape(-1, layer.tp_q_head_num, layer.qk_head_dim), o)
            return o
        q = q.reshape(-1, layer.tp_q_head_num, layer.qk_head_dim)
        o = torch.empty_like(q)
        if save_kv_cache:
            self._store(forward_batch, layer, k, v)
        md = self.forward_metadata
        int4_decode_attention(
            q, *self.int4_pool.get_int4_layer(layer.layer_id), o, md.kv_indptr, md.kv_indices,
            md.attn_logits, md.attn_lse, md.num_kv_splits, self.max_kv_splits, layer.scaling,
            self.int4_format,
        )
        if self._checker is not None:
            self._check_decode(layer, q, o)
        return o.view(-1, layer.tp_q_head_num * layer.v_head_dim)

    def _prefix_rows(self, forward_batch) -> int:
        lens = forward_batch.extend_prefix_lens_cpu
        if lens is not None:
            return int(sum(lens))
        # No host copy of the prefix lengths (gpu-only scheduling): one sync, eager path only.
        return int(self.forward_metadata.kv_indptr[forward_batch.batch_size].item())

    def _identity(self, n: int) -> torch.Tensor:
        if self._prefix_identity.numel() < n:
            self._prefix_identity = torch.arange(max(n, 2 * self._prefix_identity.numel()),
                                                 dtype=torch.int64, device=self.device)
        return self._prefix_identity[:n]

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, sinks=None,
                       score_mod=None, aux_tensors=None):
        check_int4_layer(layer, sinks, score_mod)
        if k is None or v is None:
            raise Int4KVAccessError("INT4 KV cache cannot hand stored K/V back to layers that share KV")
        if forward_batch.forward_mode.is_target_verify():
            raise Int4KVAccessError("INT4 KV cache does not support speculative decoding")
        hq, hk, d = layer.tp_q_head_num, layer.tp_k_head_num, layer.qk_head_dim
        q3, k3, v3 = q.view(-1, hq, d), k.reshape(-1, hk, d), v.reshape(-1, hk, d)
        if self.int4_pool.is_bf16_layer(layer.layer_id):
            o = super().forward_extend(q, k, v, layer, forward_batch, save_kv_cache)
            if self._checker is not None:
                self._check_extend(layer, forward_batch, q3, k3, v3, o, self._prefix_rows(forward_batch))
            return o
        md = self.forward_metadata
        n_prefix = self._prefix_rows(forward_batch)
        # Dense copy of the cached prefix only, as stored (one row even without a prefix:
        # the extend kernel takes a non-empty buffer); the new tokens join it in that space.
        scratch_rows = max(n_prefix, 1)
        k_prefix = q.new_empty((scratch_rows, hk, d))
        v_prefix = q.new_empty((scratch_rows, hk, d))
        dequantize_pages(*self.int4_pool.get_int4_layer(layer.layer_id), md.kv_indices[:n_prefix],
                         k_prefix, v_prefix, self.int4_format, unrotate=False)
        if save_kv_cache:  # the store's launch also moves the new tokens into the stored space
            k_s, v_s = k3.new_empty(k3.shape), v3.new_empty(v3.shape)
            q_s = self.int4_pool.store_and_stage(layer.layer_id, self._store_loc(forward_batch), q3, k3, v3, k_s, v_s,
                                                 center_rows=True)
        else:
            q_s, k_s, v_s = to_stored_space(q3, k3, v3, self.int4_format,
                                            self.int4_pool.key_center(layer.layer_id, stored=True))
        o = q.new_empty((q.shape[0], hq * layer.v_head_dim))
        self.extend_attention_fwd(
            q_s, k_s, v_s,
            o.view(-1, hq, layer.v_head_dim), k_prefix, v_prefix,
            md.qo_indptr, md.kv_indptr, self._identity(scratch_rows),
            md.custom_mask, True, md.mask_indptr, md.max_extend_len,
            1.0, 1.0, layer.scaling,
            logit_cap=0.0, sliding_window_size=-1, sinks=None, window_kv_offsets=None,
            xai_temperature_len=layer.xai_temperature_len, page_size=1,
        )
        o = from_stored_space(o.view(-1, hq, layer.v_head_dim), self.int4_format).view(o.shape)
        if self._checker is not None:
            self._check_extend(layer, forward_batch, q3, k3, v3, o, n_prefix)
        return o

    # -- --kv-quant-debug-check-attention: eager mode only, first calls per layer ----------
    def _check_decode(self, layer, q, o):
        md = self.forward_metadata
        self._checker.check_decode(self.int4_pool, layer, q, o, md.kv_indptr, md.kv_indices)

    def _check_extend(self, layer, forward_batch, q, k, v, o, n_prefix):
        md, batch = self.forward_metadata, forward_batch.batch_size
        self._checker.check_extend(self.int4_pool, layer, q, k, v, o, md.qo_indptr[: batch + 1],
                                   md.kv_indptr[: batch + 1], md.kv_indices, n_prefix, path="triton")
