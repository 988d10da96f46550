"""Serving benchmark over the OpenAI HTTP API: throughput, latency and capacity per KV config.

    python -m sglang_sawint4.bench.serving --model /tmp/models/8b --out bench/results/serving.json \
        --configs int4,int4-bdr-64,bf16,fp8_e4m3,int4-bdr-128 --repeat-configs int4-bdr-64,int4 \
        --shapes 1024x256,2048x512 --concurrency 1,4,16,64,128,256 \
        --capacity 2048x512@512 --capacity-configs bf16,int4-bdr-64 \
        --state /tmp/serving_state.jsonl --call-budget-s 560

Each config is one server (``python -m sglang_sawint4.launch_server``, Triton attention for
all of them so only the KV format differs) that runs the whole sweep: every shape at every
concurrency, then (for --capacity-configs) the capacity point, a load sized so that BF16
runs out of KV slots.  One server lifetime is a *unit*.  Pass 0 runs every config in the
given order; pass 1 runs --repeat-configs again in the reverse order, so that machine drift
does not favour one of them and the run-to-run spread is measured
(``repeat_spread_pct``: the largest spread of output tok/s between the two runs of a point).

Requests are random token-id prompts from a fixed seed with ``ignore_eos``, so every config
generates the same tokens; streaming gives TTFT (first chunk) and inter-token latency (gaps
between chunks); /v1/loads is sampled during each level for the peak of running requests
and used KV slots (where BF16 runs out of slots, its peak of running requests stays below
the concurrency).

Resumable: each finished unit is appended to --state; a later call with the same command
skips the units already there.  With --call-budget-s the script stops before a unit that
would not finish within the budget (exit code 75: call it again), so a run longer than one
GPU command spans several calls on the same machine (each unit records the GPU's UUID).
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
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple


from sglang_sawint4.serving.client import load_row, random_token_ids, served_model_id
from sglang_sawint4.serving.server import Server, command_line, config_flags, gpu_name, nvidia_smi, versions

EXIT_RESUME = 75  # EX_TEMPFAIL: units are left, run the same command again


def parse_shape(text: str) -> Tuple[int, int]:
    """'1024x256' -> (input_len, output_len)."""
    try:
        il, ol = (int(x) for x in text.split("x"))
    except ValueError:
        raise SystemExit(f"bad shape {text!r}: use INPUTxOUTPUT, e.g. 1024x256") from None
    if il < 1 or ol < 1:
        raise SystemExit(f"bad shape {text!r}: lengths must be positive")
    return il, ol


def parse_capacity(text: Optional[str]):
    """'2048x512@512' -> ((2048, 512), 512), or None."""
    if not text:
        return None
    shape, _, conc = text.partition("@")
    if not conc.isdigit() or int(conc) < 1:
        raise SystemExit(f"bad --capacity {text!r}: use INPUTxOUTPUT@CONCURRENCY, e.g. 2048x512@512")
    return parse_shape(shape), int(conc)


# --------------------------------------------------------------------------- #
# the load generator
# --------------------------------------------------------------------------- #
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
    With a `peak` dict, /v1/loads is sampled meanwhile and its peaks are stored there."""
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
    # limit=0: the default connector caps a session at 100 connections, i.e. at concurrency 100
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        stop = asyncio.Event()
        sampler = None
        if peak is not None:
            sampler = asyncio.ensure_future(
                sample_loads(session, base_url.rstrip("/") + "/v1/loads?include=core", peak, stop))
        results = await asyncio.gather(*(guarded(session, p) for p in prompts))
        seconds = time.perf_counter() - t0
        stop.set()
        if sampler is not None:
            await sampler
    return results, seconds


def summarize(results, seconds, output_len):
    ok = [r for r in results if r.ok]
    itl = [x for r in ok for x in r.itl_s]

    def pct(xs, q):
        return statistics.quantiles(xs, n=100)[q - 1] * 1e3 if len(xs) >= 2 else (xs[0] * 1e3 if xs else None)

    return {
        "requests": len(results), "complete": sum(r.output_tokens == output_len for r in ok),
        "errors": len(results) - len(ok), "output_tok_s": sum(r.output_tokens for r in ok) / seconds,
        "ttft_ms_p50": statistics.median(r.ttft_s for r in ok) * 1e3 if ok else None,
        "ttft_ms_p99": pct([r.ttft_s for r in ok], 99),
        "itl_ms_p50": statistics.median(itl) * 1e3 if itl else None, "itl_ms_p99": pct(itl, 99),
        "seconds": seconds,
    }


