"""The serving benchmark's client against a local fake OpenAI streaming server."""

import asyncio
import json
import os
import sys

import pytest

import aiohttp  # noqa: F401
from aiohttp import web

from sglang_sawint4.bench import serving as bench_serving

TOKEN_DELAY_S = 0.003


async def completions(request):
    body = await request.json()
    if body["prompt"][0] == 13:  # a poisoned request: the server answers 500
        return web.Response(status=500, text="boom")
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    held_back = {2, 0} if body["prompt"][1] == 14 else {2}  # 14: the first token's text held back too
    for i in range(body["max_tokens"]):
        await asyncio.sleep(TOKEN_DELAY_S)
        text = "" if i in held_back else "x"  # a token whose text is not complete yet
        await resp.write(b"data: " + json.dumps({"choices": [{"text": text}]}).encode() + b"\n\n")
    if body.get("stream_options", {}).get("include_usage"):
        usage = {"choices": [], "usage": {"completion_tokens": body["max_tokens"]}}
        await resp.write(b"data: " + json.dumps(usage).encode() + b"\n\n")
    await resp.write(b"data: [DONE]\n\n")
    return resp


class InFlight:
    """What the fake server has in flight (its /v1/loads answer) and the most it saw."""
    now = 0
    peak = 0


async def counted_completions(request):
    InFlight.now += 1
    InFlight.peak = max(InFlight.peak, InFlight.now)
    try:
        return await completions(request)
    finally:
        InFlight.now -= 1


async def loads(request):
    return web.json_response({"loads": [{"num_running_reqs": InFlight.now, "num_waiting_reqs": 0,
                                         "num_used_tokens": 10 * InFlight.now}]})


async def _run(prompts, output_len, concurrency, peak=None):
    InFlight.now = InFlight.peak = 0
    app = web.Application()
    app.router.add_post("/v1/completions", counted_completions)
    app.router.add_get("/v1/loads", loads)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        return await bench_serving.run_load(f"http://127.0.0.1:{port}", "m", prompts, output_len, concurrency,
                                            peak=peak)
    finally:
        await runner.cleanup()


def test_load_client_measures_every_request():
    prompts = bench_serving.make_prompts(12, 16, 1000, seed=1)
    prompts[3][0] = 13  # one request fails
    prompts[5][1] = prompts[7][1] = 14  # two requests' first token comes without text
    results, secs = asyncio.run(_run(prompts, output_len=8, concurrency=4))
    s = bench_serving.summarize(results, secs, 8)
    assert s["requests"] == 12 and s["complete"] == 11 and s["errors"] == 1 and s["error_samples"] == ["HTTP 500"]
    assert s["first_text_late"] == 2 and s["first_chunk_ms_p50"] <= s["ttft_ms_p50"]
    assert results[5].ttft_s - results[5].first_chunk_s >= TOKEN_DELAY_S * 0.9
    assert TOKEN_DELAY_S * 1e3 * 0.9 <= s["ttft_ms_p50"] <= s["ttft_ms_p99"]
    deciles = s["ttft_ms_deciles"]
    assert len(deciles) == 9 and deciles == sorted(deciles) and deciles[4] == pytest.approx(s["ttft_ms_p50"])
    assert TOKEN_DELAY_S * 1e3 * 0.9 <= s["itl_ms_p50"] <= s["itl_ms_p99"]
    assert s["output_tok_s"] == pytest.approx(11 * 8 / secs)


def test_spread_output_lengths_are_reproducible_and_each_request_is_held_to_its_own():
    point = bench_serving.parse_points("64x40@4*3", "1", "", output_spread=0.5)[0]
    lens = point.output_lens(12, seed=5)
    assert lens == point.output_lens(12, seed=5) and len(set(lens)) > 1
    assert min(lens) >= 20 and max(lens) <= 40
    assert bench_serving.Point("random", 64, 40, 4).output_lens(3, seed=5) == [40, 40, 40]
    prompts = bench_serving.make_prompts(12, 16, 1000, seed=1)
    results, secs = asyncio.run(_run(prompts, output_len=lens, concurrency=4))
    assert [r.output_tokens for r in results] == lens
    s = bench_serving.summarize(results, secs, lens)
    assert s["complete"] == 12 and s["output_tok_s"] == pytest.approx(sum(lens) / secs)
    # held to its own length: the same results against one length for all are mostly short
    assert bench_serving.summarize(results, secs, 40)["complete"] == lens.count(40)
    with pytest.raises(ValueError):
        bench_serving.summarize(results, secs, lens[:-1])
    for bad in (-0.1, 1.0):
        with pytest.raises(SystemExit):
            bench_serving.parse_points("64x40@4", "1", "", output_spread=bad)


