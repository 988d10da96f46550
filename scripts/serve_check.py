#!/usr/bin/env python3
"""End-to-end checks of `python -m sglang_sawint4.launch_server` over its HTTP API.

    # smoke (BF16 KV, the serving issue): start, query every endpoint, load, stop
    python scripts/serve_check.py smoke --model /tmp/m --out bench/results/smoke.json

    # INT4 KV (the integration issue): bf16 / int4 / int4-bdr servers in turn
    python scripts/serve_check.py int4 --model /tmp/m --out bench/results/int4_e2e.json

Each server is started as a subprocess with its own log; a check that could not
run is recorded as null, never true.  Only the standard library is used on the
client side (threads + http.client), so it runs on the bare GPU host.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

HOST = "127.0.0.1"


# --------------------------------------------------------------------------- #
# HTTP helpers
# --------------------------------------------------------------------------- #
def request(port, method, path, body=None, timeout=300):
    """One HTTP request; body is a JSON-able object or raw bytes (e.g. malformed JSON)."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        raw = body if isinstance(body, bytes) or body is None else json.dumps(body)
        conn.request(method, path, body=raw, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
        try:
            return resp.status, json.loads(data) if data else None
        except json.JSONDecodeError:
            return resp.status, data.decode(errors="replace")
    finally:
        conn.close()


def load_row(payload):
    """The first (DP rank 0) row of a /v1/loads answer ({"loads": [...]} or a bare list), or {}."""
    rows = payload.get("loads", payload) if isinstance(payload, dict) else payload
    return rows[0] if rows else {}


def nvidia_smi(field):
    """``nvidia-smi --query-gpu=FIELD`` of GPU 0 as text (no units), or None without nvidia-smi."""
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30).stdout.split()
        return out[0] if out else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def served_model_id(port):
    """The model name the OpenAI endpoints expect."""
    return request(port, "GET", "/v1/models")[1]["data"][0]["id"]


def stream_events(port, path, body, max_events=None, timeout=300):
    """POST with stream=True; returns (status, parsed SSE events) or (status, error body).
    With max_events the client disconnects after that many events (the server must
    abort the request)."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    events = []
    try:
        conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            return resp.status, resp.read()[:300]
        while True:
            line = resp.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                events.append("[DONE]")
                break
            events.append(json.loads(payload))
            if max_events is not None and len(events) >= max_events:
                break
    finally:
        conn.close()
    return resp.status, events


def stream(port, path, body, max_events=None, timeout=300):
    """stream_events that raises on a non-200 answer; returns the events."""
    status, events = stream_events(port, path, body, max_events, timeout)
    if status != 200:
        raise RuntimeError(f"{path} stream -> {status} {events!r}")
    return events


# --------------------------------------------------------------------------- #
# server lifecycle
# --------------------------------------------------------------------------- #
class Server:
    def __init__(self, model, port, extra, log_path, env=None):
        self.port = port
        self.log_path = log_path
        self.cmd = [sys.executable, "-m", "sglang_sawint4.launch_server", "--model-path", model,
                    "--host", HOST, "--port", str(port), "--grammar-backend", "none", *extra]
        self.env = dict(os.environ, **(env or {}))
        self.proc = None
        self.startup_s = None

    def start(self, timeout=900):
        t = time.time()
        self.log = open(self.log_path, "w")
        self.log.write("$ " + " ".join(self.cmd) + "\n")
        self.log.flush()
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True)
        while time.time() - t < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {self.log_path}:\n"
                                   + tail(self.log_path))
            try:
                status, _ = request(self.port, "GET", "/health", timeout=5)
                if status == 200:
                    self.startup_s = time.time() - t
                    return self
            except OSError:
                pass
            time.sleep(1)
        raise RuntimeError(f"server not healthy after {timeout}s; see {self.log_path}")

    def info(self):
        """SGLang's /server_info: server args, scheduler info (max_total_num_tokens, ...) and
        per-DP internal states (effective_max_running_requests_per_dp, ...)."""
        status, info = request(self.port, "GET", "/server_info")
        return info if status == 200 else {}

    def stop(self, timeout=60):
        """SIGINT like a Ctrl-C, then SIGKILL the group if it does not exit."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        os.killpg(self.proc.pid, signal.SIGINT)
        try:
            self.proc.wait(timeout)
            clean = True
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            clean = False
        self.log.close()
        return clean


def tail(path, n=40):
    try:
        return "".join(open(path, errors="replace").readlines()[-n:])
    except OSError:
        return ""


def log_has(path, pattern):
    return re.search(pattern, open(path, errors="replace").read()) is not None


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


def generate_ids(port, input_ids, max_new_tokens, **extra):
    st, r = request(port, "POST", "/generate", {"input_ids": input_ids, "sampling_params": {
        "temperature": 0, "max_new_tokens": max_new_tokens, "ignore_eos": True}, **extra})
    if st != 200:
        raise RuntimeError(f"/generate -> {st}: {str(r)[:300]}")
    return r


def greedy_outputs(port, prompts_ids, n, top_logprobs=5):
    """Greedy output ids, their logprobs and, per step, {token id: logprob} of the top candidates."""
    outs = []
    for ids in prompts_ids:
        meta = generate_ids(port, ids, n, return_logprob=True, top_logprobs_num=top_logprobs)["meta_info"]
        outs.append({"ids": [t[1] for t in meta["output_token_logprobs"]],
                     "logprobs": [t[0] for t in meta["output_token_logprobs"]],
                     "top": [{t[1]: t[0] for t in step or []} for step in meta["output_top_logprobs"]]})
    return outs


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


