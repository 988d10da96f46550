"""Int4TritonAttnBackend's forward_extend / forward_decode, driven as SGLang's model runner
drives them (stub forward batches over a real ReqToTokenPool and our pool), against float64
references: a prefill, a chunk over that cached prefix (chunked prefill / radix hit), then
decode steps; one BF16 layer, one INT4 layer with centered keys and one plain INT4 layer.
CPU: Triton in interpreter mode, fp16 (the interpreter's bf16 has given garbage)."""

import json
from types import SimpleNamespace

import pytest
import torch

from helpers import keys_with_outliers, rel_err, require_sglang

require_sglang()

from sglang_sawint4 import format as fmt  # noqa: E402
from sglang_sawint4.attention_check import bf16_attention_reference, int4_attention_reference  # noqa: E402

HQ, HK, D, LAYERS = 4, 2, 64, 3
BF16_LAYER, CENTERED_LAYER = 0, 1
LAYOUT = fmt.Int4Format(D, 64)
# the extend path attends in the pages' stored space: K rotated, K and V rotated, neither
EXTEND_LAYOUTS = [LAYOUT, fmt.Int4Format(D, 16, rotate_v=True), fmt.Int4Format(D)]
DTYPE = torch.float16


def _runner(server_args, pool, num_reqs, device):
    """What the backend reads of SGLang's ModelRunner: the real model config and request table."""
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.mem_cache.memory_pool import ReqToTokenPool

    model_config = ModelConfig.from_server_args(server_args)
    req_pool = ReqToTokenPool(size=num_reqs, max_context_len=model_config.context_len, device=device,
                              enable_memory_saver=False)
    return SimpleNamespace(req_to_token_pool=req_pool, token_to_kv_pool=pool, token_to_kv_pool_allocator=SimpleNamespace(),
                           sliding_window_size=None, page_size=1, model_config=model_config, device=device, gpu_id=0,
                           is_draft_worker=False,
                           server_args=server_args)


def _layer(i):
    from sglang.srt.layers.radix_attention import AttentionType

    return SimpleNamespace(layer_id=i, tp_q_head_num=HQ, tp_k_head_num=HK, tp_v_head_num=HK, qk_head_dim=D, v_head_dim=D,
                           scaling=D ** -0.5, logit_cap=0.0, logit_capping_method="tanh", is_cross_attention=False,
                           sliding_window_size=-1, k_scale=None, v_scale=None, xai_temperature_len=-1,
                           attn_type=AttentionType.DECODER)


def _batch(mode, req_idx, seq_lens, prefix_lens, out_loc, device):
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    new = [s - p for s, p in zip(seq_lens, prefix_lens)]
    return SimpleNamespace(
        forward_mode=mode if isinstance(mode, ForwardMode) else getattr(ForwardMode, mode),
        batch_size=len(seq_lens), req_pool_indices=torch.tensor(req_idx, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device), seq_lens_sum=sum(seq_lens),
        seq_lens_cpu=torch.tensor(seq_lens), extend_prefix_lens=torch.tensor(prefix_lens, dtype=torch.int32, device=device),
        extend_prefix_lens_cpu=list(prefix_lens), extend_seq_lens=torch.tensor(new, dtype=torch.int32, device=device),
        extend_seq_lens_cpu=list(new), out_cache_loc=out_loc, spec_info=None, positions=None)


def _reference(pool, layer, q, qo_indptr, kv_indptr, kv_indices, k_new=None, v_new=None):
    layout = pool.int4_format
    if pool.is_bf16_layer(layer):
        return bf16_attention_reference(q, qo_indptr, kv_indptr, kv_indices, pool.get_key_buffer(layer),
                                        pool.get_value_buffer(layer), D ** -0.5, k_new, v_new)
    return int4_attention_reference(q, qo_indptr, kv_indptr, kv_indices, pool.get_int4_layer(layer), layout, D ** -0.5,
                                    k_new=k_new, v_new=v_new, k_center=pool.key_center(layer),
                                    round_prefix_to=DTYPE if k_new is not None else None)


