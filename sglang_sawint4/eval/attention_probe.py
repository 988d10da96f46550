"""Per-layer attention-output error when only the keys go through a KV method.

    python -m sglang_sawint4.eval.attention_probe --model /tmp/acc/qwen2.5-coder-0.5b \
        --model-name Qwen2.5-Coder-0.5B-Instruct --text /tmp/acc/brown.txt --tokens 1024 \
        --out bench/results/attention_probe.json

For each layer: relative error ||o_hat - o|| / ||o|| of the attention output with quantized
keys (values and queries exact) against exact attention, per method (naive INT4, KIVI-style
per-channel keys, BDR on K with every block that divides head_dim), and the mean attention
mass on the first token (a sink indicator), both under the model's own masks (Gemma 3's
sliding windows included).  One window of the text, after the model's start tokens.  CPU,
float32.  The results file holds one entry per model (a run replaces its model's entry);
a plot of the error per layer is written beside it.
"""

import argparse
import json
import os

import torch


from sglang_sawint4 import format as fmt
from sglang_sawint4.eval.kv_methods import KVMethod, load_model, start_tokens, use_attention
from sglang_sawint4.serving.server import command_line


def probe_methods(head_dim: int) -> list:
    """The key-only methods probed: naive INT4, per-channel keys, BDR with each block."""
    return [KVMethod("int4"), KVMethod("kivi")] + [
        KVMethod("int4-bdr", b, "k") for b in fmt.blocks_dividing(head_dim)]


def first_token_attention(module, q, k, mask) -> float:
    """Mean attention probability on position 0, over heads and queries, under ``mask``
    (a boolean [.., q, k] mask where True attends, as SDPA takes it, or None: causal)."""
    g = q.shape[1] // k.shape[1]
    s = (q @ k.repeat_interleave(g, 1).transpose(-1, -2)) * module.scaling
    if mask is None:
        allowed = torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).tril(s.shape[-1] - s.shape[-2])
    elif mask.dtype == torch.bool:
        allowed = mask
    else:  # an additive float mask
        allowed = mask == 0
    return s.masked_fill(~allowed, float("-inf")).softmax(-1)[..., 0].mean().item()


def probe_model(model, ids: torch.Tensor) -> dict:
    """{layer: {method label: relative output error, "first_token_attention": mass}}."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    methods = probe_methods(model.config.head_dim)
    layers = {}

    def probe(module, q, k, v, mask, **kw):
        out, w = sdpa_attention_forward(module, q, k, v, mask, **kw)
        row = layers.setdefault(module.layer_idx, {})
        for m in methods:
            k_hat, _ = m.apply(k, v)
            o, _ = sdpa_attention_forward(module, q, k_hat, v, mask, **kw)
            row[m.label] = ((o - out).norm() / out.norm()).item()
        row["first_token_attention"] = first_token_attention(module, q, k, mask)
        return out, w

    use_attention(model, "sawint4_probe", probe)
    with torch.no_grad():
        model(ids[None])
    return {str(k): v for k, v in sorted(layers.items())}


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    models = list(result["models"])
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
    for ax, name in zip(axes[0], models):
        layers = result["models"][name]["layers"]
        xs = sorted(int(k) for k in layers)
        labels = [k for k in layers[str(xs[0])] if k != "first_token_attention"]
        for label in labels:
            ax.plot(xs, [layers[str(x)][label] for x in xs], marker="o", ms=3, label=label)
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("layer")
        ax.set_ylabel("attention output rel. error (keys quantized)")
        ax.set_title(f"{name} ({result['models'][name]['tokens']} tokens)", fontsize=10)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--model-name", required=True, help="the model's name in the results file")
    p.add_argument("--text", required=True)
    p.add_argument("--tokens", type=int, default=1024, help="window length, start tokens included")
    p.add_argument("--out", required=True)
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args()

    tok, model = load_model(args.model)
    prefix = start_tokens(tok)
    with open(args.text, errors="replace") as f:
        body = tok(f.read(50 * args.tokens), add_special_tokens=False)["input_ids"]
    ids = torch.tensor((prefix + body)[: args.tokens])
    result = {"models": {}}
    if os.path.exists(args.out):
        with open(args.out) as f:
            result = json.load(f)
        if "models" not in result:
            raise SystemExit(f"{args.out}: not a per-model attention probe file; write to another path")
    result["models"][args.model_name] = {
        "tokens": len(ids), "command": command_line(), "device": "cpu",
        "layers": probe_model(model, ids)}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    if not args.no_plot:
        plot(result, os.path.splitext(args.out)[0] + ".png")
    for k, v in result["models"][args.model_name]["layers"].items():
        print(k, {n: round(x, 3) for n, x in v.items()})


if __name__ == "__main__":
    main()
