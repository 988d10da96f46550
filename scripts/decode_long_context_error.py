#!/usr/bin/env python3
"""Decode attention error against float64 at long context, per split count (GPU).

    python scripts/decode_long_context_error.py [CANDIDATE.py ...]

Random INT4+BDR-128 pages whose values have a near-zero mean (offset ~ -7.5 x scale: the
case where the value accumulators' code bias dwarfs the output), 32 q / 8 KV heads,
head_dim 128, bf16 q; batch 2 at 8k / 32k / 128k tokens, each in 1 and in 8 splits.  Prints
the relative error (||o - ref|| / ||ref||) of the package's int4_decode_attention, of any
candidate files' (as bench_kernels.py --ab-kernel loads them), and of torch attention in
fp32 over bf16-rounded K/V (the rounding floor).
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sglang_sawint4 import format as fmt  # noqa: E402
from sglang_sawint4.kernels.decode import int4_decode_attention  # noqa: E402
from kernel_report import load_decode_candidate  # noqa: E402  (scripts/, this file's folder)

HQ, HK, D = 32, 8, 128


def random_meta(slots):
    scale = torch.rand(slots, HK, device="cuda") * 0.3 + 0.3
    offset = -7.5 * scale + torch.randn(slots, HK, device="cuda") * 0.1
    return torch.stack([scale, offset], -1).half()


def attention(q, k, v, ctx, dtype):
    """Per request: softmax(q k^T / sqrt(D)) v in ``dtype``, GQA by repeating K/V heads."""
    out = []
    for b in range(q.shape[0]):
        kb = k[b * ctx:(b + 1) * ctx].to(dtype).repeat_interleave(HQ // HK, 1)
        vb = v[b * ctx:(b + 1) * ctx].to(dtype).repeat_interleave(HQ // HK, 1)
        s = torch.einsum("hd,nhd->hn", q[b].to(dtype), kb) * D ** -0.5
        out.append(torch.einsum("hn,nhd->hd", torch.softmax(s, -1), vb))
    return torch.stack(out)


def main():
    kernels = {"package": int4_decode_attention}
    kernels.update({os.path.basename(p): load_decode_candidate(p).int4_decode_attention for p in sys.argv[1:]})
    torch.manual_seed(0)
    layout = fmt.Int4Format(D, 128)
    print(f"{torch.cuda.get_device_name(0)}; relative error vs float64, s<N> = N splits")
    for batch, ctx in [(2, 8192), (2, 32768), (2, 131072)]:
        slots = batch * ctx
        kd = torch.randint(0, 256, (slots, HK, D // 2), dtype=torch.uint8, device="cuda")
        vd = torch.randint(0, 256, (slots, HK, D // 2), dtype=torch.uint8, device="cuda")
        km, vm = random_meta(slots), random_meta(slots)
        q = torch.randn(batch, HQ, D, device="cuda").bfloat16()
        indptr = torch.arange(0, batch + 1, dtype=torch.int32, device="cuda") * ctx
        indices = torch.arange(slots, dtype=torch.int32, device="cuda")
        k = fmt.decode(kd, km, layout, is_value=False)
        v = fmt.decode(vd, vm, layout, is_value=True)
        ref = attention(q, k, v, ctx, torch.float64)
        floor = attention(q, k.bfloat16(), v.bfloat16(), ctx, torch.float32).bfloat16()

        def err(o):
            return ((o.double() - ref).norm() / ref.norm()).item()

        line = f"{batch} x {ctx}: bf16 K/V in torch {err(floor):.2e}"
        for name, fn in kernels.items():
            for splits in (1, 8):
                o = torch.full_like(q, float("nan"))
                logits = torch.empty(batch, HQ, 8, D, device="cuda")
                lse = torch.empty(batch, HQ, 8, device="cuda")
                fn(q, kd, km, vd, vm, o, indptr, indices, logits, lse,
                   torch.full((batch,), splits, dtype=torch.int32, device="cuda"), 8, D ** -0.5, layout)
                line += f", {name} s{splits} {err(o):.2e}"
        print(line, flush=True)
        del k, v, ref, floor
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
