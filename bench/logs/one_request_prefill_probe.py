"""Probe: what one prefill of one request over a cached prefix costs per forward's attention,
BF16 on SGLang's FlashInfer calls against the INT4 FlashInfer path (docs/results.md,
2026-12-02 23:15: under spread arrivals the shared-prefix point's prefill batches are mostly
one request, 256 new tokens over an 8k cached prefix, and there INT4's TTFT p50 is 1.24x
(plain) and 1.42x (BDR, staging un-rotated) BF16's).

8B-shaped attention (32 q / 8 KV heads, head_dim 128), 32 layers, each with its own cache.
Each layer stores the new K/V and attends:
  bf16       SGLang's FlashInfer extend: index-copy store, ragged causal prefill with LSE
             ("auto" backend), paged prefill over the BF16 prefix ("fa2"), merge_state
  int4, int4-bdr   Int4FlashInferPrefillBackend._int4_extend_combined with the store inside
             (rotate_quantize_store_and_stage), as served (BDR-128: prefix staged as
             stored, new tokens rotated by the store's launch)
  ..., store then move   rotate_quantize_store + _int4_extend (to_stored_space's own launch),
             as served before the store took the move over
Plans are made once, outside the timed regions.  Every timed region is enqueued behind a
~0.25 s sleep kernel: host us is the enqueue cost per call, device us the GPU time per call,
and "host waited" flags a region where the host caught up with the GPU (a synchronizing
call, or enqueue longer than the sleep), whose device time then holds host gaps.
Per call: each operation a layer makes, alone, 100 calls; then the 32-layer loop per config,
interleaved; the INT4 kernels also through Triton's own dispatch (``DirectLaunch`` off).  Run on the GPU host with `bash scripts/gpu_run.sh install prefill-probe`
(output in $OUT/one_request_prefill_probe.txt).
"""
import cProfile
import io
import json
import pstats
import statistics
import time
from types import SimpleNamespace

import torch
import triton
from flashinfer import BatchPrefillWithPagedKVCacheWrapper, BatchPrefillWithRaggedKVCacheWrapper, merge_state

from sglang_sawint4 import flashinfer_prefill as fp
from sglang_sawint4 import format as fmt
from sglang_sawint4.kernels import dequant as dequant_kernels
from sglang_sawint4.kernels import rotate as rotate_kernels
from sglang_sawint4.kernels import store as store_kernels
from sglang_sawint4.kernels.dequant import dequantize_pages
from sglang_sawint4.kernels.rotate import from_stored_space, to_stored_space
from sglang_sawint4.kernels.store import rotate_quantize_store, rotate_quantize_store_and_stage

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
ragged = BatchPrefillWithRaggedKVCacheWrapper(workspace, "NHD", backend="auto")  # as SGLang's backend


def plan_ragged():
    ragged.begin_forward(qo_indptr, qo_indptr, HQ, HK, D, causal=True, q_data_type=BF16)


# -- BF16: the calls SGLang's FlashInfer backend makes for an extend over a cached prefix --------
bf16_cache = [(torch.randn(PREFIX + NEW, HK, D, device=DEV, dtype=BF16),
               torch.randn(PREFIX + NEW, HK, D, device=DEV, dtype=BF16)) for _ in range(LAYERS)]
paged = BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD", backend="fa2")  # as SGLang's backend


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
    backend.int4_pool = SimpleNamespace(
        get_int4_layer=lambda i: data[i], key_center=lambda i, stored=False: None,
        store_and_stage=lambda i, loc, q_, k_, v_, k_rows, v_rows, center_rows: rotate_quantize_store_and_stage(
            q_, k_, v_, loc, *data[i], layout, None, k_rows, v_rows, center_rows))
    backend.prefill_wrapper_ragged = ragged
    return backend, data


plain, bdr = fmt.Int4Format(D), fmt.Int4Format(D, 128)
(b_plain, d_plain), (b_bdr, d_bdr) = int4_backend(plain), int4_backend(bdr)
SLEEP_CYCLES = int(5e8)  # ~0.25 s of GPU work ahead of each timed region


def timed(fn, n):
    """(host us per call, device us per call, host_waited): ``n`` calls enqueued behind a ~0.25 s
    sleep kernel; host_waited says the sleep had ended before the host finished enqueuing
    (a synchronizing call inside, or host time over the sleep): then the device time holds
    host waits."""
    torch.cuda.synchronize()
    torch.cuda._sleep(SLEEP_CYCLES)
    slept, end = torch.cuda.Event(), torch.cuda.Event(enable_timing=True)
    start = torch.cuda.Event(enable_timing=True)
    slept.record()
    start.record()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    waited = slept.query()
    end.record()
    torch.cuda.synchronize()
    return (t1 - t0) * 1e6 / n, start.elapsed_time(end) * 1e3 / n, waited