def test_prompts_are_reproducible_and_configs_validated():
    from sglang_sawint4.serving.server import serving_config

    assert bench_serving.make_prompts(2, 5, 100, 7) == bench_serving.make_prompts(2, 5, 100, 7)
    flags, fields = serving_config("int4-bdr-flashinfer", 128)
    assert flags[-2:] == ["--attention-backend", "flashinfer"] and "none" in flags
    assert fields == {"kv": "int4-bdr", "backend": "flashinfer", "block": 128}
    assert serving_config("int4-bdr-64-triton", 128)[1]["block"] == 64
    assert serving_config("bf16-triton", 64)[1] == {"kv": "bf16", "backend": "triton", "block": None}
    for bad in ("int3-flashinfer", "bf16", "int4-bdr-fa3", "-triton"):
        with pytest.raises(SystemExit):
            serving_config(bad, 128)


def test_points_and_shared_prefix_prompts():
    points = bench_serving.parse_points("1024x256@1/16,512x64", "2,4", "8192x256x128@32")
    assert [(p.workload, p.input_len, p.output_len, p.concurrency) for p in points] == [
        ("random", 1024, 256, 1), ("random", 1024, 256, 16), ("random", 512, 64, 2), ("random", 512, 64, 4),
        ("shared-prefix", 8448, 128, 32)]
    sp = points[-1]
    assert sp.prefix_len == 8192 and sp.kv_demand() == 4 * 8192 + 32 * (256 + 128)
    assert points[0].kv_demand() == 1 * (1024 + 256)
    waves = bench_serving.parse_points("1024x256@64*4/16", "1", "8192x256x128@32*3")
    assert [(p.concurrency, p.waves) for p in waves] == [(64, 4), (16, 1), (32, 3)]
    assert [bench_serving.num_requests(p, 20) for p in waves] == [256, 20, 96]
    assert waves[0].kv_demand() == 64 * (1024 + 256)  # waves follow one another: the demand of one
    for bad in (("1024", "1", ""), ("1024x256@0", "1", ""), ("1024x256", "x", ""), ("", "1", "8x2@4"), ("", "1", ""),
                ("1024x256@64*0", "1", ""), ("1024x256@64*x", "1", "")):
        with pytest.raises(SystemExit):
            bench_serving.parse_points(*bad)
    small = bench_serving.Point("shared-prefix", 20, 4, 6, prefix_len=16)
    prefixes, prompts = bench_serving.shared_prefix_prompts(6, small, 1000, seed=3)
    assert len(prefixes) == bench_serving.PREFIX_GROUPS and all(len(p) == 20 for p in prompts)
    assert prompts[0][:16] == prompts[4][:16] == prefixes[0] and prompts[0][16:] != prompts[4][16:]
    warm, timed = bench_serving.point_prompts(small, 6, 1000, seed=3)
    assert timed == prompts and [w[:16] for w in warm] == prefixes


def test_prefill_chunk_stats_from_the_log():
    log = "\n".join([
        "[x] Prefill batch, #new-seq: 1, #new-token: 8192, #cached-token: 0, token usage: 0.01, #running-req: 0, "
        "#queue-req: 3, #pending-token: 0, cuda graph: False, input throughput (token/s): 40000.00",
        "[x] Prefill batch, #new-seq: 1, #new-token: 8192, #cached-token: 8192, token usage: 0.02, #running-req: 1, "
        "#queue-req: 2, #pending-token: 0, cuda graph: False, input throughput (token/s): 30000.00",
        "[x] Prefill batch, #new-seq: 1, #new-token: 8192, #cached-token: 0, token usage: 0.02, #running-req: 1, "
        "#queue-req: 2, #pending-token: 0, cuda graph: False, input throughput (token/s): 44000.00",
        "[x] Prefill batch, #new-seq: 3, #new-token: 900, #cached-token: 0, token usage: 0.02, #running-req: 1, "
        "#queue-req: 2, #pending-token: 0, cuda graph: False, input throughput (token/s): 9000.00",
        "[x] Decode batch, #running-req: 3, gen throughput (token/s): 100.00"])
    stats = bench_serving.prefill_chunk_stats(log, 8192)
    assert stats["no_cached_prefix"] == {"chunks": 2, "median_tok_s": 42000.0}
    assert stats["cached_prefix"] == {"chunks": 1, "median_tok_s": 30000.0}
    assert bench_serving.prefill_chunk_stats("", 8192)["cached_prefix"]["median_tok_s"] is None