FIRST_PLAIN_TOKEN_ID = 10  # random prompts stay clear of the generated tokenizers' special tokens


def random_token_ids(rng, vocab, n):
    """n token ids drawn by ``rng`` (a random.Random) from the non-special part of the vocabulary."""
    return [rng.randrange(FIRST_PLAIN_TOKEN_ID, vocab) for _ in range(n)]


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
def gpu_name():
    try:
        import torch

        return torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001
        return "unknown"


def versions():
    """Versions of what served the run (recorded next to the GPU name in every result)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("torch", "triton", "sglang", "sglang-kernel", "flashinfer-python", "transformers", "sglang-sawint4"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    return out


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
    vocab = json.load(open(os.path.join(args.model, "config.json")))["vocab_size"]
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
    outputs = {}
    for name, flags in configs:
        extra = [*flags, "--attention-backend", "triton", "--chunked-prefill-size", str(args.chunk),
                 "--mem-fraction-static", str(args.mem_fraction), *args.extra]
        log = os.path.join(args.log_dir, f"int4_e2e_{name}.log")
        srv = Server(args.model, args.port, extra, log)
        result["commands"][name] = " ".join(srv.cmd)
        try:
            srv.start()
        except RuntimeError as e:
            result["details"][name] = {"start_error": str(e)[-2000:]}
            print(f"[{name}] failed to start:\n{e}", flush=True)
            continue
        try:
            info = srv.info()
            result["max_total_num_tokens"][name] = info.get("max_total_num_tokens")
            outputs[name] = greedy_outputs(args.port, prompts_ids, args.agree_tokens)
            d = {"startup_s": round(srv.startup_s, 1)}
            if name == "int4-bdr":
                model_name = served_model_id(args.port)
                ep = check_endpoints(args.port, model_name)
                d["endpoints"] = ep
                result["checks"]["streaming"] = ep["/v1/completions (stream)"] and ep["/v1/chat/completions (stream)"]
                d["radix"] = check_radix_reuse(args.port, vocab, rng)
                result["checks"]["radix_reuse"] = d["radix"]["ok"]
                d["chunked"] = check_chunked_prefill(args.port, vocab, rng, args.chunk)
                result["checks"]["chunked_prefill"] = d["chunked"]["ok"]
                d["abort"] = check_abort(args.port, model_name)
                result["checks"]["abort"] = d["abort"]["ok"]
                d["load"] = load_test(args.port, model_name, args.requests, args.concurrency)
                result["requests"] += d["load"]["requests"]
                result["complete"] += d["load"]["complete"]
                captured = log_has(log, r"Capture target decode CUDA graph end")
                result["checks"]["cuda_graph"] = captured and d["load"]["complete"] == d["load"]["requests"]
                d["log_capacity_lines"] = [l.strip() for l in open(log, errors="replace")
                                           if "sglang-sawint4" in l and ("tokens" in l or "bytes" in l)]
            result["details"][name] = d
        finally:
            srv.stop()
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


def attention_check(args, prompts_ids, vocab, rng):
    """An int4-bdr server in eager mode with --kv-quant-debug-check-attention: every
    layer's first decode / extend / extend-over-a-cached-prefix outputs are compared in
    the server with the float64 torch reference of the same INT4 pages."""
    path = os.path.join(args.log_dir, "attention_check.jsonl")
    if os.path.exists(path):
        os.remove(path)
    flags = ["--kv-quant", "int4-bdr", "--attention-backend", "triton", "--disable-decode-cuda-graph",
             "--kv-quant-debug-check-attention", path, "--chunked-prefill-size", str(args.chunk),
             "--mem-fraction-static", str(args.mem_fraction), *args.extra]
    srv = Server(args.model, args.port, flags, os.path.join(args.log_dir, "int4_e2e_attention_check.log"))
    try:
        srv.start()
    except RuntimeError as e:
        return {"ok": None, "start_error": str(e)[-2000:], "command": " ".join(srv.cmd)}
    try:
        for ids in prompts_ids[:4]:  # extends without a prefix, then decode steps
            generate_ids(args.port, ids, 8)
        check_radix_reuse(args.port, vocab, rng)  # extend over a cached prefix
        check_chunked_prefill(args.port, vocab, rng, args.chunk)  # later chunks over earlier ones
    finally:
        srv.stop()
    rows = [json.loads(line) for line in open(path)] if os.path.exists(path) else []
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
            "command": " ".join(srv.cmd)}


def tp2(args):
    flags = ["--kv-quant", "int4-bdr", "--attention-backend", "triton", "--tp", "2", *args.extra]
    srv = Server(args.model, args.port, flags, os.path.join(args.log_dir, "int4_e2e_tp2.log")).start()
    try:
        name = served_model_id(args.port)
        load = load_test(args.port, name, args.requests, args.concurrency)
        info = srv.info()
    finally:
        srv.stop()
    ok = load["complete"] == load["requests"]
    import torch

    return {"tp2": ok, "gpu": f"{torch.cuda.device_count()}x {gpu_name()}", "load": load,
            "max_total_num_tokens": info.get("max_total_num_tokens"), "command": " ".join(srv.cmd)}, ok


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
    e2e["details"]["tp2"] = {"gpu": gpu, "load": run["load"], "max_total_num_tokens": run["max_total_num_tokens"]}
    e2e["commands"]["tp2"] = run["command"]
    return e2e


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["smoke", "int4", "tp2", "fold-tp2"],
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
    result, ok = {"smoke": smoke, "int4": int4, "tp2": tp2}[args.mode](args)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1)[:6000])
    print("PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
