"""The KV policy: how each layer of a model stores its K/V.

SAW-INT4 stores every layer's K/V as rotated INT4.  On some model families one layer
breaks that (Qwen2/2.5: a huge k_proj bias makes constant key channels that eat every
token's INT4 range, and layer 0 attends through them).  A policy says, per model:

* ``block_size``: the Hadamard block (None: plain INT4);
* ``bf16_layers``: layers that keep BF16 K/V inside the same pool;
* ``key_centers``: per layer, a constant vector c subtracted from every key before the
  rotation (``format``: softmax-invariant, so decode needs no change).

``--kv-quant-policy auto`` (the default) decides from a calibration record
(``sglang_sawint4.calibration``: per-layer attention-output error of every candidate
format on a shipped text), made once per model in a subprocess and cached;
``decide`` is the rule.  ``none`` is the paper's configuration (every layer INT4, no
centering); a path names a policy or calibration file.  When calibration is impossible
(unknown architecture, no local weights, no device) the policy falls back to a stated
choice: layer 0 in BF16, no centering, the default block.

    python -m sglang_sawint4.policy show --model-path DIR            # what the server would serve
    python -m sglang_sawint4.policy resolve --model-path DIR --out policy.json
    python -m sglang_sawint4.policy calibrate --model-path DIR --out record.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from sglang_sawint4 import format as fmt

POLICY_VERSION = 1
# The auto policy keeps at least this multiple of BF16's KV capacity.
MIN_CAPACITY_VS_BF16 = 3.0
# A layer keeps BF16 K/V when quantizing it alone moves the model's next-token distribution
# (KL from the exact model) more than both BF16_MIN_KL and BF16_OUTLIER_FACTOR x the median
# layer's (see docs/design-notes.md).
BF16_MIN_KL = 0.003
BF16_OUTLIER_FACTOR = 3.0
# The fallback without calibration: these layers in BF16 (capacity permitting).
FALLBACK_BF16_LAYERS = (0,)
CALIBRATION_TIMEOUT_S = 1800
ENV_CACHE_DIR = "SGLANG_SAWINT4_CACHE_DIR"


class PolicyError(ValueError):
    """A policy that does not fit the model or the flags; one line for the user."""


@dataclass(frozen=True)
class ModelFacts:
    """What a policy must agree with: the model's attention shape (all TP ranks together)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def from_hf_config(cls, hf: Mapping) -> "ModelFacts":
        heads = hf.get("num_attention_heads")
        head_dim = hf.get("head_dim") or (hf["hidden_size"] // heads if heads else None)
        return cls(int(hf["num_hidden_layers"]), int(hf.get("num_key_value_heads") or heads), int(head_dim))


@dataclass(frozen=True)
class KVPolicy:
    method: str  # int4 | int4-bdr
    facts: ModelFacts
    block_size: Optional[int] = None
    rotate: str = "k"
    symmetric: bool = False
    bf16_layers: Tuple[int, ...] = ()
    # layer -> [num_kv_heads, head_dim] float32, original space (every KV head of the model)
    key_centers: Dict[int, torch.Tensor] = field(default_factory=dict, compare=False, hash=False, repr=False)
    source: str = ""
    reasons: Dict[str, str] = field(default_factory=dict, compare=False, hash=False, repr=False)

    def __post_init__(self):
        bad = [l for l in (*self.bf16_layers, *self.key_centers) if not 0 <= l < self.facts.num_layers]
        if bad:
            raise PolicyError(f"layer ids {sorted(set(bad))} are outside the model's {self.facts.num_layers} layers")
        overlap = set(self.bf16_layers) & set(self.key_centers)
        if overlap:
            raise PolicyError(f"layers {sorted(overlap)} cannot be both BF16 and centered")
        for l, c in self.key_centers.items():
            if tuple(c.shape) != (self.facts.num_kv_heads, self.facts.head_dim):
                raise PolicyError(f"key center of layer {l} has shape {tuple(c.shape)}, expected "
                                  f"[{self.facts.num_kv_heads}, {self.facts.head_dim}]")
        self.layout()  # raises for an impossible format

    # -- the format ---------------------------------------------------------------
    def layout(self) -> fmt.Int4Format:
        try:
            return fmt.Int4Format.for_method(self.method, self.facts.head_dim, self.block_size, self.rotate,
                                             self.symmetric)
        except fmt.FormatError as e:
            raise PolicyError(str(e)) from None

    @property
    def centered_layers(self) -> Tuple[int, ...]:
        return tuple(sorted(self.key_centers))

    def bytes_per_token(self, layers: Optional[Sequence[int]] = None, num_kv_heads: Optional[int] = None) -> int:
        """KV bytes one token costs over ``layers`` (default all) and ``num_kv_heads`` (default all)."""
        layers = range(self.facts.num_layers) if layers is None else layers
        heads = self.facts.num_kv_heads if num_kv_heads is None else num_kv_heads
        return fmt.kv_bytes_per_token(heads, layers, self.layout(), self.bf16_layers)

    def bf16_bytes_per_token(self) -> int:
        return self.facts.num_kv_heads * self.facts.num_layers * fmt.bf16_bytes_per_token_head(self.facts.head_dim)

    def capacity_vs_bf16(self) -> float:
        return self.bf16_bytes_per_token() / self.bytes_per_token()

    def describe(self) -> str:
        """One line for the start-up log."""
        fmt_s = "plain INT4" if self.block_size is None else f"INT4 + BDR-{self.block_size} on {self.rotate.upper()}"
        bf16 = (f"BF16 layers {list(self.bf16_layers)}" + (f" ({self.reasons['bf16']})" if "bf16" in self.reasons else "")
                if self.bf16_layers else "no BF16 layers")
        n_c = len(self.key_centers)
        centered = f"keys centered in {n_c} of {self.facts.num_layers} layers" if n_c else "no key centering"
        return (f"{fmt_s}{' symmetric' if self.symmetric else ''}; {bf16}; {centered}; "
                f"{self.bytes_per_token():,} KV B/token vs {self.bf16_bytes_per_token():,} in BF16 "
                f"({self.capacity_vs_bf16():.2f}x); policy: {self.source}")

    def summary(self) -> dict:
        """The compact form results files record next to a row."""
        return {"method": self.method, "block": self.block_size, "rotate": self.rotate,
                "bf16_layers": list(self.bf16_layers), "centered_layers": list(self.centered_layers),
                "capacity_vs_bf16": round(self.capacity_vs_bf16(), 4), "source": self.source}

    # -- tensor parallelism -------------------------------------------------------------
    def rank_kv_heads(self, tp_rank: int, tp_size: int) -> List[int]:
        """The KV heads attention TP rank ``tp_rank`` holds (SGLang's QKVParallelLinear: heads
        split evenly, or each head replicated on tp_size / num_kv_heads consecutive ranks)."""
        total = self.facts.num_kv_heads
        per = max(1, total // tp_size)
        replicas = max(1, tp_size // total)
        shard = tp_rank // replicas
        return list(range(shard * per, shard * per + per))

    def rank_key_centers(self, tp_rank: int, tp_size: int) -> Dict[int, torch.Tensor]:
        heads = self.rank_kv_heads(tp_rank, tp_size)
        return {l: c[heads].contiguous() for l, c in self.key_centers.items()}

    # -- files ------------------------------------------------------------------
    def to_json(self) -> dict:
        return {"version": POLICY_VERSION, "method": self.method, **self.facts.__dict__,
                "block_size": self.block_size, "rotate": self.rotate, "symmetric": self.symmetric,
                "bf16_layers": list(self.bf16_layers),
                "key_centers": {str(l): c.tolist() for l, c in sorted(self.key_centers.items())},
                "source": self.source, "reasons": self.reasons,
                "capacity_vs_bf16": round(self.capacity_vs_bf16(), 4)}

    @classmethod
    def from_json(cls, d: dict) -> "KVPolicy":
        if d.get("version") != POLICY_VERSION:
            raise PolicyError(f"policy file version {d.get('version')} != {POLICY_VERSION}")
        facts = ModelFacts(int(d["num_layers"]), int(d["num_kv_heads"]), int(d["head_dim"]))
        centers = {int(l): torch.tensor(c, dtype=torch.float32) for l, c in d.get("key_centers", {}).items()}
        return cls(d["method"], facts, d.get("block_size"), d.get("rotate", "k"), bool(d.get("symmetric")),
                   tuple(int(x) for x in d.get("bf16_layers", ())), centers, d.get("source", ""),
                   dict(d.get("reasons", {})))

    def save(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.to_json(), f)
        os.replace(tmp, path)  # atomic: workers of another server may be reading it

    def save_in(self, directory: str) -> str:
        """Save under a name made from the content (the same policy, the same file); returns the path."""
        digest = hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()[:16]
        path = os.path.join(directory, f"policy-{digest}.json")
        self.save(path)
        return path

    @classmethod
    def load(cls, path: str) -> "KVPolicy":
        with open(path) as f:
            return cls.from_json(json.load(f))

    def replace(self, **changes) -> "KVPolicy":
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d.update(changes)
        return KVPolicy(**d)

    def with_bf16_layers(self, layers: Sequence[int]) -> "KVPolicy":
        """The user's ``--kv-quant-bf16-layers``: exactly these layers BF16, none of them centered."""
        keep = tuple(sorted(set(layers)))
        return self.replace(bf16_layers=keep, key_centers={l: c for l, c in self.key_centers.items() if l not in keep})


# --------------------------------------------------------------------------- #
# the rule
# --------------------------------------------------------------------------- #
def bf16_layer_budget(facts: ModelFacts, layout: fmt.Int4Format, min_capacity: float) -> int:
    """The most layers that can keep BF16 K/V with capacity >= min_capacity x BF16."""
    layers = range(facts.num_layers)
    bf16 = facts.num_layers * fmt.bf16_bytes_per_token_head(facts.head_dim)
    n = 0
    while n < facts.num_layers and bf16 >= min_capacity * fmt.kv_bytes_per_token(1, layers, layout, range(n + 1)):
        n += 1
    return n


def decide(record, block: Optional[int] = None, bf16_layers: Optional[Sequence[int]] = None,
           min_capacity: float = MIN_CAPACITY_VS_BF16, source: str = "auto") -> KVPolicy:
    """The policy from a calibration record (``calibration.CalibrationRecord``).

    The block is the record's ``kl_block`` (the lowest end-to-end KL with every layer
    quantized; near-ties go to the larger block).  Keys are centered in the layers where that
    lowers the attention-output error (``CalibrationRecord.centered``).  Layers whose KL when
    quantized alone is an outlier (above BF16_MIN_KL and BF16_OUTLIER_FACTOR x the median
    layer's) keep BF16 K/V, the largest first, as many as the capacity floor allows.
    ``block`` and ``bf16_layers`` pin those choices (the user's overrides; the per-layer KLs
    were measured at ``kl_block``).
    """
    facts = ModelFacts(record.num_layers, record.num_kv_heads, record.head_dim)
    layers = sorted(record.layers)
    available = sorted(next(iter(record.layers.values())).errors, reverse=True)  # larger blocks first
    b = (0 if record.method == "int4" else record.kl_block) if block is None else block
    if b not in available:
        raise PolicyError(f"block {block} was not calibrated for this model (calibrated: "
                          f"{[x or 'plain' for x in available]})")
    layout = fmt.Int4Format.for_method(record.method, facts.head_dim, b or None, record.rotate, record.symmetric)
    kls = {l: record.layers[l].kl for l in layers}
    reasons = {"layer_kl": {str(l): round(v, 5) for l, v in kls.items()},
               "block": (f"BDR-{b}" if b else "plain INT4") + (" (given)" if block is not None else
                        ": lowest end-to-end KL, " + ", ".join(f"{'BDR-' + str(x) if x else 'plain'} "
                                                              f"{record.kl_full[x]:.4f}" for x in available))}
    if bf16_layers is None:
        median = statistics.median(kls.values())
        bar = max(BF16_MIN_KL, BF16_OUTLIER_FACTOR * median)
        budget = bf16_layer_budget(facts, layout, min_capacity)
        chosen = tuple(sorted(sorted((l for l in layers if kls[l] > bar), key=lambda l: -kls[l])[:budget]))
        if chosen:
            reasons["bf16"] = (f"quantized alone, {', '.join(f'L{l} KL {kls[l]:.4f}' for l in chosen)} > {bar:.4f} "
                               f"(median {median:.4f})")
    else:
        chosen = tuple(sorted(set(bf16_layers)))
        reasons["bf16"] = "given"
    centered = record.centered(b)
    centers = {l: record.layers[l].center for l in layers if centered[l] and l not in chosen}
    return KVPolicy(record.method, facts, b or None, record.rotate, record.symmetric, chosen, centers, source, reasons)


def plain_policy(method: str, facts: ModelFacts, block: Optional[int] = None, rotate: str = "k",
                 symmetric: bool = False, bf16_layers: Sequence[int] = (), source: str = "none") -> KVPolicy:
    """Every layer in one INT4 format, no centering (the paper's configuration); with
    ``bf16_layers`` those layers keep BF16.  int4-bdr without a block takes the default block."""
    if method == "int4-bdr" and block is None:
        block = fmt.default_block_size(facts.head_dim)
    return KVPolicy(method, facts, block if method == "int4-bdr" else None, rotate, symmetric,
                    tuple(sorted(set(bf16_layers))), {}, source)


def fallback_policy(method: str, facts: ModelFacts, block=None, rotate="k", symmetric=False,
                    why: str = "", min_capacity: float = MIN_CAPACITY_VS_BF16) -> KVPolicy:
    """The stated choice when the model cannot be calibrated: FALLBACK_BF16_LAYERS in BF16
    (as many as the capacity floor allows), no centering, the given or default block."""
    layout = fmt.Int4Format.for_method(method, facts.head_dim, block, rotate, symmetric)
    keep = FALLBACK_BF16_LAYERS[: bf16_layer_budget(facts, layout, min_capacity)]
    return plain_policy(method, facts, layout.block_size, rotate, symmetric, keep,
                        source=f"auto: fallback without calibration ({why})")


# --------------------------------------------------------------------------- #
# resolving a policy for a model (the launcher)
# --------------------------------------------------------------------------- #
def cache_dir() -> str:
    return os.environ.get(ENV_CACHE_DIR) or os.path.join(os.path.expanduser("~"), ".cache", "sglang_sawint4")


def model_fingerprint(model_path: str, method: str, rotate: str, symmetric: bool) -> str:
    """What a calibration record depends on: the model's config and weight files (names and
    sizes), the calibration text and code version, and the format family."""
    from sglang_sawint4 import calibration

    with open(os.path.join(model_path, "config.json"), "rb") as f:
        config = f.read()
    weights = sorted((n, os.path.getsize(os.path.join(model_path, n))) for n in os.listdir(model_path)
                     if n.endswith((".safetensors", ".bin")))
    h = hashlib.sha256()
    for part in (config, json.dumps(weights).encode(), calibration.calibration_text().encode(),
                 f"{calibration.RECORD_VERSION}/{calibration.CALIBRATION_TOKENS}/{method}/{rotate}/{symmetric}".encode()):
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()


def calibration_record(model_path: str, method: str, rotate: str, symmetric: bool, timeout_s=CALIBRATION_TIMEOUT_S):
    """(record, note): the cached calibration record of this model, made by a subprocess on a
    miss (it needs the GPU briefly; its CUDA context must be gone before SGLang sizes memory)."""
    from sglang_sawint4.calibration import CalibrationRecord

    path = os.path.join(cache_dir(), f"calibration-{model_fingerprint(model_path, method, rotate, symmetric)[:24]}.json")
    if os.path.isfile(path):
        return CalibrationRecord.load(path), f"calibrated, cached at {path}"
    os.makedirs(cache_dir(), exist_ok=True)
    cmd = [sys.executable, "-m", "sglang_sawint4.policy", "calibrate", "--model-path", model_path, "--method", method,
           "--rotate", rotate, "--out", path] + (["--symmetric"] if symmetric else [])
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0 or not os.path.isfile(path):
        lines = [l for l in (proc.stderr or proc.stdout or "").strip().splitlines() if l.strip()]
        raise RuntimeError(lines[-1] if lines else f"calibration exited with {proc.returncode}")
    record = CalibrationRecord.load(path)
    return record, f"calibrated in {time.time() - t0:.1f} s on {record.device}, cached at {path}"


def resolve_policy(spec: str, model_path: str, facts: ModelFacts, method: str,
                   block: Optional[int] = None, rotate: str = "k", symmetric: bool = False,
                   bf16_layers: Optional[Sequence[int]] = None) -> KVPolicy:
    """The policy the server will use for the model in local directory ``model_path`` (see the
    module docstring); ``block`` and ``bf16_layers`` are the user's overrides.  Raises
    PolicyError for a policy that does not fit."""
    if spec == "none":
        return plain_policy(method, facts, block, rotate, symmetric, bf16_layers or (),
                            source="none (every layer INT4)" if not bf16_layers else "none, BF16 layers given")
    if spec != "auto":
        policy = load_policy_file(spec, method, block, rotate, symmetric, bf16_layers)
        if policy.facts != facts:
            raise PolicyError(f"{spec} was made for {policy.facts}, the model has {facts}")
        return policy
    try:
        record, note = calibration_record(model_path, method, rotate, symmetric)
        record_facts = ModelFacts(record.num_layers, record.num_kv_heads, record.head_dim)
        if record_facts != facts:
            raise RuntimeError(f"calibration saw {record_facts}, config.json says {facts}")
    except Exception as e:  # noqa: BLE001 - any failure to calibrate gets the stated fallback
        policy = fallback_policy(method, facts, block, rotate, symmetric, why=str(e).strip()[:200])
        return policy if bf16_layers is None else policy.with_bf16_layers(bf16_layers)
    return decide(record, block, bf16_layers, source=f"auto: {note}")


def served_policy(config, facts: ModelFacts) -> KVPolicy:
    """The policy a worker serves: the file the launcher resolved (``ENV_POLICY_FILE``),
    checked against the model; without one (patches applied outside the launcher, e.g. in
    tests or an embedding engine), every layer in the configured INT4 format."""
    from sglang_sawint4.config import ENV_POLICY_FILE

    path = os.environ.get(ENV_POLICY_FILE)
    if not path:
        return plain_policy(config.method, facts, config.block_size, config.rotate, config.symmetric,
                            config.bf16_layers or (), source="configured format (no policy file from the launcher)")
    policy = _load_cached(path)
    if policy.facts != facts:
        raise PolicyError(f"the KV policy {path} was made for {policy.facts}, this model has {facts}")
    if (policy.method, policy.rotate, policy.symmetric) != (config.method, config.rotate, config.symmetric):
        raise PolicyError(f"the KV policy {path} is {policy.method} rotate={policy.rotate}, the server runs "
                          f"{config.method} rotate={config.rotate}")
    return policy


_loaded: Dict[str, KVPolicy] = {}


def _load_cached(path: str) -> KVPolicy:
    if path not in _loaded:
        _loaded[path] = KVPolicy.load(path)
    return _loaded[path]


def load_policy_file(path: str, method: str, block=None, rotate="k", symmetric=False, bf16_layers=None) -> KVPolicy:
    """A resolved policy file, or a calibration record decided with the overrides."""
    from sglang_sawint4.calibration import CalibrationRecord

    try:
        with open(path) as f:
            d = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise PolicyError(f"cannot read the KV policy file {path}: {e}") from None
    if "layers" in d:
        record = CalibrationRecord.from_json(d)
        if (record.method, record.rotate, record.symmetric) != (method, rotate, symmetric):
            raise PolicyError(f"{path} calibrates {record.method} rotate={record.rotate} symmetric="
                              f"{record.symmetric}, not the requested {method} rotate={rotate} symmetric={symmetric}")
        return decide(record, block, bf16_layers, source=f"calibration file {path}")
    policy = KVPolicy.from_json(d).replace(source=f"file {path}")
    if policy.method != method or (block is not None and policy.block_size != block):
        raise PolicyError(f"{path} is a {policy.method} policy with block {policy.block_size}, "
                          f"not the requested {method}" + (f" block {block}" if block else ""))
    return policy if bf16_layers is None else policy.with_bf16_layers(bf16_layers)


# what SGLang itself fetches of a hub model (weights, configs, tokenizer files)
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja"]


def local_model_dir(model_path: str, download: bool = False) -> Optional[str]:
    """A local directory for ``--model-path``: the path itself, or the local Hugging Face cache
    copy of a hub id (fetched first with ``download``, as SGLang would); None if neither."""
    if os.path.isdir(model_path):
        return model_path
    try:
        from huggingface_hub import snapshot_download

        try:
            return snapshot_download(model_path, local_files_only=True)
        except Exception:  # noqa: BLE001 - not in the cache
            if not download:
                return None
            return snapshot_download(model_path, allow_patterns=HUB_PATTERNS)
    except Exception:  # noqa: BLE001 - not a hub id, offline, or no huggingface_hub
        return None


# --------------------------------------------------------------------------- #
# command line
# --------------------------------------------------------------------------- #
def _calibrate_main(args) -> None:
    from sglang_sawint4.calibration import calibrate, load_model

    tok, model = load_model(args.model_path, args.device)
    record = calibrate(model, tok, args.method, args.rotate, args.symmetric, model_name=args.model_path)
    record.save(args.out)
    print(f"calibrated {record.num_layers} layers in {record.seconds} s on {record.device} -> {args.out}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m sglang_sawint4.policy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("calibrate", "show", "resolve"):
        a = sub.add_parser(name)
        a.add_argument("--model-path", required=True)
        a.add_argument("--method", default="int4-bdr", choices=["int4", "int4-bdr"])
        a.add_argument("--rotate", default="k", choices=list(fmt.ROTATE_TARGETS))
        a.add_argument("--symmetric", action="store_true")
        if name == "calibrate":
            a.add_argument("--out", required=True)
            a.add_argument("--device", default=None, help="default: cuda when available, else cpu")
        else:
            a.add_argument("--policy", default="auto", help="auto, none, or a policy / calibration file")
            a.add_argument("--block-size", type=int, default=None)
            a.add_argument("--bf16-layers", default=None, help="comma-separated layer ids, or 'none'")
            if name == "resolve":
                a.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.cmd == "calibrate":
        _calibrate_main(args)
        return
    from sglang_sawint4.config import parse_layer_list
    from sglang_sawint4.model_check import load_hf_config

    try:
        facts = ModelFacts.from_hf_config(load_hf_config(args.model_path))
        policy = resolve_policy(args.policy, args.model_path, facts, args.method, args.block_size, args.rotate,
                                args.symmetric, parse_layer_list(args.bf16_layers))
    except (PolicyError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(policy.describe())
    if args.cmd == "resolve":
        policy.save(args.out)
        print(f"-> {args.out}")
    else:
        for l, kl in policy.reasons.get("layer_kl", {}).items():
            tag = "BF16" if int(l) in policy.bf16_layers else "centered" if int(l) in policy.key_centers else ""
            print(f"  layer {l:>3}: KL quantized alone {kl:.5f} {tag}")


if __name__ == "__main__":
    main()
