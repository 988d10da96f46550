"""Calibration for the KV policy: one forward pass of the model over a shipped text.

The auto policy (``sglang_sawint4.policy``) decides from what this measures:

* per attention layer, the relative error of the layer's attention output when its K and V
  go through each candidate format (every Hadamard block the method allows, each with and
  without key centering) against exact attention, over the layer's own queries and causal
  mask: this decides where keys are centered;
* per layer, its key center c (``format``: keys may be stored as H (k - c));
* end to end, the KL divergence of the model's next-token distributions from the exact
  model's over the first SENSITIVITY_TOKENS tokens: with every layer quantized, for each
  block (which block), and with one layer quantized at a time, at the best block (which
  layers keep BF16).  An attention-output error says little about what a layer's error
  does downstream: once centered, every layer of Qwen2.5-Coder-1.5B has an ordinary attention
  error, while quantizing single layers still singles out two (layers 1 and 7 on an H200, at
  about 5x the median layer's KL).

c is the mean of the layer's post-RoPE keys over positions [0, max_positions), computed
from the mean m of its keys *before* RoPE (where a k_proj bias is one constant vector) and
the RoPE rotation averaged over those positions: c = mean_p R(p) m.  The plain mean of the
calibration window's post-RoPE keys would also center channel pairs that RoPE turns only
slowly, which are constant over a 2k-token window but rotate over a 32k one; there a fixed c
would add range instead of removing it.  Models whose RoPE this cannot reproduce (checked on
the window itself) fall back to that window mean, and the record says so.

The text (``data/calibration.txt``: the end of Jane Austen's *Sense and Sensibility*, public
domain, and a short Python module written for it) and the sampled query positions are fixed,
so a model's record is deterministic up to the device's arithmetic.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from importlib.resources import files
from typing import Dict, List, Optional, Tuple

import torch

from sglang_sawint4 import format as fmt

CALIBRATION_TOKENS = 2048
# queries per layer whose attention outputs are compared (evenly spread over the last
# three quarters of the window, where they see at least 512 keys)
MAX_QUERIES = 512
# the first token (BOS, an attention sink) has outlier keys of its own: kept out of the center
SKIP_FIRST_TOKENS = 1
# RoPE average over at most this many positions (longer contexts rotate those pairs even more)
MAX_ROPE_POSITIONS = 131072
# a layer's keys are centered when that lowers its attention-output error by this fraction
CENTER_MIN_GAIN = 0.02
# relative error within which the captured pre-RoPE keys, rotated the rotate_half way,
# must reproduce the keys attention saw (bf16 rounding is ~4e-3)
ROPE_CHECK_TOL = 0.05
# tokens of the end-to-end (KL) forwards: a prefix of the calibration window
SENSITIVITY_TOKENS = 1024
# blocks whose full-model KL is within this fraction of the best count as tied: the larger wins
BLOCK_KL_TIE = 0.02
RECORD_VERSION = 2


def calibration_text() -> str:
    return (files("sglang_sawint4") / "data" / "calibration.txt").read_text()


def candidate_blocks(method: str, head_dim: int) -> List[Optional[int]]:
    """Hadamard blocks the auto policy may choose: None (plain INT4) for ``int4``, every
    allowed block dividing head_dim for ``int4-bdr``."""
    if method == "int4":
        return [None]
    if method == "int4-bdr":
        return fmt.blocks_dividing(head_dim)
    raise ValueError(f"no INT4 candidates for method {method!r}")


@dataclass
class LayerRecord:
    """errors[block] = (error without centering, error with centering); block 0 = plain INT4.
    center: [num_kv_heads, head_dim] float32, original (post-RoPE) space."""

    errors: Dict[int, Tuple[float, float]]
    center: torch.Tensor
    kl: Optional[float] = None  # KL with only this layer quantized (at the record's kl_block)


@dataclass
class CalibrationRecord:
    model: str
    architecture: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    method: str
    rotate: str
    symmetric: bool
    tokens: int
    max_positions: int
    center_source: str  # "rope-average" | "window-mean: <why>"
    device: str
    seconds: float
    layers: Dict[int, LayerRecord] = field(default_factory=dict)
    kl_full: Dict[int, float] = field(default_factory=dict)  # block (0: plain) -> KL, every layer quantized
    kl_block: Optional[int] = None  # the block the per-layer KLs were measured at
    version: int = RECORD_VERSION

    def centered(self, block: int) -> Dict[int, bool]:
        """Per layer, whether centering its keys pays at this block (see CENTER_MIN_GAIN)."""
        return {l: r.errors[block][1] < r.errors[block][0] * (1 - CENTER_MIN_GAIN) for l, r in self.layers.items()}

    def to_json(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "layers"}
        d["kl_full"] = {str(b): v for b, v in self.kl_full.items()}
        d["layers"] = {str(l): {"errors": {str(b): list(e) for b, e in r.errors.items()},
                                "center": r.center.tolist(), "kl": r.kl} for l, r in sorted(self.layers.items())}
        return d

    @classmethod
    def from_json(cls, d: dict) -> "CalibrationRecord":
        if d.get("version") != RECORD_VERSION:
            raise ValueError(f"calibration record version {d.get('version')} != {RECORD_VERSION}")
        layers = {int(l): LayerRecord({int(b): tuple(e) for b, e in r["errors"].items()},
                                      torch.tensor(r["center"], dtype=torch.float32), r.get("kl"))
                  for l, r in d["layers"].items()}
        rest = {k: v for k, v in d.items() if k not in ("layers", "kl_full")}
        return cls(**rest, layers=layers, kl_full={int(b): v for b, v in d.get("kl_full", {}).items()})

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_json(), f)

    @classmethod
    def load(cls, path: str) -> "CalibrationRecord":
        with open(path) as f:
            return cls.from_json(json.load(f))


# --------------------------------------------------------------------------- #
# measurements
# --------------------------------------------------------------------------- #
def query_positions(tokens: int, max_queries: int = MAX_QUERIES) -> torch.Tensor:
    """Evenly spread query positions over the last three quarters of the window."""
    lo = tokens // 4
    n = min(max_queries, tokens - lo)
    return torch.linspace(lo, tokens - 1, n).round().long().unique()


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                     scale: float, window: Optional[int] = None) -> torch.Tensor:
    """Attention of the queries at ``positions`` over keys 0..position (float32).

    q: [num_q_heads, n, d] (rows of ``positions``); k, v: [num_kv_heads, tokens, d].
    window: sliding window (keys within ``window`` positions), or None.
    Returns [num_q_heads, n, d].
    """
    group = q.shape[0] // k.shape[0]
    k = k.float().repeat_interleave(group, 0)
    v = v.float().repeat_interleave(group, 0)
    s = torch.einsum("hnd,htd->hnt", q.float(), k) * scale
    t = torch.arange(k.shape[1], device=k.device)
    allowed = t[None, :] <= positions[:, None]
    if window:
        allowed &= t[None, :] > positions[:, None] - window
    s = s.masked_fill(~allowed[None], float("-inf"))
    return torch.einsum("hnt,htd->hnd", torch.softmax(s, -1), v)


def rel_error(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def rope_average(cos: torch.Tensor, sin: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(mean cos, mean sin) per rotated pair, [head_dim // 2] float64, of rotate_half RoPE
    tables cos, sin: [positions, head_dim] (channel i pairs with i + head_dim / 2)."""
    h = cos.shape[-1] // 2
    return cos[:, :h].double().mean(0), sin[:, :h].double().mean(0)