def total_tok_s(row) -> float:
    """Prompt plus generated tokens per second of one level: every prompt is exactly
    input_len token ids, and a failed request is counted with neither."""
    return row["output_tok_s"] + row["input_len"] * (row["requests"] - row["errors"]) / row["seconds"]


def make_prompts(n, input_len, vocab, seed):
    rng = random.Random(seed)
    return [random_token_ids(rng, vocab, input_len) for _ in range(n)]


def num_requests(concurrency, min_requests):
    """One full wave at every concurrency, and at least `min_requests` for the low ones."""
    return max(min_requests, concurrency)


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


def next_action(units, done, elapsed_s, budget_s, default_unit_s, capacity_configs=()):
    """('run', unit), ('resume', unit) when the budget would be exceeded, or ('done', None).

    The estimate is the longest finished unit; a unit with the capacity point counts 1.5x
    that while no unit with it has finished (the point is the longest level)."""
    todo = [u for u in units if u.key not in done]
    if not todo:
        return "done", None
    unit = todo[0]
    estimate = max((rec["seconds"] for rec in done.values()), default=default_unit_s)

    def has_capacity(u):
        return u.pass_idx == 0 and u.config in capacity_configs

    if has_capacity(unit) and not any(has_capacity(u) for u in units if u.key in done):
        estimate *= 1.5
    if budget_s and elapsed_s + estimate > budget_s:
        return "resume", unit
    return "run", unit


def run_unit(unit, args, shapes, levels, capacity, vocab):
    from tqdm import tqdm

    t_unit = time.time()
    log = os.path.join(args.log_dir, f"serving_{unit.config}_p{unit.pass_idx}.log")
    srv = Server(args.model, args.port, [*config_flags(unit.config), "--attention-backend", "triton", *args.extra],
                 log).start()
    base = f"http://127.0.0.1:{args.port}"
    rows = []
    try:
        info = srv.info()
        states = info.get("internal_states") or [{}]
        max_running = states[0].get("effective_max_running_requests_per_dp")
        model_id = served_model_id(args.port)
        points = [(il, ol, c, False) for il, ol in shapes for c in levels]
        if capacity and unit.pass_idx == 0 and unit.config in args.capacity_configs:
            points.append((*capacity[0], capacity[1], True))
        # untimed warm-up at every shape, with enough requests for full prefill chunks and
        # mixed prefill/decode batches: Triton specializes kernels on argument values (e.g.
        # divisible by 16), and a compile inside a timed level would count against that config
        # (decode batch sizes up to 256 are compiled by the CUDA-graph capture already)
        n_warm = min(64, max(c for _, _, c, _ in points))
        for il, ol in sorted({(p[0], p[1]) for p in points}):
            asyncio.run(run_load(base, model_id, make_prompts(n_warm, il, vocab, args.seed - 1), min(ol, 8), n_warm))
        total = sum(num_requests(c, args.min_requests) for _, _, c, _ in points)
        bar = tqdm(total=total, desc=f"pass {unit.pass_idx} {unit.config}", file=sys.stdout, mininterval=10)
        for il, ol, c, is_capacity in points:
            prompts = make_prompts(num_requests(c, args.min_requests), il, vocab, args.seed + c + il)
            peak = {}
            res, secs = asyncio.run(run_load(base, model_id, prompts, ol, c, bar, peak))
            rows.append({"config": unit.config, "input_len": il, "output_len": ol, "concurrency": c,
                         **summarize(res, secs, ol), **peak, "capacity_point": is_capacity,
                         "max_total_num_tokens": info.get("max_total_num_tokens"),
                         "max_running_requests": max_running})
        bar.close()
    finally:
        srv.stop()
    return {"unit": unit.key, "config": unit.config, "pass": unit.pass_idx, "gpu": gpu_name(),
            "gpu_uuid": nvidia_smi("uuid"), "startup_s": srv.startup_s, "seconds": time.time() - t_unit,
            "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"), "server_command": " ".join(srv.cmd), "rows": rows}