def test_server_decode_rate_from_the_log():
    # lines as SGLang 0.5.17 writes them (bench/logs/serving_int4-bdr-flashinfer_server.log)
    log = "\n".join([
        "[2026-12-02 13:28:50] Prefill batch, #new-seq: 7, #new-token: 7166, #cached-token: 0, token usage: 0.07, "
        "#running-req: 57, #queue-req: 0, #pending-token: 0, cuda graph: False, input throughput (token/s): 58068.18",
        "[2026-12-02 13:28:50] Decode batch, #running-req: 64, #token: 66047, token usage: 0.08, cuda graph: True, "
        "gen throughput (token/s): 54.37, #queue-req: 0",
        "[2026-12-02 13:28:50] INFO:     127.0.0.1:53072 - \"POST /v1/completions HTTP/1.1\" 200 OK",
        "[2026-12-02 13:28:50] Decode batch, #running-req: 64, #token: 68607, token usage: 0.08, cuda graph: True, "
        "gen throughput (token/s): 10987.51, #queue-req: 0",
        "[2026-12-02 13:28:51] Decode batch, #running-req: 64, #token: 71167, token usage: 0.08, cuda graph: True, "
        "gen throughput (token/s): 11069.76, #queue-req: 0"])
    assert bench_serving.server_decode_rate(log) == {"server_decode_tok_s_p50": 10987.51, "server_decode_lines": 3}
    assert bench_serving.server_decode_rate("") == {"server_decode_tok_s_p50": None, "server_decode_lines": 0}


def test_high_concurrency_is_really_in_flight_and_loads_are_sampled():
    # aiohttp's default connector caps a session at 100 connections: concurrency 150 must
    # still put 150 requests in flight at once
    prompts = bench_serving.make_prompts(150, 8, 1000, seed=2)
    peak = {}
    results, secs = asyncio.run(_run(prompts, output_len=200, concurrency=150, peak=peak))
    assert all(r.ok for r in results)
    assert InFlight.peak == 150
    assert 100 < peak["peak_running"] <= 150 and peak["peak_used_tokens"] == 10 * peak["peak_running"]


def test_plan_passes_and_budget():
    units = bench_serving.plan_units(["int4", "int4-bdr-64", "bf16"], ["int4-bdr-64", "int4"])
    assert [u.key for u in units] == ["0:int4", "0:int4-bdr-64", "0:bf16", "1:int4-bdr-64", "1:int4"]
    with pytest.raises(SystemExit):
        bench_serving.plan_units(["int4"], ["bf16"])
    with pytest.raises(SystemExit):
        bench_serving.plan_units(["int4", "int4"], [])
    done = {"0:int4": {"seconds": 200.0}}
    assert bench_serving.next_action(units, done, 0.0, 0.0, 240.0) == ("run", units[1])
    # the median finished unit plus 15%, and the host measurement: 300 s elapsed + 230 + 10 s > 450 s
    assert bench_serving.next_action(units, done, 300.0, 450.0, 240.0) == ("resume", units[1])
    assert bench_serving.next_action(units, done, 200.0, 450.0, 240.0) == ("run", units[1])
    # a fresh machine's first unit (JIT caches filled) does not make every later call stop early
    done = {"0:int4": {"seconds": 350.0, "config": "int4"}, "0:int4-bdr-64": {"seconds": 120.0, "config": "int4-bdr-64"},
            "0:bf16": {"seconds": 125.0, "config": "bf16"}}
    assert bench_serving.next_action(units, done, 0.0, 150.0, 240.0) == ("run", units[3])
    # a repeat is estimated from its config's own unit: 1.1 x 120 + 10 s
    assert bench_serving.next_action(units, done, 8.0, 150.0, 240.0) == ("run", units[3])
    assert bench_serving.next_action(units, done, 20.0, 150.0, 240.0) == ("resume", units[3])
    done["1:int4-bdr-64"] = {"seconds": 118.0, "config": "int4-bdr-64"}  # next: 1:int4, whose first unit took 350 s
    assert bench_serving.next_action(units, done, 0.0, 390.0, 240.0) == ("resume", units[4])
    assert bench_serving.next_action(units[:1], done, 1e9, 1.0, 240.0) == ("done", None)
    assert bench_serving.next_action(units, {}, 300.0, 450.0, 240.0) == ("resume", units[0])


