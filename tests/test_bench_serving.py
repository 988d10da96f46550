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
    for i in range(body["max_tokens"]):
        await asyncio.sleep(TOKEN_DELAY_S)
        text = "" if i == 2 else "x"  # a token whose text is not complete yet
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
    results, secs = asyncio.run(_run(prompts, output_len=8, concurrency=4))
    s = bench_serving.summarize(results, secs, 8)
    assert s["requests"] == 12 and s["complete"] == 11 and s["errors"] == 1
    assert TOKEN_DELAY_S * 1e3 * 0.9 <= s["ttft_ms_p50"] <= s["ttft_ms_p99"]
    assert TOKEN_DELAY_S * 1e3 * 0.9 <= s["itl_ms_p50"] <= s["itl_ms_p99"]
    assert s["output_tok_s"] == pytest.approx(11 * 8 / secs)


def test_prompts_are_reproducible_and_configs_validated():
    assert bench_serving.make_prompts(2, 5, 100, 7) == bench_serving.make_prompts(2, 5, 100, 7)
    assert bench_serving.config_flags("int4-bdr-64")[-1] == "64"
    with pytest.raises(SystemExit):
        bench_serving.config_flags("int3")


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
    # the longest finished unit is the estimate: 300 s elapsed + 200 s > 450 s
    assert bench_serving.next_action(units, done, 300.0, 450.0, 240.0) == ("resume", units[1])
    assert bench_serving.next_action(units, done, 200.0, 450.0, 240.0) == ("run", units[1])
    assert bench_serving.next_action(units[:1], done, 1e9, 1.0, 240.0) == ("done", None)
    # the first unit with the capacity point counts 1.5x: 200 + 1.5 x 200 > 450
    assert bench_serving.next_action(units, done, 200.0, 450.0, 240.0, ["int4-bdr-64"]) == ("resume", units[1])
    assert bench_serving.next_action(units, done, 100.0, 450.0, 240.0, ["int4-bdr-64"]) == ("run", units[1])
    assert bench_serving.parse_capacity("2048x512@512") == ((2048, 512), 512)
    for bad in ("2048x512", "2048@512", "axb@4", "2048x512@0"):
        with pytest.raises(SystemExit):
            bench_serving.parse_capacity(bad)


def test_state_round_trip(tmp_path):
    path = str(tmp_path / "sub" / "state.jsonl")
    assert bench_serving.load_state(path) == {}
    bench_serving.append_state(path, {"unit": "0:int4", "seconds": 1.0, "rows": []})
    bench_serving.append_state(path, {"unit": "0:bf16", "seconds": 2.0, "rows": []})
    bench_serving.append_state(path, {"unit": "0:int4", "seconds": 3.0, "rows": []})  # a re-run wins
    done = bench_serving.load_state(path)
    assert sorted(done) == ["0:bf16", "0:int4"] and done["0:int4"]["seconds"] == 3.0


def _row(config, c, tok_s, capacity, cap=False, il=1024, peak=None):
    return {"config": config, "input_len": il, "output_len": 256, "concurrency": c, "requests": c,
            "complete": c, "errors": 0, "output_tok_s": tok_s, "ttft_ms_p50": 10.0, "itl_ms_p50": 5.0,
            "itl_ms_p99": 9.0, "seconds": 1.0, "capacity_point": cap, "max_total_num_tokens": capacity,
            "max_running_requests": 4096, "peak_running": peak if peak is not None else c}


def _records():
    return [
        {"unit": "0:int4", "pass": 0, "rows": [_row("int4", 1, 100.0, 3700), _row("int4", 64, 1000.0, 3700),
                                                _row("int4", 512, 900.0, 3700, cap=True)]},
        {"unit": "0:int4-bdr-64", "pass": 0, "rows": [_row("int4-bdr-64", 1, 99.0, 3600),
                                                       _row("int4-bdr-64", 64, 1030.0, 3600),
                                                       _row("int4-bdr-64", 512, 880.0, 3600, cap=True)]},
        {"unit": "0:bf16", "pass": 0, "rows": [_row("bf16", 1, 101.0, 1000), _row("bf16", 64, 950.0, 1000),
                                                _row("bf16", 512, 400.0, 1000, cap=True, peak=180)]},
        {"unit": "1:int4-bdr-64", "pass": 1, "rows": [_row("int4-bdr-64", 1, 101.0, 3600),
                                                       _row("int4-bdr-64", 64, 1010.0, 3600)]},
    ]


