"""User-facing configuration of the INT4 KV cache: CLI flags and their environment form.

The launcher parses our flags, validates them and writes them into the
environment; SGLang's spawned scheduler / TP worker processes inherit the
environment and rebuild the same config there (custom CLI fields would be
dropped when SGLang turns argv into ``ServerArgs``).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Mapping, MutableMapping, Optional, Tuple

from sglang_sawint4 import format as fmt

ENV_METHOD = "SGLANG_SAWINT4_KV_QUANT"
ENV_BLOCK = "SGLANG_SAWINT4_BLOCK_SIZE"
ENV_ROTATE = "SGLANG_SAWINT4_ROTATE"
ENV_SYMMETRIC = "SGLANG_SAWINT4_SYMMETRIC"
ENV_POISON = "SGLANG_SAWINT4_DEBUG_POISON_FREED"
ENV_CHECK_ATTENTION = "SGLANG_SAWINT4_DEBUG_CHECK_ATTENTION"
# the resolved KV policy file (written by the launcher, read by every worker's pool)
ENV_POLICY_FILE = "SGLANG_SAWINT4_POLICY_FILE"
ENV_STAGING_ROWS = "SGLANG_SAWINT4_PREFILL_STAGING_ROWS"
ALL_ENV = (ENV_METHOD, ENV_BLOCK, ENV_ROTATE, ENV_SYMMETRIC, ENV_POISON, ENV_CHECK_ATTENTION, ENV_POLICY_FILE,
           ENV_STAGING_ROWS)
#: Prefix rows the FlashInfer prefill path dequantizes at once (sglang_sawint4.flashinfer_prefill):
#: an 8k-token chunk after a 24k-token prefix, or 8 requests over a 4k-token radix hit, in one
#: piece; 128 MiB at 8 KV heads x head_dim 128 in BF16.
DEFAULT_STAGING_ROWS = 32768


class ConfigError(ValueError):
    """A bad flag value or flag combination; the message is one line for the user."""


@dataclass(frozen=True)
class KVQuantConfig:
    method: str = "none"  # none | int4 | int4-bdr
    block_size: Optional[int] = None  # None = min(128, head_dim) for int4-bdr
    rotate: str = "k"  # k | kv
    symmetric: bool = False
    debug_poison_freed: bool = False  # NaN scales in freed slots: a stale read shows as NaN output
    debug_check_attention: Optional[str] = None  # JSON-lines file of served-vs-reference checks
    policy: str = "auto"  # auto | none | a policy or calibration file (sglang_sawint4.policy)
    bf16_layers: Optional[Tuple[int, ...]] = None  # None: the policy decides
    prefill_staging_rows: int = DEFAULT_STAGING_ROWS  # FlashInfer prefill: prefix rows dequantized at once

    def __post_init__(self):
        if self.method not in fmt.METHODS:
            raise ConfigError(f"--kv-quant must be one of {', '.join(fmt.METHODS)}; got {self.method!r}")
        if self.rotate not in fmt.ROTATE_TARGETS:
            raise ConfigError(f"--kv-quant-rotate must be one of {', '.join(fmt.ROTATE_TARGETS)}; got {self.rotate!r}")
        if self.block_size is not None:
            if self.method != "int4-bdr":
                raise ConfigError("--kv-quant-block-size only applies to --kv-quant int4-bdr")
            if self.block_size not in fmt.ALLOWED_BLOCK_SIZES:
                raise ConfigError(
                    f"--kv-quant-block-size must be a power of two in {fmt.ALLOWED_BLOCK_SIZES}; got {self.block_size}")
        if self.rotate == "kv" and self.method != "int4-bdr":
            raise ConfigError("--kv-quant-rotate kv only applies to --kv-quant int4-bdr")
        if self.debug_check_attention and not self.enabled:
            raise ConfigError("--kv-quant-debug-check-attention needs --kv-quant int4 or int4-bdr")
        if not self.policy:
            raise ConfigError("--kv-quant-policy must be auto, none or a policy file")
        if self.policy not in ("auto", "none") and not os.path.isfile(self.policy):
            raise ConfigError(f"--kv-quant-policy {self.policy}: no such file (use auto, none or a policy file)")
        if self.prefill_staging_rows < 1:
            raise ConfigError(f"--kv-quant-prefill-staging-rows must be positive, got {self.prefill_staging_rows}")
        if (self.policy != "auto" or self.bf16_layers is not None) and not self.enabled:
            raise ConfigError("--kv-quant-policy / --kv-quant-bf16-layers need --kv-quant int4 or int4-bdr")

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    def layout(self, head_dim: int) -> fmt.Int4Format:
        """The storage format for a model's head_dim (raises ConfigError if impossible)."""
        try:
            return fmt.Int4Format.for_method(self.method, head_dim, self.block_size, self.rotate, self.symmetric)
        except fmt.FormatError as e:
            raise ConfigError(str(e)) from None

    def describe(self) -> str:
        if not self.enabled:
            return "bf16 (SGLang default)"
        s = self.method
        if self.method == "int4-bdr":
            s += f" block={self.block_size or 'by policy'} rotate={self.rotate}"
        s += f" policy={self.policy}"
        if self.bf16_layers is not None:
            s += f" bf16_layers={list(self.bf16_layers)}"
        return s + (" symmetric" if self.symmetric else "")

    # -- environment round trip (parent -> spawned SGLang processes) ------------
    def to_env(self, env: MutableMapping[str, str]) -> None:
        env[ENV_METHOD] = self.method
        env[ENV_ROTATE] = self.rotate
        env[ENV_SYMMETRIC] = "1" if self.symmetric else "0"
        env[ENV_POISON] = "1" if self.debug_poison_freed else "0"
        if self.debug_check_attention:
            env[ENV_CHECK_ATTENTION] = os.path.abspath(self.debug_check_attention)
        else:
            env.pop(ENV_CHECK_ATTENTION, None)
        env[ENV_STAGING_ROWS] = str(self.prefill_staging_rows)
        if self.block_size is None:
            env.pop(ENV_BLOCK, None)
        else:
            env[ENV_BLOCK] = str(self.block_size)

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> "KVQuantConfig":
        block, rows = env.get(ENV_BLOCK), env.get(ENV_STAGING_ROWS)
        try:
            block_size = int(block) if block else None
            staging_rows = int(rows) if rows else DEFAULT_STAGING_ROWS
        except ValueError:
            raise ConfigError(f"{ENV_BLOCK} and {ENV_STAGING_ROWS} must be integers, got {block!r}, {rows!r}") from None
        return cls(
            method=env.get(ENV_METHOD, "none") or "none",
            block_size=block_size,
            rotate=env.get(ENV_ROTATE, "k") or "k",
            symmetric=env.get(ENV_SYMMETRIC, "0") == "1",
            debug_poison_freed=env.get(ENV_POISON, "0") == "1",
            debug_check_attention=env.get(ENV_CHECK_ATTENTION) or None,
            prefill_staging_rows=staging_rows,
        )

    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> "KVQuantConfig":
        return cls(method=ns.kv_quant, block_size=ns.kv_quant_block_size, rotate=ns.kv_quant_rotate,
                   symmetric=ns.kv_quant_symmetric, debug_poison_freed=ns.kv_quant_debug_poison,
                   debug_check_attention=ns.kv_quant_debug_check_attention,
                   policy=ns.kv_quant_policy, bf16_layers=parse_layer_list(ns.kv_quant_bf16_layers),
                   prefill_staging_rows=ns.kv_quant_prefill_staging_rows)


