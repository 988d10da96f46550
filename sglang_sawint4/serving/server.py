"""Server processes: start ``python -m sglang_sawint4.launch_server`` with a KV configuration,
wait for it, read its log, stop it; and what machine and versions served a run.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import signal
import subprocess
import sys
import time
from typing import List, Tuple

from sglang_sawint4.serving.client import HOST, request

# KV configurations by name (benchmarks, checks and evaluations use the same names)
CONFIG_FLAGS = {
    "bf16": ["--kv-quant", "none"],
    "fp8_e4m3": ["--kv-quant", "none", "--kv-cache-dtype", "fp8_e4m3"],
    "int4": ["--kv-quant", "int4"],
}


def config_flags(name: str) -> List[str]:
    """Launcher flags of a KV configuration: bf16, fp8_e4m3, int4, int4-bdr-<block> (every layer INT4,
    the paper's configuration: --kv-quant-policy none) or int4-bdr (the launcher's default policy)."""
    if name in CONFIG_FLAGS:
        return CONFIG_FLAGS[name]
    if name == "int4-bdr":
        return ["--kv-quant", "int4-bdr"]
    if name.startswith("int4-bdr-"):
        return ["--kv-quant", "int4-bdr", "--kv-quant-policy", "none", "--kv-quant-block-size", name.rsplit("-", 1)[1]]
    raise SystemExit(f"unknown config {name!r}: use bf16, fp8_e4m3, int4, int4-bdr or int4-bdr-<block>")


SERVING_BACKENDS = ("flashinfer", "triton")


def serving_config(name: str, head_dim: int) -> Tuple[List[str], dict]:
    """Launcher flags and row fields of a serving-benchmark config ``<kv>-<backend>``.

    kv: bf16, fp8_e4m3, int4 or int4-bdr (every layer INT4, ``--kv-quant-policy none``: the
    benchmark compares formats; int4-bdr at the format's default block min(128, head_dim)),
    or int4-bdr-<block>; backend: flashinfer or triton (``--attention-backend``).
    Fields: kv, backend and block (the Hadamard block, None without rotation)."""
    kv, _, backend = name.rpartition("-")
    if backend not in SERVING_BACKENDS or not kv:
        raise SystemExit(f"unknown serving config {name!r}: use <kv>-<backend>, backend one of "
                         f"{', '.join(SERVING_BACKENDS)}, e.g. int4-bdr-flashinfer")
    block = None
    if kv == "int4":
        flags = ["--kv-quant", "int4", "--kv-quant-policy", "none"]
    elif kv == "int4-bdr":
        flags, block = ["--kv-quant", "int4-bdr", "--kv-quant-policy", "none"], min(128, head_dim)
    else:
        flags = config_flags(kv)
        if kv.startswith("int4-bdr-"):
            block = int(kv.rsplit("-", 1)[1])
    return [*flags, "--attention-backend", backend], {"kv": kv, "backend": backend, "block": block}


_live_servers = set()


def _stop_live_servers():
    for srv in list(_live_servers):
        srv.stop(timeout=30)


def _exit_on_signal(signum, frame):
    # SystemExit runs the callers' `finally: srv.stop()` and then the atexit hook
    raise SystemExit(128 + signum)


def _install_cleanup():
    """Stop every server this process started when it exits, also on SIGTERM / SIGHUP (a
    `timeout` around a benchmark): the servers run in their own session, so nothing else
    would stop them, and a leftover one holds the port and the GPU's memory."""
    if getattr(_install_cleanup, "done", False):
        return
    atexit.register(_stop_live_servers)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        try:
            if signal.getsignal(sig) in (signal.SIG_DFL, None):
                signal.signal(sig, _exit_on_signal)
        except ValueError:  # not the main thread: atexit still covers a normal exit
            pass
    _install_cleanup.done = True


class Server:
    def __init__(self, model, port, extra, log_path, env=None):
        self.port = port
        self.log_path = log_path
        self.cmd = [sys.executable, "-m", "sglang_sawint4.launch_server", "--model-path", model,
                    "--host", HOST, "--port", str(port), "--grammar-backend", "none", *extra]
        self.env = dict(os.environ, **(env or {}))
        self.proc = None
        self.startup_s = None

    def start(self, timeout=900):
        try:
            request(self.port, "GET", "/health", timeout=5)
            raise RuntimeError(f"port {self.port} already answers: a server left running? stop it first")
        except OSError:
            pass
        _install_cleanup()
        t = time.time()
        self.log = open(self.log_path, "w")
        self.log.write("$ " + " ".join(self.cmd) + "\n")
        self.log.flush()
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True)
        _live_servers.add(self)
        while time.time() - t < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {self.log_path}:\n"
                                   + tail(self.log_path))
            try:
                status, _ = request(self.port, "GET", "/health", timeout=5)
                if status == 200:
                    self.startup_s = time.time() - t
                    return self
            except OSError:
                pass
            time.sleep(1)
        raise RuntimeError(f"server not healthy after {timeout}s; see {self.log_path}")

    def info(self):
        """SGLang's /server_info: server args, scheduler info (max_total_num_tokens, ...) and
        per-DP internal states (effective_max_running_requests_per_dp, ...)."""
        status, info = request(self.port, "GET", "/server_info")
        return info if status == 200 else {}

    def cpu_seconds(self) -> dict:
        """CPU seconds (user + system) each live process of the server has used so far, summed
        by process name (SGLang's ``sglang::scheduler`` and ``sglang::detokenizer``, the
        tokenizer / HTTP process): the difference over a benchmark point says how much host
        time each process spent on it, against that point's wall time."""
        return process_group_cpu_seconds(self.proc.pid) if self.proc is not None else {}

    def stop(self, timeout=60):
        """SIGINT like a Ctrl-C, then SIGKILL the group if it does not exit."""
        _live_servers.discard(self)
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        os.killpg(self.proc.pid, signal.SIGINT)
        try:
            self.proc.wait(timeout)
            clean = True
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            clean = False
        self.log.close()
        return clean


