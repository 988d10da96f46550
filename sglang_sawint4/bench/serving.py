"""Serving benchmark over the OpenAI HTTP API: throughput, latency and capacity per KV config.

    python -m sglang_sawint4.bench.serving --model /tmp/models/8b --out bench/results/serving.json \
        --configs bf16-flashinfer,int4-bdr-flashinfer,int4-flashinfer,fp8_e4m3-flashinfer,bf16-triton,int4-triton,int4-bdr-triton \
        --repeat-configs int4-bdr-flashinfer,bf16-flashinfer \
        --shapes 1024x256@1/16/64*4,16384x1024@8/32 --shared-prefix 8192x256x128@32*4 \
        --state /tmp/serving_state.jsonl --call-budget-s 560 -- --disable-prefill-cuda-graph

A config is ``<kv>-<backend>``: kv ``bf16``, ``fp8_e4m3``, ``int4``, ``int4-bdr`` (both INT4 kinds with
every layer INT4, ``--kv-quant-policy none``, so that only the format differs; ``int4-bdr`` at
the default block min(128, head_dim)) or ``int4-bdr-<block>``; backend ``flashinfer`` or
``triton`` (``--attention-backend``; INT4 decode always runs our kernel).  Each config is one
server (``python -m sglang_sawint4.launch_server``) that runs every point: the ``random``
workload (random token-id prompts, every shape at each of its concurrencies) and the
``shared-prefix`` workload (PREFIXxSUFFIXxOUTPUT: 4 groups of requests, each group's prompts
one PREFIX-token prefix plus a SUFFIX-token suffix of their own; each group's prefix is
cached by one untimed request first, as a system prompt or an earlier turn would be).
A level ``C*W`` sends W x C requests with at most C in flight, closed loop (a new request as
one ends), so that TTFT percentiles and throughput rest on more than one burst; ``C`` alone
sends C.  Each request's output length is drawn (seeded, the same for every config) from
[(1 - --output-spread) x OUTPUT, OUTPUT]: with one length for all, a closed loop runs in
lockstep waves (C requests prefill together, decode together and end on the same step), so
its TTFTs are a staircase of prefill batches and the median moves by steps between runs;
spread lengths end requests at different steps, as real traffic does, and new requests
arrive while others decode.
One server lifetime is a *unit*.  Pass 0 runs every config in the given order; pass 1
runs --repeat-configs again in the reverse order, so that machine drift does not favour
one of them and the run-to-run spread is measured (``repeat_spread_pct``).

Every request has ``ignore_eos``, so every config generates the same tokens; streaming
gives TTFT (first chunk, p50 and p99) and inter-token latency; /v1/loads is sampled
during each point for the peak of running requests and used KV slots.  A point is a
*capacity point* (``capacity_point: true``) when its KV demand exceeds the pool of the
BF16 baseline config (``bf16-flashinfer``): there BF16 cannot run every request at once.
Prefill-chunk throughput comes from the server log's ``Prefill batch`` lines of the timed
points (``prefill_chunks`` per unit: full chunks with and without a cached prefix), and each
row's ``server_decode_tok_s_p50`` from the ``Decode batch`` lines written during its point:
the rate the scheduler generated tokens at, before SGLang's streaming path and the client
(which can cap what ``output_tok_s`` sees).  ``server_cpu_s`` is the CPU time each server
process (scheduler, detokenizer, tokenizer/HTTP) used during the point: next to the point's
``seconds`` it says how much host time a config spends for the same work.  SGLang's scheduler
polls while it waits, so its own CPU seconds track the wall seconds in every config; the
tokenizer and detokenizer processes' seconds do not.

Resumable: each finished unit is appended to --state; a later call with the same command
skips the units already there.  With --call-budget-s the script stops before a unit that
would not finish within the budget (exit code 75: call it again), so a run longer than one
GPU command spans several calls on the same machine (each unit records the GPU's UUID, and
the host's speed measured just before it, ``host_speed``: host-bound configs follow it, hosts
of one GPU model differ, and one machine's host has slowed by 1.6x between two calls minutes
apart; ``host_spread_pct`` in the result says how far the run's units were apart).
When every unit is done it writes --out (JSON) and the plot beside it (PNG); the state file
keeps every unit's raw rows, from which ``--rebuild`` recomputes --out after a change to the
aggregation (the run's GPU, versions and command are kept).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple


from sglang_sawint4.serving.client import load_row, random_token_ids, served_model_id
from sglang_sawint4.serving.server import (Server, command_line, cpu_seconds_between, gpu_name, host_speed,
                                           nvidia_smi, parse_args_and_server_flags, serving_config, versions)

EXIT_RESUME = 75  # EX_TEMPFAIL: units are left, run the same command again
BASELINE = "bf16-flashinfer"
PREFIX_GROUPS = 4


def _lengths(text: str, n: int, what: str) -> Tuple[int, ...]:
    try:
        vals = tuple(int(x) for x in text.split("x"))
    except ValueError:
        raise SystemExit(f"bad {what} {text!r}") from None
    if len(vals) != n or min(vals) < 1:
        raise SystemExit(f"bad {what} {text!r}: {n} positive lengths joined by x")
    return vals


def _levels(text: str, default: List[int], what: str) -> List[Tuple[int, int]]:
    """(concurrency, waves) of each level after '@': ``C`` or ``C*W`` (W waves of C requests)."""
    shape, _, conc = text.partition("@")
    if not conc:
        return [(c, 1) for c in default]
    levels = []
    for level in conc.split("/"):
        c, _, w = level.partition("*")
        try:
            levels.append((int(c), int(w) if w else 1))
        except ValueError:
            raise SystemExit(f"bad {what} {text!r}: concurrencies as c1/c2/..., each optionally *waves") from None
    if min(min(level) for level in levels) < 1:
        raise SystemExit(f"bad {what} {text!r}: concurrencies and waves must be positive")
    return levels


@dataclass(frozen=True)
class Point:
    """One measured load.  input_len counts the whole prompt (prefix included)."""
    workload: str  # random | shared-prefix
    input_len: int
    output_len: int
    concurrency: int
    prefix_len: int = 0  # shared-prefix: tokens every request of a group shares
    waves: int = 1  # requests = waves x concurrency (closed loop: a new one as one ends)
    output_spread: float = 0.0  # output lengths drawn from [(1 - spread) x output_len, output_len]

    def output_lens(self, n: int, seed: int) -> List[int]:
        """The n requests' output lengths (max_tokens), the same for every config."""
        lo = max(1, round(self.output_len * (1 - self.output_spread)))
        rng = random.Random(seed)
        return [rng.randint(lo, self.output_len) for _ in range(n)]

    def kv_demand(self, groups: int = PREFIX_GROUPS) -> int:
        """KV slots needed to run every request at once at full output length (shared prefixes
        counted once)."""
        if self.workload == "shared-prefix":
            return groups * self.prefix_len + self.concurrency * (self.input_len - self.prefix_len + self.output_len)
        return self.concurrency * (self.input_len + self.output_len)


