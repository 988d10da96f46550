"""Probe: what one prefill of one request over a cached prefix costs per forward's attention,
BF16 on SGLang's FlashInfer calls against the INT4 FlashInfer path (docs/results.md,
2026-12-02 23:15: under spread arrivals the shared-prefix point's prefill batches are mostly
one request, 256 new tokens over an 8k cached prefix, and there INT4's TTFT p50 is 1.24x
(plain) and 1.42x (BDR, staging un-rotated) BF16's).

8B-shaped attention (32 q / 8 KV heads, head_dim 128), 32 layers, each with its own cache.
Per forward: plan (ragged + prefix wrappers), then per layer store the new K/V and attend.
  bf16                 SGLang's FlashInfer extend: index-copy store, ragged causal prefill with
                       LSE, paged prefill over the BF16 prefix, merge_state
  int4, int4-bdr       rotate_quantize_store + Int4FlashInferPrefillBackend._int4_extend, as
                       served (BDR-128: prefix staged as stored, new tokens rotated)
  int4-bdr-unrotated   BDR-128 with the staging un-rotating every row (before commit 0633d22)
host_ms: enqueueing the forward (the host's cost); device_ms: the same forward's GPU time
(enqueued behind a sleep kernel, so the host never starves it).  Medians over interleaved reps.
Run on the GPU host with `bash scripts/gpu_run.sh install prefill-probe` (output in
$OUT/one_request_prefill_probe.txt).
"""
import json
import statistics
import time
from types import SimpleNamespace

import torch
import triton
from flashinfer import BatchPrefillWithPagedKVCacheWrapper, BatchPrefillWithRaggedKVCacheWrapper, merge_state

from sglang_sawint4 import flashinfer_prefill as fp
from sglang_sawint4 import format as fmt
from sglang_sawint4.kernels.dequant import dequantize_pages
from sglang_sawint4.kernels.store import rotate_quantize_store

HQ, HK, D, LAYERS, PREFIX, NEW, STAGING, REPS = 32, 8, 128, 32, 8192, 256, 32768, 30
DEV, BF16 = "cuda", torch.bfloat16
SCALE = D ** -0.5
torch.manual_seed(0)
workspace = torch.empty(384 << 20, dtype=torch.uint8, device=DEV)
qo_indptr = torch.tensor([0, NEW], dtype=torch.int32)
kv_indptr = torch.tensor([0, PREFIX], dtype=torch.int32)
new_loc = torch.arange(PREFIX, PREFIX + NEW, device=DEV)
q = torch.randn(NEW, HQ, D, device=DEV, dtype=BF16)
k_new, v_new = (torch.randn(NEW, HK, D, device=DEV, dtype=BF16) for _ in range(2))
ragged = BatchPrefillWithRaggedKVCacheWrapper(workspace, "NHD")


def plan_ragged():
    ragged.begin_forward(qo_indptr, qo_indptr, HQ, HK, D, causal=True, q_data_type=BF16)


# -- BF16: the calls SGLang's FlashInfer backend makes for an extend over a cached prefix --------
bf16_cache = [(torch.randn(PREFIX + NEW, HK, D, device=DEV, dtype=BF16),
               torch.randn(PREFIX + NEW, HK, D, device=DEV, dtype=BF16)) for _ in range(LAYERS)]
paged = BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD")


def bf16_forward():
    plan_ragged()
    paged.begin_forward(qo_indptr, kv_indptr, torch.arange(PREFIX, dtype=torch.int32), torch.ones(1, dtype=torch.int32),
                        HQ, HK, D, 1, q_data_type=BF16, kv_data_type=BF16, non_blocking=True)
    for k_cache, v_cache in bf16_cache:
        k_cache[new_loc], v_cache[new_loc] = k_new, v_new
        o1, s1 = ragged.forward_return_lse(q, k_new, v_new, causal=True, sm_scale=SCALE, logits_soft_cap=0.0)
        o2, s2 = paged.forward_return_lse(q, (k_cache, v_cache), causal=False, sm_scale=SCALE, logits_soft_cap=0.0)
        merge_state(o1, s1, o2, s2)


