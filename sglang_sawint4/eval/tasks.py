"""Task accuracy by log-likelihood: BIG-bench multiple-choice tasks under each KV method.

    python -m sglang_sawint4.eval.tasks --model /tmp/acc/smollm2-135m --model-name SmolLM2-135M-Instruct \
        --task /tmp/bb/.../date_understanding/task.json --task /tmp/bb/.../3_digit_addition/task.json \
        --calib-text /tmp/acc/kjv.txt --examples 200 --out bench/results/accuracy.json

For every example the prompt is BIG-bench's default zero-shot format ("Q: <input>\\nA:")
and every option is scored by the sum of its tokens' log-probabilities given the prompt,
with the KV method applied to all tokens (as in eval_accuracy.py); the prediction is the
best-scored option, correct when that option has the top target score.  Rows go into the
accuracy results file with metric "task_acc", the standard error and the task name.
Examples are a fixed-seed sample of the task's (``--examples``).  The k-means method is
calibrated on one 2048-token window of ``--calib-text``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

import torch


from sglang_sawint4.eval.kv_methods import (
    KVMethod,
    default_methods,
    install,
    load_model,
    record_kv,
    text_window,
)
from sglang_sawint4.eval.results import add_common_args, merge_task_rows, run_info, task_row


def load_task(path, n, seed):
    """[(prompt, [options], index of the correct option)] from a BIG-bench task.json."""
    with open(path) as f:
        task = json.load(f)
    prefix = task.get("task_prefix", "")
    q, a = task.get("example_input_prefix", "\nQ: "), task.get("example_output_prefix", "\nA: ")
    items = []
    for ex in task["examples"]:
        scores = ex.get("target_scores")
        if not scores:
            continue
        options = list(scores)
        best = max(range(len(options)), key=lambda i: scores[options[i]])
        items.append(((prefix + q + ex["input"] + a).rstrip(" "), options, best))
    random.Random(seed).shuffle(items)
    return task.get("name", os.path.basename(os.path.dirname(path))), items[:n]


def score_options(model, tok, prompt, options):
    """Sum of log-probabilities of each option's tokens after the prompt (one padded batch)."""
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    o_ids = [tok(" " + o, add_special_tokens=False)["input_ids"] for o in options]
    length = max(len(p_ids) + len(o) for o in o_ids)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.full((len(options), length), pad, dtype=torch.long)
    mask = torch.zeros((len(options), length), dtype=torch.long)
    for i, o in enumerate(o_ids):
        seq = p_ids + o
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
    with torch.no_grad():
        logp = torch.log_softmax(model(ids.to(model.device), attention_mask=mask.to(model.device)).logits.float(), -1).cpu()
    out = []
    for i, o in enumerate(o_ids):
        pos = torch.arange(len(p_ids), len(p_ids) + len(o))
        out.append(logp[i, pos - 1, torch.tensor(o)].sum().item())
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", action="append", required=True, help="path of a BIG-bench task.json")
    p.add_argument("--examples", type=int, default=200)
    p.add_argument("--calib-text", required=True, help="text for the k-means calibration window")
    p.add_argument("--kmeans-clusters", type=int, default=16)
    add_common_args(p, seed=0)
    args = p.parse_args()
    from tqdm import tqdm

    tok, model = load_model(args.model, args.threads, args.device)
    head_dim = model.config.head_dim
    current = {"m": KVMethod("bf16")}
    install(model, lambda: current["m"])

    # k-means calibration on a held-out text window (not the task data)
    book = record_kv(model, text_window(tok, args.calib_text), current).codebook(args.kmeans_clusters)
    methods = default_methods(head_dim)
    methods.append(KVMethod("kmeans", methods[-1].block, "k", clusters=args.kmeans_clusters, codebook=book))

    tasks = [load_task(t, args.examples, args.seed) for t in args.task]
    total = len(methods) * sum(len(items) for _, items in tasks)
    bar = tqdm(total=total, desc="examples x methods", file=sys.stdout, mininterval=10)
    t0 = time.time()
    out_rows = []
    for name, items in tasks:
        for m in methods:
            current["m"] = m
            correct = 0
            for prompt, options, best in items:
                scores = score_options(model, tok, prompt, options)
                correct += int(max(range(len(options)), key=scores.__getitem__) == best)
                bar.update(1)
            out_rows.append(task_row(args.model_name, m, name, correct, len(items)))
            r = out_rows[-1]
            print(f"{name:28} {m.label:22} acc {r['value']:.3f} +- {r['stderr']:.3f} (n={len(items)})", flush=True)
    bar.close()

    merge_task_rows(args.out, out_rows, args.model_name, "task_run", run_info(t0, args.device))


if __name__ == "__main__":
    main()
