"""Failures a user must see as one clear line, never as a traceback or a silently BF16 server:
a missing model directory, a directory that is no model, a missing dependency, patches that
fail in an SGLang worker, and an SGLang that is installed but does not import."""

import json
import os
import subprocess
import sys

import pytest

from helpers import require_sglang

LAUNCHER = [sys.executable, "-m", "sglang_sawint4.launch_server"]


def _launch(argv, env=None):
    out = subprocess.run(LAUNCHER + argv, capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})
    lines = out.stderr.strip().splitlines()
    return out.returncode, lines, out.stderr + out.stdout


@pytest.mark.parametrize("kv_quant", ["none", "int4-bdr"])
def test_missing_model_directory_is_one_error_line(tmp_path, kv_quant):
    code, lines, text = _launch(["--model-path", str(tmp_path / "nonexistent"), "--kv-quant", kv_quant])
    assert code == 2 and len(lines) == 1 and "Traceback" not in text
    assert lines[0].endswith(f"error: --model-path {tmp_path / 'nonexistent'}: no such directory")


def test_a_directory_that_is_no_model_is_one_error_line(tmp_path):
    code, lines, text = _launch(["--model-path", str(tmp_path), "--kv-quant", "int4-bdr"])
    assert code == 2 and len(lines) == 1 and "Traceback" not in text
    assert "not a model directory (no config.json)" in lines[0]


def test_a_missing_dependency_is_named_in_one_line(tmp_path):
    """An SGLang whose launcher imports a package that is not installed (as SGLang 0.5.17 does
    with IPython when the set-up misses it)."""
    fake = tmp_path / "site" / "sglang"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('__version__ = "0.5.17"\n')
    (fake / "launch_server.py").write_text("import IPython_is_not_installed\n")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    env = {"PYTHONPATH": str(tmp_path / "site") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    code, lines, text = _launch(["--model-path", str(model)], env)
    assert code == 2 and len(lines) == 1 and "Traceback" not in text
    assert "missing Python package 'IPython_is_not_installed'" in lines[0]


def test_patches_failing_in_a_worker_stop_it_through_sglangs_own_plugin_loader(monkeypatch):
    """SGLang's load_plugins() swallows plugin exceptions; ours must still stop the process."""
    require_sglang()
    import sglang.srt.plugins as sglang_plugins

    import sglang_sawint4.patches.sglang_0_5_17 as patches
    from sglang_sawint4.config import KVQuantConfig

    def broken(config):
        raise RuntimeError("SGLang moved the pool builder")

    KVQuantConfig("int4-bdr").to_env(os.environ)  # what the launcher hands every worker
    monkeypatch.setattr(patches, "_applied", None)
    monkeypatch.setattr(patches, "_patch_pool_builder", broken)
    monkeypatch.setattr(sglang_plugins, "_plugins_loaded", False)
    monkeypatch.delenv("SGLANG_PLUGINS", raising=False)
    try:
        with pytest.raises(SystemExit, match="INT4 KV patches failed in this SGLang process .*SGLang moved the pool "
                                             "builder; stopping instead of serving"):
            sglang_plugins.load_plugins()
    finally:
        from sglang_sawint4.config import ALL_ENV

        for name in ALL_ENV:
            os.environ.pop(name, None)
    assert patches._applied is None  # nothing was marked as applied


def test_sglang_installed_but_broken_fails_the_tests_that_need_it(tmp_path, monkeypatch):
    """helpers.require_sglang: a test module that needs SGLang fails, with the reason."""
    fake = tmp_path / "sglang"
    (fake / "srt" / "mem_cache").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "srt" / "__init__.py").write_text("")
    (fake / "srt" / "mem_cache" / "__init__.py").write_text("")
    (fake / "srt" / "mem_cache" / "memory_pool.py").write_text("import IPython_is_not_installed\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.path.dirname(__file__),
                                                        os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", "from helpers import require_sglang; require_sglang()"],
                         capture_output=True, text=True, env=env)
    assert out.returncode != 0
    assert "sglang is installed but does not import (ModuleNotFoundError: No module named " \
           "'IPython_is_not_installed')" in out.stderr