def parse_points(shapes: str, concurrency: str, shared_prefix: str = "", output_spread: float = 0.0) -> List[Point]:
    """--shapes 'ILxOL[@c1/c2],...', --concurrency 'c1,c2' (shapes without @), --shared-prefix
    'PxSxO[@c1/c2],...' -> the points, in that order.  A level ``C*W`` sends W x C requests."""
    if not 0.0 <= output_spread < 1.0:
        raise SystemExit(f"bad --output-spread {output_spread}: a fraction in [0, 1)")
    try:
        default = [int(c) for c in concurrency.split(",") if c]
    except ValueError:
        raise SystemExit(f"bad --concurrency {concurrency!r}") from None
    points = []
    for text in (x for x in shapes.split(",") if x):
        il, ol = _lengths(text.partition("@")[0], 2, "shape")
        points += [Point("random", il, ol, c, waves=w, output_spread=output_spread)
                   for c, w in _levels(text, default, "shape")]
    for text in (x for x in shared_prefix.split(",") if x):
        pl, sl, ol = _lengths(text.partition("@")[0], 3, "--shared-prefix")
        points += [Point("shared-prefix", pl + sl, ol, c, prefix_len=pl, waves=w, output_spread=output_spread)
                   for c, w in _levels(text, default, "--shared-prefix")]
    if not points:
        raise SystemExit("no points: give --shapes and/or --shared-prefix")
    return points


# --------------------------------------------------------------------------- #
# the load generator
# --------------------------------------------------------------------------- #
@dataclass
class RequestResult:
    ok: bool
    output_tokens: int = 0  # from the final usage chunk when the server sends one, else chunks seen
    ttft_s: float = 0.0  # to the first chunk with text (as SGLang's bench_serving counts it)
    first_chunk_s: float = 0.0  # to the first chunk carrying a token, with text or not
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
                if not chunk.get("choices"):
                    continue
                now = time.perf_counter()
                if not res.first_chunk_s:
                    res.first_chunk_s = now - t0
                if not chunk["choices"][0].get("text"):
                    continue
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


async def sample_loads(session, url, peak, stop, period_s=0.5):
    """Poll SGLang's /v1/loads until `stop` is set; keep the peaks in `peak`."""
    while not stop.is_set():
        try:
            async with session.get(url) as resp:
                data = await resp.json() if resp.status == 200 else None
            ld = load_row(data)
            for key, name in (("num_running_reqs", "peak_running"), ("num_waiting_reqs", "peak_waiting"),
                              ("num_used_tokens", "peak_used_tokens")):
                if isinstance(ld.get(key), int):
                    peak[name] = max(peak.get(name, 0), ld[key])
        except Exception:  # noqa: BLE001 - a missed sample is not a failed request
            pass
        try:
            await asyncio.wait_for(stop.wait(), period_s)
        except asyncio.TimeoutError:
            pass


async def run_load(base_url, model, prompts, output_len, concurrency, progress=None, peak=None):
    """Send all prompts with at most `concurrency` in flight; returns (results, seconds).
    `output_len`: every request's max_tokens, or a list of one per prompt.  With a `peak`
    dict, /v1/loads is sampled meanwhile and its peaks are stored there."""
    import aiohttp

    sem = asyncio.Semaphore(concurrency)
    url = base_url.rstrip("/") + "/v1/completions"
    timeout = aiohttp.ClientTimeout(total=3600)

    lens = _per_request(output_len, len(prompts))

    async def guarded(session, p, n_out):
        async with sem:
            r = await one_request(session, url, model, p, n_out)
            if progress is not None:
                progress.update(1)
            return r

    t0 = time.perf_counter()
    # limit=0: the default connector caps a session at 100 connections, i.e. at concurrency 100
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        stop = asyncio.Event()
        sampler = None
        if peak is not None:
            sampler = asyncio.ensure_future(
                sample_loads(session, base_url.rstrip("/") + "/v1/loads?include=core", peak, stop))
        results = await asyncio.gather(*(guarded(session, p, n) for p, n in zip(prompts, lens)))
        seconds = time.perf_counter() - t0
        stop.set()
        if sampler is not None:
            await sampler
    return results, seconds


