"""KV-cache quantization methods applied to a Hugging Face model's attention.

Each method maps the post-RoPE key and the value tensors of every attention call
([batch, kv_heads, tokens, head_dim]) to what a served KV cache would give back,
through ``sglang_sawint4.format`` (the same format the kernels store). Teacher-forced
evaluation therefore sees every token's K/V through the cache, as in decoding.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

import torch

from sglang_sawint4 import format as fmt


@dataclass
class Codebook:
    """k-means centroids of each layer's K and V, over all KV heads of a token at once.

    k[layer], v[layer]: [clusters, num_kv_heads * head_dim] float32 (the shape the
    paper's reference code loads per layer).
    """

    clusters: int
    k: Dict[int, torch.Tensor] = field(default_factory=dict)
    v: Dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass
class QueryMetric:
    """Per-layer, per-KV-head eigenbasis of the queries' second moment (Hessian-aware keys).

    The error a key quantizer adds to an attention score is q.(k_hat - k), whose mean
    square over the queries is e^T E[q q^T] e: E[q q^T] is the Hessian of that loss in k.
    basis[layer]: [kv_heads, head_dim, head_dim] float32, eigenvectors as columns (U);
    scale[layer]: [kv_heads, head_dim] float32, square roots of the damped eigenvalues,
    lambda + alpha * mean(lambda) (GPTQ-style damping).
    """

    alpha: float
    basis: Dict[int, torch.Tensor] = field(default_factory=dict)
    scale: Dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class KVMethod:
    name: str
    block: Optional[int] = None  # Hadamard block for BDR methods
    rotate: Optional[str] = None  # "k" | "kv" for BDR methods
    bf16_layers: Tuple[int, ...] = ()  # per-layer policy: these layers keep an unquantized cache
    # "kmeans": centroid-subtract INT4 (offline only: a codebook is an irregular load);
    # clusters is part of the method's identity, the codebook's tensors are not
    clusters: Optional[int] = None
    codebook: Optional[Codebook] = field(default=None, compare=False, hash=False, repr=False)
    # "hessian": keys in the query metric's whitened eigenbasis, then BDR (offline only)
    metric: Optional[QueryMetric] = field(default=None, compare=False, hash=False, repr=False)
    # a served KV policy (sglang_sawint4.policy.KVPolicy): per-layer BF16, key centers and
    # block exactly as the server stores them; the method's name is its row name
    policy: Optional[object] = field(default=None, compare=False, hash=False, repr=False)

    @classmethod
    def from_policy(cls, policy, name: str = "served-default") -> "KVMethod":
        """The method a server with this KV policy serves (rows: ``name``, its block and rotate)."""
        return cls(name, policy.block_size, policy.rotate if policy.block_size else None, policy=policy)

    def __post_init__(self):
        if self.name == "kmeans" and (self.codebook is None or self.codebook.clusters != self.clusters):
            raise ValueError("a kmeans method needs a codebook with `clusters` centroids")
        if self.name == "hessian" and (self.metric is None or self.block is None or self.rotate != "k"):
            raise ValueError("a hessian method needs a QueryMetric, a BDR block and rotate='k'")

    @property
    def layer_policy(self) -> str:
        """'[bf16:0,5]' when some layers keep an unquantized cache, else ''."""
        return f"[bf16:{','.join(map(str, self.bf16_layers))}]" if self.bf16_layers else ""

    @property
    def label(self) -> str:
        name = self.row_name[: len(self.row_name) - len(self.layer_policy)]
        return (name if self.block is None else f"{name}-{self.block}-{self.rotate}") + self.layer_policy

    @property
    def row_name(self) -> str:
        """The ``method`` of a results row (block and rotate have their own fields)."""
        name = f"kmeans-{self.clusters}" if self.name == "kmeans" else self.name
        return name + self.layer_policy

    def apply(self, key: torch.Tensor, value: torch.Tensor, layer: int = -1, query: Optional[torch.Tensor] = None):
        """(key_hat, value_hat) as the cache would give them back; ``query`` is unused here
        (the calibration recorder takes it)."""
        if self.policy is not None:
            return served_kv(self.policy, key, value, layer)
        if self.name == "bf16" or layer in self.bf16_layers:
            return key, value
        if self.name == "fp8_e4m3":
            # SGLang's native FP8 KV cache without calibration scales: a plain cast
            return (key.to(torch.float8_e4m3fn).to(key.dtype), value.to(torch.float8_e4m3fn).to(value.dtype))
        d = key.shape[-1]
        if self.name == "kivi":
            # offline only: keys per channel over groups of tokens, values per token
            # (KIVI without its full-precision residual window); not a paged layout
            return per_channel_int4(key, KIVI_GROUP), fmt.fake_quantize(value, fmt.Int4Format(d), is_value=True)
        layout = (fmt.Int4Format(d) if self.block is None
                  else fmt.Int4Format.for_method("int4-bdr", d, self.block, self.rotate))
        if self.name == "kmeans":
            return (centroid_subtract_int4(key, self.codebook.k[layer], layout, is_value=False),
                    centroid_subtract_int4(value, self.codebook.v[layer], layout, is_value=True))
        if self.name == "hessian":
            return (hessian_int4(key, self.metric.basis[layer], self.metric.scale[layer], layout),
                    fmt.fake_quantize(value, layout, is_value=True))
        return fmt.fake_quantize(key, layout, is_value=False), fmt.fake_quantize(value, layout, is_value=True)


KIVI_GROUP = 128


def served_kv(policy, key: torch.Tensor, value: torch.Tensor, layer: int):
    """K/V [batch, kv_heads, tokens, head_dim] as a server with this KV policy gives them back:
    BF16 layers exact, the others through the policy's format with its key center."""
    if layer in policy.bf16_layers:
        return key, value
    layout = policy.layout()
    center = policy.key_centers.get(layer)
    center = None if center is None else center.to(key.device)[:, None, :]  # [kv_heads, 1, head_dim]
    return (fmt.fake_quantize(key, layout, is_value=False, center=center),
            fmt.fake_quantize(value, layout, is_value=True))


def per_channel_int4(x: torch.Tensor, group: int) -> torch.Tensor:
    """Asymmetric INT4 of [..., tokens, dim] with one (scale, offset) per channel per group of tokens."""
    t = x.shape[-2]
    pad = (-t) % group
    xp = torch.nn.functional.pad(x, (0, 0, 0, pad), mode="replicate") if pad else x
    g = xp.reshape(*xp.shape[:-2], xp.shape[-2] // group, group, xp.shape[-1]).transpose(-1, -2)
    codes, scale, offset = fmt.quantize(g)  # along the token axis of each group
    deq = fmt.dequantize(codes, scale, offset, x.dtype).transpose(-1, -2).reshape(xp.shape)
    return deq[..., :t, :]


def centroid_subtract_int4(x: torch.Tensor, centers: torch.Tensor, layout: fmt.Int4Format,
                           is_value: bool) -> torch.Tensor:
    """k-means residual INT4 of [batch, kv_heads, tokens, head_dim].

    Each token's vector over all KV heads picks its nearest centroid; the residual goes
    through the served token-wise format (rotation per ``layout``); the centroid is
    added back.  C = 1 subtracts a calibrated mean, which removes constant channels
    (biases) before the per-token range is taken.
    """
    b, h, t, d = x.shape
    flat = x.permute(0, 2, 1, 3).reshape(b * t, h * d).float()
    nearest = torch.cdist(flat, centers).argmin(-1)
    c = centers[nearest]
    resid = (flat - c).reshape(b, t, h, d).permute(0, 2, 1, 3)
    deq = fmt.fake_quantize(resid, layout, is_value).float()
    return (deq.permute(0, 2, 1, 3).reshape(b * t, h * d) + c).reshape(b, t, h, d).permute(0, 2, 1, 3).to(x.dtype)


def hessian_int4(key: torch.Tensor, basis: torch.Tensor, scale: torch.Tensor,
                 layout: fmt.Int4Format) -> torch.Tensor:
    """Hessian-aware INT4 of keys [batch, kv_heads, tokens, head_dim].

    y = diag(scale) U^T k puts each key in the eigenbasis of its KV head's query second
    moment, scaled so that every coordinate carries the same expected score error
    (E[q' q'^T] ~ I for q' = diag(1/scale) U^T q, and q'.y = q.k); y then goes through the
    served token-wise format (BDR per ``layout``) and is mapped back.  basis: [kv_heads,
    head_dim, head_dim] (eigenvectors as columns); scale: [kv_heads, head_dim].
    """
    y = torch.einsum("bhtd,hde->bhte", key.float(), basis) * scale[None, :, None, :]
    y_hat = fmt.fake_quantize(y, layout, is_value=False).float()
    return torch.einsum("bhte,hde->bhtd", y_hat / scale[None, :, None, :], basis).to(key.dtype)


def fit_kmeans(x: torch.Tensor, clusters: int, iters: int = 25, seed: int = 0) -> torch.Tensor:
    """Lloyd's k-means of rows x [n, dim] (float32), k-means++ seeding; returns [clusters, dim]."""
    g = torch.Generator().manual_seed(seed)
    x = x.float()
    centers = x[torch.randint(len(x), (1,), generator=g)]
    while len(centers) < clusters:  # k-means++: next center with probability ~ squared distance
        d2 = torch.cdist(x, centers).min(-1).values ** 2
        # drawn on the CPU generator whatever x's device: the same centers on CPU and GPU
        centers = torch.cat([centers, x[torch.multinomial((d2 + 1e-12).cpu(), 1, generator=g)]])
    for _ in range(iters):
        assign = torch.cdist(x, centers).argmin(-1)
        sums = torch.zeros_like(centers).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=clusters)[:, None]
        # an empty cluster keeps its previous center
        centers = torch.where(counts > 0, sums / counts.clamp_min(1), centers)
    return centers


class KVRecorder:
    """A stand-in method that returns K/V unchanged and keeps them per layer (calibration)."""

    name = "bf16"

    def __init__(self):
        self.k, self.v = {}, {}
        self.q_moment, self.q_count = {}, {}  # per layer: sum of q q^T per KV head, and its count

    def apply(self, key, value, layer=-1, query=None):
        for store, x in ((self.k, key), (self.v, value)):
            b, h, t, d = x.shape
            store.setdefault(layer, []).append(x.permute(0, 2, 1, 3).reshape(b * t, h * d).float())
        if query is not None:
            b, hq, t, d = query.shape
            hk = key.shape[1]
            # the queries of a KV head's GQA group: query head i reads KV head i // (hq // hk)
            q = query.float().reshape(b, hk, hq // hk, t, d)
            moment = torch.einsum("bhgtd,bhgte->hde", q, q)
            self.q_moment[layer] = self.q_moment.get(layer, 0) + moment
            self.q_count[layer] = self.q_count.get(layer, 0) + b * (hq // hk) * t
        return key, value

    def query_metric(self, alpha: float = 0.01) -> QueryMetric:
        """Eigenbasis and damped scales of each layer's per-KV-head query second moment."""
        if not self.q_moment:
            raise ValueError("no queries recorded: install() passes them to the recorder")
        metric = QueryMetric(alpha)
        for layer, total in self.q_moment.items():
            eigvals, eigvecs = torch.linalg.eigh((total / self.q_count[layer]).double())
            eigvals = eigvals.clamp_min(0)
            damped = eigvals + alpha * eigvals.mean(-1, keepdim=True)
            metric.basis[layer] = eigvecs.float()
            metric.scale[layer] = damped.sqrt().float()
        return metric

    def codebook(self, clusters: int, max_rows: int = 8192, seed: int = 0) -> Codebook:
        book = Codebook(clusters)
        for store, out in ((self.k, book.k), (self.v, book.v)):
            for layer, xs in store.items():
                rows = torch.cat(xs)
                rows = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[:max_rows]]
                out[layer] = fit_kmeans(rows, clusters, seed=seed)
        return book


def policy_methods(path, fallback: bool, hf_config) -> list:
    """The served-default method of a policy file, and the uncalibrated fallback's."""
    from sglang_sawint4.policy import ModelFacts, fallback_policy, load_policy_file

    out = []
    if path:
        with open(path) as f:
            method = json.load(f).get("method", "int4-bdr")
        out.append(KVMethod.from_policy(load_policy_file(path, method), "served-default"))
    if fallback:
        facts = ModelFacts.from_hf_config(hf_config.to_dict())
        out.append(KVMethod.from_policy(fallback_policy("int4-bdr", facts, why="evaluated"), "policy-fallback"))
    return out


def standard_methods(head_dim: int) -> list:
    methods = [KVMethod("bf16"), KVMethod("fp8_e4m3"), KVMethod("int4"), KVMethod("kivi")]
    blocks = fmt.blocks_dividing(head_dim)
    methods += [KVMethod("int4-bdr", b, "k") for b in blocks]
    methods += [KVMethod("int4-bdr", max(blocks), "kv")]
    return methods


def start_tokens(tok) -> list:
    """The ids the tokenizer puts before any input (Gemma's BOS; none for SmolLM2 /
    Qwen2.5): a model trained that way should always see them first."""
    return tok("", add_special_tokens=True)["input_ids"]


def text_window(tok, path: str, tokens: int = 2048, max_chars: int = 200_000) -> torch.Tensor:
    """A calibration window [tokens]: the model's start tokens, then the start of a text
    file (calibrated K/V should come from inputs shaped like the evaluated ones)."""
    with open(path, errors="replace") as f:
        body = tok(f.read()[:max_chars], add_special_tokens=False)["input_ids"]
    return torch.tensor((start_tokens(tok) + body)[:tokens])


def record_kv(model, ids: torch.Tensor, current: dict) -> KVRecorder:
    """One forward over ids [tokens] with a KVRecorder as the installed method (the K/V
    and queries of every layer, for calibration); ``current["m"]`` is bf16 afterwards."""
    recorder = KVRecorder()
    current["m"] = recorder
    with torch.no_grad():
        model(ids[None].to(model.device))
    current["m"] = KVMethod("bf16")
    return recorder


def default_methods(head_dim: int) -> list:
    """BF16, naive INT4 and the served default (BDR with the largest block, K only)."""
    return [KVMethod("bf16"), KVMethod("int4"), KVMethod("int4-bdr", fmt.default_block_size(head_dim), "k")]


def load_model(path: str, threads: Optional[int] = None, device: str = "cpu", dtype=torch.float32):
    """(tokenizer, model) of a converted model directory, for evaluation on ``device``.

    float32 compute on every device by default: the weights are the BF16 values, CPU matmuls
    are fast in fp32, and a GPU run then computes what a CPU run would (long contexts).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if threads:
        torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    return tok, model


def final_hidden(model, ids: torch.Tensor) -> torch.Tensor:
    """The last layer's normed hidden states [tokens, hidden] of one sequence ids [tokens]
    (what the LM head reads), without materializing [tokens, vocab] logits."""
    decoder = model.get_decoder()
    return decoder(input_ids=ids[None].to(model.device)).last_hidden_state[0]


def logits_from_hidden(model, hidden: torch.Tensor) -> torch.Tensor:
    """The causal LM's logits [rows, vocab] for hidden [rows, hidden] (Gemma's final soft-cap included)."""
    logits = model.get_output_embeddings()(hidden).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


# queries per SDPA call in the evaluation's attention (see chunked_sdpa in install)
QUERY_CHUNK = 4096


def install(model, method_ref: Callable[[], KVMethod], observer=None, served_prefill: bool = False) -> None:
    """Route the model's attention through ``method_ref()`` (looked up at every call).

    ``observer(layer_idx, key, key_hat)``, if given, sees each layer's keys before
    and after quantization (for per-layer error and outlier statistics).
    ``served_prefill``: a forward of several new tokens over an empty cache attends to
    their unquantized K/V, as the served extend attention does (it reads only a cached
    prefix from the INT4 pages); one-token forwards (decode steps) read every token
    quantized, as the served decode kernel does.  Off: every forward is quantized
    (teacher-forced evaluation).
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def kv_quant_attention(module, query, key, value, attention_mask, **kwargs):
        layer = getattr(module, "layer_idx", -1)
        if served_prefill and query.shape[-2] > 1:
            if key.shape[-2] != query.shape[-2]:
                raise ValueError("served_prefill models a prefill over an empty cache only")
            k_hat, v_hat = key, value
        else:
            k_hat, v_hat = method_ref().apply(key, value, layer, query=query)
        if observer is not None:
            observer(layer, key, k_hat)
        if query.shape[-2] <= QUERY_CHUNK:
            return sdpa_attention_forward(module, query, k_hat, v_hat, attention_mask, **kwargs)
        return chunked_sdpa(module, query, k_hat, v_hat, attention_mask, **kwargs)

    def chunked_sdpa(module, query, key, value, attention_mask, **kwargs):
        # long prefills (32k tokens): SDPA over all queries at once can fall back to a
        # [heads, tokens, tokens] fp32 score matrix (GQA in fp32); QUERY_CHUNK queries at a
        # time, each over the keys up to its last position, with the causal mask made explicit
        start = key.shape[-2] - query.shape[-2]  # 0 for a prefill over an empty cache
        outs = []
        for lo in range(0, query.shape[-2], QUERY_CHUNK):
            hi = min(lo + QUERY_CHUNK, query.shape[-2])
            if attention_mask is None:
                pos = torch.arange(start + lo, start + hi, device=query.device)
                mask = (torch.arange(start + hi, device=query.device)[None] <= pos[:, None])[None, None]
            else:
                mask = attention_mask[..., lo:hi, : start + hi]
            out, _ = sdpa_attention_forward(module, query[..., lo:hi, :], key[..., : start + hi, :],
                                            value[..., : start + hi, :], mask, **kwargs)
            outs.append(out)
        return torch.cat(outs, dim=1), None  # sdpa_attention_forward returns [batch, tokens, heads, dim]

    use_attention(model, "sawint4_kv_quant", kv_quant_attention)


def use_attention(model, name: str, fn: Callable) -> None:
    """Register ``fn`` (SDPA's signature, ending in SDPA) as attention ``name`` and make
    every attention module of ``model`` call it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, fn)
    # transformers builds no mask at all for an attention name it has no mask function
    # for: sliding-window layers (Gemma 3) would then attend to everything, and padded
    # batches to their padding.  Our functions end in SDPA, so they take SDPA's masks.
    AttentionMaskInterface.register(name, sdpa_mask)
    model.config._attn_implementation = name
    for m in model.modules():
        if hasattr(m, "config") and hasattr(m.config, "_attn_implementation"):
            m.config._attn_implementation = name
