"""Served accuracy check: do the served INT4 kernels give the accuracy the CPU harness predicts?

Three steps; the middle one runs on the GPU host (scripts/gpu_run.sh stage ``served``):

    # CPU: prompts from a text, tokenized by the converted model's own tokenizer
    python -m sglang_sawint4.eval.served prompts --model /tmp/acc/smollm2-135m --text /tmp/acc/kjv.txt \\
        --out bench/logs/served_prompts.json
    # GPU: one server per config (started side by side), greedy continuations with their logprobs
    python -m sglang_sawint4.eval.served serve --model /tmp/models/smollm2 \\
        --prompts bench/logs/served_prompts.json --out $OUT/served_generations.json
    # CPU: the harness replays every served continuation, scores it, and writes the comparison
    python -m sglang_sawint4.eval.served compare --model /tmp/acc/smollm2-135m \\
        --model-name SmolLM2-135M-Instruct --served bench/logs/served_generations.json \\
        --out bench/results/accuracy.json

The harness (sglang_sawint4.eval.kv_methods) runs with ``served_prefill``: the prompt's own
prefill attends to unquantized K/V and every decode step reads all K/V through the method,
which is what the server does (extend attention over fresh K/V, decode over INT4 pages).
For each config ``compare`` reports

* served: greedy token agreement with the served BF16 continuation, and the BF16 model's
  perplexity of the served continuation (does INT4 generate text BF16 finds likely?);
* harness, same prompts: its own greedy agreement with its BF16 continuation and that
  continuation's BF16 perplexity (what the harness predicts for the served numbers);
* replay: the harness fed the served tokens one decode step at a time: the mean |logprob
  difference| of each served token (harness vs server) and the fraction of steps where the
  harness's own argmax is the served token; and, as the control, how far the same replay moves
  when only the rounding of the K/V inputs changes (bf16 first, as served): INT4 codes flip
  at rounding boundaries, so a quantized config differs more from any re-computation of it
  than BF16 does, without any kernel error.  Greedy continuations diverge at the first near-tie,
  so the replay is the step-by-step check; the agreement and perplexity are the user-visible ones.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import random
import time

import torch


CONFIGS = "bf16,int4,int4-bdr-64"


# --------------------------------------------------------------------------- #
# prompts (CPU)
# --------------------------------------------------------------------------- #
def make_prompts(tok, text: str, n: int, length: int, seed: int):
    """n windows of exactly `length` token ids, from random places of the text."""
    rng = random.Random(seed)
    prompts = []
    while len(prompts) < n:
        start = rng.randrange(0, len(text) - 40 * length)
        ids = tok(text[start: start + 40 * length], add_special_tokens=False)["input_ids"]
        if len(ids) > length + 1:
            prompts.append(ids[1: length + 1])  # drop the first, maybe cut, token
    return prompts


def cmd_prompts(args):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model)
    with open(args.text, errors="replace") as f:
        text = f.read()
    ids = make_prompts(tok, text, args.n, args.length, args.seed)
    out = {"text": os.path.basename(args.text), "seed": args.seed, "length": args.length, "prompts": ids}
    with open(args.out, "w") as f:
        json.dump(out, f)
    print(f"{len(ids)} prompts of {args.length} tokens -> {args.out}")


# --------------------------------------------------------------------------- #
# serve (GPU host)
# --------------------------------------------------------------------------- #
def cmd_serve(args):
    from sglang_sawint4.serving.client import greedy_outputs
    from sglang_sawint4.serving.server import Server, config_flags, gpu_name, versions

    prompts = json.load(open(args.prompts))["prompts"]
    configs = [c for c in args.configs.split(",") if c]
    servers = {}
    for i, cfg in enumerate(configs):
        # side by side on one GPU, each on its own port: SGLang's --mem-fraction-static check
        # counts the other servers' memory as used, so the pools are capped by size instead
        flags = [*config_flags(cfg), "--attention-backend", "triton", "--max-total-tokens",
                 str(args.max_total_tokens), "--disable-prefill-cuda-graph", *args.extra]
        servers[cfg] = Server(args.model, args.port + 10 * i, flags,
                              os.path.join(args.log_dir, f"served_{cfg}.log"))
    result = {"gpu": gpu_name(), "versions": versions(), "model": os.path.basename(args.model.rstrip("/")),
              "max_new_tokens": args.max_new_tokens, "commands": {c: " ".join(s.cmd) for c, s in servers.items()},
              "generations": {}, "startup_s": {}}
    t0 = time.time()
    try:
        with concurrent.futures.ThreadPoolExecutor(len(servers)) as pool:
            for fut in [pool.submit(s.start) for s in servers.values()]:
                fut.result()
        for cfg, srv in servers.items():
            result["startup_s"][cfg] = round(srv.startup_s, 1)
            # one request at a time: batch size 1 at every step for every config
            result["generations"][cfg] = [{k: o[k] for k in ("ids", "logprobs")}
                                          for o in greedy_outputs(srv.port, prompts, args.max_new_tokens, 1)]
            policy = served_policy_file(srv.log_path)
            if policy:  # what this server stores, for the harness to replay exactly
                with open(policy) as f:
                    result.setdefault("policies", {})[cfg] = json.load(f)
            print(f"{cfg}: {len(prompts)} continuations of {args.max_new_tokens} tokens", flush=True)
    finally:
        for srv in servers.values():
            srv.stop()
    result["seconds"] = round(time.time() - t0, 1)
    with open(args.out, "w") as f:
        json.dump(result, f)
    print(f"-> {args.out} ({result['seconds']} s)")


# --------------------------------------------------------------------------- #
# compare (CPU)
# --------------------------------------------------------------------------- #
def served_policy_file(log_path: str):
    """The KV policy file a server's launcher resolved (its start-up line), or None."""
    from sglang_sawint4.launch_server import POLICY_LOG_PREFIX

    with open(log_path, errors="replace") as f:
        for line in f:
            if line.startswith(POLICY_LOG_PREFIX + " ("):
                return line[len(POLICY_LOG_PREFIX) + 2:].split("): ", 1)[0]
    return None