def _per_request(output_len, n: int) -> List[int]:
    if isinstance(output_len, int):
        return [output_len] * n
    if len(output_len) != n:
        raise ValueError(f"{len(output_len)} output lengths for {n} requests")
    return list(output_len)


def summarize(results, seconds, output_len):
    """One level's numbers; `output_len` as for run_load (a request is complete when it
    returned exactly its own max_tokens: every request has ignore_eos)."""
    lens = _per_request(output_len, len(results))
    ok = [r for r in results if r.ok]
    itl = [x for r in ok for x in r.itl_s]
    ttft = [r.ttft_s for r in ok]
    first = [r.first_chunk_s for r in ok]

    def pct(xs, q):
        return statistics.quantiles(xs, n=100)[q - 1] * 1e3 if len(xs) >= 2 else (xs[0] * 1e3 if xs else None)

    return {
        "requests": len(results), "complete": sum(r.ok and r.output_tokens == n for r, n in zip(results, lens)),
        "errors": len(results) - len(ok), "output_tok_s": sum(r.output_tokens for r in ok) / seconds,
        "ttft_ms_p50": statistics.median(ttft) * 1e3 if ttft else None,
        "ttft_ms_p99": pct(ttft, 99),
        # the shape of the distribution: lockstep waves (one output length for all) make
        # the TTFTs step with their prefill batches
        "ttft_ms_deciles": [q * 1e3 for q in statistics.quantiles(ttft, n=10)] if len(ttft) >= 2 else None,
        # a first token whose text is held back (an incomplete UTF-8 sequence, a special token)
        # shows up one chunk later: the tokens differ between KV formats, so this can differ too
        "first_chunk_ms_p50": statistics.median(first) * 1e3 if first else None,
        "first_text_late": sum(r.ttft_s > r.first_chunk_s for r in ok),
        "itl_ms_p50": statistics.median(itl) * 1e3 if itl else None, "itl_ms_p99": pct(itl, 99),
        "seconds": seconds, "error_samples": sorted({r.error for r in results if not r.ok})[:3],
    }


def total_tok_s(row) -> float:
    """Prompt plus generated tokens per second of one level: every prompt is exactly
    input_len token ids, and a failed request is counted with neither."""
    return row["output_tok_s"] + row["input_len"] * (row["requests"] - row["errors"]) / row["seconds"]


def make_prompts(n, input_len, vocab, seed):
    rng = random.Random(seed)
    return [random_token_ids(rng, vocab, input_len) for _ in range(n)]


def shared_prefix_prompts(n, point: Point, vocab, seed, groups=PREFIX_GROUPS):
    """(prefixes, prompts): `groups` random prefixes of point.prefix_len tokens; request i gets
    prefix i % groups plus a suffix of its own, point.input_len tokens in all."""
    rng = random.Random(seed)
    prefixes = [random_token_ids(rng, vocab, point.prefix_len) for _ in range(groups)]
    suffix = point.input_len - point.prefix_len
    return prefixes, [prefixes[i % groups] + random_token_ids(rng, vocab, suffix) for i in range(n)]


def num_requests(point: Point, min_requests: int) -> int:
    """The point's waves of `concurrency` requests, and at least `min_requests` for low concurrencies."""
    return max(min_requests, point.waves * point.concurrency)


# --------------------------------------------------------------------------- #
# the plan: units, state, resuming
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class Unit:
    pass_idx: int
    config: str

    @property
    def key(self) -> str:
        return f"{self.pass_idx}:{self.config}"


def plan_units(configs: List[str], repeat_configs: List[str]) -> List[Unit]:
    """Pass 0: every config in order; pass 1: the repeated ones in reverse order."""
    unknown = [c for c in repeat_configs if c not in configs]
    if unknown:
        raise SystemExit(f"--repeat-configs {unknown} are not in --configs {configs}")
    if len(set(configs)) != len(configs):
        raise SystemExit(f"--configs lists a config twice: {configs}")
    units = [Unit(0, c) for c in configs]
    units += [Unit(1, c) for c in reversed(configs) if c in repeat_configs]
    return units


def load_state(path: Optional[str]) -> Dict[str, dict]:
    """Finished units by key (the last record wins)."""
    done = {}
    if path and os.path.exists(path):
        with open(path) as f:
            for line in f:
                if line.strip():
                    rec = json.loads(line)
                    done[rec["unit"]] = rec
    return done


def append_state(path: Optional[str], record: dict):
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


HOST_SPEED_S = 10.0  # the host measurement before each unit (a child process with its own CUDA context)


def next_action(units, done, elapsed_s, budget_s, default_unit_s):
    """('run', unit), ('resume', unit) when the budget would be exceeded, or ('done', None).
    The estimate is an earlier unit of the same config plus 10% (a repeat), else the median
    finished unit plus 15% (else default_unit_s): not the longest, which is the first on a
    fresh machine, where the JIT caches are filled; plus the host measurement before it."""
    todo = [u for u in units if u.key not in done]
    if not todo:
        return "done", None
    unit = todo[0]
    same = [rec["seconds"] for rec in done.values() if rec.get("config") == unit.config]
    times = [rec["seconds"] for rec in done.values()]
    if same:
        estimate = 1.1 * max(same)
    else:
        estimate = 1.15 * statistics.median(times) if times else default_unit_s
    estimate += HOST_SPEED_S
    if budget_s and elapsed_s + estimate > budget_s:
        return "resume", unit
    return "run", unit