def test_state_round_trip(tmp_path):
    path = str(tmp_path / "sub" / "state.jsonl")
    assert bench_serving.load_state(path) == {}
    bench_serving.append_state(path, {"unit": "0:int4", "seconds": 1.0, "rows": []})
    bench_serving.append_state(path, {"unit": "0:bf16", "seconds": 2.0, "rows": []})
    bench_serving.append_state(path, {"unit": "0:int4", "seconds": 3.0, "rows": []})  # a re-run wins
    done = bench_serving.load_state(path)
    assert sorted(done) == ["0:bf16", "0:int4"] and done["0:int4"]["seconds"] == 3.0


def _row(config, c, tok_s, capacity, il=1024, peak=None, ttft=10.0, workload="random", prefix_len=0):
    return {"config": config, "workload": workload, "input_len": il, "prefix_len": prefix_len, "output_len": 256,
            "concurrency": c, "kv_demand_tokens": bench_serving.Point(workload, il, 256, c, prefix_len).kv_demand(),
            "requests": c, "complete": c, "errors": 0, "output_tok_s": tok_s, "ttft_ms_p50": ttft,
            "ttft_ms_p99": 2 * ttft, "ttft_ms_deciles": [ttft * (i + 1) / 5 for i in range(9)], "itl_ms_p50": 5.0, "itl_ms_p99": 9.0, "seconds": 1.0,
            "max_total_num_tokens": capacity, "max_running_requests": 4096,
            "peak_running": peak if peak is not None else c}


BF16, OURS, PLAIN = "bf16-flashinfer", "int4-bdr-flashinfer", "int4-flashinfer"


def _records():
    # BF16's pool: 100,000 tokens; concurrency 128 at 1024 + 256 tokens needs 163,840
    return [
        {"unit": "0:" + PLAIN, "config": PLAIN, "pass": 0, "host": {"torch_op_us": 6.0},
         "rows": [_row(PLAIN, 1, 100.0, 370000), _row(PLAIN, 64, 1000.0, 370000),
                  _row(PLAIN, 128, 900.0, 370000)]},
        {"unit": "0:" + OURS, "config": OURS, "pass": 0, "host": {"torch_op_us": 6.0},
         "rows": [_row(OURS, 1, 99.0, 360000, ttft=10.4), _row(OURS, 64, 1030.0, 360000),
                  _row(OURS, 128, 890.0, 360000)]},
        {"unit": "0:" + BF16, "config": BF16, "pass": 0,
         "rows": [_row(BF16, 1, 101.0, 100000), _row(BF16, 64, 950.0, 100000),
                  _row(BF16, 128, 400.0, 100000, peak=78)],
         "chunked_prefill_size": 8192, "prefill_chunks": {"no_cached_prefix": {"chunks": 2, "median_tok_s": 4e4},
                                                          "cached_prefix": {"chunks": 0, "median_tok_s": None}}},
        {"unit": "1:" + OURS, "config": OURS, "pass": 1,
         "rows": [_row(OURS, 1, 101.0, 360000, ttft=10.4), _row(OURS, 64, 1010.0, 360000)]},
    ]


