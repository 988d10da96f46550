"""Reliability of the INT4 KV path: bad configuration, bad requests, abort storms and a soak.

    python -m sglang_sawint4.bench.reliability --model /tmp/models/small --out bench/results/reliability.json \
        --soak-minutes 8

1. Bad configurations: the launcher is run as a subprocess for each case and must exit
   with code 2 and print exactly one ``error:`` line (no traceback).  Needs no GPU.
2. One int4-bdr server (``--kv-quant-debug-poison``: freed slots hold NaN scales, so a
   read of another request's stale page turns the logits NaN, which the logprobs returned
   by the ``/generate`` share of the traffic expose) with a KV pool small enough that the
   radix cache keeps evicting.
3. For ``--soak-minutes``: ``--concurrency`` client threads send mixed traffic
   (completions / chat / native ``/generate`` with logprobs, streaming and not, greedy
   and sampled, prompts sharing a few long prefixes plus unique tails), while one thread
   injects bad requests (empty / over-long prompt, max_tokens 0 and huge, invalid
   sampling parameters, malformed JSON, wrong types), one disconnects streaming clients
   mid-generation, and every ``--storm-every-s`` an abort storm opens 64 streams and
   drops them after their first chunks.  Every good request is validated (status,
   finish reason, token count, finite logprobs).
4. At the end, with the server idle: used KV slots (must be 0: everything else is
   evictable cache), again after ``/flush_cache``; GPU memory growth since the first
   minute; a fixed greedy probe prompt must give the same tokens as at the start.

Writes the issue's reliability.json (+ details) and a PNG of slots / memory / load over
time.  The client is the standard library only (threads + http.client).
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor


from sglang_sawint4.serving.client import (
    generate_ids,
    load_row,
    random_token_ids,
    request,
    served_model_id,
    stream_events,
)
from sglang_sawint4.serving.server import (Server, command_line, gpu_name, nvidia_smi, parse_args_and_server_flags,
                                           versions)

LAUNCHER = [sys.executable, "-m", "sglang_sawint4.launch_server"]
LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 1024,
         "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 128, "num_hidden_layers": 2,
         "vocab_size": 1000, "max_position_embeddings": 4096}


# --------------------------------------------------------------------------- #
# 1. bad configuration
# --------------------------------------------------------------------------- #
def bad_config_cases(tmp):
    """(name, argv, environment overrides, expected text in the error line)."""

    def model(name, **patch):
        path = os.path.join(tmp, name)
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump({**LLAMA, **patch}, f)
        return path

    ok_model = model("llama")
    fake_sglang = os.path.join(tmp, "old_sglang")
    os.makedirs(os.path.join(fake_sglang, "sglang"), exist_ok=True)
    with open(os.path.join(fake_sglang, "sglang", "__init__.py"), "w") as f:
        f.write('__version__ = "0.5.16"\n')
    m = ["--model-path", ok_model]
    return [
        ("unknown --kv-quant", m + ["--kv-quant", "int3"], {}, "--kv-quant must be one of"),
        ("block not a power of two", m + ["--kv-quant", "int4-bdr", "--kv-quant-block-size", "48"], {},
         "power of two"),
        ("block does not divide head_dim", ["--model-path", model("d64", head_dim=64, hidden_size=512),
                                            "--kv-quant", "int4-bdr", "--kv-quant-block-size", "128"], {},
         "does not divide"),
        ("head_dim not supported", ["--model-path", model("d80", head_dim=80), "--kv-quant", "int4-bdr"], {},
         "head_dim=80"),
        ("MLA model", ["--model-path", model("mla", kv_lora_rank=512, q_lora_rank=1536), "--kv-quant", "int4"],
         {}, "MLA"),
        ("sliding-window model", ["--model-path", model("swa", model_type="mistral", sliding_window=4096),
                                  "--kv-quant", "int4-bdr"], {}, "sliding-window"),
        ("soft-capped attention", ["--model-path", model("cap", attn_logit_softcapping=50.0), "--kv-quant",
                                   "int4-bdr"], {}, "soft-capping"),
        ("other attention backend", m + ["--kv-quant", "int4-bdr", "--attention-backend", "fa3"], {},
         "flashinfer or triton"),
        ("fp8 KV dtype with INT4", m + ["--kv-quant", "int4", "--kv-cache-dtype", "fp8_e4m3"], {},
         "kv-cache-dtype"),
        ("speculative decoding", m + ["--kv-quant", "int4-bdr", "--speculative-algorithm", "EAGLE"], {},
         "speculative"),
        ("unsupported SGLang version", m + ["--kv-quant", "int4-bdr"],
         {"PYTHONPATH": fake_sglang + os.pathsep + os.environ.get("PYTHONPATH", "")}, "0.5.17 only"),
        ("rotate kv without BDR", m + ["--kv-quant", "int4", "--kv-quant-rotate", "kv"], {}, "only applies"),
    ]


def run_bad_config_case(name, argv, env, expect):
    out = subprocess.run(LAUNCHER + argv, capture_output=True, text=True, timeout=300, env={**os.environ, **env})
    lines = out.stderr.strip().splitlines()
    ok = (out.returncode == 2 and len(lines) == 1 and "error:" in lines[0] and expect in lines[0]
          and "Traceback" not in out.stderr + out.stdout)
    print(f"bad config {'ok  ' if ok else 'FAIL'} {name}: {lines[-1] if lines else ''}", flush=True)
    return {"case": name, "ok": ok, "exit": out.returncode, "stderr": out.stderr.strip()[-400:]}


def run_bad_config_cases():
    """Every case in its own launcher process, all at once (each exits in about a second)."""
    with tempfile.TemporaryDirectory() as tmp:
        cases = bad_config_cases(tmp)
        with ThreadPoolExecutor(len(cases)) as pool:
            return list(pool.map(lambda c: run_bad_config_case(*c), cases))


# --------------------------------------------------------------------------- #
# HTTP helpers for traffic
# --------------------------------------------------------------------------- #
def finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x)


# --------------------------------------------------------------------------- #
# 2/3. traffic
# --------------------------------------------------------------------------- #
class Traffic:
    """Prompts from a few long shared prefixes (radix hits) plus unique tails (churn)."""

    def __init__(self, vocab, seed, families=12, prefix_len=1000, max_tail=1200):
        rng = random.Random(seed)
        self.vocab = vocab
        self.prefixes = [random_token_ids(rng, vocab, prefix_len) for _ in range(families)]
        self.max_tail = max_tail

    def prompt(self, rng):
        tail = random_token_ids(rng, self.vocab, rng.randrange(16, self.max_tail))
        return (rng.choice(self.prefixes) if rng.random() < 0.8 else []) + tail


REQUEST_TIMEOUT_S = 120  # a request the server sits on longer than this counts as failed, never blocks the soak


class Soak:
    def __init__(self, port, model_id, traffic, max_context):
        self.port, self.model_id, self.traffic, self.max_context = port, model_id, traffic, max_context
        self.lock = threading.Lock()
        self.counts = Counter()  # good requests by kind
        self.errors = Counter()  # failures of requests that should have succeeded, by type
        self.error_samples = []
        self.corrupted = 0
        self.bad_requests = {}  # case -> Counter of statuses
        self.stop = threading.Event()
        self.t0 = time.time()
        self.first_completion_s = None  # diagnostics: how long until the first good request came back

    def fail(self, kind, why, detail=""):
        with self.lock:
            self.errors[f"{kind}: {why}"] += 1
            if len(self.error_samples) < 20:
                self.error_samples.append(f"{kind}: {why} {str(detail)[:300]}")

    # -- good traffic: every response is validated ----------------------------------
    KINDS = ("completion", "completion_stream", "chat", "generate_logprobs")
    SAMPLINGS = ({"temperature": 0.0}, {"temperature": 0.8, "top_p": 0.95})

    def one_good(self, rng, kind=None, sampling=None):
        kind = kind or rng.choices(self.KINDS, [3, 3, 2, 2])[0]
        max_tokens = rng.randrange(8, 200)
        sampling = sampling or (self.SAMPLINGS[0] if rng.random() < 0.5 else self.SAMPLINGS[1])
        ids = self.traffic.prompt(rng)
        try:
            if kind == "completion":
                st, r = request(self.port, "POST", "/v1/completions", {
                    "model": self.model_id, "prompt": ids, "max_tokens": max_tokens, "ignore_eos": True,
                    **sampling}, timeout=REQUEST_TIMEOUT_S)
                ok = st == 200 and r["usage"]["completion_tokens"] == max_tokens and \
                    r["choices"][0]["finish_reason"] == "length"
            elif kind == "completion_stream":
                st, ev = stream_events(self.port, "/v1/completions", {
                    "model": self.model_id, "prompt": ids, "max_tokens": max_tokens, "ignore_eos": True,
                    "stream": True, "stream_options": {"include_usage": True}, **sampling},
                    timeout=REQUEST_TIMEOUT_S)
                usage = [e["usage"] for e in ev if isinstance(e, dict) and e.get("usage")]
                ok = st == 200 and ev and ev[-1] == "[DONE]" and usage and \
                    usage[-1]["completion_tokens"] == max_tokens
                r = ev
            elif kind == "chat":
                text = " ".join(str(t) for t in ids[: rng.randrange(8, 400)])
                st, r = request(self.port, "POST", "/v1/chat/completions", {
                    "model": self.model_id, "messages": [{"role": "user", "content": text}],
                    "max_tokens": max_tokens, "ignore_eos": True, **sampling}, timeout=REQUEST_TIMEOUT_S)
                ok = st == 200 and r["usage"]["completion_tokens"] == max_tokens and \
                    isinstance(r["choices"][0]["message"]["content"], str)
            else:
                st, r = request(self.port, "POST", "/generate", {
                    "input_ids": ids, "return_logprob": True, "sampling_params": {
                        "max_new_tokens": max_tokens, "ignore_eos": True, **sampling}},
                    timeout=REQUEST_TIMEOUT_S)
                ok = st == 200 and len(r["output_ids"]) == max_tokens
                if ok:
                    lps = [t[0] for t in r["meta_info"]["output_token_logprobs"]]
                    if len(lps) != max_tokens or not all(finite(x) for x in lps):
                        with self.lock:
                            self.corrupted += 1
                        self.fail(kind, "non-finite or missing logprobs", lps[:8])
                        return
        except (OSError, http.client.HTTPException) as e:
            self.fail(kind, type(e).__name__, e)
            return
        except (KeyError, IndexError, TypeError) as e:
            with self.lock:
                self.corrupted += 1
            self.fail(kind, "malformed response", e)
            return
        if not ok:
            status = st if st != 200 else "incomplete"
            if st == 200:
                with self.lock:
                    self.corrupted += 1
            self.fail(kind, f"HTTP {status}", r)
            return
        with self.lock:
            self.counts[kind] += 1
            if self.first_completion_s is None:
                self.first_completion_s = time.time() - self.t0

    def warm_up(self, seed):
        """Each kind of request with each sampling mode once, before the soak clock starts:
        the first sampled request makes FlashInfer JIT-compile its sampling kernels on a
        fresh machine (a one-time cost that would otherwise look like a stall)."""
        rng = random.Random(seed)
        t = time.time()
        for kind in self.KINDS:
            for sampling in self.SAMPLINGS:
                self.one_good(rng, kind, sampling)
        return time.time() - t

    def worker(self, seed):
        rng = random.Random(seed)
        while not self.stop.is_set():
            self.one_good(rng)

    # -- bad requests: SGLang's normal error, never a 5xx or a dead server ----------
    def bad_request_cases(self):
        long_prompt = [11] * (self.max_context + 16)
        m = self.model_id
        return [
            ("empty prompt", "/v1/completions", {"model": m, "prompt": "", "max_tokens": 8}),
            ("empty token list", "/generate", {"input_ids": [], "sampling_params": {"max_new_tokens": 4}}),
            ("prompt longer than the context", "/v1/completions", {"model": m, "prompt": long_prompt,
                                                                    "max_tokens": 8}),
            ("max_tokens 0", "/v1/completions", {"model": m, "prompt": "hello", "max_tokens": 0}),
            ("max_tokens huge", "/v1/completions", {"model": m, "prompt": "hello", "max_tokens": 10 ** 9}),
            ("max_tokens negative", "/v1/completions", {"model": m, "prompt": "hello", "max_tokens": -5}),
            ("temperature negative", "/v1/completions", {"model": m, "prompt": "hi", "max_tokens": 4,
                                                         "temperature": -1}),
            ("top_p above 1", "/v1/completions", {"model": m, "prompt": "hi", "max_tokens": 4, "top_p": 2.0}),
            ("top_k zero", "/generate", {"text": "hi", "sampling_params": {"max_new_tokens": 4, "top_k": 0}}),
            ("wrong prompt type", "/v1/completions", {"model": m, "prompt": {"a": 1}, "max_tokens": 4}),
            ("token id out of vocabulary", "/generate", {"input_ids": [10 ** 9, 5],
                                                         "sampling_params": {"max_new_tokens": 4}}),
            ("chat without messages", "/v1/chat/completions", {"model": m, "max_tokens": 4}),
            ("malformed JSON", "/v1/completions", b'{"model": "x", "prompt": [1, 2'),
        ]

    def one_bad(self, case):
        name, path, body = case
        try:
            st, r = request(self.port, "POST", path, body, timeout=REQUEST_TIMEOUT_S)
            outcome = f"HTTP {st}"
        except (OSError, http.client.HTTPException) as e:
            outcome, st, r = type(e).__name__, None, str(e)
        with self.lock:
            self.bad_requests.setdefault(name, Counter())[outcome] += 1
        if st is None or st >= 500:
            self.fail(f"bad request '{name}'", outcome, r)

    def bad_injector(self, every_s=1.5):
        """One bad request every `every_s`, each on its own thread: one the server sits on
        is recorded (as a timeout) without holding back the others."""
        cases = self.bad_request_cases()
        i = 0
        while not self.stop.wait(every_s):
            threading.Thread(target=self.one_bad, args=(cases[i % len(cases)],), daemon=True).start()
            i += 1

    # -- aborts: clients that go away mid-stream -------------------------------------
    def disconnect_once(self, rng):
        body = {"model": self.model_id, "prompt": self.traffic.prompt(rng), "max_tokens": 2000,
                "ignore_eos": True, "stream": True}
        try:
            stream_events(self.port, "/v1/completions", body, max_events=rng.randrange(1, 6),
                          timeout=REQUEST_TIMEOUT_S)
            with self.lock:
                self.counts["client_disconnect"] += 1
        except (OSError, http.client.HTTPException) as e:
            self.fail("client_disconnect", type(e).__name__, e)

    def disconnector(self, seed, every_s=2.0):
        rng = random.Random(seed)
        while not self.stop.wait(every_s):
            self.disconnect_once(rng)

    def storm(self, seed, n=64):
        threads = [threading.Thread(target=self.disconnect_once, args=(random.Random(seed + i),)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()


def loads(port):
    st, r = request(port, "GET", "/v1/loads?include=core", timeout=30)
    return load_row(r) if st == 200 else {}


def gpu_mem_mib():
    used = nvidia_smi("memory.used")
    try:
        return float(used)
    except (TypeError, ValueError):
        return None


def wait_idle(port, timeout=300):
    t = time.time()
    while time.time() - t < timeout:
        ld = loads(port)
        if ld.get("num_running_reqs", 1) == 0 and ld.get("num_waiting_reqs", 1) == 0:
            time.sleep(2)  # let the scheduler run its idle pass
            return loads(port)
        time.sleep(1)
    return loads(port)


def probe(port, ids, n=48):
    """Greedy output of a fixed prompt and whether all its logprobs are finite (None on an HTTP error)."""
    try:
        r = generate_ids(port, ids, n, return_logprob=True)
    except RuntimeError:
        return None
    return {"ids": r["output_ids"], "finite": all(finite(t[0]) for t in r["meta_info"]["output_token_logprobs"])}


# --------------------------------------------------------------------------- #
# the run
# --------------------------------------------------------------------------- #
def run(args):
    result = {"gpu": gpu_name(), "versions": versions(), "model": os.path.basename(args.model.rstrip("/")),
              "command": command_line()}
    # the launcher cases are CPU-only subprocesses: run them while the server starts and warms up
    bad_cfg_pool = ThreadPoolExecutor(1)
    bad_cfg_future = bad_cfg_pool.submit(run_bad_config_cases)
    cfg = json.load(open(os.path.join(args.model, "config.json")))
    vocab = cfg["vocab_size"]
    max_context = min(args.context_length, cfg.get("max_position_embeddings", args.context_length))
    traffic = Traffic(vocab, args.seed)
    flags = ["--kv-quant", "int4-bdr", "--kv-quant-debug-poison",
             "--max-total-tokens", str(args.max_total_tokens), "--context-length", str(max_context), *args.extra]
    log = os.path.join(args.log_dir, "reliability_server.log")
    srv = Server(args.model, args.port, flags, log).start()
    result["server_command"] = " ".join(srv.cmd)
    timeline = []
    try:
        model_id = served_model_id(args.port)
        probe_ids = traffic.prefixes[0][:300] + [42, 43, 44]
        probe_start = probe(args.port, probe_ids)
        start_loads = wait_idle(args.port)
        soak = Soak(args.port, model_id, traffic, max_context)
        warmup_s = soak.warm_up(args.seed + 999)
        print(f"warm-up: {warmup_s:.0f} s, {sum(soak.counts.values())} requests ok, errors {dict(soak.errors)}",
              flush=True)
        soak.counts.clear()  # the warm-up is not part of the soak's counts (its errors are)
        soak.first_completion_s = None
        soak.t0 = time.time()
        threads = [threading.Thread(target=soak.worker, args=(args.seed * 1000 + i,), daemon=True)
                   for i in range(args.concurrency)]
        threads += [threading.Thread(target=soak.bad_injector, daemon=True),
                    threading.Thread(target=soak.disconnector, args=(args.seed + 7,), daemon=True)]
        t0 = time.time()
        for t in threads:
            t.start()
        next_storm = t0 + args.storm_every_s
        storms = 0
        try:
            from tqdm import tqdm

            bar = tqdm(total=int(args.soak_minutes * 60), desc="soak (s)", file=sys.stdout, mininterval=30)
        except ImportError:
            bar = None
        while time.time() - t0 < args.soak_minutes * 60:
            time.sleep(5)
            ld = loads(args.port)
            with soak.lock:
                done = sum(soak.counts.values())
                errs = sum(soak.errors.values())
            timeline.append({"t_s": round(time.time() - t0, 1), "gpu_mem_mib": gpu_mem_mib(),
                             "used_slots": ld.get("num_used_tokens"), "running": ld.get("num_running_reqs"),
                             "waiting": ld.get("num_waiting_reqs"), "completed": done, "errors": errs})
            if bar is not None:
                bar.n = min(int(time.time() - t0), bar.total)
                bar.set_postfix(done=done, errors=errs, used=ld.get("num_used_tokens"))
                bar.refresh()
            if time.time() >= next_storm:  # in the background: the soak clock never waits on it
                threads.append(threading.Thread(target=soak.storm, args=(args.seed + 100 * storms,), daemon=True))
                threads[-1].start()
                storms += 1
                next_storm += args.storm_every_s
        soak.stop.set()
        for t in threads:
            t.join(timeout=REQUEST_TIMEOUT_S + 30)
        time.sleep(2)  # bad-request threads still in flight
        if bar is not None:
            bar.close()
        soak_s = time.time() - t0
        idle = wait_idle(args.port)
        leaked_idle = idle.get("num_used_tokens")
        st_flush, _ = request(args.port, "POST", "/flush_cache", timeout=60)
        time.sleep(2)
        flushed = loads(args.port)
        probe_end = probe(args.port, probe_ids)
        healthy = request(args.port, "GET", "/health", timeout=30)[0] == 200
        end_mem = gpu_mem_mib()
    finally:
        srv.stop()
        bad_cfg = bad_cfg_future.result()
        bad_cfg_pool.shutdown()
    result["bad_config"] = bad_cfg
    log_text = open(log, errors="replace").read()
    log_counts = {"memory leak": len(re.findall(r"memory leak detected", log_text, re.I)),
                  "scheduler exception": len(re.findall(r"Scheduler hit an exception|TpModelWorker hit", log_text))}
    after_1min = next((p["gpu_mem_mib"] for p in timeline if p["t_s"] >= 60 and p["gpu_mem_mib"] is not None), None)
    n_bad_sent = sum(sum(c.values()) for c in soak.bad_requests.values())
    result.update({
        "soak_minutes": round(soak_s / 60, 2),
        "requests": sum(soak.counts.values()) + n_bad_sent + sum(soak.errors.values()) - sum(
            v for k, v in soak.errors.items() if k.startswith("bad request")),
        "errors_by_type": dict(soak.errors),
        "corrupted_responses": soak.corrupted,
        "leaked_slots": leaked_idle if leaked_idle is not None else -1,
        "gpu_mem_growth_mib": (end_mem - after_1min) if end_mem is not None and after_1min is not None else None,
        "probe_output_stable": bool(probe_start and probe_end and probe_start["ids"] == probe_end["ids"]
                                    and probe_start["finite"] and probe_end["finite"]),
        "bad_config_cases": sum(c["ok"] for c in bad_cfg),
        "bad_request_cases": len(soak.bad_requests),
        "details": {
            "good_requests_by_kind": dict(soak.counts), "abort_storms": storms,
            "first_good_completion_s": soak.first_completion_s, "warmup_s": warmup_s,
            "bad_requests": {k: dict(v) for k, v in soak.bad_requests.items()},
            "bad_config_total": len(bad_cfg), "error_samples": soak.error_samples,
            "used_slots_idle_before": start_loads.get("num_used_tokens"), "used_slots_idle_after": leaked_idle,
            "used_slots_after_flush": flushed.get("num_used_tokens"), "flush_status": st_flush,
            "max_total_num_tokens": flushed.get("max_total_num_tokens"), "healthy_at_end": healthy,
            "server_log_counts": log_counts, "probe_start": probe_start, "probe_end": probe_end,
            "gpu_mem_mib_after_1min": after_1min, "gpu_mem_mib_end_idle": end_mem,
            "concurrency": args.concurrency, "timeline": timeline,
        },
    })
    ok = (not soak.errors and result["corrupted_responses"] == 0 and result["leaked_slots"] == 0
          and flushed.get("num_used_tokens") == 0 and result["probe_output_stable"] and healthy
          and result["bad_config_cases"] == len(bad_cfg) and log_counts["memory leak"] == 0
          and log_counts["scheduler exception"] == 0)
    result["pass"] = ok
    return result, ok


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tl = result["details"]["timeline"]
    t = [p["t_s"] / 60 for p in tl]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot(t, [p["used_slots"] for p in tl], label="used KV slots (not evictable)")
    axes[0].axhline(result["details"]["max_total_num_tokens"] or 0, color="k", ls=":", lw=0.8, label="pool size")
    axes[0].set_ylabel("slots")
    axes[1].plot(t, [p["gpu_mem_mib"] for p in tl], color="tab:red")
    axes[1].set_ylabel("GPU memory used (MiB, nvidia-smi)")
    axes[2].plot(t, [p["completed"] for p in tl], label="good requests completed")
    axes[2].plot(t, [p["errors"] for p in tl], label="failed")
    axes[2].plot(t, [p["running"] for p in tl], label="running now")
    for ax in axes:
        ax.set_xlabel("soak time (min)")
        ax.legend(fontsize=8) if ax.get_legend_handles_labels()[0] else None
    fig.suptitle(f"{result['gpu']}: {result['soak_minutes']} min, {result['requests']} requests, "
                 f"errors {sum(result['errors_by_type'].values())}, corrupted {result['corrupted_responses']}, "
                 f"leaked slots {result['leaked_slots']}, probe stable {result['probe_output_stable']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model directory (not needed with --bad-config-only)")
    p.add_argument("--out", default="bench/results/reliability.json")
    p.add_argument("--log-dir", default=".")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--soak-minutes", type=float, default=8.0)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--storm-every-s", type=float, default=90.0)
    p.add_argument("--max-total-tokens", type=int, default=100000,
                   help="small pool: the radix cache keeps evicting")
    p.add_argument("--context-length", type=int, default=8192, help="server context (the over-long prompt case)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bad-config-only", action="store_true", help="only the launcher cases (no GPU)")
    args = parse_args_and_server_flags(p)
    if args.bad_config_only:
        cases = run_bad_config_cases()
        print(f"{sum(c['ok'] for c in cases)}/{len(cases)} bad configurations refused with one line")
        sys.exit(0 if all(c["ok"] for c in cases) else 1)
    if not args.model:
        p.error("--model is required")
    os.makedirs(args.log_dir, exist_ok=True)
    result, ok = run(args)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    plot(result, os.path.splitext(args.out)[0] + ".png")
    summary = {k: v for k, v in result.items() if k not in ("details", "bad_config")}
    print(json.dumps(summary, indent=1))
    print("PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
