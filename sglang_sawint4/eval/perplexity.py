"""Perplexity, top-1 agreement and KL to the unquantized KV cache, for each KV method.

    python -m sglang_sawint4.eval.perplexity --model /tmp/smollm2-135m --model-name SmolLM2-135M-Instruct \
        --text kjv=/tmp/kjv.txt --text brown=/tmp/brown.txt --context 2048 --windows 2 \
        --out bench/results/accuracy.json

Teacher-forced: every token's K/V goes through the method (as a decoding cache
would give it back), attention then runs in float32 SDPA.  Non-overlapping windows
of --context tokens from each text; the reference ("bf16") keeps K/V unquantized.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch


from sglang_sawint4.eval.kv_methods import (
    policy_methods,
    KVMethod,
    default_methods,
    final_hidden,
    install,
    logits_from_hidden,
    load_model,
    record_kv,
    standard_methods,
    start_tokens,
)
from sglang_sawint4.eval.results import load_results, merge_method_rows, run_info, save_results


DEFAULT_CONTEXT = 2048


def windows(tokenizer, path, context, count):
    """Non-overlapping windows [context] of the text's tokens, each starting with the
    model's start tokens (``start_tokens``)."""
    prefix = start_tokens(tokenizer)
    with open(path, errors="replace") as f:
        ids = tokenizer(f.read(), add_special_tokens=False)["input_ids"]
    body = context - len(prefix)
    n = min(count, len(ids) // body)
    if n == 0:
        raise SystemExit(f"{path}: fewer than {context} tokens")
    return [torch.tensor(prefix + ids[i * body:(i + 1) * body]) for i in range(n)]


class ReferenceLogProbs:
    """Log-probabilities of the unquantized cache for one window, ``rows_per_chunk``
    positions at a time (see ``score``).  Made once and kept when the whole window's fit
    in ``keep_bytes`` (a 2k window: 2 GB at Gemma's 262k vocabulary), so the methods after
    BF16 do not recompute them; a 32k window's (34 GB) are remade per method instead."""

    def __init__(self, model, hidden, rows_per_chunk: int = 2048, keep_bytes: int = 4 << 30):
        self.model, self.hidden, self.rows_per_chunk = model, hidden, rows_per_chunk
        vocab = model.get_output_embeddings().weight.shape[0]
        self.keep = hidden.shape[0] * vocab * 4 <= keep_bytes
        self.kept = {}

    def chunk(self, lo: int) -> torch.Tensor:
        """[rows, vocab] log-probabilities of positions lo .. lo + rows_per_chunk."""
        if lo in self.kept:
            return self.kept[lo]
        logp = torch.log_softmax(logits_from_hidden(self.model, self.hidden[lo: lo + self.rows_per_chunk]), -1)
        if self.keep:
            self.kept[lo] = logp
        return logp


def score(model, hidden, ref: ReferenceLogProbs, targets) -> dict:
    """Summed NLL of ``targets`` [tokens], top-1 agreement and KL to the reference, from the
    final hidden states [tokens, hidden] of a method and the unquantized cache's log-probs.

    Logits are made ``ref.rows_per_chunk`` positions at a time: [32k, 262k] fp32 logits of a
    long Gemma window alone would be 34 GB.
    """
    rec = {"nll_sum": 0.0, "n": targets.numel(), "top1": 0.0, "kl": 0.0}
    for lo in range(0, targets.numel(), ref.rows_per_chunk):
        rows = slice(lo, lo + ref.rows_per_chunk)
        ref_logp = ref.chunk(lo)
        # the unquantized cache's own pass: its log-probs are the reference's, not made twice
        logp = ref_logp if hidden is ref.hidden else torch.log_softmax(logits_from_hidden(model, hidden[rows]), -1)
        rec["nll_sum"] -= logp.gather(-1, targets[rows, None]).sum().item()
        rec["top1"] += (logp.argmax(-1) == ref_logp.argmax(-1)).sum().item()
        rec["kl"] += (ref_logp.exp() * (ref_logp - logp)).sum().item()
    return rec


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--model-name", required=True)
    p.add_argument("--text", action="append", required=True, help="name=path of a plain-text corpus")
    p.add_argument("--context", type=int, default=DEFAULT_CONTEXT)
    p.add_argument("--methods", choices=("standard", "default"), default="standard",
                   help="standard: every method; default: BF16, naive INT4 and the served default "
                        "(long contexts, where a CPU forward takes minutes)")
    p.add_argument("--windows", type=int, default=2)
    p.add_argument("--out", required=True)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--device", default="cpu", help="cpu, or cuda on the GPU host (float32 either way)")
    p.add_argument("--no-plot", action="store_true", help="leave the plot to sglang_sawint4.eval.merge (no matplotlib)")
    p.add_argument("--bf16-layers", default=None,
                   help="comma-separated layers kept unquantized: adds int4 and int4-bdr variants with "
                        "that per-layer policy")
    p.add_argument("--only-policy", action="store_true",
                   help="with --bf16-layers: evaluate only bf16 and the per-layer-policy variants")
    p.add_argument("--kmeans", default=None, metavar="C1,C2,..",
                   help="add k-means residual INT4 (centroid subtract, plain and with the largest BDR block "
                        "on K) with these cluster counts, calibrated on a held-out window (the one after "
                        "the evaluated windows of the first --text)")
    p.add_argument("--hessian", type=float, default=None, metavar="ALPHA",
                   help="add Hessian-aware INT4 on K (the query second-moment eigenbasis, damped by ALPHA x "
                        "mean eigenvalue and whitened, composed with the largest BDR block), calibrated on "
                        "the same held-out window as --kmeans; the paper's setting is 0.01")
    p.add_argument("--only-calibrated", action="store_true",
                   help="with --kmeans / --hessian: evaluate only bf16 and the calibrated methods")
    p.add_argument("--policy", default=None, metavar="FILE",
                   help="a KV policy file (python -m sglang_sawint4.policy resolve, what the launcher serves by "
                        "default): adds its rows as method 'served-default'")
    p.add_argument("--fallback-policy", action="store_true",
                   help="adds the policy the launcher falls back to when a model cannot be calibrated "
                        "('policy-fallback' rows)")
    args = p.parse_args()
    from tqdm import tqdm

    tok, model = load_model(args.model, args.threads, args.device)
    head_dim = model.config.head_dim
    current = {"m": KVMethod("bf16")}
    layer_stats = {}

    def observer(layer, key, key_hat):
        if current["m"].name == "bf16":
            amax = key.abs().amax(dim=(0, 2)).float()  # [kv_heads, head_dim]
            s = layer_stats.setdefault(layer, {"channel_absmax": torch.zeros_like(amax)})
            s["channel_absmax"] = torch.maximum(s["channel_absmax"], amax)
        else:
            err = ((key_hat - key).norm() / key.norm()).item()
            layer_stats.setdefault(layer, {}).setdefault(f"k_err/{current['m'].label}", []).append(err)

    install(model, lambda: current["m"], observer)
    methods = standard_methods(head_dim) if args.methods == "standard" else default_methods(head_dim)
    methods += policy_methods(args.policy, args.fallback_policy, model.config)
    if args.bf16_layers:
        keep = tuple(int(x) for x in args.bf16_layers.split(","))
        policy = [KVMethod(m.name, m.block, m.rotate, keep) for m in methods
                  if m.name == "int4" or (m.name == "int4-bdr" and m.rotate == "k")]
        methods = [methods[0]] + policy if args.only_policy else methods + policy
    data = {name: windows(tok, path, args.context, args.windows)
            for name, path in (t.split("=", 1) for t in args.text)}
    if args.kmeans or args.hessian is not None:
        first_path = args.text[0].split("=", 1)[1]
        held_out = windows(tok, first_path, args.context, args.windows + 1)
        if len(held_out) <= args.windows:
            raise SystemExit(f"{first_path}: no window left after the evaluated ones for calibration")
        recorder = record_kv(model, held_out[args.windows], current)
        largest = max(m.block for m in methods if m.block)
        calibrated = []
        for c in (int(x) for x in args.kmeans.split(",")) if args.kmeans else ():
            book = recorder.codebook(c)
            calibrated += [KVMethod("kmeans", clusters=c, codebook=book),
                           KVMethod("kmeans", largest, "k", clusters=c, codebook=book)]
        if args.hessian is not None:
            calibrated.append(KVMethod("hessian", largest, "k", metric=recorder.query_metric(args.hessian)))
        methods = [methods[0]] + calibrated if args.only_calibrated else methods + calibrated
    rows = []
    total = len(methods) * sum(len(w) for w in data.values())
    bar = tqdm(total=total, desc="forwards", file=sys.stdout, mininterval=10)
    t0 = time.time()
    for corpus, wins in data.items():
        for w in wins:
            ref = None
            for m in methods:
                current["m"] = m
                with torch.no_grad():
                    hidden = final_hidden(model, w)[:-1]
                    if m.name == "bf16":
                        ref = ReferenceLogProbs(model, hidden)
                    rec = score(model, hidden, ref, w[1:].to(hidden.device))
                rows.append({"corpus": corpus, "method": m, **rec})
                bar.update(1)
    bar.close()

    out_rows = []
    for m in methods:
        for corpus in list(data) + [None]:
            sel = [r for r in rows if r["method"] == m and (corpus is None or r["corpus"] == corpus)]
            n = sum(r["n"] for r in sel)
            base = {"model": args.model_name, "method": m.row_name, "block": m.block, "rotate": m.rotate,
                    "context": args.context, "n": n, "corpus": corpus or "all"}
            if m.policy is not None:
                base["policy"] = m.policy.summary()
            out_rows.append({**base, "metric": "ppl", "value": math.exp(sum(r["nll_sum"] for r in sel) / n)})
            out_rows.append({**base, "metric": "top1_agree", "value": sum(r["top1"] for r in sel) / n})
            out_rows.append({**base, "metric": "kl", "value": sum(r["kl"] for r in sel) / n})
    run = {**run_info(t0, args.device),
           "layers": {str(k): {"channel_absmax_max": float(v["channel_absmax"].max()),
                               "channel_absmax_median": float(v["channel_absmax"].median()),
                               **{n: sum(e) / len(e) for n, e in v.items() if n.startswith("k_err/")}}
                      for k, v in sorted(layer_stats.items())}}
    # one file for every model: this run replaces its own rows (same model, method and
    # context) only; the other runs' records stay
    result = merge_method_rows(load_results(args.out), out_rows)
    runs = result["runs"].setdefault(args.model_name, {})
    if args.only_policy or args.only_calibrated:
        key = "bf16_layers_run" if args.only_policy else (
            "kmeans_run" if not args.hessian else "hessian_run" if not args.kmeans else "calibrated_run")
        if args.context != DEFAULT_CONTEXT:  # next to, not instead of, the same run at 2k
            key = f"context_{args.context}_{key}"
        runs[key] = {k: run[k] for k in run if k != "layers"}
    elif args.context != DEFAULT_CONTEXT:
        runs[f"context_{args.context}_run"] = run
    else:
        runs.update(run)
    for m in methods:
        if m.policy is not None:  # what the policy chose and the capacity it keeps, per model
            runs.setdefault("policies", {})[m.row_name] = m.policy.to_json() | {"key_centers": sorted(
                m.policy.key_centers)}
    save_results(args.out, result)
    if not args.no_plot:
        plot(result, os.path.splitext(args.out)[0] + ".png")
        plot_policy(result, os.path.join(os.path.dirname(args.out) or ".", "policy_accuracy.png"))
    for r in out_rows:
        if r["corpus"] == "all":
            print(f"{label_row(r):16} {r['metric']:10} {r['value']:.4f}")


def label_row(r) -> str:
    name = r["method"]
    suffix = name[name.index("["):] if "[" in name else ""
    base = name[: len(name) - len(suffix)]
    return (base if r["block"] is None else f"{base}-{r['block']}-{r['rotate']}") + suffix


METHOD_ORDER = ["bf16", "fp8_e4m3", "kivi", "int4", "int4-bdr", "kmeans", "hessian", "served", "policy"]


def method_key(row) -> tuple:
    return row["method"], row["block"], row["rotate"]


def method_order(key) -> tuple:
    """Plot order: the table's method order, per-layer-policy variants ([...]) last,
    larger blocks first."""
    method, block, rotate = key
    base = method.split("[")[0]
    family = base.split("-")[0] if base.startswith(("kmeans", "served", "policy")) else base
    return "[" in method, METHOD_ORDER.index(family), method, -(block or 0), rotate or ""


POLICY_METHODS = [("bf16", "BF16"), ("int4", "naive INT4"), ("int4-bdr", "paper default (BDR, every layer)"),
                  ("served-default", "served default (KV policy)"), ("policy-fallback", "fallback (uncalibrated)")]


def policy_rows(result, model_name):
    """{(method, context): ppl row} of the five methods of POLICY_METHODS for one model; the paper
    default is BDR with the largest block dividing head_dim on K (``format.default_block_size``)."""
    from sglang_sawint4 import format as fmt

    policy = result["runs"].get(model_name, {}).get("policies", {}).get("served-default")
    paper_block = fmt.default_block_size(policy["head_dim"]) if policy else None
    out = {}
    for r in result["rows"]:
        if r["model"] != model_name or r["metric"] != "ppl" or r["corpus"] != "all" or not r.get("context"):
            continue
        if r["method"] == "int4-bdr" and (r["block"] != paper_block or r["rotate"] != "k"):
            continue
        if r["method"] in dict(POLICY_METHODS):
            out[(r["method"], r["context"])] = r
    return out


def plot_policy(result, path):
    """Per model with a served-default row: perplexity of BF16, naive INT4, the paper's default,
    the served default and the fallback, at 2,048 tokens and the longest context measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m in result["runs"] if any(k[0] == "served-default" for k in policy_rows(result, m))]
    if not models:
        return
    fig, axes = plt.subplots(1, len(models), figsize=(4.6 * len(models), 4.4), squeeze=False)
    for ax, model_name in zip(axes[0], models):
        rows = policy_rows(result, model_name)
        contexts = sorted({c for _, c in rows})
        width = 0.8 / len(contexts)
        for i, (c, color) in enumerate(zip(contexts, ("tab:red", "tab:blue"))):
            xs = [x for x, (m, _) in enumerate(POLICY_METHODS) if (m, c) in rows]
            ax.bar([x + (i - (len(contexts) - 1) / 2) * width for x in xs],
                   [rows[(POLICY_METHODS[x][0], c)]["value"] for x in xs], width, color=color, label=f"{c} tokens")
        ax.set_xticks(range(len(POLICY_METHODS)), [label for _, label in POLICY_METHODS], rotation=30, ha="right",
                      fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("perplexity (3 texts)")
        policy = result["runs"][model_name]["policies"]["served-default"]
        ax.set_title(f"{model_name}\nserved default: {policy['capacity_vs_bf16']:.2f}x BF16's KV capacity",
                     fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(result["runs"])
    fig, axes = plt.subplots(len(models), 2, figsize=(13, 4.2 * len(models)), squeeze=False)
    for row, model_name in enumerate(models):
        ax, ax_l = axes[row]
        ppl = [r for r in result["rows"] if r["model"] == model_name and r["corpus"] == "all"
               and r["metric"] == "ppl" and r["context"]]
        # two bars per method: the 2,048-token windows and the model's longest context run
        contexts = sorted({DEFAULT_CONTEXT, max((r["context"] for r in ppl), default=DEFAULT_CONTEXT)})
        by_context = {c: {method_key(r): r for r in ppl if r["context"] == c} for c in contexts}
        keys = sorted({k for rows in by_context.values() for k in rows}, key=method_order)
        if not keys:  # a model with task rows only (eval_tasks / eval_passkey / eval_gsm)
            ax.axis("off")
            ax_l.axis("off")
            continue
        width = 0.8 / len(contexts)
        for i, (c, color) in enumerate(zip(contexts, ("tab:red", "tab:blue"))):
            xs = [x for x, k in enumerate(keys) if k in by_context[c]]
            ax.bar([x + (i - (len(contexts) - 1) / 2) * width for x in xs],
                   [by_context[c][keys[x]]["value"] for x in xs], width, color=color, label=f"{c}-token windows")
        first = {k: next(by_context[c][k] for c in contexts if k in by_context[c]) for k in keys}
        ax.set_xticks(range(len(keys)), [label_row(first[k]) for k in keys], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("perplexity")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
        ax.set_title(f"{model_name}: perplexity by KV method")
        layers = result["runs"][model_name].get("layers")
        if not layers:  # only partial runs (--only-policy / --only-calibrated) for this model so far
            ax_l.axis("off")
            continue
        xs = sorted(int(k) for k in layers)
        ratio = [layers[str(x)]["channel_absmax_max"] / max(layers[str(x)]["channel_absmax_median"], 1e-9) for x in xs]
        ax_l.plot(xs, ratio, "k-o", ms=3, label="key outlier ratio (max / median channel |k|)")
        ax2 = ax_l.twinx()
        # the served default: BDR with the largest block, K only (64 for head_dim 64, 128 for 256)
        bdr = max((k for k in layers[str(xs[0])] if k.startswith("k_err/int4-bdr-") and k.endswith("-k")),
                  key=lambda k: int(k.split("-")[2]), default="k_err/int4-bdr")
        for key, color in (("k_err/int4", "tab:blue"), (bdr, "tab:red")):
            if all(key in layers[str(x)] for x in xs):
                ax2.plot(xs, [layers[str(x)][key] for x in xs], color=color,
                         label=key.split("/", 1)[1] + " key rel. error")
        ax_l.set_xlabel("layer")
        ax_l.set_ylabel("outlier ratio")
        ax2.set_ylabel("relative key reconstruction error")
        ax_l.legend(loc="upper left", fontsize=8)
        ax2.legend(loc="upper right", fontsize=8)
        ax_l.set_title(f"{model_name}: outlier key channels per layer, and what BDR does")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