def test_aggregate_means_spreads_and_headlines():
    rows, spread, summary = bench_serving.aggregate(_records())
    by = {(r["config"], r["concurrency"]): r for r in rows}
    ours1 = by[(OURS, 1)]
    assert ours1["output_tok_s"] == pytest.approx(100.0) and ours1["output_tok_s_runs"] == [99.0, 101.0]
    assert ours1["requests"] == 2 and ours1["run_spread_pct"] == pytest.approx(2.0)
    assert len(ours1["ttft_ms_deciles_runs"]) == 2 and "ttft_ms_deciles" not in ours1  # each run's shape
    # prompt + generated tokens per second, the mean of the two runs: 100 + 1024 x 1 request / 1 s
    assert ours1["total_tok_s"] == pytest.approx(100.0 + 1024)
    assert by[(BF16, 64)]["total_tok_s"] == pytest.approx(950.0 + 1024 * 64)
    assert spread == pytest.approx(2.0)  # the largest spread of any repeated point (20 / 1020 at 64)
    assert summary["capacity_vs_baseline"] == {BF16: 1.0, PLAIN: 3.7, OURS: 3.6}
    # capacity points follow BF16's pool: only concurrency 128 needs more than 100,000 slots
    assert [r["capacity_point"] for r in rows if r["config"] == PLAIN] == [False, False, True]
    points = {p["concurrency"]: p for p in summary["points"]}
    assert points[1]["vs_baseline"][OURS]["ttft_ms_p50"] == pytest.approx(1.04)
    assert points[128]["vs_baseline"][OURS]["output_tok_s"] == pytest.approx(2.225)
    assert points[128]["vs_baseline"][OURS]["baseline_peak_running"] == 78
    assert points[64]["bdr_vs_int4"]["flashinfer"] == pytest.approx(1.02)
    # per pass: only pass 0 ran both (1030 / 1000), its units' hosts equally fast
    assert points[64]["bdr_vs_int4_by_pass"]["flashinfer"] == [
        {"pass": 0, "output_tok_s": pytest.approx(1.03), "host_op_time": pytest.approx(1.0)}]
    # at concurrency 1 ours (100) is slower than BF16 (101): the bar is not met, and says where
    verdict = summary["done_when"]
    assert not verdict["met"] and len(verdict["failures"]) == 1 and "@1: output tok/s" in verdict["failures"][0]


def test_done_when_checks_every_clause():
    def point(cap, tok, ttft, bdr):
        return {"workload": "random", "input_len": 1, "output_len": 1, "concurrency": 1, "capacity_point": cap,
                "vs_baseline": {OURS: {"output_tok_s": tok, "ttft_ms_p50": ttft}}, "bdr_vs_int4": {"triton": bdr}}

    assert bench_serving.done_when([point(False, 1.0, 1.05, 0.98), point(True, 1.3, 3.0, 1.0)])["met"]
    assert not bench_serving.done_when([point(False, 1.0, 1.06, 1.0)])["met"]  # TTFT
    assert not bench_serving.done_when([point(True, 1.29, 1.0, 1.0)])["met"]  # capacity throughput
    assert not bench_serving.done_when([point(False, 1.0, 1.0, 0.97)])["met"]  # BDR vs plain INT4
    assert not bench_serving.done_when([])["met"]


def test_finalize_writes_the_schema(tmp_path):
    import matplotlib  # noqa: F401 - the plot needs it

    class Args:
        model = "/tmp/models/8b/"
        extra = ["--disable-prefill-cuda-graph"]

    records = [dict(r, gpu="Fake GPU", gpu_uuid="GPU-1", startup_s=1.0, seconds=2.0, finished_at="now",
                    server_command="x") for r in _records()]
    out = str(tmp_path / "serving.json")
    result = bench_serving.finalize(records, Args, out)
    saved = json.load(open(out))
    assert saved["gpu"] == "Fake GPU" and saved["model"] == "8b" and saved["one_gpu"]
    assert saved["prefill_cuda_graph"] is False and result["incomplete_requests"] == 0
    assert saved["summary"]["prefill_chunks"][BF16]["runs"][0]["no_cached_prefix"]["chunks"] == 2
    for row in saved["rows"]:
        for key, kind in (("config", str), ("workload", str), ("input_len", int), ("output_len", int),
                          ("concurrency", int), ("output_tok_s", float), ("ttft_ms_p50", float),
                          ("ttft_ms_p99", float), ("itl_ms_p50", float), ("itl_ms_p99", float),
                          ("max_total_num_tokens", int), ("capacity_point", bool)):
            assert isinstance(row[key], kind), key
    assert os.path.getsize(str(tmp_path / "serving.png")) > 10000


