"""``python -m sglang_sawint4.launch_server``: SGLang's launcher plus the INT4 KV flags.

Every ``sglang.launch_server`` flag is passed through unchanged.  Our flag group
(``--kv-quant`` and ``--kv-quant-*``) is parsed and validated first; bad values,
unsupported combinations, a missing model directory and missing dependencies stop
here with one ``error:`` line and exit code 2.  With INT4 KV the KV policy
(``sglang_sawint4.policy``) is resolved here, once, logged in one line and handed to
every SGLang worker through a file.  With ``--kv-quant none`` (the default) this is
``sglang.launch_server``.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional, Tuple

from sglang_sawint4.config import ALL_ENV, ENV_POLICY_FILE, ConfigError, KVQuantConfig, add_cli_args

PROG = "python -m sglang_sawint4.launch_server"
#: --attention-backend values INT4 KV runs on (the prefill path; decode is always our INT4
#: kernel).  Without the flag: FlashInfer, where its prefill path can run (default_int4_backend).
INT4_ATTENTION_BACKENDS = ("flashinfer", "triton")
#: prefill CUDA-graph backends that capture attention, which the FlashInfer path plans on the host
CAPTURED_PREFILL_GRAPHS = ("full", "tc_piecewise")
PLUGIN_GROUP = "sglang.srt.plugins"
PLUGIN_NAME = "sawint4"


def split_args(argv: List[str]) -> Tuple[KVQuantConfig, List[str]]:
    """Separate our flags from SGLang's; validate ours (ConfigError on bad values)."""
    parser = argparse.ArgumentParser(prog=PROG, add_help=False, allow_abbrev=False)
    add_cli_args(parser)
    parser.error = _raise_config_error  # one line, not argparse's usage dump
    ns, rest = parser.parse_known_args(argv)
    return KVQuantConfig.from_args(ns), rest


def _raise_config_error(message):
    raise ConfigError(message)


def _flag_value(argv: List[str], flag: str) -> Optional[str]:
    """Last value given for ``flag`` (``--flag v`` or ``--flag=v``), else None."""
    value = None
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif a.startswith(flag + "="):
            value = a.split("=", 1)[1]
    return value


def default_int4_backend(argv: List[str]) -> Tuple[str, str]:
    """(prefill path, why) for INT4 KV when --attention-backend is not given: FlashInfer, or
    Triton where the FlashInfer path cannot run (a captured prefill CUDA graph, a multimodal
    model)."""
    graph = _flag_value(argv, "--cuda-graph-backend-prefill")
    if graph in CAPTURED_PREFILL_GRAPHS:
        return "triton", f"--cuda-graph-backend-prefill {graph} runs on the Triton prefill path"
    model_path = _flag_value(argv, "--model-path") or _flag_value(argv, "--model")
    if model_path is not None and os.path.isfile(os.path.join(model_path, "config.json")):
        from sglang_sawint4.model_check import is_multimodal

        if is_multimodal(model_path):
            return "triton", "multimodal models run on the Triton prefill path"
    return "flashinfer", "the default"


def int4_attention_backend(argv: List[str]) -> Tuple[str, str]:
    """(prefill path, why) the launcher serves INT4 KV on: the --attention-backend given, else
    :func:`default_int4_backend`."""
    backend = _flag_value(argv, "--attention-backend")
    return (backend, "--attention-backend") if backend is not None else default_int4_backend(argv)


