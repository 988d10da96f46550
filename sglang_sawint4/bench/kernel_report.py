"""Compile the decode kernel's stage 1 for a GPU without one, and report what it became.

    pip install --no-deps --target /tmp/tr36 triton==3.6.0      # the GPU host's Triton
    PYTHONPATH=/tmp/tr36 python -m sglang_sawint4.bench.kernel_report --block-n 64 --num-stages 3

Triton compiles for a target (default sm_90, the H100/H200) on any machine; ptxas (shipped
with Triton) then gives registers and spills.  The argument specializations are those of the
served buffers (16-byte aligned pointers, strides divisible by 16, the meta tensors' head
stride 1), so the numbers match the GPU's: for the v4 kernel without the register cap it
reported 168 registers and 26,112 bytes of shared memory, as ncu did on the H200; the v8 kernel
at the default tiling (64 tokens, 1 warp at head_dim 128): 238 registers, no spills, 11,008
bytes of shared memory.  --kernel-file compiles a candidate's stage 1 instead (as
bench_kernels.py --ab-kernel times it; candidates that read keys as bytes name them kd_ptr, as
v6 and earlier did; files without default_num_warps compile at 4 warps); --by-line N counts
the token loop's PTX instructions per opcode and per source line.  Per tile per thread at head_dim
128: v6 817 and v7 749 (128 tokens x 4 warps), v8 595 at 64 tokens x 2 warps and 1,144 at
64 x 1; per token, summed over threads: 749 (v7), 595 (v8, 2 warps), 572 (v8, 1 warp).
Also reported: the shared-memory buffers of the pipelined loads (1 = no overlap of loads and
math within a program) and the async-wait depths.  Writes the TTGIR and PTX under --out-dir for reading.
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
import subprocess


POINTERS = {"q_ptr": "*bf16", "kw_ptr": "*i16", "kd_ptr": "*u8", "km_ptr": "*i32", "vd_ptr": "*u8",
            "vm_ptr": "*i32", "kv_indptr": "*i32", "kv_indices": "*i32", "num_kv_splits": "*i32", "logits_ptr": "*fp32",
            "lse_ptr": "*fp32"}
DIVISIBLE_BY_16 = {"stride_qb", "stride_qh", "kw_st", "kw_sh", "kd_st", "kd_sh", "vd_st", "vd_sh", "st_lb",
                   "st_lh", "st_ls", "st_eb", "st_eh"}
EQUAL_TO_1 = {"km_sh", "vm_sh"}  # [slots, heads] int32 meta words: Triton specializes a 1 into a constant


def load_decode_candidate(path: str):
    """A candidate decode kernel file (a modified copy of kernels/decode.py) as a module; also
    how bench_kernels.py --ab-kernel and decode_long_context_error.py load candidates."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("decode_candidate", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--block-n", type=int, default=None)
    p.add_argument("--num-warps", type=int, default=None,
                   help="default: the kernel's for --head-dim (decode.NUM_WARPS)")
    p.add_argument("--num-stages", type=int, default=None)
    p.add_argument("--maxnreg", type=int, default=-1,
                   help="register cap per thread (PTX .maxnreg); default: the kernel's (decode.MAXNREG), 0: none")
    p.add_argument("--group", type=int, default=4, help="query heads per KV head")
    p.add_argument("--block-h", type=int, default=None, help="query-head columns per program (default: the kernel's)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block", type=int, default=128, help="Hadamard block (0: plain INT4)")
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--kernel-file", metavar="FILE",
                   help="compile this file's _decode_stage1 (a candidate, as bench_kernels.py --ab-kernel "
                        "times) instead of the package's")
    p.add_argument("--by-line", type=int, default=0, metavar="N",
                   help="also count the token loop's PTX instructions: the N most frequent opcodes and the N "
                        "source lines with the most instructions (where a tile's work goes)")
    p.add_argument("--out-dir", default="/tmp/kernel_report")
    args = p.parse_args()

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if args.kernel_file:
        decode = load_decode_candidate(args.kernel_file)
    else:
        from sglang_sawint4.kernels import decode

    if args.num_warps is None:  # candidates before v8 ran 4 warps
        args.num_warps = decode.default_num_warps(args.head_dim) if hasattr(decode, "default_num_warps") else 4
    params = list(inspect.signature(decode._decode_stage1.fn).parameters)
    signature, constants = {}, {}
    for name in params:
        if name in POINTERS:
            signature[name] = POINTERS[name]
        elif name == "sm_scale":
            signature[name] = "fp32"
        elif name.isupper() or name in EQUAL_TO_1:
            signature[name] = "constexpr"
        else:
            signature[name] = "i32"
    constants.update({n: 1 for n in EQUAL_TO_1})
    constants.update(GROUP=args.group, BLOCK_H=args.block_h or decode.default_block_h(args.group),
                     BLOCK=args.block_n or decode.BLOCK_N, HALF=args.head_dim // 2, ROTATE_K=args.block > 0,
                     BLOCK_ROT=args.block or 1, USE_PTX=True)
    if "V_WORDS" in params:  # values read as 16-bit words (decode.value_words) or as bytes
        constants["V_WORDS"] = decode.value_words(args.head_dim, args.num_warps)
        signature["vd_ptr"] = "*i16" if constants["V_WORDS"] else "*u8"
    if "W" in params:  # candidates that split each tile's tokens over the warps
        constants["W"] = args.num_warps
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(params) if n in POINTERS or n in DIVISIBLE_BY_16}
    num_stages = args.num_stages if args.num_stages is not None else decode.NUM_STAGES
    maxnreg = decode.MAXNREG.get(args.head_dim) if args.maxnreg == -1 else (args.maxnreg or None)
    kernel = triton.compile(ASTSource(decode._decode_stage1, signature, constants, attrs),
                            target=GPUTarget("cuda", args.arch, 32),
                            options={"num_warps": args.num_warps, "num_stages": num_stages,
                                     "maxnreg": maxnreg})
    os.makedirs(args.out_dir, exist_ok=True)
    for kind in ("ttgir", "ptx"):
        with open(os.path.join(args.out_dir, f"decode_stage1.{kind}"), "w") as f:
            f.write(kernel.asm[kind])
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    ptx = os.path.join(args.out_dir, "decode_stage1.ptx")
    info = subprocess.run([ptxas, f"-arch=sm_{args.arch}a", "-v", ptx, "-o", os.devnull],
                          capture_output=True, text=True).stderr
    regs = re.search(r"Used (\d+) registers", info)
    spills = re.search(r"(\d+) bytes spill stores", info)
    ttgir = kernel.asm["ttgir"]
    buffers = re.findall(r"local_alloc : \(\) -> !ttg\.memdesc<(\d+)x", ttgir)
    waits = re.findall(r"async_wait.*\{num = (\d+)", ttgir)
    print(f"triton {triton.__version__}, sm_{args.arch}: block_n {constants['BLOCK']}, {args.num_warps} warps, "
          f"{num_stages} stages, register cap {maxnreg}")
    print(f"registers {regs.group(1) if regs else '?'}, spill stores {spills.group(1) if spills else '?'} B, "
          f"shared {kernel.metadata.shared} B")
    print(f"pipelined load buffers {buffers or 'none'}, async_wait depths {waits or 'none'}")
    if args.by_line:
        report_token_loop(kernel.asm["ptx"], args.by_line)
    print(f"TTGIR and PTX in {args.out_dir}")