def test_rebuild_recomputes_rows_and_keeps_the_runs_provenance(tmp_path, monkeypatch):
    import matplotlib  # noqa: F401 - the plot needs it

    class Args:
        model = "/tmp/models/8b"
        extra = []

    records = [dict(r, gpu="Fake GPU", gpu_uuid="GPU-1", startup_s=1.0, seconds=2.0, finished_at="now",
                    server_command="x") for r in _records()]
    out, state = str(tmp_path / "serving.json"), str(tmp_path / "units.jsonl")
    bench_serving.finalize(records, Args, out)
    old = json.load(open(out))
    for row in old["rows"]:  # a result written before total_tok_s was aggregated
        del row["total_tok_s"]
    old["command"], old["versions"] = "the GPU run's command", {"sglang": "0.5.17"}
    json.dump(old, open(out, "w"))
    for rec in records:
        bench_serving.append_state(state, rec)
    monkeypatch.setattr(sys, "argv", ["bench_serving.py", "--rebuild", "--state", state, "--out", out])
    bench_serving.main()
    new = json.load(open(out))
    assert new["command"] == "the GPU run's command" and new["versions"] == {"sglang": "0.5.17"}
    assert "--rebuild" in new["rebuilt_by"] and all("total_tok_s" in r for r in new["rows"])
    assert new["summary"] == old["summary"] and len(new["rows"]) == len(old["rows"])
    # records of another run are refused
    bench_serving.append_state(state, dict(records[0], unit="1:" + BF16))
    with pytest.raises(SystemExit, match="not the units"):
        bench_serving.main()


def test_main_resumes_across_calls_and_ignores_other_sweeps(tmp_path, monkeypatch):
    """Two calls finish the plan (the first stops with exit 75); a state file of another
    sweep (other shapes) is not reused."""
    import matplotlib  # noqa: F401 - the plot needs it
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"vocab_size": 100, "hidden_size": 256, "num_attention_heads": 2,
                                                       "num_hidden_layers": 2}))
    ran, hosts = [], []

    def fake_host_speed():
        hosts.append(len(hosts))
        return {"torch_op_us": 5.0 + hosts[-1]}

    def fake_unit(unit, args, points, vocab, head_dim, host):
        assert head_dim == 128 and host == {"torch_op_us": 5.0 + hosts[-1]}  # measured just before
        ran.append(unit.key)
        cap = 1000 if unit.config == BF16 else 3700
        rows = [_row(unit.config, p.concurrency, 100.0 * p.concurrency, cap, il=p.input_len) for p in points]
        return {"unit": unit.key, "config": unit.config, "pass": unit.pass_idx, "gpu": "Fake GPU",
                "gpu_uuid": "GPU-1", "host": host, "startup_s": 1.0, "seconds": 100.0, "finished_at": "now",
                "server_command": "x", "rows": rows}

    monkeypatch.setattr(bench_serving, "run_unit", fake_unit)
    monkeypatch.setattr(bench_serving, "host_speed", fake_host_speed)
    state, out = str(tmp_path / "state.jsonl"), str(tmp_path / "serving.json")
    argv = ["bench_serving.py", "--model", str(model), "--out", out, "--state", state, "--configs",
            f"{PLAIN},{BF16}", "--repeat-configs", PLAIN, "--shapes", "1024x256", "--concurrency", "1,64",
            "--shared-prefix", "", "--unit-estimate-s", "1"]
    monkeypatch.setattr(sys, "argv", argv + ["--call-budget-s", "50"])
    with pytest.raises(SystemExit) as stop:
        bench_serving.main()
    assert stop.value.code == bench_serving.EXIT_RESUME and ran == ["0:" + PLAIN] and not os.path.exists(out)
    # --finalize writes the result of the finished unit, running none, with the versions given
    versions_file = tmp_path / "other.json"
    versions_file.write_text(json.dumps({"versions": {"sglang": "0.5.17"}}))
    partial = str(tmp_path / "partial.json")
    monkeypatch.setattr(sys, "argv", [a if a != out else partial for a in argv]
                        + ["--finalize", "--versions-from", str(versions_file)])
    bench_serving.main()
    cut_short = json.load(open(partial))
    assert ran == ["0:" + PLAIN] and cut_short["versions"] == {"sglang": "0.5.17"}
    # ... and says it was cut short: the planned units that did not run
    assert cut_short["finalized"]["units_not_run"] == ["0:" + BF16, "1:" + PLAIN]
    assert "--finalize" in cut_short["finalized"]["by"] and [u["unit"] for u in cut_short["units"]] == ["0:" + PLAIN]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as stop:
        bench_serving.main()
    assert stop.value.code == 0 and ran == ["0:" + PLAIN, "0:" + BF16, "1:" + PLAIN]
    result = json.load(open(out))
    assert result["one_gpu"] and len(result["rows"]) == 4 and result["summary"]["capacity_vs_baseline"][PLAIN] == 3.7
    # the host measured before every unit and kept with it; the result says how far apart they were
    assert len(hosts) == 3 and [u["host"]["torch_op_us"] for u in result["units"]] == [5.0, 6.0, 7.0]
    assert result["host_spread_pct"] == pytest.approx(40.0)
    monkeypatch.setattr(sys, "argv", [a if a != "1024x256" else "512x64" for a in argv])
    with pytest.raises(SystemExit):
        bench_serving.main()