def test_aggregate_means_spreads_and_headlines():
    rows, spread, summary = bench_serving.aggregate(_records())
    by = {(r["config"], r["concurrency"], r["capacity_point"]): r for r in rows}
    bdr1 = by[("int4-bdr-64", 1, False)]
    assert bdr1["output_tok_s"] == pytest.approx(100.0) and bdr1["output_tok_s_runs"] == [99.0, 101.0]
    assert bdr1["requests"] == 2 and bdr1["run_spread_pct"] == pytest.approx(2.0)
    # prompt + generated tokens per second, the mean of the two runs: 100 + 1024 x 1 request / 1 s
    assert bdr1["total_tok_s"] == pytest.approx(100.0 + 1024)
    assert by[("bf16", 64, False)]["total_tok_s"] == pytest.approx(950.0 + 1024 * 64)
    assert by[("int4-bdr-64", 64, False)]["run_spread_pct"] == pytest.approx(20 / 1020 * 100)
    assert spread == pytest.approx(2.0)  # the largest spread of any repeated point
    assert summary["capacity_vs_bf16"] == {"bf16": 1.0, "int4": 3.7, "int4-bdr-64": 3.6}
    diffs = {x["concurrency"]: x["diff_pct"] for x in summary["bdr_vs_int4_pct"]}
    assert diffs[1] == pytest.approx(0.0) and diffs[64] == pytest.approx(2.0)
    assert summary["worst_bdr_vs_int4_pct"] == pytest.approx(0.0)
    cap = summary["capacity_point"]
    assert cap["concurrency"] == 512 and cap["peak_running"]["bf16"] == 180
    assert cap["ratio_vs_bf16"]["int4-bdr-64"] == pytest.approx(2.2)
    # at concurrency 1, INT4+BDR (100) is slower than BF16 (101): reported, not hidden
    assert [(x["config"], x["concurrency"]) for x in summary["bdr_slower_than_bf16"]] == [("int4-bdr-64", 1)]


def test_finalize_writes_the_schema(tmp_path):
    import matplotlib  # noqa: F401 - the plot needs it

    class Args:
        model = "/tmp/models/8b/"

    records = [dict(r, gpu="Fake GPU", gpu_uuid="GPU-1", startup_s=1.0, seconds=2.0, finished_at="now",
                    server_command="x") for r in _records()]
    out = str(tmp_path / "serving.json")
    result = bench_serving.finalize(records, Args, out)
    saved = json.load(open(out))
    assert saved["gpu"] == "Fake GPU" and saved["model"] == "8b" and saved["one_gpu"]
    assert saved["repeat_spread_pct"] == pytest.approx(2.0) and result["incomplete_requests"] == 0
    for row in saved["rows"]:
        for key, kind in (("config", str), ("input_len", int), ("output_len", int), ("concurrency", int),
                          ("output_tok_s", float), ("ttft_ms_p50", float), ("itl_ms_p50", float),
                          ("itl_ms_p99", float), ("max_total_num_tokens", int)):
            assert isinstance(row[key], kind), key
    assert os.path.getsize(str(tmp_path / "serving.png")) > 10000


def test_rebuild_recomputes_rows_and_keeps_the_runs_provenance(tmp_path, monkeypatch):
    import matplotlib  # noqa: F401 - the plot needs it

    class Args:
        model = "/tmp/models/8b"

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
    bench_serving.append_state(state, dict(records[0], unit="1:bf16"))
    with pytest.raises(SystemExit, match="not the units"):
        bench_serving.main()


def test_main_resumes_across_calls_and_ignores_other_sweeps(tmp_path, monkeypatch):
    """Two calls finish the plan (the first stops with exit 75); a state file of another
    sweep (other shapes) is not reused."""
    import matplotlib  # noqa: F401 - the plot needs it
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"vocab_size": 100}))
    ran = []

    def fake_unit(unit, args, shapes, levels, capacity, vocab):
        ran.append(unit.key)
        cap = 1000 if unit.config == "bf16" else 3700
        rows = [_row(unit.config, c, 100.0 * c, cap, il=il) for il, _ in shapes for c in levels]
        return {"unit": unit.key, "config": unit.config, "pass": unit.pass_idx, "gpu": "Fake GPU",
                "gpu_uuid": "GPU-1", "startup_s": 1.0, "seconds": 100.0, "finished_at": "now",
                "server_command": "x", "rows": rows}

    monkeypatch.setattr(bench_serving, "run_unit", fake_unit)
    state, out = str(tmp_path / "state.jsonl"), str(tmp_path / "serving.json")
    argv = ["bench_serving.py", "--model", str(model), "--out", out, "--state", state, "--configs", "int4,bf16",
            "--repeat-configs", "int4", "--shapes", "1024x256", "--concurrency", "1,64", "--capacity", "",
            "--unit-estimate-s", "1"]
    monkeypatch.setattr(sys, "argv", argv + ["--call-budget-s", "50"])
    with pytest.raises(SystemExit) as stop:
        bench_serving.main()
    assert stop.value.code == bench_serving.EXIT_RESUME and ran == ["0:int4"] and not os.path.exists(out)
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as stop:
        bench_serving.main()
    assert stop.value.code == 0 and ran == ["0:int4", "0:bf16", "1:int4"]
    result = json.load(open(out))
    assert result["one_gpu"] and len(result["rows"]) == 4 and result["summary"]["capacity_vs_bf16"]["int4"] == 3.7
    monkeypatch.setattr(sys, "argv", [a if a != "1024x256" else "512x64" for a in argv])
    with pytest.raises(SystemExit):
        bench_serving.main()
    assert ran[3:] == ["0:int4", "0:bf16", "1:int4"]  # measured again: other shapes
