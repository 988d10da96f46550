"""The reliability script's checks: launcher refusals for real, response validation on a fake server."""

import json
import random
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from sglang_sawint4.bench import reliability


def test_every_bad_configuration_is_refused_with_one_line():
    cases = reliability.run_bad_config_cases()
    assert len(cases) >= 12
    assert [c["case"] for c in cases if not c["ok"]] == []


class FakeSGLang(BaseHTTPRequestHandler):
    """Answers like SGLang, except for the mistakes each test plants."""

    mode = "good"

    def log_message(self, *args):
        pass

    def _json(self, status, obj):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        raw = self.rfile.read(int(self.headers["Content-Length"]))
        try:
            body = json.loads(raw)
        except json.JSONDecodeError:
            return self._json(400, {"error": "bad json"})
        if self.mode == "crash":
            return self._json(500, {"error": "internal"})
        if self.path == "/generate":
            n = body["sampling_params"]["max_new_tokens"]
            lp = [float("nan") if self.mode == "nan" else -1.0] * n
            return self._json(200, {"output_ids": [1] * n, "meta_info": {
                "output_token_logprobs": [[x, 1, None] for x in lp]}})
        n = body["max_tokens"] - (1 if self.mode == "short" else 0)
        if body.get("stream"):  # SSE, connection closed at the end (HTTP/1.0)
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            events = [{"choices": [{"text": "x"}]}] * n + [{"choices": [], "usage": {"completion_tokens": n}}]
            for e in events:
                self.wfile.write(b"data: " + json.dumps(e).encode() + b"\n\n")
            self.wfile.write(b"data: [DONE]\n\n")
            return
        choice = {"finish_reason": "length", "text": "x", "message": {"content": "x"}}
        return self._json(200, {"choices": [choice], "usage": {"completion_tokens": n}})


def _soak(mode):
    FakeSGLang.mode = mode
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeSGLang)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    soak = reliability.Soak(server.server_address[1], "m", reliability.Traffic(500, 0, families=2, prefix_len=8,
                                                                              max_tail=32), 64)
    rng = random.Random(0)
    try:
        for _ in range(40):
            soak.one_good(rng)
        for case in soak.bad_request_cases():
            soak.one_bad(case)
    finally:
        server.shutdown()
    return soak


def test_validation_passes_good_responses():
    soak = _soak("good")
    assert sum(soak.counts.values()) == 40 and len(soak.counts) == 4  # every kind of good request
    assert soak.corrupted == 0 and not soak.errors
    assert len(soak.bad_requests) == len(soak.bad_request_cases())


def test_nan_logprobs_and_short_outputs_count_as_corrupted():
    nan = _soak("nan")
    assert nan.corrupted > 0 and any("non-finite" in k for k in nan.errors)
    short = _soak("short")
    assert short.corrupted > 0 and any("incomplete" in k for k in short.errors)


def test_server_errors_on_bad_requests_are_failures():
    crash = _soak("crash")
    assert any(k.startswith("bad request") and "HTTP 500" in k for k in crash.errors)
    assert crash.corrupted == 0 and crash.counts.total() == 0
