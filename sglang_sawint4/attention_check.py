"""Debug mode: check the served attention against a float64 torch reference.

With ``--kv-quant-debug-check-attention PATH`` the INT4 attention backend compares
the output of its first few decode and extend calls per layer with a float64 reference
computed from the *same* pages the kernels read (:func:`int4_attention_reference`, pages
decoded by ``sglang_sawint4.format``; :func:`bf16_attention_reference` for the layers the
KV policy keeps in BF16), and appends one JSON line per check to PATH.  It needs eager mode (``--disable-decode-cuda-graph``): a replayed CUDA graph runs no
Python, so nothing could be checked.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import torch

from sglang_sawint4 import format as fmt

# A check passes when max |served - reference| <= REL_TOL * max |reference|.  The
# reference repeats the kernels' own input roundings (q and dequantized pages in the
# query dtype), so what is left is float32 accumulation, the bf16 softmax weights of
# the P @ V products and the bf16 output: a few bf16 ulps (2**-8 = 0.4%).  Both extend
# paths attend to a rotating layout's prefix in the pages' stored space (rotated q, k, v
# and scratch rounded there), which the reference, in the original space, does not
# repeat: a few more ulps.
REL_TOL = 2e-2


def int4_attention_reference(q, qo_indptr, kv_indptr, kv_indices, data, layout: fmt.Int4Format, sm_scale,
                             k_new=None, v_new=None, round_prefix_to=None, round_rotated_q_to=None, k_center=None):
    """Float64 causal attention of each request's query tokens over its INT4 pages.

    Args:
        q: [num_q_tokens, num_q_heads, head_dim]; request b owns rows qo_indptr[b]:qo_indptr[b+1].
        kv_indptr: [batch + 1]; kv_indices: slot ids of each request's cached tokens.
        data: (k_data, k_meta, v_data, v_meta), one layer of the INT4 pool.
        k_new, v_new: [num_q_tokens, num_kv_heads, head_dim] new tokens attended exactly
            after the cached ones, causally (extend); None when the query's own token is
            already among the pages (decode).
        round_prefix_to: dtype the dequantized pages are rounded to first (the extend
            path's BF16 scratch), or None.
        round_rotated_q_to: dtype the rotated q is rounded to (the decode kernel's
            tensor-core operand), or None.
        k_center: [num_kv_heads, head_dim] key center of the layer (original space), or None.
    Returns [num_q_tokens, num_q_heads, head_dim] float64.
    """
    k_data, k_meta, v_data, v_meta = data
    # rotated space for keys when the kernel attends there (decode), else original
    keys_rotated = round_rotated_q_to is not None and layout.rotate_k
    center = None if k_center is None else k_center.to(q.device)

    def read_kv(idx):
        k = fmt.decode(k_data[idx], k_meta[idx], layout, is_value=False, unrotate=not keys_rotated, center=center)
        v = fmt.decode(v_data[idx], v_meta[idx], layout, is_value=True)
        if round_prefix_to is not None:
            k, v = k.to(round_prefix_to).double(), v.to(round_prefix_to).double()
        return k, v

    def query(qb):
        qb = qb.double()
        if keys_rotated:
            qb = fmt.rotate(qb, layout.block_size)
        return qb if round_rotated_q_to is None else qb.to(round_rotated_q_to).double()

    return _attention(q, qo_indptr, kv_indptr, kv_indices, read_kv, query, sm_scale, k_new, v_new)


def bf16_attention_reference(q, qo_indptr, kv_indptr, kv_indices, k_buffer, v_buffer, sm_scale, k_new=None, v_new=None):
    """Float64 causal attention over a BF16 layer's pages ([slots, num_kv_heads, head_dim]),
    arguments as :func:`int4_attention_reference`."""
    return _attention(q, qo_indptr, kv_indptr, kv_indices, lambda idx: (k_buffer[idx].double(), v_buffer[idx].double()),
                      lambda qb: qb.double(), sm_scale, k_new, v_new)


def pool_attention_reference(pool, layer_id, q, qo_indptr, kv_indptr, kv_indices, sm_scale, k_new=None, v_new=None,
                             round_prefix_to=None, round_rotated_q_to=None):
    """Float64 attention over the pages one layer of an ``Int4TokenToKVPool`` holds, INT4 or
    BF16 (the policy's BF16 layers are read as SGLang's kernels read them, without rounding)."""
    if pool.is_bf16_layer(layer_id):
        return bf16_attention_reference(q, qo_indptr, kv_indptr, kv_indices, pool.get_key_buffer(layer_id),
                                        pool.get_value_buffer(layer_id), sm_scale, k_new=k_new, v_new=v_new)
    return int4_attention_reference(q, qo_indptr, kv_indptr, kv_indices, pool.get_int4_layer(layer_id),
                                    pool.int4_format, sm_scale, k_new=k_new, v_new=v_new,
                                    round_prefix_to=round_prefix_to, round_rotated_q_to=round_rotated_q_to,
                                    k_center=pool.key_center(layer_id))


def _attention(q, qo_indptr, kv_indptr, kv_indices, read_kv, query, sm_scale, k_new, v_new):
    hq = q.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float64, device=q.device)
    for b in range(qo_indptr.numel() - 1):
        q0, q1 = int(qo_indptr[b]), int(qo_indptr[b + 1])
        idx = kv_indices[int(kv_indptr[b]): int(kv_indptr[b + 1])].long()
        k, v = read_kv(idx)
        qb = query(q[q0:q1])
        n_cached = k.shape[0]
        if k_new is not None:
            k = torch.cat([k, k_new[q0:q1].double()])
            v = torch.cat([v, v_new[q0:q1].double()])
        hk = k.shape[1]
        k = k.repeat_interleave(hq // hk, dim=1)
        v = v.repeat_interleave(hq // hk, dim=1)
        s = torch.einsum("qhd,nhd->hqn", qb, k) * sm_scale
        if k_new is not None:  # new token i sees the cache and new tokens 0..i
            pos = torch.arange(k.shape[0], device=q.device)
            allowed = pos[None, :] <= n_cached + torch.arange(q1 - q0, device=q.device)[:, None]
            s = s.masked_fill(~allowed[None], float("-inf"))
        out[q0:q1] = torch.einsum("hqn,nhd->qhd", torch.softmax(s, dim=-1), v)
    return out


class AttentionChecker:
    """Compares the first ``max_per_layer`` decode and extend calls of every layer."""

    def __init__(self, path: str, max_per_layer: int = 2, max_tokens: int = 4096):
        self.path = path
        self.max_per_layer = max_per_layer
        self.max_tokens = max_tokens  # keep the float64 reference affordable
        self.counts = {}

    @classmethod
    def from_env(cls) -> Optional["AttentionChecker"]:
        from sglang_sawint4.config import ENV_CHECK_ATTENTION

        path = os.environ.get(ENV_CHECK_ATTENTION)
        return cls(path) if path else None

    def wanted(self, mode: str, layer_id: int, tokens: int) -> bool:
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return False
        return self.counts.get((mode, layer_id), 0) < self.max_per_layer and 0 < tokens <= self.max_tokens

    def record(self, mode: str, layer_id: int, served: torch.Tensor, reference: torch.Tensor, **info) -> dict:
        self.counts[(mode, layer_id)] = self.counts.get((mode, layer_id), 0) + 1
        served = served.reshape(reference.shape).double()
        err = (served - reference).abs().max().item()
        scale = reference.abs().max().item()
        row = {"pid": os.getpid(), "mode": mode, "layer": layer_id, "max_abs_err": err, "ref_max_abs": scale,
               "rel_err": err / max(scale, 1e-30), "tolerance_rel": REL_TOL,
               "finite": bool(torch.isfinite(served).all()), **info}
        row["ok"] = row["finite"] and row["rel_err"] <= REL_TOL
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        return row

    @staticmethod
    def _kv_kind(pool, layer_id: int) -> str:
        return "bf16" if pool.is_bf16_layer(layer_id) else "int4"

    def check_decode(self, pool, layer, q, o, kv_indptr, kv_indices):
        """Check one decode call of ``layer``: q [batch, heads, head_dim] (one new token per
        request), o the served output, kv_indptr [>= batch + 1] / kv_indices every request's
        slots, the new token's included."""
        batch = q.shape[0]
        if not self.wanted("decode", layer.layer_id, batch):
            return
        ref = pool_attention_reference(pool, layer.layer_id, q, torch.arange(batch + 1, device=q.device),
                                       kv_indptr[: batch + 1], kv_indices, layer.scaling, round_rotated_q_to=q.dtype)
        self.record("decode", layer.layer_id, o, ref, batch=batch, kv_tokens=int(kv_indptr[batch]),
                    kv=self._kv_kind(pool, layer.layer_id))

    def check_extend(self, pool, layer, q, k, v, o, qo_indptr, kv_indptr, kv_indices, n_prefix: int, path: str):
        """Check one extend call of ``layer``: q / k / v [new_tokens, heads, head_dim] (the new
        tokens), o the served output, kv_indptr / kv_indices the cached prefix's slots per
        request (qo_indptr, kv_indptr: [batch + 1] on the device).  ``path`` names the
        backend's extend path in the record."""
        mode = "extend_prefix" if n_prefix else "extend"
        if not self.wanted(mode, layer.layer_id, q.shape[0] + n_prefix):
            return
        batch = qo_indptr.numel() - 1
        ref = pool_attention_reference(pool, layer.layer_id, q, qo_indptr, kv_indptr, kv_indices, layer.scaling,
                                       k_new=k, v_new=v, round_prefix_to=q.dtype)
        self.record(mode, layer.layer_id, o, ref, batch=batch, new_tokens=q.shape[0], prefix_tokens=n_prefix,
                    kv=self._kv_kind(pool, layer.layer_id), path=path)