def process_group_cpu_seconds(pgid: int, proc_root: str = "/proc") -> dict:
    """{process name: CPU seconds (user + system)} over the live processes of process group
    ``pgid``, read from ``/proc/<pid>/stat`` (Linux; {} elsewhere).  A name is the process's
    ``comm`` (at most 15 characters, so ``sglang::scheduler`` reads ``sglang::schedul``)."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    out = {}
    try:
        pids = [d for d in os.listdir(proc_root) if d.isdigit()]
    except OSError:
        return out
    for pid in pids:
        try:
            with open(os.path.join(proc_root, pid, "stat")) as f:
                stat = f.read()
        except OSError:  # exited meanwhile
            continue
        # "pid (comm) state ppid pgrp ... utime stime ...": comm may hold spaces and parentheses
        name = stat[stat.index("(") + 1: stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[2]) != pgid:
            continue
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def cpu_seconds_between(before: dict, after: dict) -> dict:
    """Per process name, the CPU seconds used between two ``process_group_cpu_seconds``
    readings (a process that exited in between is left out)."""
    return {name: round(after[name] - before.get(name, 0.0), 3) for name in sorted(after)}


def tail(path, n=40):
    try:
        return "".join(open(path, errors="replace").readlines()[-n:])
    except OSError:
        return ""


def log_has(path, pattern):
    return re.search(pattern, open(path, errors="replace").read()) is not None


def nvidia_smi(field):
    """``nvidia-smi --query-gpu=FIELD`` of GPU 0 as text (no units), or None without nvidia-smi."""
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30).stdout.split()
        return out[0] if out else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def parse_args_and_server_flags(parser, argv=None):
    """A benchmark's arguments: its own flags parsed, every flag it does not know (written
    after ``--`` by convention) kept for the server in ``args.extra``."""
    args, extra = parser.parse_known_args(argv)
    args.extra = [x for x in extra if x != "--"]
    return args


def command_line() -> str:
    """The command that is running, as typed: ``python -m package.module ...`` for a module
    (what results files record next to their rows)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    prog = ["python", "-m", spec.name] if spec is not None and spec.name else ["python", sys.argv[0]]
    return " ".join(prog + sys.argv[1:])


def gpu_name():
    try:
        import torch

        return torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001
        return "unknown"


_HOST_SPEED = r"""
import json, statistics, sys, time
import torch
x = torch.zeros(16, device=sys.argv[1])

def launches(n=2000):
    t = time.perf_counter()
    for _ in range(n):
        x.add_(1)
    dt = (time.perf_counter() - t) / n * 1e6
    if x.is_cuda:
        torch.cuda.synchronize()
    return dt

def loop(n=200000):
    t, s = time.perf_counter(), 0
    for i in range(n):
        s += i
    return (time.perf_counter() - t) / n * 1e9

launches(200)
print(json.dumps({"device": sys.argv[1], "torch_op_us": statistics.median(launches() for _ in range(5)),
                  "python_loop_ns": statistics.median(loop() for _ in range(5))}))
"""


def host_speed(device: str = "cuda"):
    """How fast this machine's host enqueues work: the host time of one small torch op on
    ``device`` (median of 5 x 2,000) and of one step of a Python loop, measured in a child
    process (its CUDA context leaves with it, so a server started afterwards sees all the GPU
    memory).  Host-bound configs (a small INT4 prefill) follow this; hosts of the same GPU
    model differ by 2x and more.  None where the measurement fails."""
    try:
        out = subprocess.run([sys.executable, "-c", _HOST_SPEED, device], capture_output=True, text=True, timeout=300)
        return json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError):
        return None


def versions():
    """Versions of what served the run (recorded next to the GPU name in every result)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("torch", "triton", "sglang", "sglang-kernel", "flashinfer-python", "transformers", "sglang-sawint4"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    return out
