"""Launcher flag parsing and refusal of bad configurations (no GPU, no SGLang needed)."""

import json
import os
import subprocess
import sys

import pytest

from sglang_sawint4.config import ConfigError, KVQuantConfig
from sglang_sawint4.launch_server import int4_attention_backend, prepare_int4_argv, split_args
from sglang_sawint4.model_check import check_model


def test_our_flags_are_split_from_sglangs():
    cfg, rest = split_args(["--model-path", "/m", "--kv-quant", "int4-bdr", "--kv-quant-block-size", "64",
                            "--tp", "2", "--kv-quant-rotate", "kv"])
    assert cfg == KVQuantConfig("int4-bdr", 64, "kv")
    assert rest == ["--model-path", "/m", "--tp", "2"]


def test_default_is_plain_sglang():
    cfg, rest = split_args(["--model-path", "/m", "--attention-backend", "fa3"])
    assert not cfg.enabled
    assert prepare_int4_argv(cfg, rest) == rest  # untouched: exactly SGLang


@pytest.mark.parametrize("argv,match", [
    (["--kv-quant", "int3"], "--kv-quant must be one of"),
    (["--kv-quant", "int4-bdr", "--kv-quant-block-size", "48"], "power of two"),
    (["--kv-quant", "int4-bdr", "--kv-quant-block-size", "abc"], "integer"),
    (["--kv-quant", "int4", "--kv-quant-block-size", "64"], "only applies to --kv-quant int4-bdr"),
    (["--kv-quant", "int4", "--kv-quant-rotate", "kv"], "only applies"),
    (["--kv-quant", "int4-bdr", "--kv-quant-rotate", "v"], "--kv-quant-rotate must be"),
])
def test_bad_flag_values(argv, match):
    with pytest.raises(ConfigError, match=match):
        split_args(argv)


@pytest.mark.parametrize("sglang_argv,match", [
    (["--attention-backend", "fa3"], "flashinfer or triton"),
    (["--attention-backend=fa3"], "flashinfer or triton"),
    (["--decode-attention-backend", "flashinfer", "--attention-backend", "triton"], "drop --decode-attention-backend"),
    (["--prefill-attention-backend", "triton"], "drop --prefill-attention-backend"),
    (["--attention-backend", "flashinfer", "--cuda-graph-backend-prefill", "tc_piecewise"],
     "does not support --cuda-graph-backend-prefill"),
    (["--kv-cache-dtype", "fp8_e4m3"], "replaces --kv-cache-dtype"),
    (["--speculative-algorithm", "EAGLE"], "speculative decoding"),
    (["--enable-hierarchical-cache"], "hierarchical"),
    (["--disaggregation-mode", "prefill"], "disaggregation"),
    (["--dcp-size", "2"], "context parallelism"),
    (["--enable-mis"], "multi-item scoring"),
])
def test_incompatible_flags_are_refused(sglang_argv, match):
    with pytest.raises(ConfigError, match=match):
        prepare_int4_argv(KVQuantConfig("int4-bdr"), ["--model-path", "/nonexistent"] + sglang_argv)


def test_int4_attention_backend_default_and_choices(tmp_path):
    argv = prepare_int4_argv(KVQuantConfig("int4"), ["--model-path", "/nonexistent", "--disaggregation-mode", "null"])
    assert argv[-2:] == ["--attention-backend", "flashinfer"]
    # where the FlashInfer prefill path cannot run, the default is the Triton one, with the reason
    graph = ["--model-path", "/nonexistent", "--cuda-graph-backend-prefill", "full"]
    assert prepare_int4_argv(KVQuantConfig("int4"), graph)[-2:] == ["--attention-backend", "triton"]
    assert "full" in int4_attention_backend(graph)[1]
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Qwen2_5_VLForConditionalGeneration"],
                                                      "vision_config": {}, "text_config": {}}))
    assert int4_attention_backend(["--model-path", str(tmp_path)]) == (
        "triton", "multimodal models run on the Triton prefill path")
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    assert int4_attention_backend(["--model-path", str(tmp_path)]) == ("flashinfer", "the default")
    assert int4_attention_backend(["--attention-backend", "triton"]) == ("triton", "--attention-backend")
    for backend in ("flashinfer", "triton"):
        argv = ["--model-path", "/x", "--attention-backend", backend, "--decode-attention-backend", backend]
        assert prepare_int4_argv(KVQuantConfig("int4"), argv) == argv
    # the Triton path runs under any prefill CUDA-graph backend SGLang offers
    argv = ["--model-path", "/x", "--attention-backend", "triton", "--cuda-graph-backend-prefill", "tc_piecewise"]
    assert prepare_int4_argv(KVQuantConfig("int4"), argv) == argv


def test_staging_rows_flag():
    cfg, _ = split_args(["--kv-quant", "int4", "--kv-quant-prefill-staging-rows", "4096"])
    assert cfg.prefill_staging_rows == 4096
    env = {}
    cfg.to_env(env)
    assert KVQuantConfig.from_env(env).prefill_staging_rows == 4096
    for bad, match in (("0", "positive"), ("many", "integer")):
        with pytest.raises(ConfigError, match=match):
            split_args(["--kv-quant", "int4", "--kv-quant-prefill-staging-rows", bad])


