"""Compile every Triton launch the kernel wrappers make for an NVIDIA GPU target, on a machine
without one (run by tests/test_kernels_compile.py in a process without TRITON_INTERPRET).

The wrappers run on CPU tensors with their launches captured instead of made; each captured
launch (kernel, argument types, constexprs, options) is then compiled for the target through
Triton's NVIDIA backend (ptxas ships with Triton).  The decode kernel is captured on both its
paths: the portable one and the inline-PTX one a GPU takes.  This finds what the CPU
interpreter cannot: code the compiler rejects (types, layouts, inline PTX).  It does not run
anything, and it checks this machine's Triton, which may differ from the GPU host's.

    python tests/compile_for_gpu.py [--arch 90] [--resources]    # prints a JSON summary last

``--resources`` adds each kernel's most registers and local (spill) bytes over its variants,
from ``cuobjdump --dump-resource-usage`` of the compiled binaries.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

if os.environ.get("TRITON_INTERPRET"):
    sys.exit("run without TRITON_INTERPRET: interpreted kernels cannot be compiled")

import torch  # noqa: E402
import triton  # noqa: E402
import triton.backends.nvidia  # noqa: E402,F401 - its bundled cuobjdump
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import KernelInterface  # noqa: E402

from sglang_sawint4 import format as fmt  # noqa: E402
from sglang_sawint4.kernels import decode, launch  # noqa: E402
from sglang_sawint4.kernels.dequant import dequantize_pages  # noqa: E402
from sglang_sawint4.kernels.rotate import from_stored_space, rotate_rows, to_stored_space  # noqa: E402
from sglang_sawint4.kernels.splits import int4_num_kv_splits  # noqa: E402
from sglang_sawint4.kernels.store import rotate_quantize_store, rotate_quantize_store_and_stage  # noqa: E402

_POINTER = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.uint8: "*u8",
            torch.int16: "*i16", torch.int32: "*i32", torch.int64: "*i64"}
_OPTIONS = ("num_warps", "num_stages", "maxnreg")
captured = {}  # key -> (kernel, signature, constexprs, options)


def capture(kernel, args, kwargs):
    """Record one launch: each parameter's type (or constexpr value) from the call."""
    values = list(args)
    for p in kernel.params[len(args):]:
        values.append(kwargs[p.name] if p.name in kwargs else p.default)
    signature, constexprs = {}, {}
    for p, v in zip(kernel.params, values):
        if p.is_constexpr or v is None:
            signature[p.name], constexprs[p.name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            signature[p.name] = _POINTER[v.dtype]
        elif isinstance(v, bool):
            signature[p.name] = "i1"
        elif isinstance(v, int):
            signature[p.name] = "i32" if -2**31 <= v < 2**31 else "i64"
        elif isinstance(v, float):
            signature[p.name] = "fp32"
        else:
            raise TypeError(f"{kernel.__name__}: argument {p.name} of type {type(v).__name__}")
    options = {k: kwargs[k] for k in _OPTIONS if kwargs.get(k) is not None}
    if options.get("maxnreg") == -1:
        del options["maxnreg"]
    key = (kernel.__name__, json.dumps(signature, sort_keys=True), repr(sorted(constexprs.items())),
           repr(sorted(options.items())))
    captured.setdefault(key, (kernel, signature, constexprs, options))


launch.DirectLaunch.__getitem__ = lambda self, grid: lambda *a, **kw: capture(self.kernel, a, kw)
KernelInterface.__getitem__ = lambda self, grid: lambda *a, **kw: capture(self, a, kw)


def calls(layout, dtype, center):
    """The wrappers' calls as the prefill and decode paths make them, for one layout."""
    d, hk, hq, n, slots, splits = layout.head_dim, 2, 8, 40, 64, 4
    k_data, k_meta = fmt.allocate_layer(slots, hk, d)
    v_data, v_meta = fmt.allocate_layer(slots, hk, d)
    pages = (k_data, k_meta, v_data, v_meta)
    qkv = torch.zeros(n, (hq + 2 * hk) * d, dtype=dtype)
    q, k, v = (qkv[:, a * d: b * d].view(n, -1, d) for a, b in ((0, hq), (hq, hq + hk), (hq + hk, hq + 2 * hk)))
    stored = torch.zeros(hk, d) if center else None
    loc = torch.arange(n)
    rows = torch.zeros(2, n, hk, d, dtype=dtype)
    rotate_quantize_store(k, v, loc, *pages, layout, k_center=stored)
    for center_rows in (True, False):
        rotate_quantize_store_and_stage(q, k, v, loc, *pages, layout, stored, rows[0], rows[1], center_rows)
    idx = torch.arange(n, dtype=torch.int32)
    dequantize_pages(*pages, idx, rows[0], rows[1], layout, unrotate=False)
    dequantize_pages(*pages, idx, rows[0], rows[1], layout, k_center=torch.zeros(hk, d) if center else None)
    if layout.rotate_k:
        to_stored_space(q, k, v, layout, stored)
        rotate_rows(q, layout)
        from_stored_space(q.contiguous(), layout)
    batch = 3
    indptr = torch.tensor([0, 10, 25, 40], dtype=torch.int32)
    num_splits = torch.ones(batch, dtype=torch.int32)
    for ptx in (False, True):
        decode.use_ptx = lambda kernel, device, ptx=ptx: ptx
        decode.int4_decode_attention(torch.zeros(batch, hq, d, dtype=dtype), *pages, torch.zeros(batch, hq, d, dtype=dtype),
                                     indptr, idx, torch.zeros(batch, hq, splits, d), torch.zeros(batch, hq, splits),
                                     num_splits, splits, d ** -0.5, layout, lse_out=torch.zeros(batch, hq))
    int4_num_kv_splits(num_splits, torch.tensor([10, 15, 15], dtype=torch.int64), hk, splits, d, 132)


def resource_usage(cubin: bytes) -> dict:
    """{"registers", "local_bytes"} of a compiled kernel, from Triton's bundled cuobjdump."""
    tool = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:\d+ SHARED:\d+ LOCAL:(\d+)", out)
    return {"registers": int(m[1]), "local_bytes": int(m[2])}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    p.add_argument("--resources", action="store_true", help="report registers and local bytes per kernel")
    args = p.parse_args()
    layouts = [fmt.Int4Format(128, 128), fmt.Int4Format(128), fmt.Int4Format(64, 16, rotate_v=True),
               fmt.Int4Format(256, 128, symmetric=True)]
    for layout in layouts:
        for center in (False, True):
            calls(layout, torch.bfloat16, center)
    calls(fmt.Int4Format(128, 64), torch.float16, False)
    target = GPUTarget("cuda", args.arch, 32)
    compiled, failed, resources = {}, [], {}
    for (name, *_), (kernel, signature, constexprs, options) in captured.items():
        try:
            binary = triton.compile(ASTSource(kernel, signature, constexprs), target=target, options=options)
            compiled[name] = compiled.get(name, 0) + 1
        except Exception as e:  # noqa: BLE001 - every failure is reported, then the exit code says it
            failed.append(f"{name} {constexprs} {options}: {type(e).__name__}: {str(e)[-1500:]}")
            continue
        if args.resources:
            use = resource_usage(binary.asm["cubin"])
            most = resources.setdefault(name, {"registers": 0, "local_bytes": 0})
            resources[name] = {k: max(most[k], use[k]) for k in most}
    for f in failed:
        print("FAILED", f, file=sys.stderr)
    summary = {"arch": args.arch, "triton": triton.__version__, "compiled": compiled, "failed": len(failed)}
    if args.resources:
        summary["most_per_kernel"] = resources
    print(json.dumps(summary))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
