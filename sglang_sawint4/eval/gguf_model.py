"""Turn a packaged Llama / Qwen2 / Gemma 3 GGUF file into a BF16 Hugging Face model directory.

transformers' own GGUF path keeps weights packed (5.12) and builds a wrong tokenizer
for these files (../shared/docs/models.md), so this converter dequantizes every tensor
with the ``gguf`` package, undoes llama.cpp's changes to the weights (Llama's Q/K row
permutation, Gemma's +1 on every norm weight) and rebuilds the tokenizer from the file's
own vocabulary: byte-level BPE from its merges (Llama, Qwen2), SentencePiece BPE with
byte fallback from its scores (Gemma 3).

    python -m sglang_sawint4.eval.gguf_model SmolLM2-135M-Instruct.Q4_1.gguf /tmp/smollm2
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import torch

# GGUF tensor name (per block) -> HF Llama / Qwen2 parameter name
BLOCK_MAP = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
# Gemma 3 norms around both sublayers and on q / k: its ffn_norm is the *pre*-feedforward norm
GEMMA3_BLOCK_MAP = {
    **BLOCK_MAP, "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "post_attention_norm": "post_attention_layernorm", "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
GLOBAL_MAP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
# pre-tokenizers of the GGUF files we support (tokenizer.ggml.pre)
PRETOKENIZERS = ("smollm", "gpt-2", "qwen2")
# Qwen2's split regex (its tokenizer.json), applied before the byte-level mapping
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
ARCHS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "gemma3": "Gemma3ForCausalLM"}
# llama.cpp token types (tokenizer.ggml.token_type)
NORMAL, CONTROL, USER_DEFINED = 1, 3, 4


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's convert permutation of q_proj / k_proj rows (RoPE halves)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_name(gguf_name: str, arch: str = "llama") -> str:
    base, _, suffix = gguf_name.rpartition(".")
    if base.startswith("blk."):
        _, idx, part = base.split(".", 2)
        block_map = GEMMA3_BLOCK_MAP if arch == "gemma3" else BLOCK_MAP
        return f"model.layers.{idx}.{block_map[part]}.{suffix}"
    return f"{GLOBAL_MAP[base]}.{suffix}"


def gemma3_config(reader, n_layers: int, rope_theta: float) -> dict:
    """Gemma 3 text-model settings the GGUF does not spell out the HF way.

    Every sixth layer attends globally (RoPE base ``rope.freq_base``), the others within
    ``attention.sliding_window`` tokens with RoPE base 10,000; llama.cpp hard-codes both
    the pattern and the local base for this architecture, so they are not in the file.
    """
    window = int(_field(reader, "gemma3.attention.sliding_window"))
    return {
        "model_type": "gemma3_text", "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": int(_field(reader, "gemma3.attention.key_length")),
        "sliding_window": window,
        "layer_types": ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n_layers)],
        "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": rope_theta},
                            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
        "attention_bias": False, "final_logit_softcapping": None,
        "attn_logit_softcapping": None, "pad_token_id": int(_field(reader, "tokenizer.ggml.padding_token_id", 0)),
    }


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
        name = hf_name(t.name, arch)
        # llama.cpp permutes Llama's q/k rows for its RoPE layout (not Qwen2's)
        if arch == "llama" and name.endswith("q_proj.weight"):
            w = unpermute_qk(w, n_head)
        elif arch == "llama" and name.endswith("k_proj.weight"):
            w = unpermute_qk(w, n_kv)
        # llama.cpp stores Gemma's norm weights as 1 + w (HF's Gemma3RMSNorm adds the 1 itself)
        elif arch == "gemma3" and name.endswith("norm.weight"):
            w = w - 1.0
        tensors[name] = torch.from_numpy(np.ascontiguousarray(w)).to(torch.bfloat16)
    tied = "lm_head.weight" not in tensors
    vocab = tensors["model.embed_tokens.weight"].shape[0]
    head_dim = int(_field(reader, p + "attention.key_length", hidden // n_head))
    n_layers = int(_field(reader, p + "block_count"))
    rope_theta = float(_field(reader, p + "rope.freq_base", 10000.0))
    config = {
        "architectures": [ARCHS[arch]], "model_type": arch, "hidden_size": hidden,
        "intermediate_size": int(_field(reader, p + "feed_forward_length")),
        "num_hidden_layers": n_layers, "num_attention_heads": n_head,
        "num_key_value_heads": n_kv, "head_dim": head_dim, "vocab_size": vocab,
        "max_position_embeddings": int(_field(reader, p + "context_length")),
        "rms_norm_eps": float(_field(reader, p + "attention.layer_norm_rms_epsilon")),
        "rope_theta": rope_theta, "hidden_act": "silu",
        "tie_word_embeddings": tied,
        "bos_token_id": int(_field(reader, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(_field(reader, "tokenizer.ggml.eos_token_id")), "torch_dtype": "bfloat16",
    }
    if arch == "llama":
        config.update({"attention_bias": False, "mlp_bias": False})
    elif arch == "qwen2":
        config.update({"use_sliding_window": False, "sliding_window": None})
    else:
        config.update(gemma3_config(reader, n_layers, rope_theta))
        del config["hidden_act"], config["rope_theta"]  # Gemma 3 names: hidden_activation, rope_parameters
    os.makedirs(out, exist_ok=True)
    save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    build_tokenizer(reader, out)
    return config


def build_tokenizer(reader, out: str) -> None:
    """tokenizer.json and tokenizer_config.json from the GGUF's own vocabulary."""
    from tokenizers import AddedToken, processors

    kind = _field(reader, "tokenizer.ggml.model")
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    types = list(_field(reader, "tokenizer.ggml.token_type"))
    if kind == "gpt2":
        tok = byte_level_bpe(reader, tokens)
    elif kind == "llama":
        tok = sentencepiece_bpe(tokens, list(_field(reader, "tokenizer.ggml.scores")), types,
                                int(_field(reader, "tokenizer.ggml.unknown_token_id")))
    else:
        raise ValueError(f"tokenizer.ggml.model {kind!r} is not supported; supported: gpt2 (byte-level BPE), "
                         "llama (SentencePiece BPE)")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == CONTROL])
    bos_id = int(_field(reader, "tokenizer.ggml.bos_token_id"))
    bos, eos = tokens[bos_id], tokens[int(_field(reader, "tokenizer.ggml.eos_token_id"))]
    add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token", False))
    if add_bos:  # what `tok(text)` must return for a model trained with BOS first (Gemma)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)])
    tok.save(os.path.join(out, "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos,
           "add_bos_token": add_bos, "model_max_length": 1 << 20}
    template = _field(reader, "tokenizer.chat_template")
    if template:
        cfg["chat_template"] = template
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f, indent=1)


