"""KV-cache quantization methods applied to a Hugging Face model's attention.

Each method maps the post-RoPE key and the value tensors of every attention call
([batch, kv_heads, tokens, head_dim]) to what a served KV cache would give back,
through ``sglang_sawint4.format`` (the same format the kernels store). Teacher-forced
evaluation therefore sees every token's K/V through the cache, as in decoding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch

from sglang_sawint4 import format as fmt


@dataclass(frozen=True)
class KVMethod:
    name: str
    block: Optional[int] = None  # Hadamard block for BDR methods
    rotate: Optional[str] = None  # "k" | "kv" for BDR methods
    bf16_layers: Tuple[int, ...] = ()  # per-layer policy: these layers keep an unquantized cache

    @property
    def policy(self) -> str:
        """'[bf16:0,5]' when some layers keep an unquantized cache, else ''."""
        return f"[bf16:{','.join(map(str, self.bf16_layers))}]" if self.bf16_layers else ""

    @property
    def label(self) -> str:
        return (self.name if self.block is None else f"{self.name}-{self.block}-{self.rotate}") + self.policy

    def apply(self, key: torch.Tensor, value: torch.Tensor, layer: int = -1):
        if self.name == "bf16" or layer in self.bf16_layers:
            return key, value
        if self.name == "fp8_e4m3":
            # SGLang's native FP8 KV cache without calibration scales: a plain cast
            return (key.to(torch.float8_e4m3fn).to(key.dtype), value.to(torch.float8_e4m3fn).to(value.dtype))
        d = key.shape[-1]
        if self.name == "kivi":
            # offline only: keys per channel over groups of tokens, values per token
            # (KIVI without its full-precision residual window); not a paged layout
            return per_channel_int4(key, KIVI_GROUP), fmt.fake_quantize(value, fmt.Int4Format(d), is_value=True)
        layout = (fmt.Int4Format(d) if self.name == "int4"
                  else fmt.Int4Format.for_method("int4-bdr", d, self.block, self.rotate))
        return fmt.fake_quantize(key, layout, is_value=False), fmt.fake_quantize(value, layout, is_value=True)


KIVI_GROUP = 128


def per_channel_int4(x: torch.Tensor, group: int) -> torch.Tensor:
    """Asymmetric INT4 of [..., tokens, dim] with one (scale, offset) per channel per group of tokens."""
    t = x.shape[-2]
    pad = (-t) % group
    xp = torch.nn.functional.pad(x, (0, 0, 0, pad), mode="replicate") if pad else x
    g = xp.reshape(*xp.shape[:-2], xp.shape[-2] // group, group, xp.shape[-1]).transpose(-1, -2)
    codes, scale, offset = fmt.quantize(g)  # along the token axis of each group
    deq = fmt.dequantize(codes, scale, offset, x.dtype).transpose(-1, -2).reshape(xp.shape)
    return deq[..., :t, :]


def standard_methods(head_dim: int) -> list:
    methods = [KVMethod("bf16"), KVMethod("fp8_e4m3"), KVMethod("int4"), KVMethod("kivi")]
    blocks = [b for b in fmt.ALLOWED_BLOCK_SIZES if head_dim % b == 0]
    methods += [KVMethod("int4-bdr", b, "k") for b in blocks]
    methods += [KVMethod("int4-bdr", max(blocks), "kv")]
    return methods


def install(model, method_ref: Callable[[], KVMethod], observer=None) -> None:
    """Route the model's attention through ``method_ref()`` (looked up at every call).

    ``observer(layer_idx, key, key_hat)``, if given, sees each layer's keys before
    and after quantization (for per-layer error and outlier statistics).
    """
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def kv_quant_attention(module, query, key, value, attention_mask, **kwargs):
        layer = getattr(module, "layer_idx", -1)
        k_hat, v_hat = method_ref().apply(key, value, layer)
        if observer is not None:
            observer(layer, key, k_hat)
        return sdpa_attention_forward(module, query, k_hat, v_hat, attention_mask, **kwargs)

    AttentionInterface.register("sawint4_kv_quant", kv_quant_attention)
    model.config._attn_implementation = "sawint4_kv_quant"
    for m in model.modules():
        if hasattr(m, "config") and hasattr(m.config, "_attn_implementation"):
            m.config._attn_implementation = "sawint4_kv_quant"
