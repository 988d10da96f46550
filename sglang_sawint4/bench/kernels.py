"""GPU kernel benchmark: decode attention and the KV store path, in GB/s.

    python -m sglang_sawint4.bench.kernels --out bench/results/kernels.json

Decode rows: BF16 (FlashInfer's paged decode), plain INT4 and INT4+BDR (ours) on
an 8B-shaped attention layer (32 q heads, 8 KV heads, head_dim 128) for batch
1..256 and context 1k..128k (skipping shapes whose BF16 cache would not fit in
--max-kv-gib).  Store rows: rotate_quantize_store for a batch of new tokens.
Slots: ``rows`` give each request one contiguous run of slots (what SGLang's allocator
hands a request prefilled into a fresh pool); ``rows_scattered_slots`` repeat the
batch >= 32 shapes with a random permutation of all slots (a long-running pool's
worst case: every token row of a request in a different place).
``gbps`` = bytes the kernel must move (each input read once, each output written
once) / median time; ``copy_gbps`` is a device-to-device copy on the same GPU,
counting bytes read + written.  Times: triton.testing.do_bench medians, after
warm-up, on random data.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys

import torch
import triton


from sglang_sawint4 import format as fmt
from sglang_sawint4.kernels.decode import (
    BLOCK_N, LOW_PARALLELISM_PAIRS_PER_SM, LOW_PARALLELISM_TILING, MAXNREG, NUM_STAGES, default_block_h,
    default_num_warps, int4_decode_attention)
from sglang_sawint4.kernels.splits import num_kv_splits_reference
from sglang_sawint4.kernels.store import rotate_quantize_store
from sglang_sawint4.serving.server import command_line

HQ, HK, D = 32, 8, 128
MAX_SPLITS = 16  # split scratch capacity; waves-rule A/Bs may use up to this many
SERVED_MAX_SPLITS = 8  # SGLang's default --triton-attention-num-kv-splits, the served rule's cap


def progress(it, total, label):
    try:
        from tqdm import tqdm

        return tqdm(it, total=total, desc=label, file=sys.stdout, mininterval=5)
    except ImportError:
        return it


def upper_median(values):
    """The middle value of a list (the upper one of the two middles for an even length)."""
    return sorted(values)[len(values) // 2]


def bench(fn, reps=50):
    return triton.testing.do_bench(fn, warmup=25, rep=reps, return_mode="median") * 1e3  # us


# Decode launches timed by do_bench at less than this are timed again as CUDA-graph replays,
# as the server launches them: below it do_bench can measure the host's launch path instead
# of the kernels (seen on H200 hosts: a floor of ~50 us per decode call on one machine and
# ~130 us on another, at batch 32 x 1k-8k alike).
GRAPH_BELOW_US = 1000


def bench_decode(fn):
    """(median us, "graph" | "do_bench") of one decode call: do_bench, then, when that is
    under GRAPH_BELOW_US, CUDA-graph replays of about 2 ms (do_bench where capture fails)."""
    t = bench(fn)
    if t >= GRAPH_BELOW_US:
        return t, "do_bench"
    try:
        return bench_graph(fn, calls=max(1, min(20, int(2 * GRAPH_BELOW_US / t)))), "graph"
    except RuntimeError as e:  # a launch path that cannot be captured
        print(f"CUDA-graph capture failed ({e}); do_bench time kept", flush=True)
        return t, "do_bench"


def bench_graph(fn, calls=20, replays=25):
    """Median time (us) of one ``fn`` call replayed from a CUDA graph of ``calls`` calls,
    as the served decode step launches it.  For kernels of a few microseconds, where
    do_bench measures the host launch (5-7 us) and its jitter (30-40 us outliers) instead."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return upper_median(times)


def copy_bandwidth(gib=2):
    n = gib * (1 << 30)
    a = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    b = torch.empty_like(a)
    t = bench(lambda: b.copy_(a), reps=200)
    return 2 * n / (t * 1e-6) / 1e9