def test_env_round_trip():
    cfg = KVQuantConfig("int4-bdr", 32, "kv", symmetric=True, debug_poison_freed=True)
    assert split_args(["--kv-quant", "int4-bdr", "--kv-quant-block-size", "32", "--kv-quant-rotate", "kv",
                       "--kv-quant-symmetric", "--kv-quant-debug-poison"])[0] == cfg
    env = {}
    cfg.to_env(env)
    assert KVQuantConfig.from_env(env) == cfg
    assert not KVQuantConfig.from_env({}).enabled


def test_attention_check_needs_eager_mode(tmp_path):
    path = str(tmp_path / "check.jsonl")
    cfg, rest = split_args(["--kv-quant", "int4", "--kv-quant-debug-check-attention", path])
    with pytest.raises(ConfigError, match="--disable-decode-cuda-graph"):
        prepare_int4_argv(cfg, ["--model-path", "/nonexistent"])
    for eager in (["--disable-decode-cuda-graph"], ["--disable-cuda-graph"],
                  ["--cuda-graph-backend-decode", "disabled"]):
        argv = prepare_int4_argv(cfg, ["--model-path", "/nonexistent", *eager])
        assert "--disable-prefill-cuda-graph" in argv
    env = {}
    cfg.to_env(env)
    assert KVQuantConfig.from_env(env).debug_check_attention == path
    with pytest.raises(ConfigError, match="needs --kv-quant int4"):
        split_args(["--kv-quant-debug-check-attention", path])


LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
         "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128}


@pytest.mark.parametrize("patch,match", [
    ({"kv_lora_rank": 512, "q_lora_rank": 1536}, "MLA"),
    ({"use_sliding_window": True, "sliding_window": 4096}, "sliding-window"),
    ({"layer_types": ["sliding_attention", "full_attention"]}, "sliding-window"),
    ({"layer_types": ["linear_attention", "full_attention"]}, "hybrid attention"),
    ({"head_dim": 80}, "head_dim=80"),
    ({"attn_logit_softcapping": 50.0}, "soft-capping"),
])
def test_unsupported_models_are_refused(patch, match):
    with pytest.raises(ConfigError, match=match):
        check_model({**LLAMA, **patch}, KVQuantConfig("int4-bdr"))


def test_block_size_must_divide_head_dim():
    with pytest.raises(ConfigError, match="does not divide head_dim=64"):
        check_model({**LLAMA, "head_dim": 64}, KVQuantConfig("int4-bdr", 128))
    assert check_model({**LLAMA, "head_dim": None, "hidden_size": 2048, "num_attention_heads": 32},
                       KVQuantConfig("int4-bdr")) == 64


def test_cli_prints_one_error_line_and_exits_2(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({**LLAMA, "kv_lora_rank": 512}))
    out = subprocess.run([sys.executable, "-m", "sglang_sawint4.launch_server", "--model-path", str(model),
                          "--kv-quant", "int4-bdr"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0] and "MLA" in lines[0], out.stderr


def test_qwen2_config_with_disabled_window_is_accepted():
    qwen = {**LLAMA, "model_type": "qwen2", "sliding_window": 32768, "use_sliding_window": False}
    assert check_model(qwen, KVQuantConfig("int4-bdr")) == 128
    mistral = {**LLAMA, "model_type": "mistral", "sliding_window": 4096}
    with pytest.raises(ConfigError, match="sliding-window"):
        check_model(mistral, KVQuantConfig("int4-bdr"))


def test_policy_resolution_writes_the_workers_file_and_one_log_line(tmp_path, monkeypatch):
    """The launcher's policy step: none needs no calibration; the file goes where the workers
    read it; an unwritable cache is one line."""
    from sglang_sawint4.config import ENV_POLICY_FILE
    from sglang_sawint4.launch_server import POLICY_LOG_PREFIX, resolve_served_policy
    from sglang_sawint4.policy import KVPolicy

    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"num_hidden_layers": 4, "num_attention_heads": 8,
                                                   "num_key_value_heads": 2, "head_dim": 128}))
    monkeypatch.setenv("SGLANG_SAWINT4_CACHE_DIR", str(tmp_path / "cache"))
    env = {}
    line = resolve_served_policy(KVQuantConfig("int4-bdr", policy="none", bf16_layers=(3,)),
                                 ["--model-path", str(model)], env)
    assert line.startswith(POLICY_LOG_PREFIX + f" ({env[ENV_POLICY_FILE]}): INT4 + BDR-128 on K; BF16 layers [3]")
    assert KVPolicy.load(env[ENV_POLICY_FILE]).bf16_layers == (3,)
    (tmp_path / "ro").write_text("a file, not a directory")
    monkeypatch.setenv("SGLANG_SAWINT4_CACHE_DIR", str(tmp_path / "ro" / "sub"))
    with pytest.raises(ConfigError, match="cannot write the KV policy under .*SGLANG_SAWINT4_CACHE_DIR"):
        resolve_served_policy(KVQuantConfig("int4-bdr", policy="none"), ["--model-path", str(model)], {})
    with pytest.raises(ConfigError, match="outside the model's 4 layers"):
        resolve_served_policy(KVQuantConfig("int4-bdr", policy="none", bf16_layers=(4,)),
                              ["--model-path", str(model)], {})