def rotate_half_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., tokens, d] rotated by rotate_half RoPE tables [tokens, d]."""
    h = x.shape[-1] // 2
    rotated = torch.cat([-x[..., h:], x[..., :h]], dim=-1)
    return x * cos + rotated * sin


def center_from_pre_rope(mean_pre: torch.Tensor, avg_cos: torch.Tensor, avg_sin: torch.Tensor) -> torch.Tensor:
    """mean_p R(p) m for pre-RoPE key means m [heads, d]: channel i and i + d/2 turn together."""
    h = mean_pre.shape[-1] // 2
    lo, hi = mean_pre[..., :h].double(), mean_pre[..., h:].double()
    return torch.cat([avg_cos * lo - avg_sin * hi, avg_cos * hi + avg_sin * lo], dim=-1).float()


def measure_layer(query, key, value, center, blocks, rotate_v: bool, symmetric: bool, scale: float,
                  window: Optional[int] = None, positions: Optional[torch.Tensor] = None) -> LayerRecord:
    """Attention-output errors of every candidate format for one layer.

    query: [num_q_heads, tokens, d]; key, value: [num_kv_heads, tokens, d] (post-RoPE);
    center: [num_kv_heads, d].  Returns the layer's record (errors per block, the center).
    """
    tokens, d = key.shape[1], key.shape[2]
    positions = query_positions(tokens) if positions is None else positions
    positions = positions.to(key.device)
    q = query[:, positions]
    exact = causal_attention(q, key, value, positions, scale, window)
    c = center.to(key.device)[:, None, :]
    errors = {}
    v_plain = fmt.fake_quantize(value, fmt.Int4Format(d, symmetric=symmetric), is_value=True)
    for block in blocks:
        layout = fmt.Int4Format(d, block, rotate_v=rotate_v and block is not None, symmetric=symmetric)
        v_hat = fmt.fake_quantize(value, layout, is_value=True) if layout.rotate_v else v_plain
        pair = []
        for centered in (False, True):
            k_hat = fmt.fake_quantize(key, layout, is_value=False, center=c if centered else None)
            pair.append(rel_error(causal_attention(q, k_hat, v_hat, positions, scale, window), exact))
        errors[block or 0] = tuple(pair)
    return LayerRecord(errors, center.float().cpu())


# --------------------------------------------------------------------------- #
# the forward pass
# --------------------------------------------------------------------------- #
def _attention_modules(model) -> Dict[int, torch.nn.Module]:
    mods = {}
    for m in model.modules():
        idx = getattr(m, "layer_idx", None)
        if idx is not None and hasattr(m, "k_proj"):
            mods[int(idx)] = m
    return mods


def _rope_tables(model, module, positions: int, device) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """The model's own RoPE (cos, sin) [positions, d] for this layer, if it has the usual
    rotary module; None otherwise."""
    rotary = getattr(model.get_decoder(), "rotary_emb", None)
    if rotary is None:
        return None
    # Gemma 3 style: one RoPE per layer type (rope_type is a dict keyed by it)
    layer_type = getattr(module, "layer_type", None) if isinstance(getattr(rotary, "rope_type", None), dict) else None
    key = (id(rotary), layer_type, positions)
    if key not in _rope_cache:
        pos = torch.arange(positions, device=device)[None]
        x = torch.zeros(1, dtype=torch.float32, device=device)
        with torch.no_grad():
            cos, sin = rotary(x, pos, layer_type=layer_type) if layer_type is not None else rotary(x, pos)
        _rope_cache[key] = (cos[0].float(), sin[0].float())
    return _rope_cache[key]


# (rotary module, layer type, positions) -> tables; emptied by each calibrate() call
_rope_cache: Dict[tuple, Tuple[torch.Tensor, torch.Tensor]] = {}


def calibrate(model, tok, method: str, rotate: str = "k", symmetric: bool = False,
              max_positions: Optional[int] = None, model_name: str = "", tokens: int = CALIBRATION_TOKENS,
              progress=None, sensitivity_tokens: int = SENSITIVITY_TOKENS) -> CalibrationRecord:
    """Run the calibration forward pass of a loaded Hugging Face causal LM and measure every
    attention layer (see the module docstring).  ``progress(layer)`` is called per layer."""
    from sglang_sawint4.eval.kv_methods import start_tokens, use_attention

    t0 = time.time()
    _rope_cache.clear()
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    max_positions = min(max_positions or getattr(cfg, "max_position_embeddings", tokens), MAX_ROPE_POSITIONS)
    blocks = candidate_blocks(method, head_dim)
    modules = _attention_modules(model)
    if not modules:
        raise RuntimeError("no attention modules with k_proj and layer_idx: not a supported architecture")
    device = next(model.parameters()).device
    ids = (start_tokens(tok) + tok(calibration_text(), add_special_tokens=False)["input_ids"])[:tokens]
    pre_rope: Dict[int, torch.Tensor] = {}
    records: Dict[int, LayerRecord] = {}
    sources = set()

    def capture_pre_rope(idx):
        def hook(_module, _inputs, out):
            pre_rope[idx] = out.reshape(out.shape[0], out.shape[1], -1, head_dim)[0].transpose(0, 1)
        return hook

    handles = []
    for idx, m in modules.items():
        target = getattr(m, "k_norm", None)
        target = target if isinstance(target, torch.nn.Module) else m.k_proj
        handles.append(target.register_forward_hook(capture_pre_rope(idx)))

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def observe(module, query, key, value, attention_mask, **kwargs):
        idx = int(module.layer_idx)
        center, source = _layer_center(model, module, key[0], pre_rope.pop(idx, None), max_positions)
        sources.add(source)
        window = getattr(module, "sliding_window", None)
        records[idx] = measure_layer(query[0], key[0], value[0], center, blocks, rotate == "kv", symmetric,
                                     float(getattr(module, "scaling", head_dim ** -0.5)), window)
        if progress:
            progress(idx)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    previous = cfg._attn_implementation
    head = torch.tensor([ids[:sensitivity_tokens]], device=device)  # the prefix the KLs are measured on
    with torch.no_grad():  # the exact model's next-token distributions
        ref = _log_probs(model, head)
    try:
        use_attention(model, "sawint4_calibration", observe)
        with torch.no_grad():
            model(torch.tensor([ids], device=device))
    finally:
        for h in handles:
            h.remove()
        _restore_attention(model, previous)
    if len(records) != len(modules):
        raise RuntimeError(f"calibration saw {len(records)} of {len(modules)} attention layers")
    kv_heads = next(iter(records.values())).center.shape[0]
    source = "rope-average" if sources == {"rope-average"} else "; ".join(sorted(sources))
    record = CalibrationRecord(
        model=model_name, architecture=(getattr(cfg, "architectures", None) or [type(model).__name__])[0],
        num_layers=len(records), num_kv_heads=kv_heads, head_dim=head_dim, method=method, rotate=rotate,
        symmetric=symmetric, tokens=len(ids), max_positions=max_positions, center_source=source,
        device=str(device), seconds=0.0, layers=dict(sorted(records.items())))
    measure_sensitivity(model, record, head, ref, progress)
    record.seconds = round(time.time() - t0, 2)
    return record


def _restore_attention(model, name) -> None:
    for m in model.modules():  # the model's own attention again
        if hasattr(m, "config") and hasattr(m.config, "_attn_implementation"):
            m.config._attn_implementation = name


def _log_probs(model, ids: torch.Tensor) -> torch.Tensor:
    """[tokens, vocab] float32 next-token log-probabilities of one sequence ids [1, tokens]."""
    return torch.log_softmax(model(ids).logits[0].float(), dim=-1)


def mean_kl(ref: torch.Tensor, logp: torch.Tensor) -> float:
    """Mean over positions of KL(ref || logp), both [tokens, vocab] log-probabilities."""
    return (ref.exp() * (ref - logp)).sum(-1).mean().item()


def measure_sensitivity(model, record: CalibrationRecord, ids: torch.Tensor, ref: torch.Tensor, progress=None):
    """The end-to-end KLs of the record (see the module docstring): every layer quantized per
    block, then one layer at a time at the best block (the lowest KL; ties within
    BLOCK_KL_TIE to the larger block)."""
    from sglang_sawint4.eval.kv_methods import KVMethod, install
    from sglang_sawint4.policy import KVPolicy, ModelFacts

    facts = ModelFacts(record.num_layers, record.num_kv_heads, record.head_dim)
    layers = list(record.layers)
    previous = model.config._attn_implementation
    current = {}

    def policy(block, quantized):
        centered = record.centered(block)
        return KVPolicy(record.method, facts, block or None, record.rotate, record.symmetric,
                        bf16_layers=tuple(l for l in layers if l not in quantized),
                        key_centers={l: record.layers[l].center for l in quantized if centered[l]})

    def kl(p):
        current["m"] = KVMethod.from_policy(p)
        with torch.no_grad():
            return mean_kl(ref, _log_probs(model, ids))

    try:
        install(model, lambda: current["m"])
        for block in sorted(next(iter(record.layers.values())).errors, reverse=True):
            record.kl_full[block] = kl(policy(block, layers))
        best = min(record.kl_full.values())
        record.kl_block = max(b for b, v in record.kl_full.items() if v <= best * (1 + BLOCK_KL_TIE))
        for l in layers:
            record.layers[l].kl = kl(policy(record.kl_block, [l]))
            if progress:
                progress(l)
    finally:
        _restore_attention(model, previous)


def _layer_center(model, module, key_post: torch.Tensor, key_pre: Optional[torch.Tensor],
                  max_positions: int) -> Tuple[torch.Tensor, str]:
    """(center [kv_heads, d], how it was obtained) for one layer; key_post: [kv_heads, tokens, d]."""
    window_mean = key_post[:, SKIP_FIRST_TOKENS:].double().mean(1).float()
    if key_pre is None or key_pre.shape != key_post.shape:
        return window_mean, "window-mean: no pre-RoPE keys captured"
    tables = _rope_tables(model, module, max(max_positions, key_post.shape[1]), key_post.device)
    if tables is None:
        return window_mean, "window-mean: no rotary module"
    cos, sin = tables
    h = cos.shape[-1] // 2
    if cos.shape[-1] != key_post.shape[-1] or not torch.allclose(cos[:, :h], cos[:, h:]):
        return window_mean, "window-mean: RoPE is not rotate_half over the whole head"
    n = key_post.shape[1]
    replayed = rotate_half_rope(key_pre.float(), cos[:n], sin[:n])
    if rel_error(replayed, key_post.float()) > ROPE_CHECK_TOL:
        return window_mean, "window-mean: the model's RoPE could not be reproduced"
    avg_cos, avg_sin = rope_average(cos[:max_positions], sin[:max_positions])
    mean_pre = key_pre[:, SKIP_FIRST_TOKENS:].double().mean(1)
    return center_from_pre_rope(mean_pre, avg_cos, avg_sin), "rope-average"


def load_model(model_path: str, device: Optional[str] = None):
    """(tokenizer, model) for calibration: BF16 on the GPU when there is one (as served),
    float32 on the CPU."""
    from sglang_sawint4.eval.kv_methods import load_model as load

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return load(model_path, device=device, dtype=torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32)