_PREFILL_LINE = re.compile(r"Prefill batch.*?#new-token: (\d+), #cached-token: (\d+),.*?"
                           r"input throughput \(token/s\): ([0-9.]+)")


def prefill_chunk_stats(log_text: str, chunk_tokens: int) -> dict:
    """Prefill throughput of full chunks (#new-token >= chunk_tokens) from SGLang's log, split
    by whether the batch had radix-cached or earlier-chunk tokens (#cached-token > 0).

    SGLang's "input throughput" is a batch's new tokens over the time since the previous
    prefill log line; for back-to-back full chunks that is the chunk's prefill time."""
    out = {}
    groups = {"no_cached_prefix": [], "cached_prefix": []}
    for new, cached, tok_s in _PREFILL_LINE.findall(log_text):
        if int(new) >= chunk_tokens:
            groups["cached_prefix" if int(cached) else "no_cached_prefix"].append(float(tok_s))
    for name, vals in groups.items():
        out[name] = {"chunks": len(vals), "median_tok_s": statistics.median(vals) if vals else None}
    return out


_DECODE_LINE = re.compile(r"Decode batch, #running-req: \d+,.*?gen throughput \(token/s\): ([0-9.]+)")


def server_decode_rate(log_text: str) -> dict:
    """Median of SGLang's ``Decode batch`` "gen throughput" lines in a slice of its log (each
    line: tokens generated over the time since the previous decode log line) and their count."""
    vals = [float(v) for v in _DECODE_LINE.findall(log_text)]
    return {"server_decode_tok_s_p50": statistics.median(vals) if vals else None, "server_decode_lines": len(vals)}


def _read_from(path: str, offset: int) -> str:
    with open(path, errors="replace") as f:
        f.seek(offset)
        return f.read()


def send_all(base, model_id, prompts, output_len, concurrency, bar=None, peak=None):
    """run_load from synchronous code: (results, seconds)."""
    return asyncio.run(run_load(base, model_id, prompts, output_len, concurrency, bar, peak))


def point_prompts(point: Point, n: int, vocab: int, seed: int):
    """(warm-up prompts sent untimed first, the timed prompts) of a point."""
    if point.workload == "shared-prefix":
        prefixes, prompts = shared_prefix_prompts(n, point, vocab, seed)
        # one request per group caches its prefix (with a suffix of its own, so the timed
        # requests hit the prefix and compute their suffixes)
        warm = [pre + random_token_ids(random.Random(seed + 1 + g), vocab, 8) for g, pre in enumerate(prefixes)]
        return warm, prompts
    return [], make_prompts(n, point.input_len, vocab, seed)


def run_unit(unit, args, points: List[Point], vocab, head_dim, host=None):
    """One config's server, warmed up, then every point; the unit's record (``host``: the
    ``host_speed`` measured just before it, kept with the unit: a run's units may land on other
    machines, and one machine's host speed moves between calls)."""
    from tqdm import tqdm

    t_unit = time.time()
    log = os.path.join(args.log_dir, f"serving_{unit.config}_p{unit.pass_idx}.log")
    flags, info_fields = serving_config(unit.config, head_dim)
    srv = Server(args.model, args.port, [*flags, *args.extra], log).start()
    base = f"http://127.0.0.1:{args.port}"
    rows = []
    try:
        info = srv.info()
        states = info.get("internal_states") or [{}]
        max_running = states[0].get("effective_max_running_requests_per_dp")
        chunk = info.get("chunked_prefill_size") or 8192
        model_id = served_model_id(args.port)
        # untimed warm-up at every shape, with enough requests for full prefill chunks and
        # mixed prefill/decode batches, then one request again (a radix-cache hit: the cached-
        # prefix path): Triton specializes kernels on argument values (e.g. divisible by 16),
        # FlashInfer loads its modules at first use, and a compile or load inside a timed level
        # would count against that config (decode batch sizes are compiled by the CUDA-graph
        # capture already)
        for il, ol in sorted({(p.input_len, p.output_len) for p in points}):
            n_warm = min(64, max(p.concurrency for p in points if (p.input_len, p.output_len) == (il, ol)))
            warm = make_prompts(n_warm, il, vocab, args.seed - 1)
            send_all(base, model_id, warm, min(ol, 8), n_warm)
            send_all(base, model_id, warm[:1], 2, 1)
        log_start = os.path.getsize(log)
        total = sum(num_requests(p, args.min_requests) for p in points)
        bar = tqdm(total=total, desc=f"pass {unit.pass_idx} {unit.config}", file=sys.stdout, mininterval=10)
        for p in points:
            n = num_requests(p, args.min_requests)
            seed = args.seed + p.concurrency + p.input_len + p.prefix_len
            warm, prompts = point_prompts(p, n, vocab, seed)
            lens = p.output_lens(n, seed)
            if warm:
                send_all(base, model_id, warm, 1, len(warm))
            peak = {}
            point_start = os.path.getsize(log)
            cpu_before = srv.cpu_seconds()
            res, secs = send_all(base, model_id, prompts, lens, p.concurrency, bar, peak)
            cpu = cpu_seconds_between(cpu_before, srv.cpu_seconds())
            decode = server_decode_rate(_read_from(log, point_start))
            rows.append({"config": unit.config, **info_fields, "workload": p.workload, "input_len": p.input_len,
                         "prefix_len": p.prefix_len, "output_len": p.output_len, "concurrency": p.concurrency,
                         "waves": p.waves, "output_spread": p.output_spread, "output_len_min": min(lens),
                         "output_tokens_sent": sum(lens),
                         "kv_demand_tokens": p.kv_demand(), **summarize(res, secs, lens), **peak,
                         "max_total_num_tokens": info.get("max_total_num_tokens"),
                         "max_running_requests": max_running, **decode, "server_cpu_s": cpu})
        bar.close()
        chunks = prefill_chunk_stats(_read_from(log, log_start), chunk)
    finally:
        srv.stop()
    return {"unit": unit.key, "config": unit.config, "pass": unit.pass_idx, "gpu": gpu_name(),
            "gpu_uuid": nvidia_smi("uuid"), "host": host, "versions": versions(), "command": command_line(),
            "startup_s": srv.startup_s, "seconds": time.time() - t_unit,
            "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"), "server_command": " ".join(srv.cmd),
            "chunked_prefill_size": chunk, "prefill_chunks": chunks, "rows": rows}


