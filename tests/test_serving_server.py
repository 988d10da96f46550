"""Server processes of the benchmarks: a port already in use is refused, servers never
outlive the benchmark that started them (a `timeout` sends SIGTERM), and their CPU time is
read per process group."""

import os
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


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_cpu_seconds_of_a_process_group_count_its_processes_only():
    """A session of a parent and a child (as SGLang's scheduler is a child of the launcher)
    that each burn 0.4 s of CPU and then wait: both are counted, and nothing of this test's
    own process, outside the group."""
    from sglang_sawint4.serving.server import cpu_seconds_between, process_group_cpu_seconds

    burn = ("import sys, time\nt = time.process_time()\nwhile time.process_time() - t < 0.4: pass\n"
            "sys.stdout.write('burned\\n'); sys.stdout.flush(); sys.stdin.read()\n")
    script = f"import subprocess, sys\nc = subprocess.Popen([sys.executable, '-c', {burn!r}])\n" + burn
    group = subprocess.Popen([sys.executable, "-c", script], start_new_session=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert [group.stdout.readline() for _ in range(2)] == ["burned\n"] * 2  # both now wait
        used = process_group_cpu_seconds(group.pid)
        assert list(used) and 0.75 < sum(used.values()) < 5, used
        again = process_group_cpu_seconds(group.pid)  # idle since, but for a scheduler tick or so
        assert set(again) == set(used) and 0 <= sum(again.values()) - sum(used.values()) < 0.1
        assert cpu_seconds_between({}, used) == {k: round(v, 3) for k, v in used.items()}
    finally:
        os.killpg(group.pid, signal.SIGKILL)
        group.wait()


def test_cpu_seconds_read_names_with_spaces_and_parentheses(tmp_path):
    """/proc/<pid>/stat's name field is taken between the first '(' and the last ')'."""
    from sglang_sawint4.serving.server import process_group_cpu_seconds

    tick = os.sysconf("SC_CLK_TCK")

    def stat(pid, name, pgrp, utime, stime):
        (tmp_path / str(pid)).mkdir()
        rest = ["S", "1", str(pgrp)] + ["0"] * 8 + [str(utime), str(stime)] + ["0"] * 5
        (tmp_path / str(pid) / "stat").write_text(f"{pid} ({name}) " + " ".join(rest) + "\n")

    stat(10, "sglang::schedul", 7, 3 * tick, tick)
    stat(11, "a (b) c", 7, tick, 0)
    stat(12, "a (b) c", 7, tick, tick)
    stat(13, "other", 8, 50 * tick, 0)
    (tmp_path / "self").mkdir()
    assert process_group_cpu_seconds(7, str(tmp_path)) == {"sglang::schedul": 4.0, "a (b) c": 3.0}
    assert process_group_cpu_seconds(9, str(tmp_path)) == {}
