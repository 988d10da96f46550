"""Turn a packaged Llama-architecture GGUF file into a BF16 Hugging Face model directory.

transformers' own GGUF path keeps weights packed (5.12) and builds a wrong tokenizer
for these files (../shared/docs/models.md), so this converter dequantizes every tensor
with the ``gguf`` package, undoes llama.cpp's Q/K row permutation, and rebuilds the
byte-level BPE tokenizer from the file's own vocabulary and merges.

    python -m sglang_sawint4.eval.gguf_model SmolLM2-135M-Instruct.Q4_1.gguf /tmp/smollm2
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import torch

# GGUF tensor name (per block) -> HF Llama parameter name
BLOCK_MAP = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
GLOBAL_MAP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
# pre-tokenizers of the GGUF files we support (tokenizer.ggml.pre)
PRETOKENIZERS = ("smollm", "gpt-2", "qwen2")
# Qwen2's split regex (its tokenizer.json), applied before the byte-level mapping
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
ARCHS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's convert permutation of q_proj / k_proj rows (RoPE halves)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_name(gguf_name: str) -> str:
    base, _, suffix = gguf_name.rpartition(".")
    if base.startswith("blk."):
        _, idx, part = base.split(".", 2)
        return f"model.layers.{idx}.{BLOCK_MAP[part]}.{suffix}"
    return f"{GLOBAL_MAP[base]}.{suffix}"


def convert(gguf_path: str, out: str) -> dict:
    import gguf
    from safetensors.torch import save_file

    reader = gguf.GGUFReader(gguf_path)
    arch = _field(reader, "general.architecture")
    if arch not in ARCHS:
        raise ValueError(f"{gguf_path}: architecture {arch!r} is not supported; supported: {sorted(ARCHS)}")
    p = f"{arch}."
    n_head = int(_field(reader, p + "attention.head_count"))
    n_kv = int(_field(reader, p + "attention.head_count_kv"))
    hidden = int(_field(reader, p + "embedding_length"))
    tensors = {}
    for t in reader.tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        w = w.reshape([int(x) for x in reversed(t.shape)]) if w.ndim == 1 and len(t.shape) > 1 else w
        name = hf_name(t.name)
        # llama.cpp permutes Llama's q/k rows for its RoPE layout (not Qwen2's)
        if arch == "llama" and name.endswith("q_proj.weight"):
            w = unpermute_qk(w, n_head)
        elif arch == "llama" and name.endswith("k_proj.weight"):
            w = unpermute_qk(w, n_kv)
        tensors[name] = torch.from_numpy(np.ascontiguousarray(w)).to(torch.bfloat16)
    tied = "lm_head.weight" not in tensors
    vocab = tensors["model.embed_tokens.weight"].shape[0]
    config = {
        "architectures": [ARCHS[arch]], "model_type": arch, "hidden_size": hidden,
        "intermediate_size": int(_field(reader, p + "feed_forward_length")),
        "num_hidden_layers": int(_field(reader, p + "block_count")), "num_attention_heads": n_head,
        "num_key_value_heads": n_kv, "head_dim": hidden // n_head, "vocab_size": vocab,
        "max_position_embeddings": int(_field(reader, p + "context_length")),
        "rms_norm_eps": float(_field(reader, p + "attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_field(reader, p + "rope.freq_base", 10000.0)), "hidden_act": "silu",
        "tie_word_embeddings": tied,
        "bos_token_id": int(_field(reader, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(_field(reader, "tokenizer.ggml.eos_token_id")), "torch_dtype": "bfloat16",
    }
    if arch == "llama":
        config.update({"attention_bias": False, "mlp_bias": False})
    else:
        config.update({"use_sliding_window": False, "sliding_window": None})
    os.makedirs(out, exist_ok=True)
    save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    build_tokenizer(reader, out)
    return config


def build_tokenizer(reader, out: str) -> None:
    """Byte-level BPE from the GGUF vocabulary and merges (what the stock conversion gets wrong)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    if _field(reader, "tokenizer.ggml.model") != "gpt2":
        raise ValueError("only byte-level BPE (tokenizer.ggml.model = gpt2) vocabularies are supported")
    pre = _field(reader, "tokenizer.ggml.pre")
    if pre not in PRETOKENIZERS:
        raise ValueError(f"unknown pre-tokenizer {pre!r}; supported: {PRETOKENIZERS}")
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    types = list(_field(reader, "tokenizer.ggml.token_type"))
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    if pre == "qwen2":
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        # SmolLM2 splits digits one by one before the GPT-2 regex
        tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                             if pre == "smollm" else byte_level)
    tok.decoder = decoders.ByteLevel()
    CONTROL = 3  # llama.cpp token type
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == CONTROL])
    tok.save(os.path.join(out, "tokenizer.json"))
    bos = tokens[int(_field(reader, "tokenizer.ggml.bos_token_id"))]
    eos = tokens[int(_field(reader, "tokenizer.ggml.eos_token_id"))]
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos,
           "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
           "model_max_length": 1 << 20}
    template = _field(reader, "tokenizer.chat_template")
    if template:
        cfg["chat_template"] = template
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f, indent=1)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    print(convert(sys.argv[1], sys.argv[2]))