def _exact(q, ks, vs, qo, lens):
    """float64 attention of each request's queries over all of its exact tokens (its own last)."""
    out = []
    for b, (q0, q1) in enumerate(zip(qo[:-1], qo[1:])):
        k, v = ks[b][: lens[b]].double(), vs[b][: lens[b]].double()
        n = q1 - q0
        qb = q[q0:q1].double()
        s = torch.einsum("qhd,nhd->hqn", qb, k.repeat_interleave(HQ // HK, 1)) * D ** -0.5
        pos = torch.arange(lens[b])
        s = s.masked_fill(pos[None, None, :] > (lens[b] - n + torch.arange(n))[None, :, None], float("-inf"))
        out.append(torch.einsum("hqn,nhd->qhd", torch.softmax(s, -1), v.repeat_interleave(HQ // HK, 1)))
    return torch.cat(out)


@pytest.fixture
def published(tmp_path, monkeypatch):
    """SGLang's process-wide server args, as a scheduler process publishes them (CPU device),
    and a single-rank parallel context (no process groups on a CPU test)."""
    import transformers
    from sglang.srt.layers.attention import triton_backend

    monkeypatch.setattr(triton_backend, "get_parallel",
                        lambda: SimpleNamespace(attn_tp_size=1, attn_dcp_size=1, attn_dcp_rank=0))
    from sglang.srt.runtime_context import publish, reset_context
    from sglang.srt.server_args import ServerArgs

    transformers.LlamaConfig(hidden_size=HQ * D, num_attention_heads=HQ, num_key_value_heads=HK, head_dim=D,
                             num_hidden_layers=LAYERS, vocab_size=64, max_position_embeddings=512,
                             architectures=["LlamaForCausalLM"]).save_pretrained(tmp_path)
    server_args = ServerArgs(model_path=str(tmp_path), device="cpu", attention_backend="triton",
                             triton_attention_num_kv_splits=4)
    publish(server_args, role="test")
    yield server_args
    reset_context()


@pytest.mark.parametrize("layout", EXTEND_LAYOUTS,
                         ids=[f"b{l.block_size}-{'kv' if l.rotate_v else 'k'}" for l in EXTEND_LAYOUTS])
def test_backend_extend_chunk_and_decode_match_references(layout, device, published, tmp_path):
    from sglang_sawint4.attention_check import AttentionChecker
    from sglang_sawint4.backend import Int4TritonAttnBackend
    from sglang_sawint4.pool import Int4TokenToKVPool

    gen = torch.Generator().manual_seed(1234)
    center = torch.zeros(HK, D)
    center[:, [5, 40]] = 30.0  # a constant key component, like a k_proj bias
    pool = Int4TokenToKVPool(256, page_size=1, dtype=DTYPE, head_num=HK, head_dim=D, layer_num=LAYERS, device=device,
                             enable_memory_saver=False, int4_format=layout, bf16_layers=(BF16_LAYER,),
                             key_centers={CENTERED_LAYER: center})
    runner = _runner(published, pool, 4, device)
    backend = Int4TritonAttnBackend(runner)
    # --kv-quant-debug-check-attention as the server runs it: every step's records must pass
    backend._checker = AttentionChecker(str(tmp_path / "checks.jsonl"), max_per_layer=4)
    req_to_token = runner.req_to_token_pool.req_to_token
    total = [32, 9]  # tokens of request 0 and 1 by the end of the prefill steps
    slots = torch.randperm(255, generator=gen)[: sum(total) + 2] + 1  # scattered slots, slot 0 is padding
    per_req = [slots[: total[0]], slots[total[0]: sum(total)]]
    for b, s in enumerate(per_req):
        req_to_token[b, : len(s)] = s.to(req_to_token.dtype)
    # per layer: every token's exact K/V of each request (q's are drawn per step)
    kv = {l: [(keys_with_outliers(n, HK, D, gen) + (center if l == CENTERED_LAYER else 0),
               torch.randn(n, HK, D, generator=gen)) for n in total + [0]][:2] for l in range(LAYERS)}
    kv = {l: [(k.to(DTYPE), v.to(DTYPE)) for k, v in kv[l]] for l in kv}

    def step(mode, seq_lens, prefix_lens, new_ranges):
        out_loc = torch.cat([per_req[b][lo:hi] for b, (lo, hi) in enumerate(new_ranges)]).to(device)
        fb = _batch(mode, [0, 1], seq_lens, prefix_lens, out_loc, device)
        backend.init_forward_metadata(fb)
        md = backend.forward_metadata
        n = out_loc.numel()
        for l in range(LAYERS):
            layer = _layer(l)
            k = torch.cat([kv[l][b][0][lo:hi] for b, (lo, hi) in enumerate(new_ranges)]).to(device)
            v = torch.cat([kv[l][b][1][lo:hi] for b, (lo, hi) in enumerate(new_ranges)]).to(device)
            q = (0.5 * torch.randn(n, HQ, D, generator=gen)).to(DTYPE).to(device)
            if mode == "DECODE":
                o = backend.forward_decode(q.view(n, -1), k, v, layer, fb)  # k, v as RadixAttention passes them
                ref = _reference(pool, l, q, torch.arange(n + 1), md.kv_indptr[: n + 1], md.kv_indices)
            else:
                o = backend.forward_extend(q.view(n, -1), k, v, layer, fb)
                ref = _reference(pool, l, q, md.qo_indptr, md.kv_indptr, md.kv_indices, k_new=k, v_new=v)
            o = o.view(n, HQ, D)
            assert torch.isfinite(o).all()
            assert rel_err(o, ref) < 1e-2, (mode, l, rel_err(o, ref))
            # and the pages hold what was sent: attention over the exact K/V is close
            qo = [0] + torch.tensor([hi - lo for lo, hi in new_ranges]).cumsum(0).tolist()
            exact = _exact(q.cpu(), [kv[l][b][0] for b in range(2)], [kv[l][b][1] for b in range(2)], qo, seq_lens)
            # INT4 pages: the rotation spreads the keys' outlier channels; plain INT4 keeps them
            int4_bound = 0.25 if layout.rotate_k else 0.5
            bound = 1e-2 if l == BF16_LAYER or (mode == "EXTEND" and not any(prefix_lens)) else int4_bound
            assert rel_err(o, exact) < bound, (mode, l, rel_err(o, exact))

    step("EXTEND", [20, 9], [0, 0], [(0, 20), (0, 9)])  # prefill: exact attention among the new tokens
    step("EXTEND", [30, 9], [20, 8], [(20, 30), (8, 9)])  # a chunk over the cached prefix
    step("DECODE", [31, 9], [30, 8], [(30, 31), (8, 9)])  # (request 1 decodes its 9th token again)
    step("DECODE", [32, 9], [31, 8], [(31, 32), (8, 9)])
    checks = [json.loads(line) for line in open(tmp_path / "checks.jsonl")]
    assert sorted({(c["mode"], c["layer"]) for c in checks}) == sorted(
        (mode, l) for mode in ("decode", "extend", "extend_prefix") for l in range(LAYERS))
    assert all(c["ok"] for c in checks), [c for c in checks if not c["ok"]]
    assert {c["kv"] for c in checks if c["layer"] == BF16_LAYER} == {"bf16"}
    # the centered layer's pages hold H (k - c): stored without the center, read back with it
    kd, km, _, _ = pool.get_int4_layer(CENTERED_LAYER)
    s0 = per_req[0][:20].long()
    k_back = fmt.decode(kd[s0].cpu(), km[s0].cpu(), layout, is_value=False, center=center)
    assert rel_err(k_back, kv[CENTERED_LAYER][0][0][:20]) < 0.1


def test_backend_refuses_int4_reads_through_bf16_accessors(device):
    from sglang_sawint4.pool import Int4KVAccessError, Int4TokenToKVPool

    pool = Int4TokenToKVPool(16, page_size=1, dtype=DTYPE, head_num=HK, head_dim=D, layer_num=LAYERS, device=device,
                             enable_memory_saver=False, int4_format=LAYOUT, bf16_layers=(BF16_LAYER,))
    assert pool.get_key_buffer(BF16_LAYER).dtype == DTYPE
    with pytest.raises(Int4KVAccessError, match="INT4 layer"):
        pool.get_key_buffer(2)
    with pytest.raises(Int4KVAccessError, match="keeps BF16"):
        pool.get_int4_layer(BF16_LAYER)


def _compiled_variants(kernel) -> int:
    return sum(len(cache[0]) for cache in kernel.device_caches.values())


@pytest.mark.parametrize("layout", [LAYOUT, fmt.Int4Format(D)], ids=["bdr", "int4"])
def test_combined_stores_reuse_the_variants_compiled_when_the_backend_is_built(layout, rng, device):
    """Building the FlashInfer prefill backend compiles the combined batch's store for a
    centered and an uncentered INT4 layer, writing only the padding slot; stores of any row
    count from q, k, v viewed in a fused qkv tensor into staging rows at any offset then run
    on those variants (counted on a GPU, where kernels compile)."""
    from sglang_sawint4.backend import compile_store_and_stage
    from sglang_sawint4.kernels.store import _store_and_stage_kernel, rotate_quantize_store_and_stage
    from sglang_sawint4.pool import Int4TokenToKVPool

    pool = Int4TokenToKVPool(256, page_size=1, dtype=DTYPE, head_num=HK, head_dim=D, layer_num=LAYERS, device=device,
                             enable_memory_saver=False, int4_format=layout, bf16_layers=(BF16_LAYER,),
                             key_centers={CENTERED_LAYER: torch.randn(HK, D, generator=rng)})
    k_stage, v_stage = (torch.full((128, HK, D), float("nan"), dtype=DTYPE, device=device) for _ in range(2))
    assert compile_store_and_stage(pool, center_rows=layout.rotate_k) == 2
    for layer in (CENTERED_LAYER, 2):
        assert torch.count_nonzero(pool.get_int4_layer(layer)[1][1:]) == 0  # meta of every slot but 0 untouched
    compiled = _compiled_variants(_store_and_stage_kernel) if device == "cuda" else None
    for layer in (CENTERED_LAYER, 2):
        for n, row0 in ((37, 3), (1, 0), (64, 16), (17, 101)):
            qkv = torch.randn(n, (HQ + 2 * HK) * D, generator=rng).to(DTYPE).to(device)
            q, k, v = (qkv[:, a * D: b * D].view(n, -1, D) for a, b in ((0, HQ), (HQ, HQ + HK), (HQ + HK, HQ + 2 * HK)))
            loc = (torch.randperm(255, generator=rng)[:n] + 1).to(device)
            rotate_quantize_store_and_stage(q, k, v, loc, *pool.get_int4_layer(layer), layout,
                                            pool.key_center(layer, stored=True), k_stage[row0: row0 + n],
                                            v_stage[row0: row0 + n], center_rows=layout.rotate_k)
    if device == "cuda":
        torch.cuda.synchronize()
        assert _compiled_variants(_store_and_stage_kernel) == compiled


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled kernel variants exist on a GPU only")
@pytest.mark.parametrize("layout,variants", [(LAYOUT, 5), (fmt.Int4Format(D, 16, rotate_v=True), 6),
                                             (fmt.Int4Format(D), 4)], ids=["bdr", "bdr-kv", "int4"])
def test_extends_reuse_the_kernel_variants_compiled_when_the_backend_is_built(layout, variants, rng):
    """Building the backend compiles the prefix dequantize kernel as both prefill paths read
    (as stored; a plain layout's centered layers also with the center added back), the
    Triton path's store into the stored space (with and without a center) and, for a
    rotating layout, the new tokens' rotation (with and without a center) and, where V is
    rotated, the output's; prefixes of any length, cut from any offset of a piece's slot
    list, and new tokens of any count, q, k and v viewed in a fused qkv tensor, then run on
    those variants: no Triton compile in the middle of serving."""
    from sglang_sawint4.backend import compile_extend_kernels
    from sglang_sawint4.kernels.dequant import _dequantize_pages_kernel, dequantize_pages
    from sglang_sawint4.kernels.rotate import _rotate_qkv_kernel, _rotate_rows_kernel, from_stored_space, to_stored_space
    from sglang_sawint4.kernels.store import _store_and_stage_kernel, rotate_quantize_store_and_stage
    from sglang_sawint4.pool import Int4TokenToKVPool

    center = torch.randn(HK, D, generator=rng)
    pool = Int4TokenToKVPool(256, page_size=1, dtype=DTYPE, head_num=HK, head_dim=D, layer_num=LAYERS, device="cuda",
                             enable_memory_saver=False, int4_format=layout, bf16_layers=(BF16_LAYER,),
                             key_centers={CENTERED_LAYER: center})
    assert compile_extend_kernels(pool) == variants
    kernels = (_dequantize_pages_kernel, _rotate_qkv_kernel, _rotate_rows_kernel, _store_and_stage_kernel)
    before = [_compiled_variants(k) for k in kernels]
    slots = (torch.randperm(255, generator=rng)[:120] + 1).to(torch.int32).cuda()
    k_out, v_out = (torch.empty(128, HK, D, dtype=DTYPE, device="cuda") for _ in range(2))
    for layer in (CENTERED_LAYER, 2):
        for n, offset in ((37, 3), (1, 0), (64, 16), (17, 101)):
            piece = slots[offset: offset + n]
            dequantize_pages(*pool.get_int4_layer(layer), piece, k_out, v_out, layout, unrotate=False)
            if layout.block_size is None:  # the FlashInfer path's staging of a plain layout
                dequantize_pages(*pool.get_int4_layer(layer), piece, k_out, v_out, layout,
                                 k_center=pool.key_center(layer))
            qkv = torch.randn(n, (HQ + 2 * HK) * D, dtype=DTYPE, device="cuda")
            q, k, v = (qkv[:, a * D: b * D].view(n, -1, D) for a, b in ((0, HQ), (HQ, HQ + HK), (HQ + HK, HQ + 2 * HK)))
            to_stored_space(q, k, v, layout, pool.key_center(layer, stored=True))
            loc = (torch.randperm(255, generator=rng)[:n] + 1).cuda()  # int64, as out_cache_loc
            rotate_quantize_store_and_stage(q, k, v, loc, *pool.get_int4_layer(layer), layout,
                                            pool.key_center(layer, stored=True), torch.empty_like(k),
                                            torch.empty_like(v), center_rows=True)
            from_stored_space(torch.randn(n, HQ, D, dtype=DTYPE, device="cuda"), layout)
    torch.cuda.synchronize()
    assert [_compiled_variants(k) for k in kernels] == before