# -- INT4: the served backend's plan and run steps ----------------------------------------------
def int4_backend(layout):
    backend = fp.Int4FlashInferPrefillBackend.__new__(fp.Int4FlashInferPrefillBackend)
    backend.workspace_buffer, backend.prefill_backend = workspace, "fa2"
    backend._heads, backend.staging_rows, backend.int4_format = (HQ, HK, D), STAGING, layout
    backend._k_stage = torch.empty(STAGING, HK, D, dtype=BF16, device=DEV)
    backend._v_stage = torch.empty_like(backend._k_stage)
    backend._piece_wrappers, backend._overflow, backend._overflow_next = [], [], 0
    backend._planned_copied, backend._planned_pending, backend._checker = torch.cuda.Event(), False, None
    backend.req_to_token_pool = SimpleNamespace(
        req_to_token=torch.arange(PREFIX + NEW, dtype=torch.int32, device=DEV)[None])
    data = []
    for k_cache, v_cache in bf16_cache:
        bufs = [*fmt.allocate_layer(PREFIX + NEW, HK, D, DEV), *fmt.allocate_layer(PREFIX + NEW, HK, D, DEV)]
        rotate_quantize_store(k_cache, v_cache, torch.arange(PREFIX + NEW, device=DEV), *bufs, layout)
        data.append(tuple(bufs))
    backend.int4_pool = SimpleNamespace(get_int4_layer=lambda i: data[i], key_center=lambda i, stored=False: None)
    backend.prefill_wrapper_ragged = ragged
    return backend, data


def int4_forward(backend, data, layout, unrotated=False):
    plan_ragged()
    backend._plan_prefix([PREFIX], [NEW], torch.zeros(1, dtype=torch.int64, device=DEV),
                         torch.tensor([PREFIX], dtype=torch.int32, device=DEV),
                         torch.tensor([NEW], dtype=torch.int32, device=DEV))
    for i in range(LAYERS):
        rotate_quantize_store(k_new, v_new, new_loc, *data[i], layout)
        if not unrotated:
            backend._int4_extend(q, k_new, v_new, SimpleNamespace(layer_id=i, scaling=SCALE))
            continue
        o, lse = ragged.forward_return_lse(q, k_new, v_new, causal=True, sm_scale=SCALE, logits_soft_cap=0.0)

        def stage(slots, i=i):
            dequantize_pages(*data[i], slots, backend._k_stage, backend._v_stage, layout)
            return backend._k_stage, backend._v_stage

        fp.attend_prefix_pieces(q, o, lse, backend._plan, stage,
                                lambda j, piece, qp, ks, vs: backend._attend_piece(j, piece, qp, ks, vs, SCALE),
                                fp.merge_partial_attention)


plain, bdr = fmt.Int4Format(D), fmt.Int4Format(D, 128)
(b_plain, d_plain), (b_bdr, d_bdr) = int4_backend(plain), int4_backend(bdr)
configs = {
    "bf16": bf16_forward,
    "int4": lambda: int4_forward(b_plain, d_plain, plain),
    "int4-bdr": lambda: int4_forward(b_bdr, d_bdr, bdr),
    "int4-bdr-unrotated": lambda: int4_forward(b_bdr, d_bdr, bdr, unrotated=True),
}
host, device = {c: [] for c in configs}, {c: [] for c in configs}
for rep in range(REPS + 3):  # 3 warm-up reps (compiles, FlashInfer module loads)
    for name, forward in configs.items():
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        forward()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(int(2e8))  # ~0.1 s of GPU work ahead of the forward: the host never starves it
        start.record()
        forward()
        end.record()
        torch.cuda.synchronize()
        if rep >= 3:
            host[name].append((t1 - t0) * 1e3)
            device[name].append(start.elapsed_time(end))
out = {name: {"host_ms": round(statistics.median(host[name]), 3), "device_ms": round(statistics.median(device[name]), 3)}
       for name in configs}
slots = torch.arange(PREFIX, dtype=torch.int32, device=DEV)
for name, layout, data, unrotate in (("int4", plain, d_plain, True), ("int4-bdr", bdr, d_bdr, False),
                                     ("int4-bdr-unrotated", bdr, d_bdr, True)):
    ks = torch.empty(PREFIX, HK, D, dtype=BF16, device=DEV)
    vs = torch.empty_like(ks)
    out[name]["dequant_8k_rows_us"] = round(1e3 * triton.testing.do_bench(
        lambda: dequantize_pages(*data[0], slots, ks, vs, layout, unrotate=unrotate), warmup=50, rep=300), 1)
print(json.dumps({"gpu": torch.cuda.get_device_name(), "layers": LAYERS, "prefix": PREFIX, "new": NEW,
                  "reps": REPS, "configs": out}, indent=1))