def medians(runs):
    """{host_us, device_us, host_waited} over ``timed`` results."""
    return {"host_us": round(statistics.median(r[0] for r in runs), 1),
            "device_us": round(statistics.median(r[1] for r in runs), 1),
            "host_waited": any(r[2] for r in runs)}


# -- one call of each operation a layer makes (plans made once, outside the timed region) --------
plan_ragged()
paged.begin_forward(qo_indptr, kv_indptr, torch.arange(PREFIX, dtype=torch.int32), torch.ones(1, dtype=torch.int32),
                    HQ, HK, D, 1, q_data_type=BF16, kv_data_type=BF16)
paged_fa3 = None
try:
    paged_fa3 = BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD", backend="fa3")
    paged_fa3.begin_forward(qo_indptr, kv_indptr, torch.arange(PREFIX, dtype=torch.int32),
                            torch.ones(1, dtype=torch.int32), HQ, HK, D, 1, q_data_type=BF16, kv_data_type=BF16)
    paged_fa3.forward_return_lse(q, bf16_cache[0], causal=False, sm_scale=SCALE, logits_soft_cap=0.0)
except Exception as e:  # noqa: BLE001 - reported, not fatal
    print("fa3 paged prefill unavailable:", repr(e)[:300])
    paged_fa3 = None
kc, vc = bf16_cache[0]
o1, s1 = ragged.forward_return_lse(q, k_new, v_new, causal=True, sm_scale=SCALE, logits_soft_cap=0.0)
o2, s2 = paged.forward_return_lse(q, (kc, vc), causal=False, sm_scale=SCALE, logits_soft_cap=0.0)
slots = torch.arange(PREFIX, dtype=torch.int32, device=DEV)
ks, vs = torch.empty(PREFIX, HK, D, dtype=BF16, device=DEV), torch.empty(PREFIX, HK, D, dtype=BF16, device=DEV)
b_plain._plan_prefix([PREFIX], [NEW], torch.zeros(1, dtype=torch.int64, device=DEV),
                     torch.tensor([PREFIX], dtype=torch.int32, device=DEV), torch.tensor([NEW], dtype=torch.int32, device=DEV))
assert b_plain._combined is not None  # one request over an 8k prefix: one causal call
layer0 = SimpleNamespace(layer_id=0, scaling=SCALE)


def bf16_store():
    kc[new_loc], vc[new_loc] = k_new, v_new


ops = {
    "bf16 store (index copy)": bf16_store,
    "ragged causal prefill": lambda: ragged.forward_return_lse(q, k_new, v_new, causal=True, sm_scale=SCALE,
                                                               logits_soft_cap=0.0),
    "paged prefill fa2, 8k": lambda: paged.forward_return_lse(q, (kc, vc), causal=False, sm_scale=SCALE,
                                                              logits_soft_cap=0.0),
    "merge_state": lambda: merge_state(o1, s1, o2, s2),
    "merge_partial_attention": lambda: fp.merge_partial_attention(o1, s1, o2, s2),
    "rotate_quantize_store plain": lambda: rotate_quantize_store(k_new, v_new, new_loc, *d_plain[0], plain),
    "rotate_quantize_store bdr": lambda: rotate_quantize_store(k_new, v_new, new_loc, *d_bdr[0], bdr),
    "dequantize_pages 8k plain": lambda: dequantize_pages(*d_plain[0], slots, ks, vs, plain),
    "dequantize_pages 8k bdr as stored": lambda: dequantize_pages(*d_bdr[0], slots, ks, vs, bdr, unrotate=False),
    "to_stored_space bdr": lambda: to_stored_space(q, k_new, v_new, bdr),
    "from_stored_space bdr": lambda: from_stored_space(o1, bdr),
    "_attend_combined (fa2, 8k + 256 staged, causal)": lambda: b_plain._attend_combined(
        q, b_plain._k_stage, b_plain._v_stage, SCALE),
    "_int4_extend plain": lambda: b_plain._int4_extend(q, k_new, v_new, layer0),
}
if paged_fa3 is not None:
    ops["paged prefill fa3, 8k"] = lambda: paged_fa3.forward_return_lse(q, (kc, vc), causal=False, sm_scale=SCALE,
                                                                       logits_soft_cap=0.0)
b_bdr._plan_prefix([PREFIX], [NEW], torch.zeros(1, dtype=torch.int64, device=DEV),
                   torch.tensor([PREFIX], dtype=torch.int32, device=DEV), torch.tensor([NEW], dtype=torch.int32, device=DEV))
ops["_int4_extend bdr"] = lambda: b_bdr._int4_extend(q, k_new, v_new, layer0)
for name, b in (("plain", b_plain), ("bdr", b_bdr)):
    ops[f"_int4_extend_combined {name}, store inside"] = (
        lambda b=b: b._int4_extend_combined(q, k_new, v_new, layer0, store_loc=new_loc))
    ops[f"rotate_quantize_store_and_stage {name}"] = lambda b=b: b.int4_pool.store_and_stage(
        0, new_loc, q, k_new, v_new, b._k_stage[:NEW], b._v_stage[:NEW], center_rows=b.int4_format.rotate_k)
