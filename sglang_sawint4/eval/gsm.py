"""GSM8K-style word problems (reasoning-gym ``gsm_symbolic``) solved by greedy generation under each KV method.

    pip install reasoning-gym==0.1.25   # procedurally generated: no download at run time
    python -m sglang_sawint4.eval.gsm --model /tmp/acc/qwen2.5-coder-0.5b --model-name Qwen2.5-Coder-0.5B-Instruct \
        --problems 40 --out bench/results/accuracy.json

Each problem goes through the model's chat template with an instruction to reason step by
step and finish with "Answer: <number>"; the model generates greedily (--max-new-tokens) with
the KV method applied to every cached token at every step (as in eval_accuracy.py: the
Hugging Face cache keeps the exact K/V and the method maps all of them at each attention
call, which equals a cache that stores the quantized rows, the format being per token).
The prediction is the number after the last "Answer:" (else the last number in the text);
correct when it equals reasoning-gym's answer.  Problems are a fixed-seed sample; prompts
run in left-padded batches.  Rows: metric "task_acc", task "gsm_symbolic".
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time

import torch


from sglang_sawint4.eval.kv_methods import KVMethod, default_methods, install, load_model, policy_methods
from sglang_sawint4.eval.results import add_common_args, merge_task_rows, run_info, task_row

INSTRUCTION = "Solve the problem step by step, then write the final number on its own line as 'Answer: <number>'."
NUMBER = r"-?\d[\d,]*(?:\.\d+)?"


def extract_answer(text: str):
    """The first number after the last 'Answer:', else the last number in the text (None if none)."""
    after = re.findall(NUMBER, text.rsplit("Answer:", 1)[1]) if "Answer:" in text else []
    nums = after[:1] or re.findall(NUMBER, text)[-1:]
    if not nums:
        return None
    try:
        return float(nums[0].replace(",", ""))
    except ValueError:
        return None


def is_correct(text: str, answer: str) -> bool:
    got = extract_answer(text)
    return got is not None and abs(got - float(answer)) < 1e-6


def generate(model, tok, questions, max_new_tokens):
    """Greedy completions of the chat-formatted questions (one left-padded batch)."""
    prompts = [tok.apply_chat_template([{"role": "user", "content": f"{q}\n{INSTRUCTION}"}], tokenize=False,
                                       add_generation_prompt=True) for q in questions]
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    batch = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)


def generate_problems(count: int, seed: int) -> list:
    """[{"question", "answer"}] from reasoning-gym's gsm_symbolic (deterministic in the seed)."""
    import reasoning_gym

    return [{"question": x["question"], "answer": x["answer"]}
            for x in reasoning_gym.create_dataset("gsm_symbolic", size=count, seed=seed)]


def load_problems(path: str) -> list:
    with open(path) as f:
        return json.load(f)["problems"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--problems", type=int, default=40)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=320)
    p.add_argument("--samples-out", default=None, help="JSON-lines file for every generation (optional)")
    p.add_argument("--problems-file", default=None,
                   help="read the problems from this JSON file (written by --write-problems) instead of "
                        "generating them: for a host without reasoning-gym")
    p.add_argument("--write-problems", default=None, metavar="PATH",
                   help="only write the --problems / --seed problems (question, answer) to PATH and exit")
    p.add_argument("--policy", default=None, metavar="FILE",
                   help="a KV policy file (python -m sglang_sawint4.policy resolve): adds the served default")
    add_common_args(p, seed=42)
    args = p.parse_args()
    from tqdm import tqdm

    data = load_problems(args.problems_file) if args.problems_file else generate_problems(args.problems, args.seed)
    if args.write_problems:
        with open(args.write_problems, "w") as f:
            json.dump({"generator": f"reasoning-gym gsm_symbolic, {args.problems} problems, seed {args.seed}",
                       "problems": data}, f, indent=1)
        return
    tok, model = load_model(args.model, args.threads, args.device)
    current = {"m": KVMethod("bf16")}
    install(model, lambda: current["m"])
    methods = default_methods(model.config.head_dim)
    if args.policy:
        methods += policy_methods(args.policy, False, model.config)

    t0 = time.time()
    bar = tqdm(total=len(methods) * len(data), desc="gsm problems x methods", file=sys.stdout, mininterval=10)
    rows, samples = [], []
    for m in methods:
        current["m"] = m
        correct = 0
        for i in range(0, len(data), args.batch):
            chunk = data[i: i + args.batch]
            texts = generate(model, tok, [x["question"] for x in chunk], args.max_new_tokens)
            for x, text in zip(chunk, texts):
                ok = is_correct(text, x["answer"])
                correct += ok
                samples.append({"method": m.label, "answer": x["answer"], "extracted": extract_answer(text),
                                "correct": ok, "output": text})
            bar.update(len(chunk))
        rows.append(task_row(args.model_name, m, "gsm_symbolic", correct, len(data)))
        print(f"{m.label:18} gsm_symbolic {correct}/{len(data)}", flush=True)
    bar.close()
    merge_task_rows(args.out, rows, args.model_name, "gsm_run", run_info(t0, args.device))
    if args.samples_out:
        with open(args.samples_out, "w") as f:
            for s in samples:
                f.write(json.dumps(s) + "\n")


if __name__ == "__main__":
    main()