def prepare_int4_argv(config: KVQuantConfig, argv: List[str]) -> List[str]:
    """Check flag combinations for INT4 KV; default the attention backend (default_int4_backend)."""
    if not config.enabled:
        return argv
    backend = _flag_value(argv, "--attention-backend")
    if backend is not None and backend not in INT4_ATTENTION_BACKENDS:
        raise ConfigError(f"--kv-quant {config.method} runs on --attention-backend "
                          f"{' or '.join(INT4_ATTENTION_BACKENDS)}; got {backend!r}")
    effective, _ = int4_attention_backend(argv)
    for flag in ("--prefill-attention-backend", "--decode-attention-backend"):
        value = _flag_value(argv, flag)
        if value is not None and value != effective:
            raise ConfigError(f"--kv-quant {config.method} sets the prefill path with --attention-backend "
                              f"(decode always runs the INT4 kernel); drop {flag} {value}")
    graph = _flag_value(argv, "--cuda-graph-backend-prefill")
    if effective == "flashinfer" and graph in CAPTURED_PREFILL_GRAPHS:
        raise ConfigError(f"--kv-quant {config.method} with --attention-backend flashinfer does not support "
                          f"--cuda-graph-backend-prefill {graph}; use the default, breakable, or disabled")
    dtype = _flag_value(argv, "--kv-cache-dtype")
    if dtype not in (None, "auto", "bf16", "bfloat16"):
        raise ConfigError(f"--kv-quant {config.method} replaces --kv-cache-dtype; drop --kv-cache-dtype {dtype}")
    refused = {
        "--speculative-algorithm": "speculative decoding",
        "--enable-hierarchical-cache": "the hierarchical (host) KV cache",
        "--disaggregation-mode": "prefill/decode disaggregation",
        "--enable-deterministic-inference": "deterministic inference",
        "--enable-dp-attention": "DP attention",
        "--enable-mis": "multi-item scoring",
    }
    for flag, what in refused.items():
        present = any(a == flag or a.startswith(flag + "=") for a in argv)
        if present and not (flag == "--disaggregation-mode" and _flag_value(argv, flag) == "null"):
            raise ConfigError(f"--kv-quant {config.method} does not support {what} ({flag})")
    for flag in ("--dcp-size", "--attn-cp-size", "--context-parallel-size"):
        value = _flag_value(argv, flag)
        if value not in (None, "1"):
            raise ConfigError(f"--kv-quant {config.method} does not support context parallelism ({flag} {value})")
    if config.debug_check_attention:
        eager = ("--disable-cuda-graph" in argv or "--disable-decode-cuda-graph" in argv
                 or _flag_value(argv, "--cuda-graph-backend-decode") == "disabled")
        if not eager:
            raise ConfigError("--kv-quant-debug-check-attention runs Python checks that a replayed CUDA graph "
                              "skips; add --disable-decode-cuda-graph")
        if "--disable-prefill-cuda-graph" not in argv:
            argv = argv + ["--disable-prefill-cuda-graph"]
    if backend is None:
        argv = argv + ["--attention-backend", effective]
    model_path = _flag_value(argv, "--model-path") or _flag_value(argv, "--model")
    if model_path is not None and os.path.isdir(model_path):
        from sglang_sawint4.model_check import check_model, load_hf_config

        check_model(load_hf_config(model_path), config)
    return argv


def looks_local(path: str) -> bool:
    """Whether --model-path names a file-system path rather than a hub id ("org/name")."""
    return (os.path.isabs(path) or path.startswith(("./", "../", "~")) or os.path.exists(path)
            or path.count("/") > 1)


def check_model_path(argv: List[str]) -> None:
    """A local --model-path must be a model directory (config.json) or a GGUF file."""
    path = _flag_value(argv, "--model-path") or _flag_value(argv, "--model")
    if path is None or not looks_local(path):
        return
    full = os.path.expanduser(path)
    if not os.path.exists(full):
        raise ConfigError(f"--model-path {path}: no such directory")
    if os.path.isfile(full):
        if not full.endswith(".gguf"):
            raise ConfigError(f"--model-path {path}: a file, not a model directory (or .gguf file)")
        return
    if not os.path.isfile(os.path.join(full, "config.json")):
        raise ConfigError(f"--model-path {path}: not a model directory (no config.json)")


POLICY_LOG_PREFIX = "sglang-sawint4: KV policy"
PREFILL_LOG_PREFIX = "sglang-sawint4: INT4 KV prefill on"