def point_lines(rows: List[dict]) -> List[str]:
    """One line per point of a unit: throughput, TTFT p50 and the scheduler's CPU seconds
    against the point's wall seconds (the scheduler polls: a share far under 1 means it was
    descheduled or blocked)."""
    lines = []
    for r in rows:
        cpu = r.get("server_cpu_s") or {}
        sched = sum(v for k, v in cpu.items() if k.startswith("sglang::schedul"))
        where = f"{r['workload']} {r['input_len']}@{r['concurrency']}"
        busy = f", scheduler {sched:.1f} CPU s in {r['seconds']:.1f} s" if cpu and r.get("seconds") else ""
        ttft = "none completed" if r["ttft_ms_p50"] is None else f"{r['ttft_ms_p50']:.1f} ms"
        lines.append(f"{where}: {r['output_tok_s']:.0f} tok/s, TTFT p50 {ttft}{busy}")
    return lines


# --------------------------------------------------------------------------- #
# aggregation
# --------------------------------------------------------------------------- #
METRICS = ("output_tok_s", "total_tok_s", "ttft_ms_p50", "ttft_ms_p99", "itl_ms_p50", "itl_ms_p99", "first_chunk_ms_p50")


def point_key(row) -> tuple:
    return (row.get("workload", "random"), row["input_len"], row.get("prefix_len", 0), row["output_len"],
            row["concurrency"], row.get("output_spread", 0.0))


def _ratio(a, b):
    return a / b if a is not None and b else None


def aggregate(records: List[dict], baseline=BASELINE):
    """Rows (mean over the runs of each point), the spreads and the headline comparisons."""
    per_point: Dict[tuple, List[dict]] = {}
    by_pass: Dict[tuple, Tuple[dict, Optional[dict]]] = {}  # (pass, config, *point): (row, unit's host)
    for rec in sorted(records, key=lambda r: r["pass"]):
        for row in rec["rows"]:
            per_point.setdefault((row["config"], *point_key(row)), []).append(dict(row, total_tok_s=total_tok_s(row)))
            by_pass[(rec["pass"], row["config"], *point_key(row))] = (row, rec.get("host"))
    rows, spreads = [], {}
    for key, runs in per_point.items():
        row = dict(runs[0])
        for m in METRICS:
            vals = [r[m] for r in runs if r.get(m) is not None]
            row[m] = statistics.fmean(vals) if vals else None
        for m in ("requests", "complete", "errors"):
            row[m] = sum(r[m] for r in runs)
        if all("first_text_late" in r for r in runs):
            row["first_text_late"] = sum(r["first_text_late"] for r in runs)
        for m in ("peak_running", "peak_waiting", "peak_used_tokens"):
            row[m] = max((r[m] for r in runs if r.get(m) is not None), default=None)
        row["output_tok_s_runs"] = [r["output_tok_s"] for r in runs]
        row["ttft_ms_deciles_runs"] = [r["ttft_ms_deciles"] for r in runs if r.get("ttft_ms_deciles")]
        row.pop("ttft_ms_deciles", None)
        if len(runs) > 1 and row["output_tok_s"]:
            vals = row["output_tok_s_runs"]
            spreads[key] = (max(vals) - min(vals)) / row["output_tok_s"] * 100
            row["run_spread_pct"] = spreads[key]
        rows.append(row)
    capacity = {r["config"]: r["max_total_num_tokens"] for r in rows}
    bf16_pool = capacity.get(baseline)
    for row in rows:
        row["capacity_point"] = bool(bf16_pool) and row["kv_demand_tokens"] > bf16_pool
    rows.sort(key=lambda r: (r.get("workload", "random"), r["input_len"], r["config"], r["concurrency"]))
    by = {(r["config"], *point_key(r)): r for r in rows}
    configs = sorted({r["config"] for r in rows})
    summary = {"baseline": baseline,
               "capacity_vs_baseline": {c: capacity[c] / bf16_pool for c in configs if bf16_pool and capacity.get(c)}}
    # per point: every config against the baseline, and INT4+BDR against plain INT4 per backend
    versus = []
    for key in sorted({point_key(r) for r in rows}):
        base = by.get((baseline, *key))
        if base is None:
            continue
        entry = {"workload": key[0], "input_len": key[1], "prefix_len": key[2], "output_len": key[3],
                 "concurrency": key[4], "output_spread": key[5], "capacity_point": base["capacity_point"],
                 "vs_baseline": {}, "bdr_vs_int4": {}, "bdr_vs_int4_by_pass": {}}
        for c in configs:
            r = by.get((c, *key))
            if r is None or c == baseline:
                continue
            entry["vs_baseline"][c] = {
                "output_tok_s": _ratio(r["output_tok_s"], base["output_tok_s"]),
                "ttft_ms_p50": _ratio(r["ttft_ms_p50"], base["ttft_ms_p50"]),
                "ttft_ms_p99": _ratio(r["ttft_ms_p99"], base["ttft_ms_p99"]),
                "itl_ms_p50": _ratio(r["itl_ms_p50"], base["itl_ms_p50"]),
                "peak_running": r.get("peak_running"), "baseline_peak_running": base.get("peak_running")}
        for backend in ("flashinfer", "triton"):
            bdr, plain = by.get((f"int4-bdr-{backend}", *key)), by.get((f"int4-{backend}", *key))
            if bdr and plain:
                entry["bdr_vs_int4"][backend] = _ratio(bdr["output_tok_s"], plain["output_tok_s"])
                entry["bdr_vs_int4_by_pass"][backend] = pairs_by_pass(by_pass, f"int4-bdr-{backend}",
                                                                      f"int4-{backend}", key)
        versus.append(entry)
    summary["points"] = versus
    summary["done_when"] = done_when(versus)
    spread = max(spreads.values()) if spreads else None
    return rows, spread, summary


