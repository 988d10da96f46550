"""Server processes of the benchmarks: a port already in use is refused, and servers never
outlive the benchmark that started them (a `timeout` sends SIGTERM)."""

import signal
import socket
import subprocess
import sys
import time

import pytest

from sglang_sawint4.serving.client import request
from sglang_sawint4.serving.server import Server

# a stand-in server: answers 200 on every GET, exits on SIGINT (KeyboardInterrupt)
HEALTH_SERVER = """
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(port):
    try:
        request(port, "GET", "/health", timeout=2)
        return True
    except OSError:
        return False


def _wait(condition, seconds=30):
    deadline = time.time() + seconds
    while not condition():
        if time.time() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_a_port_that_already_answers_is_refused(tmp_path):
    port = _free_port()
    holder = subprocess.Popen([sys.executable, "-c", HEALTH_SERVER, str(port)])
    try:
        assert _wait(lambda: _answers(port))
        with pytest.raises(RuntimeError, match="already answers"):
            Server("/models/m", port, [], str(tmp_path / "server.log")).start(timeout=5)
    finally:
        holder.kill()
        holder.wait()


def test_servers_stop_when_the_benchmark_is_terminated(tmp_path):
    port = _free_port()
    benchmark = f"""
import sys, time
from sglang_sawint4.serving.server import Server
srv = Server("/models/m", {port}, [], {str(tmp_path / "server.log")!r})
srv.cmd = [sys.executable, "-c", {HEALTH_SERVER!r}, "{port}"]
srv.start(timeout=30)
print("up", flush=True)
time.sleep(600)
"""
    proc = subprocess.Popen([sys.executable, "-c", benchmark], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "up" and _answers(port)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
        assert _wait(lambda: not _answers(port)), "the server outlived the benchmark"
    finally:
        proc.kill()


def test_benchmark_flags_and_server_flags_are_split():
    import argparse

    from sglang_sawint4.serving.server import parse_args_and_server_flags

    p = argparse.ArgumentParser()
    p.add_argument("--configs")
    args = parse_args_and_server_flags(p, ["--configs", "a,b", "--", "--mem-fraction-static", "0.3",
                                           "--disable-prefill-cuda-graph"])
    assert args.configs == "a,b"
    assert args.extra == ["--mem-fraction-static", "0.3", "--disable-prefill-cuda-graph"]
    assert parse_args_and_server_flags(p, ["--configs", "c"]).extra == []