def token_loop(ptx: str) -> list:
    """The PTX lines of stage 1's token loop: the span of its backward branch, from the
    branch's target label to the branch (LLVM may place the latch block before the header,
    so the widest backward branch is taken rather than the one to the "Loop Header" label)."""
    lines = ptx.splitlines()
    labels = {m.group(1): i for i, l in enumerate(lines) if (m := re.match(r"^(\$L__BB\d+_\d+):", l))}
    spans = [(labels[m.group(1)], i) for i, l in enumerate(lines)
             if (m := re.search(r"\bbra(?:\.uni)?\s+(\$L__BB\d+_\d+);", l)) and labels.get(m.group(1), i) < i]
    start, end = max(spans, key=lambda span: span[1] - span[0])
    return lines[start:end + 1]


def instructions_by_source(loop: list) -> tuple:
    """(opcode counts, counts per source location) of a PTX fragment; a location is the `.loc`
    comment's text, inlined call sites included (e.g. "format_jit.py:171:83 @[ decode.py:139:53 ]")."""
    opcodes, sources, where = {}, {}, "?"
    for line in loop:
        text = line.strip()
        if text.startswith(".loc"):
            where = text.split("//", 1)[1].strip() if "//" in text else where
            continue
        if not text or text.startswith(("//", "$", "{", "}", ".reg")):
            continue
        op = re.sub(r"^@!?%p\d+\s+", "", text).split()[0].rstrip(";")
        opcodes[op] = opcodes.get(op, 0) + 1
        sources[where] = sources.get(where, 0) + 1
    return opcodes, sources


def report_token_loop(ptx: str, top: int) -> None:
    opcodes, sources = instructions_by_source(token_loop(ptx))
    total = sum(opcodes.values())
    print(f"token loop: {total} PTX instructions per tile per thread; "
          + ", ".join(f"{k} {v}" for k, v in sorted(opcodes.items(), key=lambda kv: -kv[1])[:top]))
    for where, n in sorted(sources.items(), key=lambda kv: -kv[1])[:top]:
        print(f"  {n:5d}  {where}")


if __name__ == "__main__":
    main()
