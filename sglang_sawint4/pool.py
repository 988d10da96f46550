"""SGLang KV pool whose pages hold rotated INT4 K/V (see ``format.py`` for the layout).

``Int4TokenToKVPool`` keeps ``MHATokenToKVPool``'s token-indexed addressing
(slot ``i`` of every layer belongs to the same token; ``page_size`` only groups
slots), so SGLang's allocator, radix cache and ``req_to_token`` tables work
unchanged.  Per layer it owns::

    k_buffer[l], v_buffer[l]: [num_slots, num_kv_heads, head_dim // 2] uint8
    k_meta[l],   v_meta[l]:   [num_slots, num_kv_heads, 2] float16 (scale, offset)

Readers must go through :meth:`get_int4_layer`.  SGLang's BF16 accessors
(``get_key_buffer`` & co.) raise :class:`Int4KVAccessError` so that no code path
can silently read packed nibbles as BF16.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager, nullcontext
from typing import List, Tuple

import torch

from sglang_sawint4 import format as fmt
from sglang_sawint4.kernels.store import rotate_quantize_store

logger = logging.getLogger(__name__)

try:  # SGLang is an optional dependency of the package (the `serve` extra).
    from sglang.srt.constants import GPU_MEMORY_TYPE_KV_CACHE
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, unwrap_write_loc
except ImportError as e:  # pragma: no cover - exercised only without sglang
    raise ImportError(
        "sglang_sawint4.pool needs sglang==0.5.17 (pip install 'sglang-sawint4[serve]')"
    ) from e


class Int4KVAccessError(RuntimeError):
    """Something asked the INT4 pool for a BF16 view of its pages."""


class Int4TokenToKVPool(MHATokenToKVPool):
    def __init__(self, *args, int4_format: fmt.Int4Format, **kwargs):
        self.int4_format = int4_format
        self._shape_probe = False
        for unsupported in ("swa_head_num", "swa_head_dim", "swa_v_head_dim", "kv_cache_layout", "quant_method"):
            if kwargs.get(unsupported) is not None:
                raise ValueError(f"Int4TokenToKVPool does not support {unsupported}")
        if kwargs.pop("post_capture_active", False):
            raise ValueError("Int4TokenToKVPool does not support post-capture KV backing")
        super().__init__(*args, **kwargs)
        if self.v_head_dim != self.head_dim or self.head_dim != int4_format.head_dim:
            raise ValueError(
                f"INT4 KV needs K and V head dims equal to the format's ({int4_format.head_dim}); "
                f"got k={self.head_dim}, v={self.v_head_dim}")
        if self.use_hnd or self.kv_cache_layout != "nhd":
            raise ValueError("INT4 KV supports the NHD (token-major) layout only")

    # -- allocation -----------------------------------------------------------
    def _create_buffers(self):
        # Called from MHATokenToKVPool.__init__.  SGLang's generic code (byte
        # accounting, slot moves, descriptors) reads store_dtype and the buffer lists.
        self.store_dtype = fmt.DATA_DTYPE
        self.k_scale_buffer = self.v_scale_buffer = None
        self.dq_k_buffer = self.dq_v_buffer = None
        num_slots = self.size + self.page_size  # slot 0's page absorbs padded writes
        with self.memory_saver_adapter.region(GPU_MEMORY_TYPE_KV_CACHE):
            with (torch.cuda.use_mem_pool(self.custom_mem_pool) if self.enable_custom_mem_pool else nullcontext()):
                k = [fmt.allocate_layer(num_slots, self.head_num, self.head_dim, self.device) for _ in range(self.layer_num)]
                v = [fmt.allocate_layer(num_slots, self.head_num, self.head_dim, self.device) for _ in range(self.layer_num)]
        self.k_buffer: List[torch.Tensor] = [d for d, _ in k]
        self.k_meta: List[torch.Tensor] = [m for _, m in k]
        self.v_buffer: List[torch.Tensor] = [d for d, _ in v]
        self.v_meta: List[torch.Tensor] = [m for _, m in v]
        self._kv_buffer_descs = self._build_kv_buffer_descs()
        self._init_data_ptrs_and_strides()

    def _slot_move_pointer_buffers(self):
        return [*self.k_buffer, *self.v_buffer, *self.k_meta, *self.v_meta]

    def get_kv_size_bytes(self) -> Tuple[int, int]:
        k = sum(t.numel() * t.element_size() for t in (*self.k_buffer, *self.k_meta))
        v = sum(t.numel() * t.element_size() for t in (*self.v_buffer, *self.v_meta))
        return k, v

    def _finalize_allocation_log(self, num_tokens: int):
        k, v = self.get_kv_size_bytes()
        self.mem_usage = (k + v) / (1 << 30)
        logger.info(
            "INT4 KV cache is allocated. format: %s, #tokens: %d, K size: %.2f GB, V size: %.2f GB, "
            "%d B/token/layer (BF16 would be %d)",
            self.int4_format, num_tokens, k / (1 << 30), v / (1 << 30),
            int4_cell_size_bytes(self.head_num, 1, self.int4_format),
            self.head_num * 2 * self.head_dim * 2,
        )

    # -- the INT4 interface ----------------------------------------------------
    def get_int4_layer(self, layer_id: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(k_data, k_meta, v_data, v_meta) of a layer, shapes as in the module doc."""
        i = layer_id - self.start_layer
        return self.k_buffer[i], self.k_meta[i], self.v_buffer[i], self.v_meta[i]

    def set_kv_buffer(self, layer, loc, cache_k, cache_v, k_scale=None, v_scale=None,
                      layer_id_override=None, dcp_kv_mask=None):
        if k_scale is not None or v_scale is not None:
            raise Int4KVAccessError("INT4 KV cache cannot store pre-scaled (FP8-calibrated) K/V")
        if dcp_kv_mask is not None:
            raise Int4KVAccessError("INT4 KV cache does not support decode context parallelism")
        loc, _, full_loc = unwrap_write_loc(loc)
        if full_loc is not None:
            loc = full_loc
        layer_id = layer_id_override if layer_id_override is not None else layer.layer_id
        rotate_quantize_store(cache_k, cache_v, loc, *self.get_int4_layer(layer_id), self.int4_format)

    def poison_slots(self, loc: torch.Tensor) -> None:
        """Debug: NaN (scale, offset) in every layer for these slots.

        A slot is rewritten (store kernel) before a request that owns it again reads
        it; a read of a freed, not yet rewritten slot makes the attention output NaN.
        """
        if loc.numel() == 0:
            return
        # SGLang frees int64 slot tensors and int32 ones (radix-cache segments come
        # straight from the int32 req_to_token table); index_fill_ takes int64 only
        loc = loc.to(device=self.k_meta[0].device, dtype=torch.int64)
        for meta in (*self.k_meta, *self.v_meta):
            meta.index_fill_(0, loc, float("nan"))

    def move_kv_cache(self, tgt_loc: torch.Tensor, src_loc: torch.Tensor):
        if tgt_loc.numel() == 0:
            return
        for buf in self._slot_move_pointer_buffers():
            buf[tgt_loc] = buf[src_loc]

    # -- BF16 accessors: refused ---------------------------------------------------
    @contextmanager
    def shape_probe(self):
        """Let SGLang's backend constructor read the logical [slots, heads, dim] shape.

        Inside this context the BF16 accessors return storage-less ``meta`` tensors
        with the logical shape and compute dtype; any attempt to read their data fails.
        """
        self._shape_probe = True
        try:
            yield
        finally:
            self._shape_probe = False

    def _refuse(self, what: str, layer_id: int):
        if self._shape_probe:
            return torch.empty((self.size + self.page_size, self.head_num, self.head_dim),
                               dtype=self.dtype, device="meta")
        raise Int4KVAccessError(
            f"{what}({layer_id}) asked the INT4 KV pool for BF16 pages; only the sglang-sawint4 "
            f"attention path can read them (use --attention-backend triton with --kv-quant)")

    def get_key_buffer(self, layer_id: int):
        return self._refuse("get_key_buffer", layer_id)

    def get_value_buffer(self, layer_id: int):
        return self._refuse("get_value_buffer", layer_id)

    def get_kv_buffer(self, layer_id: int):
        return self.get_key_buffer(layer_id), self.get_value_buffer(layer_id)

    def _unsupported(self, name):
        raise Int4KVAccessError(f"INT4 KV cache does not support {name} (hierarchical cache / PD transfer)")

    def get_cpu_copy(self, indices, mamba_indices=None):
        self._unsupported("get_cpu_copy")

    def load_cpu_copy(self, kv_cache_cpu, indices, mamba_indices=None):
        self._unsupported("load_cpu_copy")

    def get_contiguous_buf_infos(self):
        self._unsupported("get_contiguous_buf_infos")

    def set_kv_buffer_prefix_valid(self, *args, **kwargs):
        self._unsupported("set_kv_buffer_prefix_valid")

    def get_raw_kv_buffer(self, *args, **kwargs):
        self._unsupported("get_raw_kv_buffer")

    def get_flashinfer_dequant_workspace_kv_buffer(self, *args, **kwargs):
        self._unsupported("get_flashinfer_dequant_workspace_kv_buffer")

    def get_flashinfer_decode_dequant_workspace_kv_buffer(self, *args, **kwargs):
        self._unsupported("get_flashinfer_decode_dequant_workspace_kv_buffer")


def int4_cell_size_bytes(num_kv_heads: int, num_layers: int, layout: fmt.Int4Format) -> int:
    """Bytes one token costs across all layers of one rank (what SGLang calls cell_size)."""
    return num_kv_heads * num_layers * layout.bytes_per_token_head()