def byte_level_bpe(reader, tokens: list):
    """GPT-2-style BPE from the GGUF's merges, with the file's pre-tokenizer (Llama, Qwen2)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    pre = _field(reader, "tokenizer.ggml.pre")
    if pre not in PRETOKENIZERS:
        raise ValueError(f"unknown pre-tokenizer {pre!r}; supported: {PRETOKENIZERS}")
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
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
    return tok


def sentencepiece_merges(tokens: list, scores: list, types: list) -> list:
    """BPE merges equivalent to SentencePiece's BPE encoding over this vocabulary.

    SentencePiece merges, at each step, the adjacent pair whose concatenation is the
    highest-scoring normal piece; a merge list sorted by the merged piece's score (its
    splits into two normal pieces in id order) makes a rank-based BPE do the same.
    """
    normal = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == NORMAL}
    # SentencePiece merges characters it has no piece for too (byte fallback comes last),
    # a BPE with byte fallback turns them into bytes first: equal only if every character
    # of a piece is a piece itself (true of Gemma 3's vocabulary)
    orphans = sorted({c for t in normal if len(t) > 1 for c in t if c not in normal})
    if orphans:
        raise ValueError(f"characters {orphans[:10]} occur in pieces but are no pieces themselves: a BPE "
                         "tokenizer cannot reproduce SentencePiece's encoding of this vocabulary")
    ranked = []
    for piece, i in normal.items():
        splits = [(piece[:k], piece[k:]) for k in range(1, len(piece))
                  if piece[:k] in normal and piece[k:] in normal]
        splits.sort(key=lambda ab: (normal[ab[0]], normal[ab[1]]))
        ranked += [(-scores[i], i, a, b) for a, b in splits]
    ranked.sort(key=lambda r: (r[0], r[1]))
    return [(a, b) for _, _, a, b in ranked]


def sentencepiece_bpe(tokens: list, scores: list, types: list, unk_id: int):
    """SentencePiece BPE with byte fallback (Gemma 3; ``tokenizer.ggml.model = llama``).

    Spaces become U+2581 and there is no pre-splitting, as in SentencePiece with
    add_dummy_prefix off (the GGUF's add_space_prefix); user-defined pieces (runs of
    newlines, spaces and tabs) are matched whole before BPE, as SentencePiece and
    llama.cpp do; characters outside the vocabulary fall back to <0xXX> byte pieces.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=sentencepiece_merges(tokens, scores, types), unk_token=tokens[unk_id],
                               fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    # normalized=True: a run of spaces in the text matches the user-defined run after both became U+2581s
    tok.add_tokens([AddedToken(t, special=False, normalized=True) for t, ty in zip(tokens, types) if ty == USER_DEFINED])
    return tok


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    print(convert(sys.argv[1], sys.argv[2]))