LAUNCHERS = (store_kernels._rotate_quantize_store_launch, store_kernels._store_and_stage_launch,
             dequant_kernels._dequantize_pages_launch, rotate_kernels._rotate_rows_launch,
             rotate_kernels._rotate_qkv_launch)
for launcher in LAUNCHERS:  # on here whether or not this Triton release is marked checked
    launcher.direct = True


def through_tritons_dispatch(fn):
    """``fn`` with every INT4 kernel launched through Triton's own call (no DirectLaunch)."""
    def run():
        for launcher in LAUNCHERS:
            launcher.direct = False
        try:
            fn()
        finally:
            for launcher in LAUNCHERS:
                launcher.direct = True
    return run


for name in ("rotate_quantize_store plain", "dequantize_pages 8k plain", "_int4_extend plain"):
    ops[name + ", Triton's dispatch"] = through_tritons_dispatch(ops[name])
for fn in ops.values():  # warm-up: compiles, module loads
    fn(), fn()
torch.cuda.synchronize()
op_runs = {name: [] for name in ops}
for rep in range(7):  # interleaved: drifts in the host's speed fall on every op alike
    for name, fn in ops.items():
        op_runs[name].append(timed(fn, 100))
op_times = {name: medians(runs) for name, runs in op_runs.items()}


# -- a forward's attention, 32 layers, plan excluded ------------------------------------------
def bf16_layers():
    for k_cache, v_cache in bf16_cache:
        k_cache[new_loc], v_cache[new_loc] = k_new, v_new
        a, sa = ragged.forward_return_lse(q, k_new, v_new, causal=True, sm_scale=SCALE, logits_soft_cap=0.0)
        b, sb = paged.forward_return_lse(q, (k_cache, v_cache), causal=False, sm_scale=SCALE, logits_soft_cap=0.0)
        merge_state(a, sa, b, sb)


def int4_layers(backend):
    for i in range(LAYERS):
        backend._int4_extend_combined(q, k_new, v_new, SimpleNamespace(layer_id=i, scaling=SCALE), store_loc=new_loc)


def int4_layers_store_then_move(backend, data, layout):
    for i in range(LAYERS):
        rotate_quantize_store(k_new, v_new, new_loc, *data[i], layout)
        backend._int4_extend(q, k_new, v_new, SimpleNamespace(layer_id=i, scaling=SCALE))


forwards = {"bf16 (fa2, as SGLang)": bf16_layers, "int4": lambda: int4_layers(b_plain),
            "int4-bdr": lambda: int4_layers(b_bdr),
            "int4, store then move": lambda: int4_layers_store_then_move(b_plain, d_plain, plain),
            "int4-bdr, store then move": lambda: int4_layers_store_then_move(b_bdr, d_bdr, bdr)}
forwards["int4, Triton's dispatch"] = through_tritons_dispatch(forwards["int4"])
forwards["int4-bdr, Triton's dispatch"] = through_tritons_dispatch(forwards["int4-bdr"])
for fn in forwards.values():
    fn()
forward_times = {}
for rep in range(5):  # interleaved
    for name, fn in forwards.items():
        forward_times.setdefault(name, []).append(timed(fn, 3))
forward_times = {name: medians(runs) for name, runs in forward_times.items()}
print(json.dumps({"gpu": torch.cuda.get_device_name(), "layers": LAYERS, "prefix": PREFIX, "new": NEW,
                  "forward_attention_32_layers": forward_times, "per_call": op_times}, indent=1))
print(f"{'per call':48s} {'host us':>9s} {'device us':>10s}")
for name, t in op_times.items():
    print(f"{name:48s} {t['host_us']:9.1f} {t['device_us']:10.1f}{'  (host waited)' if t['host_waited'] else ''}")
for name, t in forward_times.items():
    print(f"{name + ' x32 layers':48s} {t['host_us']:9.1f} {t['device_us']:10.1f}"
          f"{'  (host waited)' if t['host_waited'] else ''}")

# where a forward's host time goes: cProfile over 3 forwards per config (the GPU busy behind a
# sleep, so no call waits for it; cProfile's own cost inflates every Python call alike)
for name in ("bf16 (fa2, as SGLang)", "int4"):
    prof = cProfile.Profile()
    torch.cuda.synchronize()
    torch.cuda._sleep(SLEEP_CYCLES)
    prof.enable()
    for _ in range(3):
        forwards[name]()
    prof.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(16)
    print(f"== cProfile, {name}, 3 forwards (tottime)")
    print("\n".join(line for line in text.getvalue().splitlines()[6:] if line.strip()))