def num_kv_splits(batch, context, sms, waves=None, head_dim=D):
    """Splits per request: the served rule (kernels/splits.py, capped at SGLang's default
    --triton-attention-num-kv-splits) unless `waves` is given, in which case enough
    (batch x kv_head x split) programs for `waves` per SM, >= 512 tokens/split (the rule of
    the A/Bs before the served rule existed)."""
    if waves is None:
        return num_kv_splits_reference([context] * batch, HK, SERVED_MAX_SPLITS, head_dim, sms)[0]
    want = math.ceil(waves * sms / (batch * HK))
    return max(1, min(MAX_SPLITS, want, math.ceil(context / 512)))


TUNE = [dict(block_n=64, num_warps=1, num_stages=2), dict(block_n=64, num_warps=1, num_stages=4),
        dict(block_n=32, num_warps=1, num_stages=3), dict(block_n=64, num_warps=2, num_stages=3),
        dict(block_n=32, num_warps=2, num_stages=3), dict(block_n=64, num_warps=2, num_stages=3, maxnreg=128),
        dict(block_n=64, num_warps=1, num_stages=3, block_h=16), dict(block_n=128, num_warps=4, num_stages=3)]
# besides the package's default (64 tokens x 1 warp x 3 stages at head_dim 128, uncapped); each
# with its register cap (decode.MAXNREG: none) and query-head columns (decode.default_block_h)
# unless given.  The split rule (kernels/splits.py) counts the default's programs per SM, so
# rows with fewer programs per SM than the default's get more than one wave.
TUNE_ROUNDS = 3


def slot_indices(slots, scattered):
    """kv_indices over `slots` slots: one contiguous run per request, or a random permutation."""
    if scattered:
        return torch.randperm(slots, device="cuda").to(torch.int32)
    return torch.arange(slots, device="cuda", dtype=torch.int32)


def int4_decode_case(layout, batch, context, sms, cfg=None, waves=None, scattered=False,
                     attention=int4_decode_attention):
    d = layout.head_dim
    slots = batch * context
    kd, km = fmt.allocate_layer(slots, HK, d, "cuda")
    vd, vm = fmt.allocate_layer(slots, HK, d, "cuda")
    kd.random_(0, 256)
    vd.random_(0, 256)
    km.uniform_(0.01, 0.1)
    vm.uniform_(0.01, 0.1)
    q = torch.randn(batch, HQ, d, dtype=torch.bfloat16, device="cuda")
    o = torch.empty_like(q)
    indptr = torch.arange(0, batch + 1, dtype=torch.int32, device="cuda") * context
    indices = slot_indices(slots, scattered)
    splits = torch.full((batch,), num_kv_splits(batch, context, sms, waves, d), dtype=torch.int32, device="cuda")
    logits = torch.empty(batch, HQ, MAX_SPLITS, d, dtype=torch.float32, device="cuda")
    lse = torch.empty(batch, HQ, MAX_SPLITS, dtype=torch.float32, device="cuda")

    def run():
        return attention(q, kd, km, vd, vm, o, indptr, indices, logits, lse, splits, MAX_SPLITS,
                         d ** -0.5, layout, **(cfg or {}))

    moved = slots * HK * layout.bytes_per_token_head() + slots * 4 + 2 * q.numel() * 2
    return run, moved


def bf16_decode_case(batch, context, scattered=False):
    import flashinfer

    slots = batch * context
    k = torch.randn(slots, HK, D, dtype=torch.bfloat16, device="cuda")
    v = torch.randn(slots, HK, D, dtype=torch.bfloat16, device="cuda")
    q = torch.randn(batch, HQ, D, dtype=torch.bfloat16, device="cuda")
    indptr = torch.arange(0, batch + 1, dtype=torch.int32, device="cuda") * context
    indices = slot_indices(slots, scattered)
    last = torch.ones(batch, dtype=torch.int32, device="cuda")
    ws = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=True)
    wrapper.plan(indptr, indices, last, HQ, HK, D, 1, data_type=torch.bfloat16, q_data_type=torch.bfloat16)
    kv = (k.view(slots, 1, HK, D), v.view(slots, 1, HK, D))

    def run():
        wrapper.run(q, kv)

    moved = slots * HK * D * 2 * 2 + slots * 4 + 2 * q.numel() * 2
    return run, moved


