"""SGLang KV pool whose pages hold rotated INT4 K/V (see ``format.py`` for the layout).

``Int4TokenToKVPool`` keeps ``MHATokenToKVPool``'s token-indexed addressing
(slot ``i`` of every layer belongs to the same token; ``page_size`` only groups
slots), so SGLang's allocator, radix cache and ``req_to_token`` tables work
unchanged.  Per INT4 layer it owns::

    k_buffer[l], v_buffer[l]: [num_slots, num_kv_heads, head_dim // 2] uint8
    k_meta[l],   v_meta[l]:   [num_slots, num_kv_heads, 2] float16 (scale, offset)

and per BF16 layer (the policy's ``bf16_layers``) SGLang's own layout::

    k_buffer[l], v_buffer[l]: [num_slots, num_kv_heads, head_dim] bfloat16, k_meta[l] = None

INT4 layers may store centered keys (``format``): ``key_center(l)`` is their center.
Readers of INT4 layers must go through :meth:`get_int4_layer`; SGLang's BF16 accessors
(``get_key_buffer`` & co.) serve BF16 layers only and raise :class:`Int4KVAccessError`
for INT4 ones, so that no code path can silently read packed nibbles as BF16.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager, nullcontext
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from sglang_sawint4 import format as fmt
from sglang_sawint4.kernels.store import rotate_quantize_store, rotate_quantize_store_and_stage

logger = logging.getLogger(__name__)

try:  # SGLang is an optional dependency of the package (the `serve` extra).
    from sglang.srt.constants import GPU_MEMORY_TYPE_KV_CACHE
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, _set_kv_buffer_impl, unwrap_write_loc
except ImportError as e:  # pragma: no cover - exercised only without sglang
    raise ImportError(
        "sglang_sawint4.pool needs sglang==0.5.17 (pip install 'sglang-sawint4[serve]')"
    ) from e


class Int4KVAccessError(RuntimeError):
    """Something asked the INT4 pool for a BF16 view of its pages."""


class Int4TokenToKVPool(MHATokenToKVPool):
    def __init__(self, *args, int4_format: fmt.Int4Format, bf16_layers: Sequence[int] = (),
                 key_centers: Optional[Dict[int, torch.Tensor]] = None, **kwargs):
        """``bf16_layers``: global layer ids that keep BF16 K/V; ``key_centers``: global layer
        id -> [num_kv_heads, head_dim] float32 center of this rank's KV heads (original space)."""
        self.int4_format = int4_format
        self.bf16_layers = frozenset(int(l) for l in bf16_layers)
        self._key_centers_in = dict(key_centers or {})
        if self.bf16_layers & set(self._key_centers_in):
            raise ValueError(f"layers {sorted(self.bf16_layers & set(self._key_centers_in))} cannot be BF16 and centered")
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
        layers = range(self.start_layer, self.start_layer + self.layer_num)
        for l in set(self._key_centers_in) - set(layers):
            raise ValueError(f"key center for layer {l}, outside this pool's layers {list(layers)}")
        with self.memory_saver_adapter.region(GPU_MEMORY_TYPE_KV_CACHE):
            with (torch.cuda.use_mem_pool(self.custom_mem_pool) if self.enable_custom_mem_pool else nullcontext()):
                k = [self._allocate(l, num_slots) for l in layers]
                v = [self._allocate(l, num_slots) for l in layers]
        self.k_buffer: List[torch.Tensor] = [d for d, _ in k]
        self.k_meta: List[Optional[torch.Tensor]] = [m for _, m in k]
        self.v_buffer: List[torch.Tensor] = [d for d, _ in v]
        self.v_meta: List[Optional[torch.Tensor]] = [m for _, m in v]
        # per local layer: the key center in the original space (extend path, references) and
        # in the stored space (the store kernel subtracts it after its rotation)
        self._key_center: List[Optional[torch.Tensor]] = []
        self._stored_key_center: List[Optional[torch.Tensor]] = []
        for l in layers:
            c = self._key_centers_in.get(l)
            if c is not None and tuple(c.shape) != (self.head_num, self.head_dim):
                raise ValueError(f"key center of layer {l} must be [{self.head_num}, {self.head_dim}], got {tuple(c.shape)}")
            self._key_center.append(None if c is None else c.float().contiguous().to(self.device))
            self._stored_key_center.append(None if c is None else fmt.stored_center(c, self.int4_format).to(self.device))
        self._kv_buffer_descs = self._build_kv_buffer_descs()
        self._init_data_ptrs_and_strides()

    def _allocate(self, layer: int, num_slots: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        if layer in self.bf16_layers:
            return torch.zeros((num_slots, self.head_num, self.head_dim), dtype=self.dtype, device=self.device), None
        return fmt.allocate_layer(num_slots, self.head_num, self.head_dim, self.device)

    def _slot_move_pointer_buffers(self):
        return [*self.k_buffer, *self.v_buffer, *(m for m in (*self.k_meta, *self.v_meta) if m is not None)]

    def get_kv_size_bytes(self) -> Tuple[int, int]:
        k = sum(t.numel() * t.element_size() for t in (*self.k_buffer, *self.k_meta) if t is not None)
        v = sum(t.numel() * t.element_size() for t in (*self.v_buffer, *self.v_meta) if t is not None)
        return k, v

    def _finalize_allocation_log(self, num_tokens: int):
        k, v = self.get_kv_size_bytes()
        self.mem_usage = (k + v) / (1 << 30)
        layers = range(self.start_layer, self.start_layer + self.layer_num)
        logger.info(
            "INT4 KV cache is allocated. format: %s, BF16 layers: %s, centered key layers: %d, #tokens: %d, "
            "K size: %.2f GB, V size: %.2f GB, %d B/token (BF16 would be %d)",
            self.int4_format, sorted(self.bf16_layers) or "none", sum(c is not None for c in self._key_center),
            num_tokens, k / (1 << 30), v / (1 << 30),
            fmt.kv_bytes_per_token(self.head_num, layers, self.int4_format, self.bf16_layers),
            self.head_num * self.layer_num * fmt.bf16_bytes_per_token_head(self.head_dim),
        )

    # -- the INT4 interface ----------------------------------------------------
    def is_bf16_layer(self, layer_id: int) -> bool:
        return layer_id in self.bf16_layers

    def get_int4_layer(self, layer_id: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(k_data, k_meta, v_data, v_meta) of an INT4 layer, shapes as in the module doc."""
        if layer_id in self.bf16_layers:
            raise Int4KVAccessError(f"layer {layer_id} keeps BF16 K/V; read it with get_key_buffer / get_value_buffer")
        i = layer_id - self.start_layer
        return self.k_buffer[i], self.k_meta[i], self.v_buffer[i], self.v_meta[i]

    def key_center(self, layer_id: int, stored: bool = False) -> Optional[torch.Tensor]:
        """[num_kv_heads, head_dim] float32 key center of an INT4 layer (None: keys not
        centered), in the original space or, with ``stored``, in the stored (rotated) one."""
        i = layer_id - self.start_layer
        return (self._stored_key_center if stored else self._key_center)[i]

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
        if layer_id in self.bf16_layers:
            i = layer_id - self.start_layer
            rows = (-1, self.head_num, self.head_dim)
            _set_kv_buffer_impl(cache_k.reshape(rows).to(self.dtype), cache_v.reshape(rows).to(self.dtype),
                                self.k_buffer[i], self.v_buffer[i],
                                loc, row_dim=self.head_num * self.head_dim, store_dtype=self.dtype,
                                device_module=self.device_module, size_limit=self.size + self.page_size,
                                alt_stream=self.alt_stream)
            return
        rotate_quantize_store(cache_k, cache_v, loc, *self.get_int4_layer(layer_id), self.int4_format,
                              k_center=self.key_center(layer_id, stored=True))

    def store_and_stage(self, layer_id: int, loc: torch.Tensor, q, k, v, k_rows, v_rows,
                        center_rows: bool) -> torch.Tensor:
        """``set_kv_buffer`` of an INT4 layer that also writes the new tokens' K/V into staging
        rows and returns q, in the space that layer's prefix is staged in
        (``rotate_quantize_store_and_stage``; shapes and ``center_rows`` there)."""
        return rotate_quantize_store_and_stage(q, k, v, loc, *self.get_int4_layer(layer_id), self.int4_format,
                                               self.key_center(layer_id, stored=True), k_rows, v_rows, center_rows)

    def poison_slots(self, loc: torch.Tensor) -> None:
        """Debug: NaN (scale, offset) in every INT4 layer and NaN rows in every BF16 layer
        for these slots.

        A slot is rewritten before a request that owns it again reads it; a read of a
        freed, not yet rewritten slot makes the attention output NaN.
        """
        if loc.numel() == 0:
            return
        # SGLang frees int64 slot tensors and int32 ones (radix-cache segments come
        # straight from the int32 req_to_token table); index_fill_ takes int64 only
        loc = loc.to(device=self.k_buffer[0].device, dtype=torch.int64)
        for i in range(self.layer_num):
            if self.k_meta[i] is None:
                targets = (self.k_buffer[i], self.v_buffer[i])
            else:
                targets = (self.k_meta[i], self.v_meta[i])
            for t in targets:
                t.index_fill_(0, loc, float("nan"))

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

    def _bf16_buffer(self, what: str, layer_id: int, buffers: List[torch.Tensor]):
        if layer_id in self.bf16_layers:
            return buffers[layer_id - self.start_layer]
        if self._shape_probe:
            return torch.empty((self.size + self.page_size, self.head_num, self.head_dim),
                               dtype=self.dtype, device="meta")
        raise Int4KVAccessError(
            f"{what}({layer_id}) asked the INT4 KV pool for BF16 pages of an INT4 layer; only the "
            f"sglang-sawint4 attention path can read them (use --attention-backend flashinfer or triton with --kv-quant)")

    def get_key_buffer(self, layer_id: int):
        return self._bf16_buffer("get_key_buffer", layer_id, self.k_buffer)

    def get_value_buffer(self, layer_id: int):
        return self._bf16_buffer("get_value_buffer", layer_id, self.v_buffer)

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