# --------------------------------------------------------------------------- #
# aggregation
# --------------------------------------------------------------------------- #
METRICS = ("output_tok_s", "total_tok_s", "ttft_ms_p50", "ttft_ms_p99", "itl_ms_p50", "itl_ms_p99")


def aggregate(records: List[dict], bdr_reference="int4", baseline="bf16"):
    """Rows (mean over the runs of each point), the spreads and the headline comparisons."""
    per_point: Dict[tuple, List[dict]] = {}
    for rec in sorted(records, key=lambda r: r["pass"]):
        for row in rec["rows"]:
            key = (row["config"], row["input_len"], row["output_len"], row["concurrency"], row["capacity_point"])
            per_point.setdefault(key, []).append(dict(row, total_tok_s=total_tok_s(row)))
    rows, spreads = [], {}
    for key, runs in per_point.items():
        row = dict(runs[0])
        for m in METRICS:
            vals = [r[m] for r in runs if r.get(m) is not None]
            row[m] = statistics.fmean(vals) if vals else None
        for m in ("requests", "complete", "errors"):
            row[m] = sum(r[m] for r in runs)
        for m in ("peak_running", "peak_waiting", "peak_used_tokens"):
            row[m] = max((r[m] for r in runs if r.get(m) is not None), default=None)
        row["output_tok_s_runs"] = [r["output_tok_s"] for r in runs]
        if len(runs) > 1 and row["output_tok_s"]:
            vals = row["output_tok_s_runs"]
            spreads[key] = (max(vals) - min(vals)) / row["output_tok_s"] * 100
            row["run_spread_pct"] = spreads[key]
        rows.append(row)
    rows.sort(key=lambda r: (r["capacity_point"], r["input_len"], r["config"], r["concurrency"]))

    def tok_s(config, il, ol, c, cap=False):
        r = next((r for r in rows if (r["config"], r["input_len"], r["output_len"], r["concurrency"],
                                      r["capacity_point"]) == (config, il, ol, c, cap)), None)
        return r["output_tok_s"] if r else None

    configs = sorted({r["config"] for r in rows})
    capacity = {r["config"]: r["max_total_num_tokens"] for r in rows}
    summary = {"capacity_vs_" + baseline: {c: capacity[c] / capacity[baseline] for c in configs
                                           if capacity.get(baseline) and capacity.get(c)}}
    bdr_vs = []
    for cfg in (c for c in configs if c.startswith("int4-bdr-")):
        for r in rows:
            if r["config"] == cfg and not r["capacity_point"]:
                ref = tok_s(bdr_reference, r["input_len"], r["output_len"], r["concurrency"])
                if ref:
                    bdr_vs.append({"config": cfg, "input_len": r["input_len"], "output_len": r["output_len"],
                                   "concurrency": r["concurrency"],
                                   "diff_pct": (r["output_tok_s"] / ref - 1) * 100})
    summary[f"bdr_vs_{bdr_reference}_pct"] = bdr_vs
    summary["worst_bdr_vs_" + bdr_reference + "_pct"] = min((x["diff_pct"] for x in bdr_vs), default=None)
    cap_rows = [r for r in rows if r["capacity_point"]]
    if cap_rows:
        r0 = cap_rows[0]
        point = (r0["input_len"], r0["output_len"], r0["concurrency"])
        summary["capacity_point"] = {
            "input_len": point[0], "output_len": point[1], "concurrency": point[2],
            "output_tok_s": {r["config"]: r["output_tok_s"] for r in cap_rows},
            "peak_running": {r["config"]: r.get("peak_running") for r in cap_rows},
            "ratio_vs_" + baseline: {r["config"]: r["output_tok_s"] / tok_s(baseline, *point, cap=True)
                                     for r in cap_rows if tok_s(baseline, *point, cap=True)},
        }
    # bf16 vs int4-bdr outside the capacity point: where is ours slower than BF16?
    slower = []
    for r in rows:
        if r["config"].startswith("int4-bdr-") and not r["capacity_point"]:
            ref = tok_s(baseline, r["input_len"], r["output_len"], r["concurrency"])
            if ref and r["output_tok_s"] < ref:
                slower.append({"config": r["config"], "input_len": r["input_len"], "output_len": r["output_len"],
                               "concurrency": r["concurrency"], "diff_pct": (r["output_tok_s"] / ref - 1) * 100})
    summary[f"bdr_slower_than_{baseline}"] = slower
    spread = max(spreads.values()) if spreads else None
    return rows, spread, summary