def method_of(config: str, policies=None):
    """The harness method a served config runs: the server's own KV policy when it recorded
    one (int4-bdr: the launcher's default), else the plain format (BDR on K only, as served)."""
    from sglang_sawint4.eval.kv_methods import KVMethod
    from sglang_sawint4.policy import KVPolicy

    if policies and config in policies:
        return KVMethod.from_policy(KVPolicy.from_json(policies[config]), config)
    if config in ("bf16", "int4"):
        return KVMethod(config)
    if config.startswith("int4-bdr-"):
        return KVMethod("int4-bdr", int(config.rsplit("-", 1)[1]), "k")
    raise SystemExit(f"no harness method for config {config!r}")


class BF16Inputs:
    """A method whose K/V inputs are rounded to bfloat16 first, as the server's are: the
    control for how much the harness moves when only its inputs' rounding changes."""

    def __init__(self, method):
        self.method = method

    def apply(self, key, value, layer=-1, query=None):
        rounded = (key.to(torch.bfloat16).to(key.dtype), value.to(torch.bfloat16).to(value.dtype))
        return self.method.apply(*rounded, layer, query=query)


def decode_steps(model, prompts, feed=None, steps=None):
    """Prefill the prompts [n, L] as one batch, then decode one token per step.

    ``feed`` [n, T]: the tokens to feed (teacher-forced decode), else greedy for ``steps``.
    Returns (tokens [n, T], logprob of each token [n, T], argmax [n, T]) where the logprob
    and the argmax come from the distribution the token was drawn from.
    """
    steps = feed.shape[1] if feed is not None else steps
    with torch.no_grad():
        out = model(prompts, use_cache=True)
        cache, logits = out.past_key_values, out.logits[:, -1]
        toks, lps, amax = [], [], []
        for t in range(steps):
            logp = torch.log_softmax(logits.double(), dim=-1)
            best = logp.argmax(-1)
            tok = feed[:, t] if feed is not None else best
            toks.append(tok)
            lps.append(logp.gather(1, tok[:, None])[:, 0])
            amax.append(best)
            if t + 1 < steps:
                out = model(tok[:, None], past_key_values=cache, use_cache=True)
                cache, logits = out.past_key_values, out.logits[:, -1]
    return torch.stack(toks, 1), torch.stack(lps, 1), torch.stack(amax, 1)


def continuation_ppl(model, prompts, cont):
    """The perplexity of cont [n, T] after prompts [n, L] under the model as installed."""
    with torch.no_grad():
        logits = model(torch.cat([prompts, cont], 1)).logits[:, prompts.shape[1] - 1: -1]
    nll = -torch.log_softmax(logits.double(), -1).gather(2, cont[..., None])[..., 0]
    return math.exp(nll.mean().item())


def agreement(a, b) -> float:
    """Position-wise token agreement of two [n, T] tensors."""
    return (a == b).double().mean().item()


