"""The serving benchmark's client against a local fake OpenAI streaming server."""

import asyncio
import json
import os
import sys

import pytest

aiohttp = pytest.importorskip("aiohttp")
from aiohttp import web  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
import bench_serving  # noqa: E402

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


async def _run(prompts, output_len, concurrency):
    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        return await bench_serving.run_load(f"http://127.0.0.1:{port}", "m", prompts, output_len, concurrency)
    finally:
        await runner.cleanup()


def test_load_client_measures_every_request():
    prompts = bench_serving.make_prompts(12, 16, 1000, seed=1)
    prompts[3][0] = 13  # one request fails
    results, secs = asyncio.run(_run(prompts, output_len=8, concurrency=4))
    s = bench_serving.summarize(results, secs, 8)
    assert s["requests"] == 12 and s["complete"] == 11 and s["errors"] == 1
    assert s["ttft_ms_p50"] >= TOKEN_DELAY_S * 1e3 * 0.9
    assert TOKEN_DELAY_S * 1e3 * 0.9 <= s["itl_ms_p50"] <= s["itl_ms_p99"]
    assert s["output_tok_s"] == pytest.approx(11 * 8 / secs)


def test_prompts_are_reproducible_and_configs_validated():
    assert bench_serving.make_prompts(2, 5, 100, 7) == bench_serving.make_prompts(2, 5, 100, 7)
    assert bench_serving.config_flags("int4-bdr-64")[-1] == "64"
    with pytest.raises(SystemExit):
        bench_serving.config_flags("int3")
