"""Write a Llama / Qwen2 / Qwen3-architecture model directory with seeded random weights.

    python -m sglang_sawint4.tools.make_model --preset tiny --out /tmp/models/tiny
    python -m sglang_sawint4.tools.make_model --preset 8b --arch qwen2 --out /tmp/models/qwen8b
    python -m sglang_sawint4.tools.make_model --preset 8b --arch qwen3 --out /tmp/models/qwen3-8b

For serving, integration and throughput work only: the weights are random, so
the text is meaningless (it is not an accuracy model).  The directory holds
config.json, safetensors shards, a byte-level BPE tokenizer trained on the
Python standard library's sources (offline, seconds) and a chat template, so
SGLang serves it through the ordinary HF loading path.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time

PRESETS = {
    # name: (layers, hidden, intermediate, q_heads, kv_heads, head_dim)
    "tiny": (2, 256, 512, 4, 2, 64),
    "small": (8, 1024, 2816, 8, 2, 128),
    "1b": (16, 2048, 5632, 16, 8, 128),
    "8b": (32, 4096, 14336, 32, 8, 128),
}
SPECIAL = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def train_tokenizer(out: str, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    files = sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py")))[:200]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train(files, trainer)
    tok.save(os.path.join(out, "tokenizer.json"))
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "<|im_end|>",
                   "unk_token": "<unk>", "pad_token": "</s>", "model_max_length": 131072,
                   "chat_template": CHAT_TEMPLATE}, f, indent=1)


def model_config(arch: str, preset: str, vocab: int, max_pos: int) -> dict:
    layers, hidden, inter, hq, hk, hd = PRESETS[preset]
    cfg = {
        "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
        "num_attention_heads": hq, "num_key_value_heads": hk, "head_dim": hd,
        "vocab_size": vocab, "max_position_embeddings": max_pos, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "hidden_act": "silu", "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 4, "torch_dtype": "bfloat16", "initializer_range": 0.02,
    }
    if arch == "llama":
        cfg.update({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False,
                    "mlp_bias": False})
    elif arch == "qwen2":
        cfg.update({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "use_sliding_window": False,
                    "sliding_window": None, "max_window_layers": layers})
    else:  # Qwen3: RMSNorm on q and k per head before RoPE, no q/k/v bias (the paper's family)
        cfg.update({"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "attention_bias": False,
                    "use_sliding_window": False, "sliding_window": None, "max_window_layers": layers})
    return cfg


def weight_shapes(cfg: dict, arch: str):
    h, i, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    yield "model.embed_tokens.weight", (cfg["vocab_size"], h)
    for l in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{l}."
        yield p + "input_layernorm.weight", (h,)
        yield p + "post_attention_layernorm.weight", (h,)
        yield p + "self_attn.q_proj.weight", (q, h)
        yield p + "self_attn.k_proj.weight", (kv, h)
        yield p + "self_attn.v_proj.weight", (kv, h)
        yield p + "self_attn.o_proj.weight", (h, q)
        if arch == "qwen2":
            yield p + "self_attn.q_proj.bias", (q,)
            yield p + "self_attn.k_proj.bias", (kv,)
            yield p + "self_attn.v_proj.bias", (kv,)
        if arch == "qwen3":
            yield p + "self_attn.q_norm.weight", (hd,)
            yield p + "self_attn.k_norm.weight", (hd,)
        yield p + "mlp.gate_proj.weight", (i, h)
        yield p + "mlp.up_proj.weight", (i, h)
        yield p + "mlp.down_proj.weight", (h, i)
    yield "model.norm.weight", (h,)
    yield "lm_head.weight", (cfg["vocab_size"], h)


def write_weights(out: str, cfg: dict, arch: str, seed: int, shard_gib: float, device: str,
                  lm_head_std: float) -> int:
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator(device=device).manual_seed(seed)
    std = cfg["initializer_range"]
    shard, shard_bytes, index, n_shards, total = {}, 0, {}, 0, 0
    limit = int(shard_gib * (1 << 30))
    names = list(weight_shapes(cfg, arch))

    def flush():
        nonlocal shard, shard_bytes, n_shards
        if shard:
            n_shards += 1
            fname = f"model-{n_shards:05d}.safetensors"
            save_file(shard, os.path.join(out, fname), metadata={"format": "pt"})
            for k in shard:
                index[k] = fname
            shard, shard_bytes = {}, 0

    for k, (name, shape) in enumerate(names):
        if name.endswith("norm.weight"):
            t = torch.ones(shape, dtype=torch.bfloat16)
        elif name.endswith(".bias"):
            t = torch.zeros(shape, dtype=torch.bfloat16)
        else:
            s = lm_head_std if name == "lm_head.weight" else std
            t = (torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * s).to(torch.bfloat16).cpu()
        shard[name] = t
        shard_bytes += t.numel() * 2
        total += t.numel()
        if shard_bytes >= limit:
            flush()
        if (k + 1) % 50 == 0:
            print(f"  weights {k + 1}/{len(names)}", flush=True)
    flush()
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total * 2}, "weight_map": index}, f, indent=1)
    return total


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--arch", choices=["llama", "qwen2", "qwen3"], default="llama")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--max-position-embeddings", type=int, default=131072)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-gib", type=float, default=4.0)
    p.add_argument("--lm-head-std", type=float, default=0.2,
                   help="std of lm_head weights; 10x the rest so greedy decoding is decisive (as with "
                        "trained models) instead of a coin toss between near-equal logits")
    p.add_argument("--device", default=None, help="where random weights are drawn (default: cuda if available)")
    args = p.parse_args(argv)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    os.makedirs(args.out, exist_ok=True)
    t = time.time()
    train_tokenizer(args.out, args.vocab_size)
    cfg = model_config(args.arch, args.preset, args.vocab_size, args.max_position_embeddings)
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    with open(os.path.join(args.out, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 1, "eos_token_id": 4, "do_sample": False}, f)
    n = write_weights(args.out, cfg, args.arch, args.seed, args.shard_gib, device, args.lm_head_std)
    print(f"{args.arch}/{args.preset}: {n / 1e6:.1f}M params at {args.out} in {time.time() - t:.0f}s")


if __name__ == "__main__":
    sys.exit(main())