def parse_layer_list(text: Optional[str]) -> Optional[Tuple[int, ...]]:
    """'0,27' -> (0, 27); 'none' or '' -> (); None -> None (not given)."""
    if text is None:
        return None
    if text.strip().lower() in ("", "none"):
        return ()
    try:
        layers = tuple(sorted({int(x) for x in text.split(",") if x.strip()}))
    except ValueError:
        raise ConfigError(f"--kv-quant-bf16-layers takes comma-separated layer ids or 'none', got {text!r}") from None
    if any(l < 0 for l in layers):
        raise ConfigError(f"--kv-quant-bf16-layers takes layer ids >= 0, got {text!r}")
    return layers


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("sglang-sawint4 (rotated INT4 KV cache)")
    g.add_argument("--kv-quant", default="none", metavar="{none,int4,int4-bdr}",
                   help="KV cache storage: none = SGLang unchanged (BF16 or --kv-cache-dtype), "
                        "int4 = token-wise INT4, int4-bdr = INT4 after block-diagonal Hadamard rotation")
    g.add_argument("--kv-quant-policy", default="auto", metavar="{auto,none,FILE}",
                   help="per-layer KV policy: auto (default) calibrates the model once (cached) and keeps "
                        "outlier layers in BF16, centers keys where that helps and picks the Hadamard "
                        "block; none = every layer INT4 as in the paper; FILE = a policy written by "
                        "python -m sglang_sawint4.policy resolve")
    g.add_argument("--kv-quant-bf16-layers", default=None, metavar="LIST",
                   help="layers that keep BF16 K/V, e.g. 0,27, or none (overrides the policy's choice)")
    g.add_argument("--kv-quant-block-size", type=_int_arg("--kv-quant-block-size"), default=None,
                   help="Hadamard block size for int4-bdr: 16, 32, 64 or 128 dividing head_dim "
                        "(default: the policy's choice; min(128, head_dim) with --kv-quant-policy none)")
    g.add_argument("--kv-quant-rotate", default="k", metavar="{k,kv}",
                   help="rotate keys only (default, the paper's served config) or keys and values")
    g.add_argument("--kv-quant-symmetric", action="store_true",
                   help="symmetric INT4 grid instead of the default asymmetric min/max grid")
    g.add_argument("--kv-quant-prefill-staging-rows", type=_int_arg("--kv-quant-prefill-staging-rows"),
                   default=DEFAULT_STAGING_ROWS, metavar="N",
                   help="--attention-backend flashinfer: BF16 rows that a prefill's cached prefix is "
                        f"dequantized into (default {DEFAULT_STAGING_ROWS}); reserved at start-up out of the KV "
                        "pool's memory; a batch whose prefix and new tokens fit runs one attention call, longer "
                        "prefixes run in pieces")
    g.add_argument("--kv-quant-debug-poison", action="store_true",
                   help="debug: write NaN scales into KV slots when SGLang frees them, so any later "
                        "read of a stale slot turns the output into NaN (slower frees)")
    g.add_argument("--kv-quant-debug-check-attention", metavar="PATH", default=None,
                   help="debug: compare the first attention calls of every layer with a float64 torch "
                        "reference of the same INT4 pages and append the results to PATH (JSON lines); "
                        "needs --disable-decode-cuda-graph")


def _int_arg(flag):
    def parse(s):
        try:
            return int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} takes an integer, got {s!r}") from None

    return parse