def pairs_by_pass(by_pass, config, other, key) -> List[dict]:
    """``config`` / ``other`` output throughput at point ``key`` within each pass that ran both
    (the two units ran minutes apart, where the means of several passes mix units run at other
    times), with the ratio of their units' host op times (1.0: the host was as fast for both)."""
    out = []
    for p in sorted({k[0] for k in by_pass}):
        a, b = by_pass.get((p, config, *key)), by_pass.get((p, other, *key))
        if a is None or b is None:
            continue
        host_a, host_b = (h.get("torch_op_us") if h else None for h in (a[1], b[1]))
        out.append({"pass": p, "output_tok_s": _ratio(a[0]["output_tok_s"], b[0]["output_tok_s"]),
                    "host_op_time": _ratio(host_a, host_b)})
    return out


def host_spread_pct(records) -> Optional[float]:
    """How far apart the units' hosts were: (slowest - fastest) / fastest small-op host time, %."""
    times = [r["host"]["torch_op_us"] for r in records if (r.get("host") or {}).get("torch_op_us")]
    return (max(times) - min(times)) / min(times) * 100 if times else None


def _fmt(x) -> str:
    return "unmeasured (no request completed)" if x is None else f"{x:.3f}x"


def done_when(points: List[dict], ours="int4-bdr-flashinfer") -> dict:
    """The issue's bar, point by point: TTFT p50 within 5% of the baseline where its pool is not
    the limit, output throughput >= the baseline everywhere and >= 1.3x where it is, and
    INT4+BDR / plain INT4 >= 0.98 everywhere (both backends measured)."""
    fails = []
    for p in points:
        v = p["vs_baseline"].get(ours)
        where = f"{p['workload']} {p['input_len']}x{p['output_len']}@{p['concurrency']}"
        if v is None:
            fails.append(f"{where}: {ours} not measured")
            continue
        if not p["capacity_point"] and (v["ttft_ms_p50"] is None or v["ttft_ms_p50"] > 1.05):
            fails.append(f"{where}: TTFT p50 {_fmt(v['ttft_ms_p50'])} the baseline's")
        need = 1.3 if p["capacity_point"] else 1.0
        if v["output_tok_s"] is None or v["output_tok_s"] < need:
            fails.append(f"{where}: output tok/s {_fmt(v['output_tok_s'])} the baseline's (needs >= {need})")
        for backend, ratio in p["bdr_vs_int4"].items():
            if ratio is None or ratio < 0.98:
                fails.append(f"{where}: BDR / plain INT4 on {backend} {_fmt(ratio)}")
    return {"met": not fails and bool(points), "failures": fails}


def measured(records) -> dict:
    """The part of the result computed from the unit records."""
    rows, spread, summary = aggregate(list(records))
    chunks = {}
    for rec in sorted(records, key=lambda r: r["pass"]):
        if rec.get("prefill_chunks") is not None:
            chunks.setdefault(rec["config"], {"chunked_prefill_size": rec.get("chunked_prefill_size"), "runs": []})
            chunks[rec["config"]]["runs"].append(rec["prefill_chunks"])
    summary["prefill_chunks"] = chunks
    return {"repeat_spread_pct": spread, "host_spread_pct": host_spread_pct(records),
            "incomplete_requests": sum(r["requests"] - r["complete"] for r in rows),
            "summary": summary, "rows": rows}


def write_result(result, out):
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    plot(result, os.path.splitext(out)[0] + ".png")
    return result


def finalize(records, args, out, run_versions=None, finalized=None):
    """The result of finished units.  Versions and command are the units' own when they
    recorded them (else ``run_versions``, else this process's: finalize runs on the GPU host
    right after the last unit).  ``finalized`` ({"by": command line, "units_not_run": [unit
    keys]}) marks a result written by ``--finalize`` from a run cut short."""
    uuids = sorted({r.get("gpu_uuid") for r in records if r.get("gpu_uuid")})
    unit_versions = [r["versions"] for r in records if r.get("versions")]
    if unit_versions and any(v != unit_versions[0] for v in unit_versions):
        raise SystemExit("the units ran with different software versions: not one run")
    result = {"gpu": records[0]["gpu"], "model": os.path.basename(args.model.rstrip("/")),
              "versions": unit_versions[0] if unit_versions else (run_versions or versions()),
              "command": records[0].get("command") or command_line(),
              "one_gpu": len(uuids) <= 1, "gpu_uuids": uuids,
              "prefill_cuda_graph": "--disable-prefill-cuda-graph" not in args.extra,
              "units": [{k: r.get(k) for k in ("unit", "gpu_uuid", "host", "startup_s", "seconds", "finished_at",
                                               "server_command")} for r in records],
              **measured(records)}
    if finalized is not None:
        result["finalized"] = finalized
    return write_result(result, out)


