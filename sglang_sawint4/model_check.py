"""Up-front check that a model's attention fits the INT4 KV path.

Runs in the launcher before SGLang starts, on the model's ``config.json``, so an
unsupported model is refused with one clear line instead of a traceback from a
spawned scheduler process.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict

from sglang_sawint4.config import ConfigError, KVQuantConfig

# model types whose `sliding_window` is active unless a flag says otherwise
SLIDING_BY_DEFAULT = ("mistral", "mixtral", "gemma2", "gemma3", "gemma3_text", "cohere2")


# top-level config.json keys of models with a non-text encoder (SGLang serves them multimodal)
MULTIMODAL_KEYS = ("vision_config", "audio_config", "vision_tower_config", "speech_config")


def _read_config(model_path: str) -> Dict[str, Any]:
    path = os.path.join(model_path, "config.json")
    if not os.path.isfile(path):
        raise ConfigError(f"cannot check the model for --kv-quant: {path} not found (a local model directory is needed)")
    with open(path) as f:
        return json.load(f)


def load_hf_config(model_path: str) -> Dict[str, Any]:
    """The language model's config (multimodal / composite configs keep it in text_config)."""
    cfg = _read_config(model_path)
    return cfg.get("text_config") or cfg


def is_multimodal(model_path: str) -> bool:
    """Whether the model has an image/audio encoder beside its language model."""
    return any(key in _read_config(model_path) for key in MULTIMODAL_KEYS)


def check_model(hf: Dict[str, Any], config: KVQuantConfig) -> int:
    """Raise ConfigError if the model cannot use INT4 KV; return its head_dim."""
    arch = (hf.get("architectures") or ["?"])[0]
    if hf.get("kv_lora_rank") or hf.get("q_lora_rank"):
        raise ConfigError(f"--kv-quant does not support MLA models ({arch})")
    layer_types = hf.get("layer_types") or []
    # Qwen2-style configs carry a sliding_window value but switch it off with
    # use_sliding_window=False; Mistral/Gemma-style ones use it whenever it is set.
    window_on = hf.get("use_sliding_window", hf.get("model_type") in SLIDING_BY_DEFAULT)
    if any("sliding" in str(t) for t in layer_types) or (window_on and hf.get("sliding_window")):
        raise ConfigError(f"--kv-quant does not support sliding-window attention ({arch})")
    if any(t not in ("full_attention", "attention") for t in layer_types):
        raise ConfigError(f"--kv-quant does not support hybrid attention layers {sorted(set(layer_types))} ({arch})")
    if hf.get("attn_logit_softcapping"):
        raise ConfigError(f"--kv-quant does not support attention logit soft-capping ({arch})")
    heads = hf.get("num_attention_heads")
    head_dim = hf.get("head_dim") or (hf["hidden_size"] // heads if heads and hf.get("hidden_size") else None)
    if head_dim is None:
        raise ConfigError(f"cannot determine head_dim of {arch} for --kv-quant")
    config.layout(int(head_dim))  # raises ConfigError for head_dim / block-size mismatches
    return int(head_dim)
