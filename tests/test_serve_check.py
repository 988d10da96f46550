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


def _check_row(pid, mode, ok=True, layer=0):
    return {"pid": pid, "mode": mode, "layer": layer, "ok": ok, "rel_err": 0.004 if ok else 0.5,
            "tolerance_rel": 0.02, "kv": "int4"}


def test_attention_checks_are_summarized_per_mode_and_process():
    from sglang_sawint4.bench.e2e import summarize_attention_checks

    rows = [_check_row(pid, mode, layer=l) for pid in (11, 12) for mode in ("decode", "extend", "extend_prefix")
            for l in (0, 1)]
    s = summarize_attention_checks(rows)
    assert s["ok"] and s["processes"] == 2 and s["checks"] == 12 and s["by_mode"]["decode"]["layers"] == 2
    assert not summarize_attention_checks(rows + [_check_row(12, "decode", ok=False)])["ok"]
    assert not summarize_attention_checks([r for r in rows if r["mode"] != "extend_prefix"])["ok"]
    assert not summarize_attention_checks([])["ok"]


def test_tp2_needs_both_ranks_everywhere():
    from sglang_sawint4.bench.e2e import summarize_attention_checks, tp2_verdict

    both = summarize_attention_checks([_check_row(p, m) for p in (1, 2) for m in ("decode", "extend", "extend_prefix")])
    one = summarize_attention_checks([_check_row(1, m) for m in ("decode", "extend", "extend_prefix")])
    load = {"requests": 256, "complete": 256}
    pools = ["[TP0] INT4 KV cache is allocated ...", "[TP1] INT4 KV cache is allocated ..."]
    assert tp2_verdict(load, pools, True, both)
    assert not tp2_verdict(load, pools[:1], True, both)  # a rank without the INT4 pool
    assert not tp2_verdict(load, pools, True, one)  # the check reached one rank only
    assert not tp2_verdict(load, pools, False, both)  # no CUDA graphs
    assert not tp2_verdict({"requests": 256, "complete": 255}, pools, True, both)