def rebuild(state_path, out):
    """Recompute the rows, spreads and summary of an existing result from the unit records
    the run appended to its state file (e.g. after a metric was added to the aggregation);
    the run's provenance (GPU, versions, command, units) is kept from the existing file."""
    records = list(load_state(state_path).values())
    if not records:
        raise SystemExit(f"--rebuild: no unit records in {state_path}")
    old = json.load(open(out))
    if sorted(u["unit"] for u in old["units"]) != sorted(r["unit"] for r in records):
        raise SystemExit(f"--rebuild: the units in {state_path} are not the units of {out}")
    result = {**old, **measured(records), "rebuilt_by": command_line()}
    return write_result(result, out)


def plot(result, path):
    """Per (workload, shape): output tok/s as bars, one group per concurrency, one bar per
    config (the runs as dots), and TTFT on a log scale (p50 a marker, p99 a tick); a capacity
    point's group is shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    panels = sorted({(r.get("workload", "random"), r["input_len"], r.get("prefix_len", 0), r["output_len"])
                     for r in rows})
    configs = sorted({r["config"] for r in rows}, key=lambda c: (not c.endswith("flashinfer"), c))
    colors = {c: plt.get_cmap("tab10")(i % 10) for i, c in enumerate(configs)}
    width = 0.8 / len(configs)
    fig, axes = plt.subplots(len(panels), 2, figsize=(13, 0.6 + 3.6 * len(panels)), squeeze=False)
    for i, (wl, il, pl, ol) in enumerate(panels):
        mine = [r for r in rows if point_key(r)[:4] == (wl, il, pl, ol)]
        levels = sorted({r["concurrency"] for r in mine})
        by = {(r["config"], r["concurrency"]): r for r in mine}
        for g, c in enumerate(levels):
            if any(by[k]["capacity_point"] for k in by if k[1] == c):
                for ax in axes[i]:
                    ax.axvspan(g - 0.45, g + 0.45, color="0.92", zorder=0)
            for j, cfg in enumerate(configs):
                r = by.get((cfg, c))
                if r is None:
                    continue
                x = g - 0.4 + (j + 0.5) * width
                hatch = None if cfg.endswith("flashinfer") else "//"
                axes[i][0].bar(x, r["output_tok_s"], width, color=colors[cfg], hatch=hatch, edgecolor="white",
                               label=cfg if g == 0 else None)
                runs = r.get("output_tok_s_runs") or []
                if len(runs) > 1:
                    axes[i][0].plot([x] * len(runs), runs, "k.", ms=4)
                if r["errors"]:
                    axes[i][0].annotate(f"{r['errors']} failed", (x, r["output_tok_s"]), color="red", fontsize=7,
                                        rotation=90, va="bottom")
                if r["ttft_ms_p50"] is not None:
                    axes[i][1].plot(x, r["ttft_ms_p50"], "o" if cfg.endswith("flashinfer") else "s", color=colors[cfg],
                                    ms=7)
                if r["ttft_ms_p99"] is not None:
                    axes[i][1].plot([x - width / 2, x + width / 2], [r["ttft_ms_p99"]] * 2, color=colors[cfg], lw=2)
        lo = min((r.get("output_len_min", ol) for r in mine), default=ol)
        out = f"{lo}-{ol}" if lo < ol else f"{ol}"
        title = (f"shared prefix {pl} + {il - pl} in / {out} out" if wl == "shared-prefix"
                 else f"random {il} in / {out} out")
        # log scale (so markers, not bars): a burst's p99 (requests queued behind a wave of
        # prefills) is 10-20x the p50
        axes[i][1].set_yscale("log")
        for ax, ylabel in zip(axes[i], ("output tok/s (dots: runs)",
                                        "TTFT ms, log scale: marker p50, line p99\n(square: Triton prefill)")):
            ax.set_xticks(range(len(levels)), [f"concurrency {c}" for c in levels])
            ax.set_xlim(-0.5, len(levels) - 0.5)
            ax.set_ylabel(ylabel)
            ax.set_title(title + ("  (shaded: BF16's KV pool is the limit)" if any(r["capacity_point"] for r in mine)
                                  else ""), fontsize=9)
        axes[i][0].set_ylim(top=axes[i][0].get_ylim()[1] * 1.08)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(configs), fontsize=8, bbox_to_anchor=(0.5, 0.968))
    spread, host = result["repeat_spread_pct"], result.get("host_spread_pct")
    fig.suptitle(f"{result['gpu']}, {result['model']}, prefill CUDA graphs "
                 f"{'on' if result.get('prefill_cuda_graph') else 'off'}, run-to-run spread "
                 f"{'n/a' if spread is None else f'{spread:.1f}%'}, host speed spread "
                 f"{'n/a' if host is None else f'{host:.0f}%'} (hatched: Triton prefill)", fontsize=9, y=0.995)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    fig.savefig(path, dpi=100)


def model_facts(model_dir: str) -> Tuple[int, int]:
    """(vocab_size, head_dim) from a model directory's config.json."""
    from sglang_sawint4.model_check import load_hf_config
    from sglang_sawint4.policy import ModelFacts

    hf = load_hf_config(model_dir)
    return hf["vocab_size"], ModelFacts.from_hf_config(hf).head_dim


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rebuild", action="store_true",
                   help="only recompute --out from the unit records in --state (no GPU, no server)")
    p.add_argument("--finalize", action="store_true",
                   help="write --out from the units already in --state (same command), running none; for "
                        "a run cut short before it wrote --out")
    p.add_argument("--versions-from", help="--finalize: a JSON result of the same GPU call whose 'versions' "
                                           "the units did not record themselves")
    p.add_argument("--model", help="the served model's directory (required unless --rebuild)")
    p.add_argument("--out", required=True)
    p.add_argument("--configs", default="bf16-flashinfer,int4-bdr-flashinfer,int4-flashinfer,fp8_e4m3-flashinfer,"
                                        "bf16-triton,int4-triton,int4-bdr-triton")
    p.add_argument("--repeat-configs", default="int4-bdr-flashinfer,bf16-flashinfer",
                   help="configs run a second time, in reverse order (comma list; empty: none)")
    p.add_argument("--shapes", default="1024x256@1/16/64,16384x1024@8/32",
                   help="random workload: INPUTxOUTPUT[@c1/c2/...] (without @: --concurrency); a level c*w: w waves")
    p.add_argument("--concurrency", default="1,16,64")
    p.add_argument("--shared-prefix", default="8192x256x128@32",
                   help="shared-prefix workload: PREFIXxSUFFIXxOUTPUT[@c1/c2/...] ('' for none); a level c*w: w waves")
    p.add_argument("--min-requests", type=int, default=4, help="requests per level = max(this, waves x concurrency)")
    p.add_argument("--output-spread", type=float, default=0.5,
                   help="each request's output length is drawn from [(1 - this) x OUTPUT, OUTPUT] (0: all OUTPUT, "
                        "which runs a closed loop in lockstep waves)")
    p.add_argument("--state", help="JSON-lines file of finished units (resume)")
    p.add_argument("--call-budget-s", type=float, default=0.0,
                   help="stop (exit 75) before a unit that would end after this many seconds")
    p.add_argument("--unit-estimate-s", type=float, default=240.0, help="unit duration before one has run")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-dir", default=".")
    args = parse_args_and_server_flags(p)
    if args.rebuild:
        if not args.state:
            raise SystemExit("--rebuild needs --state (the run's unit records)")
        rebuild(args.state, args.out)
        return
    if not args.model:
        p.error("--model is required")
    configs = [c for c in args.configs.split(",") if c]
    vocab = head_dim = None
    if not args.finalize:  # the model may be gone by then: its units are in --state
        vocab, head_dim = model_facts(args.model)
        for c in configs:
            serving_config(c, head_dim)
    units = plan_units(configs, [c for c in args.repeat_configs.split(",") if c])
    points = parse_points(args.shapes, args.concurrency, args.shared_prefix, args.output_spread)
    os.makedirs(args.log_dir, exist_ok=True)

    # a unit is reused only if it ran the same measurement (a state file from another sweep is ignored)
    plan = {"model": os.path.abspath(args.model), "points": [vars(pt) for pt in points],
            "min_requests": args.min_requests, "seed": args.seed, "extra": args.extra}
    plan = json.loads(json.dumps(plan))  # tuples -> lists, as read back from the state file
    t_call = time.time()
    stored = load_state(args.state)
    done = {k: v for k, v in stored.items() if k in {u.key for u in units} and v.get("plan") == plan}
    if len(done) < len([k for k in stored if k in {u.key for u in units}]):
        print(f"ignoring units in {args.state} measured with other settings", flush=True)
    if done:
        print(f"resuming: {len(done)}/{len(units)} units already in {args.state}", flush=True)
    if args.finalize:
        if not done:
            raise SystemExit(f"--finalize: no finished unit of this command in {args.state}")
        run_versions = json.load(open(args.versions_from))["versions"] if args.versions_from else None
        not_run = [u.key for u in units if u.key not in done]
        result = finalize([done[u.key] for u in units if u.key in done], args, args.out, run_versions,
                          finalized={"by": command_line(), "units_not_run": not_run})
        print(json.dumps(result["summary"]["done_when"], indent=1))
        return
    while True:
        action, unit = next_action(units, done, time.time() - t_call, args.call_budget_s, args.unit_estimate_s)
        if action == "done":
            break
        if action == "resume":
            left = len(units) - len(done)
            print(f"stopping before unit {unit.key}: {left} units left would not fit in "
                  f"--call-budget-s {args.call_budget_s:.0f}; run the same command again to resume", flush=True)
            sys.exit(EXIT_RESUME)
        host = host_speed()
        print(f"host before {unit.key}: {host}", flush=True)
        rec = dict(run_unit(unit, args, points, vocab, head_dim, host), plan=plan)
        append_state(args.state, rec)
        done[unit.key] = rec
        bad = sum(r["requests"] - r["complete"] for r in rec["rows"])
        print(f"unit {unit.key}: {rec['seconds']:.0f} s (server start {rec['startup_s']:.0f} s), "
              f"{len(rec['rows'])} points, incomplete or failed requests {bad}", flush=True)
        for line in point_lines(rec["rows"]):
            print("  " + line, flush=True)
    result = finalize([done[u.key] for u in units], args, args.out)
    print(json.dumps({k: result[k] for k in ("gpu", "model", "repeat_spread_pct", "host_spread_pct", "one_gpu",
                                             "incomplete_requests")},
                     indent=1))
    print(json.dumps(result["summary"]["done_when"], indent=1))
    # every request must come back whole: ignore_eos makes each one exactly its max_tokens
    sys.exit(1 if result["incomplete_requests"] else 0)


if __name__ == "__main__":
    main()
