"""Served prefills, per config: one request at a time over a cached prefix, and under the
serving benchmark's loads (a random point and the shared-prefix point), each load once plain
and once with a torch profile of the server (the lone requests' profile with Python stacks:
where the host time of an INT4 prefill goes).

Why: at the serving benchmark's shared-prefix point (256 new tokens over an 8k cached prefix,
32 requests in flight) INT4+BDR on FlashInfer spent ~20 ms more per prefill batch than plain
INT4 (H200, 2026-12-03), while one request at a time it did not (this probe's lone part, first
run: ``served_prefill_probe_lone_h200.txt``); and at the random 1024-token point every INT4
config's TTFT p50 sat 1.2x BF16's though those prefills do the same work.  The profile shows
GPU kernel time by kernel, CUDA runtime calls by name (a synchronizing call would show there),
and for each prefill forward its GPU span and how much of that span the GPU was busy (a
host-bound forward leaves the GPU idle between launches).

    python bench/logs/served_prefill_probe.py --model /tmp/models/8b --out-dir $OUT

Configs run in the order given (default A, B, C, A: the repeat shows the drift) on one
machine; the log is ``served_prefill_probe.txt``, the numbers ``served_prefill_probe.json``.
"""

import argparse
import glob
import gzip
import json
import os
import random
import statistics
import sys
import time
from collections import defaultdict

from sglang_sawint4.bench.serving import (model_facts, num_requests, parse_points, point_prompts, send_all,
                                          summarize)
from sglang_sawint4.serving.client import generate_ids, random_token_ids, request, served_model_id
from sglang_sawint4.serving.server import Server, host_speed, serving_config

FLAGS = ["--disable-prefill-cuda-graph", "--mem-fraction-static", "0.3", "--cuda-graph-max-bs", "64",
         "--chunked-prefill-size", "8192"]
GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
# FlashInfer's prefill attention kernels: per layer of a prefill forward, one or two adjacent
# ones (BF16 over a cached prefix: ragged then paged; INT4's combined call: paged; no prefix: ragged)
PREFILL_ATTENTION = ("PrefillWithKVCacheKernel<flashinfer::CollectiveMainloop<RaggedParams",
                     "BatchPrefillWithRaggedKVCacheKernel", "BatchPrefillWithPagedKVCacheKernel")


def is_prefill_attention(name):
    return any(m in name for m in PREFILL_ATTENTION)


