"""Triton kernels of the INT4 KV path (imported as ``sglang_sawint4.kernels``)."""

from sglang_sawint4.kernels.decode import int4_decode_attention
from sglang_sawint4.kernels.dequant import dequantize_pages
from sglang_sawint4.kernels.store import rotate_quantize_store

__all__ = ["int4_decode_attention", "dequantize_pages", "rotate_quantize_store"]