def resolve_served_policy(config: KVQuantConfig, argv: List[str], env) -> str:
    """Resolve the KV policy for the model (calibrating it on the first start), save it where
    every worker reads it, and return the start-up log line (the file and the description)."""
    from sglang_sawint4.model_check import load_hf_config
    from sglang_sawint4.policy import ModelFacts, PolicyError, cache_dir, local_model_dir, resolve_policy

    path = _flag_value(argv, "--model-path") or _flag_value(argv, "--model")
    local = local_model_dir(path, download=True) if path else None
    if local is None:
        raise ConfigError(f"--kv-quant needs the model's files to choose its KV policy; {path} is neither a "
                          "local model directory nor a hub id that could be downloaded")
    try:
        facts = ModelFacts.from_hf_config(load_hf_config(local))
        policy = resolve_policy(config.policy, local, facts, config.method, config.block_size, config.rotate,
                                config.symmetric, config.bf16_layers)
    except PolicyError as e:
        raise ConfigError(str(e)) from None
    try:
        out = policy.save_in(cache_dir())
    except OSError as e:
        raise ConfigError(f"cannot write the KV policy under {cache_dir()} ({e.strerror}); set "
                          f"SGLANG_SAWINT4_CACHE_DIR to a writable directory") from None
    env[ENV_POLICY_FILE] = out
    return f"{POLICY_LOG_PREFIX} ({out}): {policy.describe()}"


def ensure_plugin_reaches_workers(env) -> None:
    """SGLang's worker processes get the patches only through our plugin entry point."""
    from importlib.metadata import entry_points

    names = {ep.name for ep in entry_points(group=PLUGIN_GROUP)}
    if PLUGIN_NAME not in names:
        raise ConfigError(
            "the sglang-sawint4 plugin entry point is not installed, so SGLang's scheduler "
            "processes would run without the INT4 patches; pip install the package (not only "
            "put it on PYTHONPATH)")
    allowed = env.get("SGLANG_PLUGINS")
    if allowed and PLUGIN_NAME not in {x.strip() for x in allowed.split(",")}:
        env["SGLANG_PLUGINS"] = allowed + "," + PLUGIN_NAME


def print_help() -> None:
    parser = argparse.ArgumentParser(prog=PROG, add_help=False)
    add_cli_args(parser)
    print(parser.format_help())
    print("All other flags are SGLang's (python -m sglang.launch_server --help).")


def missing_dependency(e: ImportError) -> ConfigError:
    """One line naming the Python package an import could not find."""
    missing = getattr(e, "name", None) or str(e)
    return ConfigError(f"cannot import SGLang: missing Python package {missing!r} ({e}); install the serving "
                       f"dependencies: pip install '.[serve]' (or the offline bundle, see the README)")


def import_sglang():
    """SGLang's launcher entry points (a missing package: ConfigError)."""
    try:
        from sglang.launch_server import run_server
        from sglang.srt.plugins import load_plugins
        from sglang.srt.server_args import prepare_server_args
        from sglang.srt.utils import kill_process_tree
    except ImportError as e:
        raise missing_dependency(e) from None
    return run_server, load_plugins, prepare_server_args, kill_process_tree


def main(argv: Optional[List[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print_help()
        return
    from sglang_sawint4.patches.sglang_0_5_17 import UnsupportedSGLangVersion, check_sglang_version

    try:
        config, sglang_argv = split_args(argv)
        check_model_path(sglang_argv)
        # before the default joins the flags
        prefill, why = int4_attention_backend(sglang_argv) if config.enabled else (None, None)
        sglang_argv = prepare_int4_argv(config, sglang_argv)
        if config.enabled:
            try:
                check_sglang_version()
            except ImportError as e:
                raise missing_dependency(e) from None
        run_server, load_plugins, prepare_server_args, kill_process_tree = import_sglang()
        if config.enabled:
            ensure_plugin_reaches_workers(os.environ)
            config.to_env(os.environ)  # inherited by every process SGLang spawns
            print(resolve_served_policy(config, sglang_argv, os.environ), file=sys.stderr, flush=True)
            print(f"{PREFILL_LOG_PREFIX} {prefill} ({why}); decode on the INT4 Triton kernel", file=sys.stderr, flush=True)
        else:
            for name in ALL_ENV:  # a stale setting must not turn the plugin on in the workers
                os.environ.pop(name, None)
    except (ConfigError, UnsupportedSGLangVersion) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        sys.exit(2)

    # From here on this is sglang.launch_server's __main__.
    load_plugins()  # runs our entry point here (and again in every SGLang worker process)
    server_args = prepare_server_args(sglang_argv)
    try:
        run_server(server_args)
    finally:
        kill_process_tree(os.getpid(), include_parent=False)


if __name__ == "__main__":
    main()