def test_host_speed_measures_this_host():
    from sglang_sawint4.serving.server import host_speed

    host = host_speed("cpu")
    assert host["device"] == "cpu" and 0 < host["torch_op_us"] < 10_000 and 0 < host["python_loop_ns"] < 100_000
    assert host_speed("no-such-device") is None


def test_prefix_burst_verdict():
    from sglang_sawint4.bench.prefix_burst import verdict

    row = {"complete": 64, "requests": 64, "healthy_after": True, "before_mib": 1000, "peak_mib": 1500}
    assert verdict(row, 1024)
    assert not verdict(dict(row, peak_mib=3000), 1024)  # grew with the burst
    assert not verdict(dict(row, complete=63), 1024)
    assert not verdict(dict(row, healthy_after=False), 1024)


def test_point_lines_show_the_schedulers_cpu_time():
    rows = [dict(workload="shared-prefix", input_len=8448, concurrency=32, output_tok_s=2229.4, ttft_ms_p50=57.42,
                 seconds=24.0, server_cpu_s={"sglang::schedul": 21.5, "python3": 3.0, "sglang::detoken": 1.0}),
            dict(workload="random", input_len=1024, concurrency=64, output_tok_s=0.0, ttft_ms_p50=None, seconds=3.0,
                 server_cpu_s={})]
    assert bench_serving.point_lines(rows) == [
        "shared-prefix 8448@32: 2229 tok/s, TTFT p50 57.4 ms, scheduler 21.5 CPU s in 24.0 s",
        "random 1024@64: 0 tok/s, TTFT p50 none completed"]


def test_pairs_by_pass_compare_units_of_one_pass_and_their_hosts():
    key = ("shared-prefix", 8448, 8192, 128, 32, 0.5)

    def entry(tok, op_us):
        return {"output_tok_s": tok}, {"torch_op_us": op_us}

    by_pass = {(0, OURS, *key): entry(95.0, 6.0), (0, PLAIN, *key): entry(100.0, 6.0),
               (1, OURS, *key): entry(90.0, 9.0), (1, PLAIN, *key): entry(100.0, 7.5),
               (2, OURS, *key): entry(1.0, 6.0),  # pass 2 has no plain unit: no pair
               (1, PLAIN, "random", 1024, 0, 256, 64, 0.5): entry(1.0, 6.0)}
    pairs = bench_serving.pairs_by_pass(by_pass, OURS, PLAIN, key)
    assert pairs == [{"pass": 0, "output_tok_s": pytest.approx(0.95), "host_op_time": pytest.approx(1.0)},
                     {"pass": 1, "output_tok_s": pytest.approx(0.9), "host_op_time": pytest.approx(1.2)}]
    # a unit without a host measurement: the ratio is there, the host comparison is not
    by_pass[(0, OURS, *key)] = ({"output_tok_s": 95.0}, None)
    assert bench_serving.pairs_by_pass(by_pass, OURS, PLAIN, key)[0]["host_op_time"] is None


def test_host_spread_over_the_units_that_measured_it():
    units = [{"host": {"torch_op_us": 6.0}}, {"host": None}, {"host": {"torch_op_us": 9.0}}, {}]
    assert bench_serving.host_spread_pct(units) == pytest.approx(50.0)
    assert bench_serving.host_spread_pct([{"host": None}]) is None