def measured(records) -> dict:
    """The part of the result computed from the unit records."""
    rows, spread, summary = aggregate(list(records))
    return {"repeat_spread_pct": spread, "incomplete_requests": sum(r["requests"] - r["complete"] for r in rows),
            "summary": summary, "rows": rows}


def write_result(result, out):
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    plot(result, os.path.splitext(out)[0] + ".png")
    return result


def finalize(records, args, out):
    uuids = sorted({r.get("gpu_uuid") for r in records if r.get("gpu_uuid")})
    result = {"gpu": records[0]["gpu"], "model": os.path.basename(args.model.rstrip("/")),
              "versions": versions(), "command": command_line(),
              "one_gpu": len(uuids) <= 1, "gpu_uuids": uuids,
              "units": [{k: r[k] for k in ("unit", "gpu_uuid", "startup_s", "seconds", "finished_at",
                                           "server_command")} for r in records],
              **measured(records)}
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = [r for r in result["rows"] if not r.get("capacity_point")]
    shapes = sorted({(r["input_len"], r["output_len"]) for r in sweep})
    configs = sorted({r["config"] for r in result["rows"]})
    fig, axes = plt.subplots(len(shapes) + 1, 2, figsize=(12, 4 * (len(shapes) + 1)), squeeze=False)
    for i, (il, ol) in enumerate(shapes):
        for cfg in configs:
            pts = sorted((r["concurrency"], r["output_tok_s"], r["itl_ms_p50"]) for r in sweep
                         if r["config"] == cfg and (r["input_len"], r["output_len"]) == (il, ol))
            axes[i][0].plot([x[0] for x in pts], [x[1] for x in pts], "-o", label=cfg)
            axes[i][1].plot([x[0] for x in pts], [x[2] for x in pts], "-o", label=cfg)
        for ax, ylabel in zip(axes[i], ("output tok/s", "ITL p50 (ms)")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("concurrency")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{il} in / {ol} out")
            ax.legend(fontsize=8)
    cap = {r["config"]: r["max_total_num_tokens"] for r in result["rows"]}
    ax = axes[-1][0]
    ax.bar(configs, [cap[c] / 1e6 for c in configs], color="tab:gray")
    for x, c in enumerate(configs):
        ax.text(x, cap[c] / 1e6, f"{cap[c] / 1e6:.2f}M", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("KV capacity (million tokens)")
    ax.set_title("max_total_num_tokens")
    ax = axes[-1][1]
    point = result["summary"].get("capacity_point")
    if point:
        names = list(point["output_tok_s"])
        ax.bar(names, [point["output_tok_s"][c] for c in names], color="tab:blue")
        for x, c in enumerate(names):
            ax.text(x, point["output_tok_s"][c], f"peak running {point['peak_running'][c]}",
                    ha="center", va="bottom", fontsize=8)
        ax.set_ylabel("output tok/s")
        ax.set_title(f"capacity point: {point['input_len']} in / {point['output_len']} out, "
                     f"concurrency {point['concurrency']}")
    else:
        ax.axis("off")
    spread = result["repeat_spread_pct"]
    fig.suptitle(f"{result['gpu']}, {result['model']}, run-to-run spread "
                 f"{'n/a' if spread is None else f'{spread:.1f}%'}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rebuild", action="store_true",
                   help="only recompute --out from the unit records in --state (no GPU, no server)")
    p.add_argument("--model", help="the served model's directory (required unless --rebuild)")
    p.add_argument("--out", required=True)
    p.add_argument("--configs", default="int4,int4-bdr-64,bf16,fp8_e4m3,int4-bdr-128")
    p.add_argument("--repeat-configs", default="int4-bdr-64,int4",
                   help="configs run a second time, in reverse order (comma list; empty: none)")
    p.add_argument("--shapes", default="1024x256,2048x512", help="input x output lengths")
    p.add_argument("--concurrency", default="1,4,16,64,128,256")
    p.add_argument("--min-requests", type=int, default=4, help="requests per level = max(this, concurrency)")
    p.add_argument("--capacity", default="2048x512@512", help="INPUTxOUTPUT@CONCURRENCY ('' for none)")
    p.add_argument("--capacity-configs", default="bf16,int4-bdr-64")
    p.add_argument("--state", help="JSON-lines file of finished units (resume)")
    p.add_argument("--call-budget-s", type=float, default=0.0,
                   help="stop (exit 75) before a unit that would end after this many seconds")
    p.add_argument("--unit-estimate-s", type=float, default=240.0, help="unit duration before one has run")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-dir", default=".")
    args, extra = p.parse_known_args()
    args.extra = [x for x in extra if x != "--"]
    if args.rebuild:
        if not args.state:
            raise SystemExit("--rebuild needs --state (the run's unit records)")
        rebuild(args.state, args.out)
        return
    if not args.model:
        p.error("--model is required")
    configs = [c for c in args.configs.split(",") if c]
    for c in configs:
        config_flags(c)
    args.capacity_configs = [c for c in args.capacity_configs.split(",") if c]
    units = plan_units(configs, [c for c in args.repeat_configs.split(",") if c])
    shapes = [parse_shape(s) for s in args.shapes.split(",")]
    levels = [int(c) for c in args.concurrency.split(",")]
    capacity = parse_capacity(args.capacity)
    vocab = json.load(open(os.path.join(args.model, "config.json")))["vocab_size"]
    os.makedirs(args.log_dir, exist_ok=True)

    # a unit is reused only if it ran the same measurement (a state file from another sweep is ignored)
    plan = {"model": os.path.abspath(args.model), "shapes": shapes, "concurrency": levels, "capacity": capacity,
            "min_requests": args.min_requests, "seed": args.seed, "extra": args.extra}
    plan = json.loads(json.dumps(plan))  # tuples -> lists, as read back from the state file
    t_call = time.time()
    stored = load_state(args.state)
    done = {k: v for k, v in stored.items() if k in {u.key for u in units} and v.get("plan") == plan}
    if len(done) < len([k for k in stored if k in {u.key for u in units}]):
        print(f"ignoring units in {args.state} measured with other settings", flush=True)
    if done:
        print(f"resuming: {len(done)}/{len(units)} units already in {args.state}", flush=True)
    while True:
        action, unit = next_action(units, done, time.time() - t_call, args.call_budget_s, args.unit_estimate_s,
                                   args.capacity_configs if capacity else ())
        if action == "done":
            break
        if action == "resume":
            left = len(units) - len(done)
            print(f"stopping before unit {unit.key}: {left} units left would not fit in "
                  f"--call-budget-s {args.call_budget_s:.0f}; run the same command again to resume", flush=True)
            sys.exit(EXIT_RESUME)
        rec = dict(run_unit(unit, args, shapes, levels, capacity, vocab), plan=plan)
        append_state(args.state, rec)
        done[unit.key] = rec
        bad = sum(r["requests"] - r["complete"] for r in rec["rows"])
        print(f"unit {unit.key}: {rec['seconds']:.0f} s (server start {rec['startup_s']:.0f} s), "
              f"{len(rec['rows'])} points, incomplete or failed requests {bad}", flush=True)
    result = finalize([done[u.key] for u in units], args, args.out)
    print(json.dumps({k: result[k] for k in ("gpu", "model", "repeat_spread_pct", "one_gpu", "incomplete_requests",
                                             "summary")}, indent=1))
    # every request must come back whole: ignore_eos makes each one exactly output_len tokens
    sys.exit(1 if result["incomplete_requests"] else 0)


if __name__ == "__main__":
    main()