def store_case(layout, tokens):
    slots = max(tokens * 4, 4096)
    kd, km = fmt.allocate_layer(slots, HK, D, "cuda")
    vd, vm = fmt.allocate_layer(slots, HK, D, "cuda")
    k = torch.randn(tokens, HK, D, dtype=torch.bfloat16, device="cuda")
    v = torch.randn(tokens, HK, D, dtype=torch.bfloat16, device="cuda")
    loc = torch.randperm(slots, device="cuda")[:tokens]

    def run():
        rotate_quantize_store(k, v, loc, kd, km, vd, vm, layout)

    moved = tokens * HK * (D * 2 * 2 + layout.bytes_per_token_head()) + tokens * 8
    return run, moved


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    rows = [r for r in result["rows"] if r["kernel"] == "decode"]
    batches = sorted({r["batch"] for r in rows})
    show = [b for b in (1, 32, 128) if b in batches]
    series = sorted({(r["method"], r["block"]) for r in rows}, key=lambda mb: (mb[0], -(mb[1] or 0)))
    colors = {("bf16", None): "tab:gray", ("int4", None): "tab:blue"}
    palette = iter(["tab:red", "tab:orange", "tab:purple"])
    for b in show:
        for m, blk in series:
            color = colors.setdefault((m, blk), next(palette, "tab:green"))
            pts = sorted((r["context"], r["gbps"]) for r in rows
                         if r["batch"] == b and r["method"] == m and r["block"] == blk)
            name = m if blk is None else f"{m}-{blk}"
            if pts:
                axes[0].plot([p[0] for p in pts], [p[1] for p in pts], "-" if b == 32 else ":", color=color,
                             marker="o", alpha=1.0 if b == 32 else 0.45, label=f"{name} batch {b}")
    for m, blk in series:  # the scattered-slot worst case, batch 32 only
        pts = sorted((r["context"], r["gbps"]) for r in result.get("rows_scattered_slots", [])
                     if r["batch"] == 32 and r["method"] == m and r["block"] == blk)
        if pts:
            name = m if blk is None else f"{m}-{blk}"
            axes[0].plot([p[0] for p in pts], [p[1] for p in pts], "--", color=colors[(m, blk)], marker="x",
                         label=f"{name} batch 32, scattered slots")
    axes[0].axhline(result["copy_gbps"], color="k", lw=0.8, ls=":", label="D2D copy")
    axes[0].set_xscale("log", base=2)
    axes[0].set_xlabel("context (tokens)")
    axes[0].set_ylabel("achieved GB/s (bytes moved / time)")
    axes[0].set_title("decode attention, 32 q / 8 KV heads, d=128")
    axes[0].legend(fontsize=7, ncol=2)
    srows = [r for r in result["rows"] if r["kernel"] == "store"]
    toks = sorted({r["batch"] for r in srows})
    sseries = sorted({(r["method"], r["block"]) for r in srows}, key=lambda mb: (mb[0], -(mb[1] or 0)))
    width = 0.8 / max(len(sseries), 1)
    for i, (m, blk) in enumerate(sseries):
        vals = [next((r["time_us"] for r in srows if r["batch"] == t and r["method"] == m and r["block"] == blk), 0)
                for t in toks]
        axes[1].bar([j + width * i for j in range(len(toks))], vals, width=width,
                    label=m if blk is None else f"{m}-{blk}", color=colors.get((m, blk), "tab:green"))
    axes[1].set_xticks([j + 0.4 - width / 2 for j in range(len(toks))], [str(t) for t in toks])
    axes[1].set_xlabel("new tokens per launch (K and V, 8 KV heads)")
    axes[1].set_ylabel("time (us)")
    axes[1].set_yscale("log")
    axes[1].set_title("rotate_quantize_store")
    axes[1].legend()
    fig.suptitle(f"{result['gpu']}, torch {result['torch']}, triton {result['triton']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def replot(json_path):
    """Redraw the PNG of an existing results file (no GPU needed)."""
    with open(json_path) as f:
        plot(json.load(f), os.path.splitext(json_path)[0] + ".png")


VARIANT_KEYS = ("block_n", "num_warps", "num_stages", "maxnreg", "block_h", "waves")


def parse_variant(text):
    """'block_n=64,maxnreg=96,waves=2' -> ({'block_n': 64, 'maxnreg': 96}, 2): stage-1 launch
    options of int4_decode_attention plus the split heuristic's waves (default None: the
    served rule)."""
    cfg = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        if key not in VARIANT_KEYS or not value.isdigit():
            raise SystemExit(f"bad --ab-variants item {item!r}: want {'/'.join(VARIANT_KEYS)}=INT")
        cfg[key] = int(value)
    return cfg, cfg.pop("waves", None)


def ab_decode(args, rounds=3):
    """A/B of decode kernels against the installed one: a candidate file's int4_decode_attention
    and/or launch-option variants of the installed one; same process, alternating the kernels
    ``rounds`` times per shape (drift hits all alike)."""
    from sglang_sawint4.bench.kernel_report import load_decode_candidate

    kernels = {"installed": (int4_decode_attention, {}, None)}
    for text in filter(None, (args.ab_kernel or "").split(";")):
        path, _, options = text.partition(":")
        candidate = load_decode_candidate(path)
        cfg, waves = parse_variant(options)
        name = os.path.splitext(os.path.basename(path))[0] + (f":{options}" if options else "")
        kernels[name] = (candidate.int4_decode_attention, cfg, waves)
    for text in filter(None, (args.ab_variants or "").split(";")):
        cfg, waves = parse_variant(text)
        kernels[text] = (int4_decode_attention, cfg, waves)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    result = {"gpu": torch.cuda.get_device_name(0), "triton": triton.__version__, "copy_gbps": copy_bandwidth(),
              "head_dim": args.ab_head_dim,
              "command": command_line(), "rows": []}
    print(f"{result['gpu']}: D2D copy {result['copy_gbps']:.0f} GB/s", flush=True)
    layout = fmt.Int4Format(args.ab_head_dim, min(128, args.ab_head_dim))
    batches = [int(b) for b in args.batches.split(",")]
    contexts = [int(c) for c in args.contexts.split(",")]
    # untimed pass over the first shape: compiles every kernel and brings the clocks up, which
    # otherwise lands on whichever kernel the first shape times first (seen: +10% on the H200)
    for fn, cfg, waves in kernels.values():
        run, _ = int4_decode_case(layout, batches[0], contexts[0], sms, cfg, waves, attention=fn)
        bench(run)
        del run
    for batch in batches:
        for context in contexts:
            times = {name: [] for name in kernels}
            installed_out, diffs = None, {}
            for r in range(rounds):
                for name, (fn, cfg, waves) in kernels.items():
                    torch.manual_seed(batch * 1_000_003 + context)  # the same inputs for every kernel
                    run, moved = int4_decode_case(layout, batch, context, sms, cfg, waves, attention=fn)
                    if r == 0:
                        # a kernel that disagrees with the installed one (timed first) is no candidate
                        out = run().float()
                        installed_out = out if installed_out is None else installed_out
                        diffs[name] = ((out - installed_out).norm() / installed_out.norm()).item()
                        del out
                    times[name].append(bench_decode(run)[0])
                    del run
                    torch.cuda.empty_cache()
            row = {"batch": batch, "context": context, "moved_bytes": moved}
            for name, ts in times.items():
                t = upper_median(ts)
                row[name] = {"time_us": t, "gbps": moved / (t * 1e-6) / 1e9, "all_us": ts,
                             "rel_diff_vs_installed": diffs[name]}
            result["rows"].append(row)
            print(f"{batch:>4} x {context:>6}: " + ", ".join(
                f"{name} {row[name]['time_us']:.1f} us ({row[name]['gbps'] / result['copy_gbps']:.0%}"
                f"{'' if name == 'installed' else ', diff %.1e' % row[name]['rel_diff_vs_installed']})"
                for name in kernels), flush=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench/results/kernels.json")
    p.add_argument("--batches", default="1,8,32,64,128,256")
    p.add_argument("--contexts", default="1024,4096,8192,32768,131072")
    p.add_argument("--max-kv-gib", type=float, default=12.0, help="skip shapes whose BF16 K+V exceed this")
    p.add_argument("--bdr-blocks", default="128,64")
    p.add_argument("--rounds", type=int, default=5, help="timings per decode row, interleaved with the other methods")
    p.add_argument("--store-tokens", default="1,32,256,4096,16384")
    p.add_argument("--replot", metavar="JSON", help="only redraw the plot of a results file")
    p.add_argument("--profile-case", metavar="BATCHxCONTEXT",
                   help="only launch INT4+BDR-128 decode on this shape (contiguous slots) a few times, "
                        "for a profiler (scripts/gpu_run.sh profile runs it under ncu)")
    p.add_argument("--ab-kernel", metavar="FILE[:OPTIONS];...",
                   help="only time INT4+BDR-128 decode (contiguous slots) of these files' int4_decode_attention "
                        "(each with optional --ab-variants options) against the package's, interleaved, on "
                        "--batches x --contexts; writes --out")
    p.add_argument("--ab-head-dim", type=int, default=D,
                   help="head_dim of the A/B shapes (INT4+BDR with the largest block up to 128)")
    p.add_argument("--ab-variants", metavar="V1;V2",
                   help="like --ab-kernel, for launch-option variants of the package's kernel, e.g. "
                        "'maxnreg=128;block_n=64,maxnreg=96,waves=2' (keys: " + ", ".join(VARIANT_KEYS) + ")")
    args = p.parse_args()
    if args.replot:
        return replot(args.replot)
    if args.ab_kernel or args.ab_variants:
        return ab_decode(args)
    if args.profile_case:
        batch, context = (int(x) for x in args.profile_case.split("x"))
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        run, moved = int4_decode_case(fmt.Int4Format(D, 128), batch, context, sms)
        for _ in range(5):
            run()
        torch.cuda.synchronize()
        t = bench(run)
        print(f"profile case {batch}x{context}: {t:.1f} us, {moved / (t * 1e-6) / 1e9:.0f} GB/s (outside ncu)")
        return

    props = torch.cuda.get_device_properties(0)
    sms = props.multi_processor_count
    result = {"gpu": props.name, "torch": torch.__version__, "triton": triton.__version__,
              "python": platform.python_version(), "copy_gbps": copy_bandwidth(),
              "command": command_line(),
              "timing": f"decode: median of {args.rounds} rounds (methods interleaved) of triton.testing.do_bench "
                        f"medians, or, for calls under {GRAPH_BELOW_US} us, of CUDA-graph replay medians "
                        "(bench_decode; timing_modes says which each method got); store: CUDA-graph replay "
                        "median (bench_graph)",
              "rows": []}
    print(f"{props.name}: D2D copy {result['copy_gbps']:.0f} GB/s", flush=True)
    layouts = [("int4", None, fmt.Int4Format(D))] + [
        ("int4-bdr", int(b), fmt.Int4Format(D, int(b))) for b in args.bdr_blocks.split(",")]
    try:
        import flashinfer

        have_fi = True
        result["flashinfer"] = getattr(flashinfer, "__version__", "unknown")  # behind the BF16 rows
    except ImportError as e:
        print(f"FlashInfer unavailable ({e}); BF16 rows skipped", flush=True)
        have_fi = False

    # The rows run the package's stage-1 tiling (what the server runs: decode.default_tiling,
    # which changes it for few requests), with the served split rule (kernels/splits.py).  On
    # record beside them: a sweep of other tilings on one shape, every tiling run once untimed
    # first (compilation, clocks), then TUNE_ROUNDS rounds interleaved; a tiling faster than
    # the default by more than the spread between runs of the A/B (bench_kernels.py
    # --ab-variants) is a lead for a new default, not taken here.
    default_cfg = {"block_n": BLOCK_N, "num_warps": default_num_warps(D), "num_stages": NUM_STAGES,
                   "maxnreg": MAXNREG.get(D), "block_h": default_block_h(HQ // HK)}
    tune_cfgs = [default_cfg] + [{**default_cfg, **cfg} for cfg in TUNE]
    tune_runs = []
    for cfg in tune_cfgs:
        run, moved = int4_decode_case(fmt.Int4Format(D, 128), 32, 8192, sms, cfg)
        bench(run)
        tune_runs.append((cfg, run, []))
    for _ in range(TUNE_ROUNDS):
        for cfg, run, times in tune_runs:
            times.append(bench_decode(run)[0])
    tune = []
    for cfg, run, times in tune_runs:
        t = upper_median(times)
        tune.append({**cfg, "time_us": t, "gbps": moved / (t * 1e-6) / 1e9, "all_us": times})
        print(f"tune {cfg}: {t:.1f} us {tune[-1]['gbps']:.0f} GB/s", flush=True)
    del tune_runs, run
    low_block_n, low_warps = LOW_PARALLELISM_TILING.get(D, (None, None))
    result["decode_config"] = {
        **default_cfg, "splits": f"served rule (sglang_sawint4.kernels.splits), at most {SERVED_MAX_SPLITS}",
        "tiling": f"decode.default_tiling: the above; {low_block_n} tokens x {low_warps} warps at <= "
                  f"{LOW_PARALLELISM_PAIRS_PER_SM} (request, KV head) pairs per SM"}
    result["tune"] = tune
    shapes = [(int(b), int(c)) for b in args.batches.split(",") for c in args.contexts.split(",")
              if int(b) * int(c) * HK * D * 4 <= args.max_kv_gib * (1 << 30)]
    result["rows_scattered_slots"] = []
    timing_modes = {}
    runs = [(b, c, False) for b, c in shapes] + [(b, c, True) for b, c in shapes if b >= 32 and c >= 8192]
    for batch, context, scattered in progress(runs, len(runs), "decode"):
        cases = ([("bf16", None, lambda: bf16_decode_case(batch, context, scattered))] if have_fi else []) + [
            (m, b, (lambda l=l: int4_decode_case(l, batch, context, sms, None, None, scattered)))
            for m, b, l in layouts]
        # every method of a shape timed in turn, --rounds times: a slow spell of the GPU then
        # lands on one round of each, not on one method's whole measurement
        made = [(method, block, *make()) for method, block, make in cases]
        times = {(method, block): [] for method, block, _, _ in made}
        for _ in range(args.rounds):
            for method, block, run, _ in made:
                t, mode = bench_decode(run)
                times[(method, block)].append(t)
                timing_modes.setdefault(method, set()).add(mode)
        for method, block, run, moved in made:
            t = upper_median(times[(method, block)])
            result["rows_scattered_slots" if scattered else "rows"].append(
                {"kernel": "decode", "method": method, "block": block, "batch": batch, "context": context,
                 "time_us": t, "gbps": moved / (t * 1e-6) / 1e9})
        del made, run
        torch.cuda.empty_cache()
    for tokens in [int(t) for t in args.store_tokens.split(",")]:
        for method, block, layout in layouts:
            run, moved = store_case(layout, tokens)
            t = bench_graph(run)
            result["rows"].append({"kernel": "store", "method": method, "block": block, "batch": tokens,
                                   "context": 0, "time_us": t, "gbps": moved / (t * 1e-6) / 1e9})

    result["timing_modes"] = {method: sorted(modes) for method, modes in timing_modes.items()}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    plot(result, os.path.splitext(args.out)[0] + ".png")
    print(f"{'kernel':7} {'method':9} {'blk':>4} {'batch':>5} {'ctx':>7} {'us':>9} {'GB/s':>7}  slots")
    for key in ("rows", "rows_scattered_slots"):
        for r in result[key]:
            if r["kernel"] == "store" or r["batch"] in (1, 32, 128):
                print(f"{r['kernel']:7} {r['method']:9} {str(r['block']):>4} {r['batch']:>5} {r['context']:>7} "
                      f"{r['time_us']:9.1f} {r['gbps']:7.0f}  {'scattered' if key != 'rows' else 'contiguous'}")


if __name__ == "__main__":
    main()
