"""Scripted check: a burst of requests over one long shared prefix stays inside SGLang's memory.

    python -m sglang_sawint4.bench.prefix_burst --model /tmp/models/8b --out bench/results/prefix_burst.json \
        --configs int4-bdr-flashinfer,int4-bdr-triton --prefix 32768 --requests 64 -- --disable-prefill-cuda-graph

Per config (``sglang_sawint4.serving.server.serving_config`` names): start the server, cache
one PREFIX-token prompt with one request, then send REQUESTS requests at once, each that
prefix plus a suffix of its own (SUFFIX tokens) and OUTPUT generated tokens.  With the
prefix cached, SGLang schedules them as extend batches whose cached prefixes add up to
REQUESTS x PREFIX rows (2M at 64 x 32k): the load where a prefill path that dequantizes the
whole prefix of every request at once grows without bound.  The GPU's used memory is
sampled (nvidia-smi, every 0.1 s) from before the burst to its end.

The check passes when every request returns all its tokens, the server still answers
/health afterwards, and the burst's peak memory stays within what the server held before
it plus the allowance (``--allowance-mib``, default 1024: SGLang's own activations for one
prefill batch), i.e. the INT4 prefill path allocated nothing that grows with the prefix.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import threading
import time

from sglang_sawint4.bench.serving import send_all, model_facts
from sglang_sawint4.serving.client import random_token_ids, served_model_id
from sglang_sawint4.serving.server import (Server, command_line, gpu_name, nvidia_smi, parse_args_and_server_flags,
                                           request, serving_config, versions)


def used_mib() -> int:
    """GPU 0's used memory (MiB), as nvidia-smi reports it."""
    used = nvidia_smi("memory.used")
    if used is None:
        raise RuntimeError("nvidia-smi did not report the GPU's used memory")
    return int(used)


class MemorySampler(threading.Thread):
    def __init__(self, period_s=0.1):
        super().__init__(daemon=True)
        self.period_s, self.peak, self.samples = period_s, 0, 0
        self._stop_event = threading.Event()

    def run(self):
        while not self._stop_event.is_set():
            self.peak = max(self.peak, used_mib())
            self.samples += 1
            self._stop_event.wait(self.period_s)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return self.peak


def verdict(row: dict, allowance_mib: int) -> bool:
    return (row["complete"] == row["requests"] and row["healthy_after"]
            and row["peak_mib"] - row["before_mib"] <= allowance_mib)


def burst(config, args, vocab, head_dim) -> dict:
    flags, fields = serving_config(config, head_dim)
    log = os.path.join(args.log_dir, f"prefix_burst_{config}.log")
    srv = Server(args.model, args.port, [*flags, *args.extra], log).start()
    try:
        base = f"http://127.0.0.1:{args.port}"
        model_id = served_model_id(args.port)
        rng = random.Random(args.seed)
        prefix = random_token_ids(rng, vocab, args.prefix)
        prompts = [prefix + random_token_ids(rng, vocab, args.suffix) for _ in range(args.requests)]
        send_all(base, model_id, [prefix + random_token_ids(rng, vocab, args.suffix)], 1, 1)  # caches the prefix
        time.sleep(1.0)
        before = used_mib()
        sampler = MemorySampler()
        sampler.start()
        results, seconds = send_all(base, model_id, prompts, args.output, args.requests)
        peak = sampler.stop()
        status, _ = request(args.port, "GET", "/health", timeout=30)
        row = {"config": config, **fields, "prefix_len": args.prefix, "suffix_len": args.suffix,
               "requests": args.requests, "output_len": args.output,
               "complete": sum(r.ok and r.output_tokens == args.output for r in results),
               "errors": [r.error for r in results if not r.ok][:5], "seconds": seconds,
               "before_mib": before, "peak_mib": peak, "growth_mib": peak - before, "samples": sampler.samples,
               "healthy_after": status == 200, "allowance_mib": args.allowance_mib,
               "server_command": " ".join(srv.cmd)}
    finally:
        srv.stop()
    row["passed"] = verdict(row, args.allowance_mib)
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--configs", default="int4-bdr-flashinfer")
    p.add_argument("--prefix", type=int, default=32768)
    p.add_argument("--suffix", type=int, default=32)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--output", type=int, default=8)
    p.add_argument("--allowance-mib", type=int, default=1024)
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-dir", default=".")
    args = parse_args_and_server_flags(p)
    vocab, head_dim = model_facts(args.model)
    os.makedirs(args.log_dir, exist_ok=True)
    rows = []
    for config in (c for c in args.configs.split(",") if c):
        try:
            rows.append(burst(config, args, vocab, head_dim))
        except Exception as e:  # noqa: BLE001 - a server that dies under the burst is the finding
            rows.append({"config": config, "passed": False, "error": f"{type(e).__name__}: {e}"[:2000]})
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "server_command"}), flush=True)
    result = {"gpu": gpu_name(), "model": os.path.basename(args.model.rstrip("/")), "versions": versions(),
              "command": command_line(), "rows": rows}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    sys.exit(0 if all(r["passed"] for r in rows) else 1)


if __name__ == "__main__":
    main()
