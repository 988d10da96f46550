#!/usr/bin/env python3
"""Per-layer attention-output error when only the keys go through a KV method.

    python scripts/probe_attention_error.py --model /tmp/qwen2.5-coder-0.5b --text /tmp/brown.txt \
        --tokens 1024 --out bench/results/attention_probe.json

For each layer: relative error of the attention output with quantized keys (values
and queries exact) against exact attention, per method, and the mean attention mass
on the first token (a sink indicator).  CPU, float32.
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sglang_sawint4.eval.kv_methods import KVMethod, load_model  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--text", required=True)
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    tok, model = load_model(args.model)
    with open(args.text, errors="replace") as f:
        ids = tok(f.read(50 * args.tokens), add_special_tokens=False)["input_ids"][: args.tokens]
    d = model.config.head_dim
    methods = [KVMethod("int4"), KVMethod("kivi")] + [KVMethod("int4-bdr", b, "k") for b in (16, 32, 64, 128)
                                                      if d % b == 0]
    layers = {}

    def probe(module, q, k, v, mask, **kw):
        out, w = sdpa_attention_forward(module, q, k, v, mask, **kw)
        row = layers.setdefault(module.layer_idx, {})
        for m in methods:
            k_hat, _ = m.apply(k, v)
            o, _ = sdpa_attention_forward(module, q, k_hat, v, mask, **kw)
            row[m.label] = ((o - out).norm() / out.norm()).item()
        g = q.shape[1] // k.shape[1]
        s = (q @ k.repeat_interleave(g, 1).transpose(-1, -2)) * module.scaling
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
        row["first_token_attention"] = s.softmax(-1)[..., 0].mean().item()
        return out, w

    AttentionInterface.register("sawint4_probe", probe)
    model.config._attn_implementation = "sawint4_probe"
    with torch.no_grad():
        model(torch.tensor([ids]))
    result = {"model": os.path.basename(args.model.rstrip("/")), "tokens": len(ids),
              "command": " ".join(["python"] + sys.argv), "device": "cpu",
              "layers": {str(k): v for k, v in sorted(layers.items())}}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    for k, v in sorted(layers.items()):
        print(k, {n: round(x, 3) for n, x in v.items()})


if __name__ == "__main__":
    main()