def compare(model, prompts, served: dict, current: dict, progress=None, policies=None) -> dict:
    """The comparison for every served config (see the module docstring).

    prompts [n, L] long; served: {config: [{"ids": [T], "logprobs": [T]}]}; current: the
    dict whose "m" the installed harness reads (the method in use); policies: the KV policy
    each config's server recorded."""
    from sglang_sawint4.eval.kv_methods import KVMethod

    def tensor(cfg, key, dtype):
        return torch.tensor([g[key] for g in served[cfg]], dtype=dtype, device=prompts.device)

    bf16 = KVMethod("bf16")
    current["m"] = bf16
    harness_bf16, _, _ = decode_steps(model, prompts, steps=len(served["bf16"][0]["ids"]))
    out = {}
    for cfg in served:
        ids, lps = tensor(cfg, "ids", torch.long), tensor(cfg, "logprobs", torch.float64)
        current["m"] = method_of(cfg, policies)
        greedy = harness_bf16 if cfg == "bf16" else decode_steps(model, prompts, steps=ids.shape[1])[0]
        _, replay_lp, replay_argmax = decode_steps(model, prompts, feed=ids)
        current["m"] = BF16Inputs(method_of(cfg, policies))
        _, rounded_lp, _ = decode_steps(model, prompts, feed=ids)
        current["m"] = bf16
        out[cfg] = {
            "served_agree_vs_bf16": agreement(ids, tensor("bf16", "ids", torch.long)),
            "served_bf16_ppl": continuation_ppl(model, prompts, ids),
            "harness_agree_vs_bf16": agreement(greedy, harness_bf16),
            "harness_bf16_ppl": continuation_ppl(model, prompts, greedy),
            "replay_logprob_mae": (replay_lp - lps).abs().mean().item(),
            "replay_logprob_max": (replay_lp - lps).abs().max().item(),
            "replay_argmax_agree": agreement(replay_argmax, ids),
            # the same replay with the K/V inputs rounded to bf16 first, against the plain one
            "control_rounding_mae": (rounded_lp - replay_lp).abs().mean().item(),
            "n_prompts": ids.shape[0], "tokens": ids.shape[1],
        }
        if progress:
            progress(cfg, out[cfg])
    return out


def cmd_compare(args):
    from sglang_sawint4.eval.kv_methods import KVMethod, install, load_model
    from sglang_sawint4.eval.results import load_results, run_info, save_results
    from sglang_sawint4.policy import KVPolicy

    t0 = time.time()
    served = json.load(open(args.served))
    prompts = torch.tensor(json.load(open(args.prompts))["prompts"], dtype=torch.long, device=args.device)
    _, model = load_model(args.model, args.threads, args.device)
    current = {"m": KVMethod("bf16")}
    install(model, lambda: current["m"], served_prefill=True)

    def show(cfg, r):
        print(f"{cfg:14s} " + "  ".join(f"{k} {v:.4g}" for k, v in r.items()), flush=True)

    configs = compare(model, prompts, served["generations"], current, show, served.get("policies"))
    result = load_results(args.out)
    result.setdefault("served", {})[args.model_name] = {
        "gpu": served["gpu"], "versions": served["versions"], "server_commands": served["commands"],
        "prompts": os.path.basename(args.prompts), "max_new_tokens": served["max_new_tokens"],
        "configs": configs, "run": run_info(t0, args.device),
        "policies": {c: KVPolicy.from_json(p).summary() for c, p in served.get("policies", {}).items()}}
    save_results(args.out, result)
    print(f"-> {args.out} (served.{args.model_name})")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("prompts", help="prompts from a text (CPU)")
    a.add_argument("--model", required=True, help="converted model directory (its tokenizer)")
    a.add_argument("--text", required=True)
    a.add_argument("--n", type=int, default=16)
    a.add_argument("--length", type=int, default=256)
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--out", required=True)
    a = sub.add_parser("serve", help="served greedy continuations (GPU host)")
    a.add_argument("--model", required=True)
    a.add_argument("--prompts", required=True)
    a.add_argument("--out", required=True)
    a.add_argument("--configs", default=CONFIGS)
    a.add_argument("--max-new-tokens", type=int, default=64)
    a.add_argument("--max-total-tokens", type=int, default=100000, help="KV pool of each server")
    a.add_argument("--port", type=int, default=30000)
    a.add_argument("--log-dir", default=".")
    a = sub.add_parser("compare", help="harness vs served (CPU)")
    a.add_argument("--model", required=True, help="the same converted model, on this machine")
    a.add_argument("--model-name", required=True)
    a.add_argument("--served", required=True)
    a.add_argument("--prompts", required=True)
    a.add_argument("--out", required=True)
    a.add_argument("--threads", type=int, default=os.cpu_count())
    a.add_argument("--device", default="cpu", help="cpu, or cuda on the GPU host (float32 either way)")
    args, extra = p.parse_known_args()
    if extra and args.cmd != "serve":
        p.error(f"unknown arguments {extra}")
    args.extra = [x for x in extra if x != "--"]
    {"prompts": cmd_prompts, "serve": cmd_serve, "compare": cmd_compare}[args.cmd](args)


if __name__ == "__main__":
    main()
