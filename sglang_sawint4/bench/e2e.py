"""End-to-end checks of ``python -m sglang_sawint4.launch_server`` over its HTTP API.

    # smoke (BF16 KV): start, query every endpoint, load, stop
    python -m sglang_sawint4.bench.e2e smoke --model /tmp/m --out bench/results/smoke.json

    # INT4 KV: bf16 / int4 / int4-bdr servers in turn, features, served-attention check
    python -m sglang_sawint4.bench.e2e int4 --model /tmp/m --out bench/results/int4_e2e.json

    # the FlashInfer prefill path against the Triton one, its features, attention and poison checks
    python -m sglang_sawint4.bench.e2e flashinfer --model /tmp/m --out bench/results/flashinfer_e2e.json

Each server is started as a subprocess with its own log; a check that could not
run is recorded as null, never true.  Only the standard library is used on the
client side (threads + http.client), so it runs on the bare GPU host.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from sglang_sawint4.model_check import load_hf_config
from sglang_sawint4.serving.client import (
    generate_ids,
    greedy_outputs,
    random_token_ids,
    request,
    served_model_id,
    stream,
)
from sglang_sawint4.serving.server import Server, gpu_name, log_has, versions

# --------------------------------------------------------------------------- #
# checks
# --------------------------------------------------------------------------- #
PROMPTS = [
    "def fibonacci(n):\n    ",
    "import os\nimport sys\n\nclass Parser:\n",
    "The quick brown fox jumps over the lazy dog. " * 3,
    "for i in range(10):\n    print(",
]


def completion_ok(resp, n):
    try:
        c = resp["choices"][0]
        text = c["text"] if "text" in c else c["message"]["content"]
        return resp["usage"]["completion_tokens"] == n and c["finish_reason"] == "length" and isinstance(text, str)
    except (KeyError, IndexError, TypeError):
        return False


def check_endpoints(port, model_name):
    """Every OpenAI endpoint, streaming and not. Returns {endpoint: ok}."""
    out = {}
    st, r = request(port, "POST", "/v1/completions", {"model": model_name, "prompt": PROMPTS[0], "max_tokens": 16,
                                                      "temperature": 0, "ignore_eos": True})
    out["/v1/completions"] = st == 200 and completion_ok(r, 16)
    ev = stream(port, "/v1/completions", {"model": model_name, "prompt": PROMPTS[1], "max_tokens": 16,
                                          "temperature": 0, "ignore_eos": True, "stream": True})
    chunks = [e for e in ev if isinstance(e, dict) and e.get("choices")]
    out["/v1/completions (stream)"] = (ev[-1] == "[DONE]" and len(chunks) >= 2
                                       and chunks[-1]["choices"][0].get("finish_reason") == "length")
    msg = [{"role": "user", "content": "Write a function that adds two numbers."}]
    st, r = request(port, "POST", "/v1/chat/completions", {"model": model_name, "messages": msg, "max_tokens": 16,
                                                           "temperature": 0, "ignore_eos": True})
    out["/v1/chat/completions"] = (st == 200 and r["usage"]["completion_tokens"] == 16
                                   and r["choices"][0]["finish_reason"] == "length")
    ev = stream(port, "/v1/chat/completions", {"model": model_name, "messages": msg, "max_tokens": 16,
                                               "temperature": 0, "ignore_eos": True, "stream": True})
    chunks = [e for e in ev if isinstance(e, dict) and e.get("choices")]
    out["/v1/chat/completions (stream)"] = (ev[-1] == "[DONE]" and len(chunks) >= 2
                                            and any(c["choices"][0].get("finish_reason") == "length" for c in chunks))
    st, r = request(port, "GET", "/v1/models")
    out["/v1/models"] = st == 200 and bool(r.get("data"))
    return out


def load_test(port, model_name, requests_n=256, concurrency=64, max_tokens=32, seed=0):
    """requests_n requests (completions and chat alternating) at the given concurrency;
    every one must come back complete."""
    rng = random.Random(seed)
    prompts = [rng.choice(PROMPTS) + str(i) for i in range(requests_n)]
    errors, complete = [], 0
    lock = threading.Lock()

    def one(i_p):
        nonlocal complete
        i, p = i_p
        try:
            if i % 2:
                path, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": p}]}
            else:
                path, body = "/v1/completions", {"prompt": p}
            st, r = request(port, "POST", path, {"model": model_name, **body, "max_tokens": max_tokens,
                                                 "temperature": 0.7, "ignore_eos": True, "seed": 1})
            ok = st == 200 and completion_ok(r, max_tokens)
            with lock:
                complete += ok
                if not ok:
                    errors.append(f"{path} {st}: {str(r)[:200]}")
        except Exception as e:  # noqa: BLE001 - every failure is counted and reported
            with lock:
                errors.append(f"{type(e).__name__}: {e}")

    t = time.time()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, enumerate(prompts)))
    return {"requests": requests_n, "concurrency": concurrency, "complete": complete, "errors": len(errors),
            "endpoints": ["/v1/completions", "/v1/chat/completions"], "error_samples": errors[:5],
            "seconds": time.time() - t}


def logprob_error(test, ref):
    """Per-step |logprob(test) - logprob(ref)| over the top candidates both servers list,
    on the steps before the first differing token (same prefix, so same distribution)."""
    errs = []
    for a, b in zip(test, ref):
        for ta, tb, ia, ib in zip(a["top"], b["top"], a["ids"], b["ids"]):
            common = set(ta) & set(tb)
            if common:
                errs.append(max(abs(ta[t] - tb[t]) for t in common))
            if ia != ib:
                break
    if not errs:
        return None
    errs.sort()
    return {"steps": len(errs), "mean_abs": sum(errs) / len(errs), "p99_abs": errs[int(0.99 * (len(errs) - 1))],
            "max_abs": errs[-1]}


def agreement(a, b):
    """Position-wise greedy token agreement of two lists of sequences."""
    same = total = 0
    for x, y in zip((o["ids"] for o in a), (o["ids"] for o in b)):
        same += sum(int(p == q) for p, q in zip(x, y))
        total += max(len(x), len(y))
    return same / max(total, 1)


def check_radix_reuse(port, vocab, rng):
    """One prompt sent three times; the second and third reuse its cached prefix.

    Passes when both repeats hit the cache (>= 1024 cached tokens) and give the same
    greedy tokens.  Their tokens are not required to equal the first, uncached pass's:
    with INT4 pages a hit is numerically different from it (the recomputed last prompt
    token attends to the INT4 prefix, where the first pass gave it its chunk's exact K/V),
    and a random-weight model's greedy tokens can flip on that difference.  How far they
    agree is recorded; the cached-prefix attention itself is checked against a reference
    inside the server (--kv-quant-debug-check-attention, mode extend_prefix).
    """
    prefix = random_token_ids(rng, vocab, 1500)
    first, second, third = (generate_ids(port, prefix + [11, 12, 13], 24) for _ in range(3))
    cached = [r.get("meta_info", {}).get("cached_tokens", 0) for r in (second, third)]
    ids = [r["output_ids"] for r in (first, second, third)]
    leading = next((i for i, (a, b) in enumerate(zip(ids[0], ids[1])) if a != b), min(len(ids[0]), len(ids[1])))
    return {"ok": min(cached) >= 1024 and ids[1] == ids[2], "cached_tokens": cached[0],
            "repeats_agree": ids[1] == ids[2], "same_output": ids[0] == ids[1],
            "leading_tokens_equal_to_uncached": leading, "tokens": len(ids[0])}


def check_shared_prefix_batch(port, vocab, rng, requests=4, prefix_len=600, suffix_len=40):
    """Requests over one cached prefix sent at once, so that they share an extend batch (and,
    on the FlashInfer path with a small staging buffer, pieces that span several requests).
    Passes when every one returns its tokens with the prefix cached."""
    prefix = random_token_ids(rng, vocab, prefix_len)
    generate_ids(port, prefix + random_token_ids(rng, vocab, 4), 1)  # caches the prefix
    prompts = [prefix + random_token_ids(rng, vocab, suffix_len) for _ in range(requests)]
    with ThreadPoolExecutor(requests) as pool:
        replies = list(pool.map(lambda ids: generate_ids(port, ids, 8), prompts))
    cached = [r.get("meta_info", {}).get("cached_tokens", 0) for r in replies]
    return {"ok": all(len(r["output_ids"]) == 8 for r in replies) and min(cached) >= prefix_len,
            "cached_tokens": cached}


def check_chunked_prefill(port, vocab, rng, chunk):
    ids = random_token_ids(rng, vocab, 3 * chunk + 17)
    r = generate_ids(port, ids, 16)
    return {"ok": len(r["output_ids"]) == 16 and r["meta_info"]["prompt_tokens"] == len(ids),
            "prompt_tokens": r["meta_info"]["prompt_tokens"]}


def check_abort(port, model_name):
    before = time.time()
    ev = stream(port, "/v1/completions", {"model": model_name, "prompt": PROMPTS[2], "max_tokens": 4000,
                                          "ignore_eos": True, "stream": True}, max_events=5)
    time.sleep(1.0)
    st, r = request(port, "POST", "/v1/completions", {"model": model_name, "prompt": PROMPTS[0],
                                                      "max_tokens": 8, "ignore_eos": True})
    st_h, _ = request(port, "GET", "/health")
    return {"ok": len(ev) == 5 and st == 200 and completion_ok(r, 8) and st_h == 200,
            "seconds": time.time() - before}


# --------------------------------------------------------------------------- #
# modes
# --------------------------------------------------------------------------- #
def smoke(args):
    port = args.port
    srv = Server(args.model, port, ["--kv-quant", "none", "--attention-backend", "triton", *args.extra],
                 os.path.join(args.log_dir, "smoke_server.log")).start()
    try:
        name = served_model_id(port)
        endpoints = check_endpoints(port, name)
        load = load_test(port, name, args.requests, args.concurrency)
    finally:
        clean = srv.stop()
    result = {"gpu": gpu_name(), "versions": versions(), "kv_quant": "none", "bundle_mib": args.bundle_mib,
              "requests": load["requests"] + len(endpoints), "complete": load["complete"] + sum(endpoints.values()),
              "errors": load["errors"] + sum(not v for v in endpoints.values()),
              "endpoints": sorted(k for k, v in endpoints.items() if v), "startup_s": round(srv.startup_s, 1),
              "clean_shutdown": clean, "endpoint_checks": endpoints, "load": load,
              "command": " ".join(srv.cmd)}
    return result, result["errors"] == 0 and result["complete"] == result["requests"]


def int4(args):
    rng = random.Random(0)
    vocab = load_hf_config(args.model)["vocab_size"]
    prompts_ids = [random_token_ids(rng, vocab, rng.randrange(64, 1024)) for _ in range(args.agree_prompts)]
    # The comparison servers skip SGLang's prefill CUDA-graph capture (80 s per start on
    # an H100); the int4-bdr server, which runs every feature check, keeps all defaults.
    fast = ["--disable-prefill-cuda-graph"]
    configs = [("bf16", ["--kv-quant", "none", *fast]), ("int4", ["--kv-quant", "int4", *fast]),
               ("int4-bdr", ["--kv-quant", "int4-bdr"])]
    result = {"gpu": gpu_name(), "versions": versions(), "model": args.model_name or os.path.basename(args.model.rstrip("/")),
              "max_total_num_tokens": {}, "checks": {k: None for k in
                                                    ("cuda_graph", "radix_reuse", "chunked_prefill", "streaming",
                                                     "abort", "tp2")},
              "greedy_agreement_vs_bf16": {}, "requests": 0, "complete": 0, "details": {}, "commands": {}}
    outputs = serve_and_compare(
        args, result, [(name, [*flags, "--attention-backend", "triton"]) for name, flags in configs],
        prompts_ids, vocab, rng, featured="int4-bdr", log_prefix="int4_e2e")
    result["logprob_error_vs_bf16"] = {}
    for name in ("int4", "int4-bdr"):
        if name in outputs and "bf16" in outputs:
            result["greedy_agreement_vs_bf16"][name] = agreement(outputs[name], outputs["bf16"])
            result["logprob_error_vs_bf16"][name] = logprob_error(outputs[name], outputs["bf16"])
    result["attention_vs_reference"] = attention_check(args, prompts_ids, vocab, rng)
    ok = (result["complete"] == result["requests"] > 0
          and all(v is True for k, v in result["checks"].items() if k != "tp2")
          and result["attention_vs_reference"].get("ok") is True)
    return result, ok


def serve_and_compare(args, result, servers, prompts_ids, vocab, rng, featured, log_prefix):
    """Start each (name, flags) server in turn (its flags, then the chunk size, memory fraction
    and the extra server flags); record its command and KV capacity, its greedy outputs on
    ``prompts_ids`` and, on ``featured``, every feature check.  A server that does not start is
    recorded, not raised.  Returns the greedy outputs by name."""
    base = ["--chunked-prefill-size", str(args.chunk), "--mem-fraction-static", str(args.mem_fraction), *args.extra]
    outputs = {}
    for name, flags in servers:
        log = os.path.join(args.log_dir, f"{log_prefix}_{name}.log")
        srv = Server(args.model, args.port, [*flags, *base], log)
        result["commands"][name] = " ".join(srv.cmd)
        try:
            srv.start()
        except RuntimeError as e:
            result["details"][name] = {"start_error": str(e)[-2000:]}
            print(f"[{name}] failed to start:\n{e}", flush=True)
            continue
        try:
            result["max_total_num_tokens"][name] = srv.info().get("max_total_num_tokens")
            outputs[name] = greedy_outputs(args.port, prompts_ids, args.agree_tokens)
            d = {"startup_s": round(srv.startup_s, 1)}
            if name == featured:
                d.update(feature_checks(args, result, log, vocab, rng))
            result["details"][name] = d
        finally:
            srv.stop()
    return outputs


def feature_checks(args, result, log, vocab, rng) -> dict:
    """On the running int4-bdr server: every endpoint, radix-cache reuse, chunked prefill,
    abort, a load test, CUDA graphs; fills result["checks"] and counts; returns the details."""
    port, d = args.port, {}
    model_name = served_model_id(port)
    ep = check_endpoints(port, model_name)
    d["endpoints"] = ep
    result["checks"]["streaming"] = ep["/v1/completions (stream)"] and ep["/v1/chat/completions (stream)"]
    d["radix"] = check_radix_reuse(port, vocab, rng)
    result["checks"]["radix_reuse"] = d["radix"]["ok"]
    d["chunked"] = check_chunked_prefill(port, vocab, rng, args.chunk)
    result["checks"]["chunked_prefill"] = d["chunked"]["ok"]
    d["abort"] = check_abort(port, model_name)
    result["checks"]["abort"] = d["abort"]["ok"]
    d["load"] = load_test(port, model_name, args.requests, args.concurrency)
    result["requests"] += d["load"]["requests"]
    result["complete"] += d["load"]["complete"]
    captured = log_has(log, r"Capture target decode CUDA graph end")
    result["checks"]["cuda_graph"] = captured and d["load"]["complete"] == d["load"]["requests"]
    d["log_capacity_lines"] = [l.strip() for l in open(log, errors="replace")
                               if "sglang-sawint4" in l and any(w in l for w in ("tokens", "bytes", "policy", "staging"))]
    return d


def policy(args):
    """The launcher's default INT4 configuration (``--kv-quant int4-bdr``: the auto KV policy,
    CUDA graphs) on a model: the policy it chose, every feature check, and the served
    attention against the reference with a BF16 layer forced in, so that BF16, centered
    and plain INT4 layers are all checked."""
    rng = random.Random(0)
    vocab = load_hf_config(args.model)["vocab_size"]
    prompts_ids = [random_token_ids(rng, vocab, rng.randrange(64, 1024)) for _ in range(4)]
    result = {"gpu": gpu_name(), "versions": versions(), "model": args.model_name or os.path.basename(args.model.rstrip("/")),
              "checks": {k: None for k in ("cuda_graph", "radix_reuse", "chunked_prefill", "streaming", "abort")},
              "requests": 0, "complete": 0, "details": {}, "commands": {}}
    log = os.path.join(args.log_dir, "policy_e2e_int4-bdr.log")
    srv = Server(args.model, args.port, ["--kv-quant", "int4-bdr", "--chunked-prefill-size", str(args.chunk),
                                         "--mem-fraction-static", str(args.mem_fraction), *args.extra], log)
    result["commands"]["int4-bdr"] = " ".join(srv.cmd)
    try:
        srv.start()
        result["max_total_num_tokens"] = srv.info().get("max_total_num_tokens")
        result["details"]["int4-bdr"] = {"startup_s": round(srv.startup_s, 1),
                                         **feature_checks(args, result, log, vocab, rng)}
    except RuntimeError as e:
        result["details"]["int4-bdr"] = {"start_error": str(e)[-2000:]}
    finally:
        srv.stop()
    result["attention_vs_reference"] = attention_check(args, prompts_ids, vocab, rng, ["--kv-quant-bf16-layers", "0"])
    kinds = result["attention_vs_reference"].get("kv_kinds", [])
    ok = (result["complete"] == result["requests"] > 0 and all(v is True for v in result["checks"].values())
          and result["attention_vs_reference"].get("ok") is True and set(kinds) == {"bf16", "int4"})
    return result, ok


def attention_check(args, prompts_ids, vocab, rng, flags=(), backend="triton"):
    """An int4-bdr server in eager mode with --kv-quant-debug-check-attention: every
    layer's first decode / extend / extend-over-a-cached-prefix outputs are compared in
    the server with the float64 torch reference of the same pages."""
    path = os.path.join(args.log_dir, f"attention_check_{backend}.jsonl")
    if os.path.exists(path):
        os.remove(path)
    flags = ["--kv-quant", "int4-bdr", "--attention-backend", backend, "--disable-decode-cuda-graph",
             "--kv-quant-debug-check-attention", path, "--chunked-prefill-size", str(args.chunk),
             "--mem-fraction-static", str(args.mem_fraction), *flags, *args.extra]
    srv = Server(args.model, args.port, flags, os.path.join(args.log_dir, f"int4_e2e_attention_check_{backend}.log"))
    try:
        srv.start()
    except RuntimeError as e:
        return {"ok": None, "start_error": str(e)[-2000:], "command": " ".join(srv.cmd)}
    try:
        for ids in prompts_ids[:4]:  # extends without a prefix, then decode steps
            generate_ids(args.port, ids, 8)
        # extends over a cached prefix (the checker takes the first two per layer): several
        # requests over one prefix at once first, then one request alone
        check_shared_prefix_batch(args.port, vocab, rng)
        check_radix_reuse(args.port, vocab, rng)
        check_chunked_prefill(args.port, vocab, rng, args.chunk)  # later chunks over earlier ones
    finally:
        srv.stop()
    rows = [json.loads(line) for line in open(path)] if os.path.exists(path) else []
    return {**summarize_attention_checks(rows), "command": " ".join(srv.cmd)}


def flashinfer(args):
    """``--attention-backend flashinfer`` (opt-in with INT4 KV): greedy outputs
    and logprobs against the Triton path on the same prompts (same pages, other prefill
    kernels), every feature check with SGLang's defaults (prefill and decode CUDA graphs), and
    the served attention against the reference with the poison mode on, a BF16 layer and a
    staging buffer of STAGING rows, so that long prefixes run in several pieces."""
    rng = random.Random(0)
    vocab = load_hf_config(args.model)["vocab_size"]
    prompts_ids = [random_token_ids(rng, vocab, rng.randrange(64, 1024)) for _ in range(args.agree_prompts)]
    # four prompts over one 1,200-token prefix: the later ones extend its cached pages
    shared = random_token_ids(rng, vocab, 1200)
    prompts_ids += [shared + random_token_ids(rng, vocab, 40 + i) for i in range(4)]
    result = {"gpu": gpu_name(), "versions": versions(), "model": args.model_name or os.path.basename(args.model.rstrip("/")),
              "max_total_num_tokens": {},
              "checks": {k: None for k in ("cuda_graph", "radix_reuse", "chunked_prefill", "streaming", "abort")},
              "requests": 0, "complete": 0, "details": {}, "commands": {}}
    # the Triton comparison skips SGLang's prefill CUDA-graph capture; the FlashInfer server
    # (every feature check) keeps SGLang's defaults
    servers = [("triton", ["--kv-quant", "int4-bdr", "--attention-backend", "triton", "--disable-prefill-cuda-graph"]),
               ("flashinfer", ["--kv-quant", "int4-bdr", "--attention-backend", "flashinfer"])]
    outputs = serve_and_compare(args, result, [] if args.only_attention else servers, prompts_ids, vocab, rng,
                                featured="flashinfer", log_prefix="flashinfer_e2e")
    if len(outputs) == 2:
        result["greedy_agreement_vs_triton"] = agreement(outputs["flashinfer"], outputs["triton"])
        result["logprob_error_vs_triton"] = logprob_error(outputs["flashinfer"], outputs["triton"])
    result["attention_vs_reference"] = attention_check(
        args, prompts_ids, vocab, rng, ["--kv-quant-bf16-layers", "0", "--kv-quant-debug-poison",
                                        "--kv-quant-prefill-staging-rows", str(args.staging_rows)], backend="flashinfer")
    paths = set(result["attention_vs_reference"].get("paths", []))
    ok = result["attention_vs_reference"].get("ok") is True and "flashinfer" in paths
    if not args.only_attention:
        ok = ok and result["complete"] == result["requests"] > 0 and all(v is True for v in result["checks"].values())
    return result, ok


def summarize_attention_checks(rows) -> dict:
    """The served-vs-reference rows of --kv-quant-debug-check-attention, per mode: passes when
    decode, extend and extend over a cached prefix were all checked and none failed.
    ``processes``: how many server processes (TP ranks) wrote rows."""
    by_mode = {}
    for r in rows:
        m = by_mode.setdefault(r["mode"], {"checks": 0, "failed": 0, "max_rel_err": 0.0, "layers": set()})
        m["checks"] += 1
        m["failed"] += not r["ok"]
        m["max_rel_err"] = max(m["max_rel_err"], r["rel_err"])
        m["layers"].add(r["layer"])
    for m in by_mode.values():
        m["layers"] = len(m["layers"])
    want = {"decode", "extend", "extend_prefix"}
    return {"ok": bool(rows) and want <= set(by_mode) and all(not m["failed"] for m in by_mode.values()),
            "checks": len(rows), "by_mode": by_mode, "tolerance_rel": rows[0].get("tolerance_rel") if rows else None,
            "kv_kinds": sorted({r.get("kv", "int4") for r in rows}), "processes": len({r["pid"] for r in rows}),
            "paths": sorted({r["path"] for r in rows if r.get("path")})}


def tp2_verdict(load, pool_lines, captured, attention) -> bool:
    """TP 2 passes when every request completed, both ranks built the INT4 pool, decode CUDA
    graphs were captured and the served attention matched the reference on both ranks."""
    return (load["complete"] == load["requests"] > 0 and len(pool_lines) == 2 and captured
            and attention.get("ok") is True and attention.get("processes") == 2)


def tp2(args):
    """--tp 2 with the launcher's default INT4 configuration: both ranks' pools, a load test
    with CUDA graphs, greedy outputs against the same server at TP 1 (reported: TP changes the
    reduction order), and the served attention against the reference on both ranks."""
    import torch

    rng = random.Random(0)
    vocab = load_hf_config(args.model)["vocab_size"]
    prompts_ids = [random_token_ids(rng, vocab, rng.randrange(64, 1024)) for _ in range(args.agree_prompts)]
    base = ["--kv-quant", "int4-bdr", "--attention-backend", "triton", "--chunked-prefill-size", str(args.chunk),
            "--mem-fraction-static", str(args.mem_fraction), *args.extra]
    result = {"gpu": f"{torch.cuda.device_count()}x {gpu_name()}", "versions": versions(), "commands": {}}
    srv = Server(args.model, args.port, [*base, "--disable-prefill-cuda-graph"],
                 os.path.join(args.log_dir, "int4_tp1.log"))
    result["commands"]["tp1"] = " ".join(srv.cmd)
    srv.start()
    try:
        tp1 = greedy_outputs(args.port, prompts_ids, args.agree_tokens)
    finally:
        srv.stop()
    log = os.path.join(args.log_dir, "int4_e2e_tp2.log")
    srv = Server(args.model, args.port, [*base, "--tp", "2"], log)
    result["commands"]["tp2"] = " ".join(srv.cmd)
    srv.start()
    try:
        name = served_model_id(args.port)
        result["load"] = load_test(args.port, name, args.requests, args.concurrency)
        tp2_out = greedy_outputs(args.port, prompts_ids, args.agree_tokens)
        result["max_total_num_tokens"] = srv.info().get("max_total_num_tokens")
    finally:
        srv.stop()
    result["pool_lines"] = [l.strip() for l in open(log, errors="replace") if "INT4 KV cache is allocated" in l]
    result["cuda_graph"] = log_has(log, r"Capture target decode CUDA graph end")
    result["greedy_agreement_vs_tp1"] = agreement(tp2_out, tp1)
    result["logprob_error_vs_tp1"] = logprob_error(tp2_out, tp1)
    result["attention_vs_reference"] = attention_check(args, prompts_ids, vocab, rng, ["--tp", "2"])
    ok = tp2_verdict(result["load"], result["pool_lines"], result["cuda_graph"], result["attention_vs_reference"])
    result["tp2"] = ok
    result["command"] = result["commands"]["tp2"]
    return result, ok


def fold_tp2(e2e_path: str, tp2_path: str, gpu: str = None) -> dict:
    """Put a tp2 run's result (run on a 2-GPU machine, apart from the int4 checks) into
    int4_e2e.json: checks.tp2 and its details / command."""
    with open(e2e_path) as f:
        e2e = json.load(f)
    with open(tp2_path) as f:
        run = json.load(f)
    gpu = run.get("gpu") or gpu
    if not gpu:
        raise SystemExit(f"{tp2_path} does not say its GPU (runs before it did): pass --gpu")
    e2e["checks"]["tp2"] = bool(run["tp2"])
    e2e["details"]["tp2"] = {"gpu": gpu, **{k: run[k] for k in (
        "load", "max_total_num_tokens", "pool_lines", "cuda_graph", "greedy_agreement_vs_tp1", "logprob_error_vs_tp1",
        "attention_vs_reference") if k in run}}
    e2e["commands"]["tp2"] = run["command"]
    return e2e


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["smoke", "int4", "policy", "tp2", "flashinfer", "fold-tp2"],
                   help="fold-tp2: put the tp2 result --tp2-result into the int4 result --out")
    p.add_argument("--model")
    p.add_argument("--tp2-result", help="fold-tp2: a tp2 run's JSON")
    p.add_argument("--gpu", help="fold-tp2: the GPU of a tp2 result that does not name it")
    p.add_argument("--model-name", default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--log-dir", default=".")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--bundle-mib", type=float, default=None)
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--mem-fraction", type=float, default=0.8)
    p.add_argument("--agree-prompts", type=int, default=16)
    p.add_argument("--agree-tokens", type=int, default=48)
    p.add_argument("--staging-rows", type=int, default=256,
                   help="flashinfer: staging rows of the attention-check server (small: prefixes run in pieces)")
    p.add_argument("--only-attention", action="store_true", help="flashinfer: the attention-reference check only")
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = p.parse_args(argv[: len(argv) - len(extra) - (1 if extra or "--" in argv else 0)])
    args.extra = extra  # server flags after "--"
    if args.mode == "fold-tp2":
        if not args.tp2_result:
            p.error("fold-tp2 needs --tp2-result")
        e2e = fold_tp2(args.out, args.tp2_result, args.gpu)
        with open(args.out, "w") as f:
            json.dump(e2e, f, indent=1)
        print(f"checks.tp2 = {e2e['checks']['tp2']} ({e2e['details']['tp2']['gpu']}) in {args.out}")
        return
    if not args.model:
        p.error(f"{args.mode} needs --model")
    os.makedirs(args.log_dir, exist_ok=True)
    result, ok = {"smoke": smoke, "int4": int4, "policy": policy, "tp2": tp2, "flashinfer": flashinfer}[args.mode](args)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1)[:6000])
    print("PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
