"""sglang_sawint4.bench.e2e pieces that run without a GPU."""

import json
import subprocess
import sys

import pytest

TOOL = [sys.executable, "-m", "sglang_sawint4.bench.e2e"]


def _write(path, obj):
    path.write_text(json.dumps(obj))
    return str(path)


@pytest.mark.parametrize("passed", [True, False])
def test_fold_tp2_sets_only_the_tp2_check(tmp_path, passed):
    e2e = {"gpu": "H100", "checks": {"cuda_graph": True, "abort": True, "tp2": None},
           "details": {"int4": {}}, "commands": {"int4": "x"}}
    run = {"tp2": passed, "gpu": "2x NVIDIA H200", "load": {"requests": 4, "complete": 4 if passed else 3},
           "max_total_num_tokens": 10, "command": "launch --tp 2"}
    out = _write(tmp_path / "e2e.json", e2e)
    subprocess.run([*TOOL, "fold-tp2", "--tp2-result", _write(tmp_path / "tp2.json", run),
                    "--out", out], check=True, capture_output=True)
    got = json.loads((tmp_path / "e2e.json").read_text())
    assert got["checks"] == {"cuda_graph": True, "abort": True, "tp2": passed}
    assert got["details"]["tp2"]["gpu"] == "2x NVIDIA H200" and got["commands"]["tp2"] == "launch --tp 2"
    assert got["gpu"] == "H100" and got["details"]["int4"] == {}


def test_fold_tp2_needs_the_gpu_of_an_older_result(tmp_path):
    out = _write(tmp_path / "e2e.json", {"checks": {"tp2": None}, "details": {}, "commands": {}})
    old = _write(tmp_path / "tp2.json", {"tp2": True, "load": {}, "max_total_num_tokens": 1, "command": "c"})
    r = subprocess.run([*TOOL, "fold-tp2", "--tp2-result", old, "--out", out],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "pass --gpu" in r.stderr
    assert json.loads((tmp_path / "e2e.json").read_text())["checks"]["tp2"] is None
