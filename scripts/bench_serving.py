#!/usr/bin/env python3
"""Serving benchmark over the OpenAI HTTP API: throughput and latency per KV config.

    python scripts/bench_serving.py --model /tmp/models/8b --out bench/results/serving.json \
        --configs bf16,fp8_e4m3,int4,int4-bdr-64,int4-bdr-128 --shapes 1024x256,8192x1024 \
        --concurrency 1,4,16,64,128,256 --rounds 2

Each config is one server (`python -m sglang_sawint4.launch_server`, Triton attention for
all of them so only the KV format differs).  Configs run in rounds whose order alternates
(A B C, C B A, ...) so machine drift does not favour one; the spread between rounds of the
same config is reported as ``repeat_spread_pct``.  Requests are random token-id prompts
from a fixed seed with ``ignore_eos``, so every config generates the same number of tokens.
Streaming gives TTFT (first chunk) and inter-token latency (gaps between chunks).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

CONFIG_FLAGS = {
    "bf16": ["--kv-quant", "none"],
    "fp8_e4m3": ["--kv-quant", "none", "--kv-cache-dtype", "fp8_e4m3"],
    "int4": ["--kv-quant", "int4"],
}


def config_flags(name: str) -> List[str]:
    if name in CONFIG_FLAGS:
        return CONFIG_FLAGS[name]
    if name.startswith("int4-bdr-"):
        return ["--kv-quant", "int4-bdr", "--kv-quant-block-size", name.rsplit("-", 1)[1]]
    raise SystemExit(f"unknown config {name!r}: use bf16, fp8_e4m3, int4 or int4-bdr-<block>")


@dataclass
class RequestResult:
    ok: bool
    output_tokens: int = 0  # from the final usage chunk when the server sends one, else chunks seen
    ttft_s: float = 0.0
    itl_s: List[float] = field(default_factory=list)
    error: str = ""


async def one_request(session, url, model, prompt_ids, output_len) -> RequestResult:
    body = {"model": model, "prompt": prompt_ids, "max_tokens": output_len, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    last = None
    usage_tokens = None
    res = RequestResult(ok=False)
    try:
        async with session.post(url, json=body) as resp:
            if resp.status != 200:
                res.error = f"HTTP {resp.status}"
                return res
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    break
                chunk = json.loads(payload)
                usage = chunk.get("usage") or {}
                if usage.get("completion_tokens") is not None:
                    # a token can decode to no text (partial UTF-8): count what the server says
                    usage_tokens = usage["completion_tokens"]
                if not chunk.get("choices") or not chunk["choices"][0].get("text"):
                    continue
                now = time.perf_counter()
                if last is None:
                    res.ttft_s = now - t0
                else:
                    res.itl_s.append(now - last)
                last = now
                res.output_tokens += 1
        if usage_tokens is not None:
            res.output_tokens = usage_tokens
        res.ok = res.output_tokens > 0
    except Exception as e:  # noqa: BLE001 - counted, reported, never silently dropped
        res.error = f"{type(e).__name__}: {e}"
    return res


async def run_load(base_url, model, prompts, output_len, concurrency, progress=None):
    """Send all prompts with at most `concurrency` in flight; returns (results, seconds)."""
    import aiohttp

    sem = asyncio.Semaphore(concurrency)
    url = base_url.rstrip("/") + "/v1/completions"
    timeout = aiohttp.ClientTimeout(total=3600)

    async def guarded(session, p):
        async with sem:
            r = await one_request(session, url, model, p, output_len)
            if progress is not None:
                progress.update(1)
            return r

    t0 = time.perf_counter()
    async with aiohttp.ClientSession(timeout=timeout) as session:
        results = await asyncio.gather(*(guarded(session, p) for p in prompts))
    return results, time.perf_counter() - t0


def summarize(results, seconds, output_len):
    ok = [r for r in results if r.ok]
    itl = [x for r in ok for x in r.itl_s]

    def pct(xs, q):
        return statistics.quantiles(xs, n=100)[q - 1] * 1e3 if len(xs) >= 2 else (xs[0] * 1e3 if xs else None)

    return {
        "requests": len(results), "complete": sum(r.output_tokens == output_len for r in ok),
        "errors": len(results) - len(ok), "output_tok_s": sum(r.output_tokens for r in ok) / seconds,
        "ttft_ms_p50": statistics.median(r.ttft_s for r in ok) * 1e3 if ok else None,
        "itl_ms_p50": statistics.median(itl) * 1e3 if itl else None, "itl_ms_p99": pct(itl, 99),
        "seconds": seconds,
    }


def make_prompts(n, input_len, vocab, seed):
    from serve_check import random_token_ids

    rng = random.Random(seed)
    return [random_token_ids(rng, vocab, input_len) for _ in range(n)]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--configs", default="bf16,fp8_e4m3,int4,int4-bdr-64,int4-bdr-128")
    p.add_argument("--shapes", default="1024x256,8192x1024", help="input x output lengths")
    p.add_argument("--concurrency", default="1,4,16,64,128,256")
    p.add_argument("--requests-per-level", type=int, default=2, help="requests = this x concurrency (min 8)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-dir", default=".")
    args, extra = p.parse_known_args()
    from tqdm import tqdm

    from serve_check import Server, gpu_name, served_model_id, versions

    vocab = json.load(open(os.path.join(args.model, "config.json")))["vocab_size"]
    configs = args.configs.split(",")
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    levels = [int(c) for c in args.concurrency.split(",")]
    per_round = {}
    for rnd in range(args.rounds):
        order = configs if rnd % 2 == 0 else configs[::-1]
        for name in order:
            srv = Server(args.model, args.port, [*config_flags(name), "--attention-backend", "triton", *extra],
                         os.path.join(args.log_dir, f"serving_{name}_r{rnd}.log")).start()
            try:
                info = srv.info()
                model_id = served_model_id(args.port)
                # untimed warm-up at every shape: Triton / FlashInfer JIT and allocator growth on a
                # fresh server would otherwise land in the first timed level
                for input_len, output_len in shapes:
                    asyncio.run(run_load(f"http://127.0.0.1:{args.port}", model_id,
                                         make_prompts(4, input_len, vocab, args.seed - 1), min(output_len, 16), 4))
                total = sum(max(8, args.requests_per_level * c) for c in levels) * len(shapes)
                bar = tqdm(total=total, desc=f"round {rnd} {name}", file=sys.stdout, mininterval=5)
                for input_len, output_len in shapes:
                    for c in levels:
                        n = max(8, args.requests_per_level * c)
                        prompts = make_prompts(n, input_len, vocab, args.seed + c)
                        res, secs = asyncio.run(run_load(f"http://127.0.0.1:{args.port}", model_id, prompts,
                                                         output_len, c, bar))
                        row = {"config": name, "input_len": input_len, "output_len": output_len,
                               "concurrency": c, **summarize(res, secs, output_len),
                               "max_total_num_tokens": info.get("max_total_num_tokens"),
                               "max_running_requests": info.get("max_running_requests")}
                        per_round.setdefault((name, input_len, output_len, c), []).append(row)
                bar.close()
            finally:
                srv.stop()
    rows, spreads = [], []
    for key, runs in per_round.items():
        best = max(runs, key=lambda r: r["output_tok_s"])
        vals = [r["output_tok_s"] for r in runs]
        if len(vals) > 1 and min(vals) > 0:
            spreads.append((max(vals) - min(vals)) / min(vals) * 100)
        rows.append({**best, "output_tok_s_runs": vals})
    result = {"gpu": gpu_name(), "versions": versions(), "model": os.path.basename(args.model.rstrip("/")),
              "repeat_spread_pct": max(spreads) if spreads else None,
              "command": " ".join(["python"] + sys.argv), "rows": rows}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    plot(result, os.path.splitext(args.out)[0] + ".png")


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({(r["input_len"], r["output_len"]) for r in result["rows"]})
    fig, axes = plt.subplots(len(shapes), 2, figsize=(12, 4 * len(shapes)), squeeze=False)
    for i, (il, ol) in enumerate(shapes):
        for cfg in sorted({r["config"] for r in result["rows"]}):
            pts = sorted((r["concurrency"], r["output_tok_s"], r["itl_ms_p50"]) for r in result["rows"]
                         if r["config"] == cfg and (r["input_len"], r["output_len"]) == (il, ol))
            axes[i][0].plot([x[0] for x in pts], [x[1] for x in pts], "-o", label=cfg)
            axes[i][1].plot([x[0] for x in pts], [x[2] for x in pts], "-o", label=cfg)
        for ax, ylabel in zip(axes[i], ("output tok/s", "ITL p50 (ms)")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("concurrency")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{il} in / {ol} out")
            ax.legend(fontsize=8)
    fig.suptitle(f"{result['gpu']}, {result['model']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