def busy_us(intervals):
    """Length of the union of (start, end) intervals."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e > end:
            total += e - max(s, end)
            end = e
    return total


def trace_events(path):
    """The complete ("X") events of a torch profiler trace (.json.gz)."""
    return [e for e in json.load(gzip.open(path))["traceEvents"] if e.get("ph") == "X"]


def summarize_trace(events, num_layers, top=12):
    """(text, numbers) of one profile's events: kernels and runtime calls by name; per prefill
    forward (``num_layers`` layers' prefill attention kernels) its GPU span and busy fraction."""
    gpu = sorted(((e["ts"], e["ts"] + e.get("dur", 0.0), e["name"]) for e in events if e.get("cat") in GPU_CATS))
    kernels, runtime = defaultdict(lambda: [0, 0.0]), defaultdict(lambda: [0, 0.0])
    for s, e, name in gpu:
        kernels[name][0] += 1
        kernels[name][1] += e - s
    for e in events:
        if e.get("cat") == "cuda_runtime":
            runtime[e["name"]][0] += 1
            runtime[e["name"]][1] += e.get("dur", 0.0)
    layers = [i for i, (_, _, name) in enumerate(gpu)
              if is_prefill_attention(name) and not (i and is_prefill_attention(gpu[i - 1][2]))]
    forwards = []
    for f in range(len(layers) // num_layers):
        first, last = layers[f * num_layers], layers[(f + 1) * num_layers - 1]
        span = gpu[last][1] - gpu[first][0]
        forwards.append((span, busy_us([(s, e) for s, e, _ in gpu[first:last + 1]]) / span if span else 0.0))
    span_all = gpu[-1][1] - gpu[0][0] if gpu else 0.0
    numbers = {"gpu_span_ms": span_all / 1e3, "gpu_busy": busy_us([(s, e) for s, e, _ in gpu]) / span_all if gpu else 0,
               "prefill_forwards": len(forwards),
               "prefill_span_ms_p50": statistics.median(f[0] for f in forwards) / 1e3 if forwards else None,
               "prefill_busy_p50": statistics.median(f[1] for f in forwards) if forwards else None}
    lines = [f"GPU: {numbers['gpu_span_ms']:.1f} ms traced, busy {numbers['gpu_busy']:.2f}; "
             f"{len(forwards)} prefill forwards (first to last layer's prefill attention): span p50 "
             f"{numbers['prefill_span_ms_p50'] or 0:.2f} ms, busy p50 {numbers['prefill_busy_p50'] or 0:.2f}",
             f"kernels by GPU time ({sum(v[0] for v in kernels.values())} in all)"]
    for name, (n, d) in sorted(kernels.items(), key=lambda kv: -kv[1][1])[:top]:
        lines.append(f"  {d / 1e3:8.2f} ms {n:6d}x  {name[:100]}")
    lines.append("CUDA runtime calls by host time")
    for name, (n, d) in sorted(runtime.items(), key=lambda kv: -kv[1][1])[:top]:
        lines.append(f"  {d / 1e3:8.2f} ms {n:6d}x  {name[:100]}")
    return "\n".join(lines), numbers


def python_self_times(events, top=25):
    """Text: the Python functions of a trace recorded with stacks, by self time (their
    duration less their callees'), summed over the trace, per thread nesting."""
    by_tid = defaultdict(list)
    for e in events:
        if e.get("cat") == "python_function":
            by_tid[e.get("tid")].append((e["ts"], e.get("dur", 0.0), e["name"]))
    self_us, calls = defaultdict(float), defaultdict(int)
    for evs in by_tid.values():
        stack = []  # (end, name) of the calls enclosing the current one
        for ts, dur, name in sorted(evs, key=lambda x: (x[0], -x[1])):
            while stack and stack[-1][0] <= ts:
                stack.pop()
            if stack:  # the caller's self time excludes this call
                self_us[stack[-1][1]] -= dur
            self_us[name] += dur
            calls[name] += 1
            stack.append((ts + dur, name))
    lines = ["Python functions by self time (stack-recorded profile)"]
    for name, us in sorted(self_us.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"  {us / 1e3:8.2f} ms {calls[name]:6d}x  {name[:110]}")
    return "\n".join(lines)


def profiled(port, tag, steps, num_layers, drive, with_stack=False):
    """Profile the server's next ``steps`` forward steps while ``drive()`` runs."""
    prof_dir = os.path.join("/tmp", f"prof_{tag}_{time.time():.0f}")
    request(port, "POST", "/start_profile", {"output_dir": prof_dir, "num_steps": steps, "activities": ["CPU", "GPU"],
                                             "with_stack": with_stack})
    drive()
    for _ in range(120):
        traces = glob.glob(os.path.join(prof_dir, "*.trace.json.gz"))
        if traces:
            time.sleep(3)  # written in one go, but give the file system a moment
            events = trace_events(traces[0])
            text, numbers = summarize_trace(events, num_layers)
            if with_stack:
                text += "\n" + python_self_times(events)
            return text, numbers
        time.sleep(1)
    return "no trace written", {}


def probe(config, env, args, vocab, num_layers, head_dim):
    flags, _ = serving_config(config, head_dim)
    tag = config + ("-tritons-dispatch" if env.get("SGLANG_SAWINT4_DIRECT_LAUNCH") == "0" else "")
    log = os.path.join(args.out_dir, f"served_prefill_{tag}_{int(time.time())}.log")
    srv = Server(args.model, args.port, [*flags, *FLAGS], log, env=env).start()
    port, rng = args.port, random.Random(0)
    out = {"config": tag}
    try:
        base, model_id = f"http://127.0.0.1:{port}", served_model_id(port)
        # lone: one request at a time over one cached prefix
        prefix = random_token_ids(rng, vocab, 8192)
        generate_ids(port, prefix + random_token_ids(rng, vocab, 8), 1)

        def lone_requests(count):
            """``count`` requests one after another, 256 new tokens each over the cached
            prefix; their latencies in ms."""
            ms = []
            for _ in range(count):
                t = time.perf_counter()
                generate_ids(port, prefix + random_token_ids(rng, vocab, 256), 1)
                ms.append((time.perf_counter() - t) * 1e3)
            return ms

        lone_requests(4)  # whatever the timed shape compiles or loads
        out["lone_ms_p50"] = statistics.median(lone_requests(args.n))
        lone_text, out["lone_profile"] = profiled(port, tag, 3, num_layers, lambda: lone_requests(4),
                                                  with_stack=True)
        # loads: the serving benchmark's points, each once plain and once profiled
        out["loads"], texts = [], []
        for point in parse_points(args.shapes, "", args.shared_prefix, 0.5):
            n = num_requests(point, 1)
            seed = 1 + point.input_len
            prefix_warm, prompts = point_prompts(point, n, vocab, seed)
            if prefix_warm:  # the groups' prefixes cached, as the benchmark does
                send_all(base, model_id, prefix_warm, 1, len(prefix_warm))
            lens = point.output_lens(n, seed)
            warm = min(n, point.concurrency)  # one wave: the load's shapes compiled or loaded before timing
            send_all(base, model_id, prompts[:warm], lens[:warm], point.concurrency)
            res, secs = send_all(base, model_id, prompts, lens, point.concurrency)
            s = summarize(res, secs, lens)
            row = {"workload": point.workload, "input_len": point.input_len, "prefix_len": point.prefix_len,
                   "concurrency": point.concurrency, "requests": n, "output_tok_s": s["output_tok_s"],
                   "ttft_ms_p50": s["ttft_ms_p50"], "itl_ms_p50": s["itl_ms_p50"], "errors": s["errors"]}
            text, row["profile"] = profiled(port, tag, args.profile_steps, num_layers,
                                            lambda: send_all(base, model_id, prompts, lens, point.concurrency))
            out["loads"].append(row)
            texts.append(f"-- {point.workload} {point.input_len} in ({point.prefix_len} shared) / "
                         f"{min(lens)}-{point.output_len} out @{point.concurrency}, {n} requests: "
                         f"{row['output_tok_s']:.0f} output tok/s, TTFT p50 {row['ttft_ms_p50']:.1f} ms, ITL p50 "
                         f"{row['itl_ms_p50']:.2f} ms, errors {row['errors']}\n"
                         f"profile of {args.profile_steps} steps under the same load (the profiler slows the host):\n"
                         f"{text}")
    finally:
        srv.stop()
    text = (f"== {tag}: lone prefill (256 new over 8192 cached, 1 new token) p50 {out['lone_ms_p50']:.1f} ms\n"
            f"profile of 3 steps, one request at a time, with Python stacks:\n{lone_text}\n"
            + "\n".join(texts) + "\n")
    return out, text


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--configs", default="int4-bdr-flashinfer,int4-flashinfer,bf16-flashinfer,int4-bdr-flashinfer")
    p.add_argument("--shapes", default="1024x256@64*2", help="random loads, as the serving benchmark's --shapes")
    p.add_argument("--shared-prefix", default="8192x256x128@32*8", help="as the serving benchmark's --shared-prefix")
    p.add_argument("--tritons-dispatch", default="", help="configs (comma list) also run with Triton's dispatch")
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--profile-steps", type=int, default=60)
    p.add_argument("--port", type=int, default=30000)
    args = p.parse_args()
    hf = json.load(open(os.path.join(args.model, "config.json")))
    vocab, head_dim = model_facts(args.model)
    runs = [(c, {}) for c in args.configs.split(",") if c]
    runs += [(c, {"SGLANG_SAWINT4_DIRECT_LAUNCH": "0"}) for c in args.tritons_dispatch.split(",") if c]
    results = [{"host": host_speed()}]
    with open(os.path.join(args.out_dir, "served_prefill_probe.txt"), "w") as log:
        log.write(f"host: {results[0]['host']}\n")
        for config, env in runs:
            out, text = probe(config, env, args, vocab, hf["num_hidden_layers"], head_dim)
            results.append(out)
            print(text, flush=True)
            log.write(text)
            log.flush()
            json.dump(results, open(os.path.join(args.out_dir, "served_prefill_probe.json"), "w"), indent=1)


if __name__ == "__main__":
    sys.exit(main())
