"""Passkey retrieval under each KV method: a 5-digit key hidden in filler text at a given depth.

    python -m sglang_sawint4.eval.passkey --model /tmp/acc/smollm2-135m --model-name SmolLM2-135M-Instruct \
        --context 8192 --samples 8 --out bench/results/accuracy.json

The prompt is the passkey test of Mohtashami & Jaggi (2023): an instruction, repeated
filler sentences with "The pass key is NNNNN. Remember it. NNNNN is the pass key." at a
depth, and "What is the pass key? The pass key is", filling --context tokens.  One
teacher-forced forward per (sample, method) over the prompt and the answer: a sample is
correct when every answer token is the model's top-1 (exactly what greedy decoding would
print), with the KV method applied to every token as in eval_accuracy.py.  Depths are
spread evenly over the context ((i + 0.5) / samples), each sample has its own key from a
fixed seed.  Rows: metric "task_acc", task "passkey", context = the prompt length.
``--kmeans C --calib-text FILE`` adds k-means residual INT4 + BDR on K (calibrated on the
file's first 2048 tokens, as in eval_tasks.py).
"""

from __future__ import annotations

import argparse
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
    start_tokens,
    text_window,
)
from sglang_sawint4.eval.results import add_common_args, merge_task_rows, run_info, task_row

INSTRUCTION = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
               "I will quiz you about the important information there.\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\nWhat is the pass key? The pass key is"


def passkey_sample(tok, context: int, depth: float, key: int):
    """(prompt ids, answer ids): at most `context` tokens in all, the needle after
    round(depth * fillers) filler sentences."""
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    prefix = start_tokens(tok)
    answer = ids(f" {key}.")
    fixed = len(prefix) + len(ids(INSTRUCTION)) + len(ids(NEEDLE.format(key=key))) + len(ids(QUESTION)) + len(answer)
    per_filler = len(ids(FILLER * 8)) / 8
    fillers = int((context - fixed) / per_filler)
    if fillers < 2:
        raise SystemExit(f"--context {context} is too short for the passkey prompt")
    while True:  # filler tokenization can merge across sentence boundaries: shrink until it fits
        at = round(depth * fillers)
        text = INSTRUCTION + FILLER * at + NEEDLE.format(key=key) + FILLER * (fillers - at) + QUESTION
        prompt = prefix + ids(text)
        if len(prompt) + len(answer) <= context:
            return prompt, answer
        fillers -= 1


def retrieved(model, prompt, answer) -> bool:
    """Whether greedy decoding after `prompt` starts with `answer` (one teacher-forced forward)."""
    ids = torch.tensor([prompt + answer])
    with torch.no_grad():
        # only the positions that predict the answer: [32k, vocab] logits would be 20-34 GB
        logits = model(ids.to(model.device), logits_to_keep=len(answer) + 1).logits[0, :-1].cpu()
    return bool((logits.argmax(-1) == torch.tensor(answer)).all())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", type=int, default=None, help="prompt tokens (default: the model's maximum)")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--kmeans", type=int, default=None, metavar="C",
                   help="also k-means residual INT4 with C clusters + the default BDR block on K, calibrated "
                        "on the first 2048 tokens of --calib-text")
    p.add_argument("--calib-text", default=None)
    p.add_argument("--only-extra", action="store_true", help="with --kmeans: evaluate only that method")
    add_common_args(p, seed=0)
    args = p.parse_args()
    from tqdm import tqdm

    tok, model = load_model(args.model, args.threads, args.device)
    context = args.context or model.config.max_position_embeddings
    if context > model.config.max_position_embeddings:
        raise SystemExit(f"--context {context} is beyond the model's {model.config.max_position_embeddings}")
    current = {"m": KVMethod("bf16")}
    install(model, lambda: current["m"])
    methods = default_methods(model.config.head_dim)
    if args.kmeans:
        if not args.calib_text:
            p.error("--kmeans needs --calib-text")
        book = record_kv(model, text_window(tok, args.calib_text), current).codebook(args.kmeans)
        kmeans = KVMethod("kmeans", methods[-1].block, "k", clusters=args.kmeans, codebook=book)
        methods = [kmeans] if args.only_extra else methods + [kmeans]
    rng = random.Random(args.seed)
    samples = [passkey_sample(tok, context, (i + 0.5) / args.samples, rng.randrange(10000, 100000))
               for i in range(args.samples)]
    length = max(len(pr) + len(a) for pr, a in samples)

    t0 = time.time()
    bar = tqdm(total=len(methods) * len(samples), desc=f"passkey {length} tokens", file=sys.stdout, mininterval=10)
    rows = []
    for m in methods:
        current["m"] = m
        hits = []
        for prompt, answer in samples:
            hits.append(retrieved(model, prompt, answer))
            bar.update(1)
        rows.append(task_row(args.model_name, m, "passkey", sum(hits), len(hits), context=length))
        rows[-1]["hits_by_depth"] = hits
        print(f"{m.label:18} passkey at {length} tokens: {sum(hits)}/{len(hits)}  by depth {hits}", flush=True)
    bar.close()
    # keep the other runs' records: the k-means one, and those at other contexts
    run_key = f"passkey_kmeans_{context}_run" if args.only_extra else f"passkey_{context}_run"
    merge_task_rows(args.out, rows, args.model_name, run_key, run_info(t0, args.device))


if __name__ == "__main__":
    main()
