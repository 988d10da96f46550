"""Probe behind the Triton extend path's stored-space design (docs/design-notes.md): the prefix
dequant un-rotated vs as stored over 32 x 8k prefix rows, and moving 8192 new tokens' q / k into
the stored space (torch float matmul vs rotate_rows).  Output: prefix_extend_probe_h200.txt."""
import json, torch, triton
from sglang_sawint4 import format as fmt
from sglang_sawint4.kernels.dequant import dequantize_pages
from sglang_sawint4.kernels.store import rotate_quantize_store
from sglang_sawint4.kernels.rotate import rotate_rows
torch.manual_seed(0)
H, D, N, REQ, NEW = 8, 128, 8192, 32, 256
rows = {}
for name, layout in (("int4", fmt.Int4Format(D)), ("int4-bdr", fmt.Int4Format(D, 128))):
    bufs = [t.cuda() for t in (*fmt.allocate_layer(N, H, D), *fmt.allocate_layer(N, H, D))]
    k = torch.randn(N, H, D, device="cuda", dtype=torch.bfloat16); v = torch.randn_like(k)
    rotate_quantize_store(k, v, torch.arange(N, device="cuda"), *bufs, layout)
    idx = torch.arange(N, device="cuda", dtype=torch.int32).repeat(REQ)
    ko = torch.empty(REQ * N, H, D, device="cuda", dtype=torch.bfloat16); vo = torch.empty_like(ko)
    for unrotate in (True, False):
        f = lambda: dequantize_pages(*bufs, idx, ko, vo, layout, unrotate=unrotate)
        rows[f"{name} unrotate={unrotate}"] = triton.testing.do_bench(f, warmup=50, rep=300)
q = torch.randn(REQ * NEW, 32, D, device="cuda", dtype=torch.bfloat16)
L = fmt.Int4Format(D, 128)
hh = fmt.hadamard_matrix(128, torch.float32).cuda()
tr = lambda x: (x.float().view(-1, 128) @ hh).view(x.shape).to(x.dtype)
kk = torch.randn(REQ * NEW, H, D, device="cuda", dtype=torch.bfloat16)
c = torch.randn(H, D, device="cuda")
for _ in range(2):
    rows["torch rotate q 8192x32"] = triton.testing.do_bench(lambda: tr(q), warmup=50, rep=300)
    rows["rotate_rows q 8192x32"] = triton.testing.do_bench(lambda: rotate_rows(q, L), warmup=50, rep=300)
    rows["rotate_rows k 8192x8 center"] = triton.testing.do_bench(lambda: rotate_rows(kk, L, stored_center=c), warmup=50, rep=300)
ref = fmt.rotate(q[:64].double(), 128)
rows["rotate_rows max rel err"] = float((rotate_rows(q[:64], L).double() - ref).abs().max() / ref.abs().max())
print(json.dumps({k: round(v, 4) for k, v in rows.items()}, indent=1))
