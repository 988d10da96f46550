"""Our pool and patches against the real SGLang 0.5.17 classes, on CPU.

Needs sglang==0.5.17 installed without its GPU dependencies (the README's set-up); fails,
never skips, with the reason when it is missing or does not import.
"""

import pytest
import torch

from helpers import require_sglang

require_sglang()
pytestmark = pytest.mark.sglang

from sglang_sawint4 import format as fmt  # noqa: E402
from sglang_sawint4.config import ConfigError, KVQuantConfig  # noqa: E402


@pytest.fixture(scope="module")
def sgl():
    from sglang.srt.mem_cache import memory_pool

    return memory_pool


def test_version_check():
    from sglang_sawint4.patches.sglang_0_5_17 import UnsupportedSGLangVersion, check_sglang_version

    assert check_sglang_version() == "0.5.17"
    with pytest.raises(UnsupportedSGLangVersion, match="0.5.17 only, found 0.5.23"):
        check_sglang_version("0.5.23")


def _pool(layout, size=64, heads=2, layers=3, device="cpu", key_centers=None):
    from sglang_sawint4.pool import Int4TokenToKVPool

    return Int4TokenToKVPool(size, page_size=1, dtype=torch.bfloat16, head_num=heads, head_dim=layout.head_dim,
                             layer_num=layers, device=device, enable_memory_saver=False, int4_format=layout,
                             key_centers=key_centers)


def test_pool_layout_and_true_bytes(sgl):
    layout = fmt.Int4Format(128, 128)
    pool = _pool(layout, size=100, heads=8, layers=4)
    assert isinstance(pool, sgl.MHATokenToKVPool)
    kd, km, vd, vm = pool.get_int4_layer(2)
    assert kd.shape == (101, 8, 64) and kd.dtype == torch.uint8
    assert km.shape == (101, 8, 2) and km.dtype == torch.float16
    k_bytes, v_bytes = pool.get_kv_size_bytes()
    assert k_bytes + v_bytes == 101 * 8 * 4 * 136
    bf16 = sgl.MHATokenToKVPool(100, page_size=1, dtype=torch.bfloat16, head_num=8, head_dim=128, layer_num=4,
                                device="cpu", enable_memory_saver=False)
    ratio = sum(bf16.get_kv_size_bytes()) / (k_bytes + v_bytes)
    assert abs(ratio - 512 / 136) < 1e-9  # 3.76x


def test_pool_store_goes_through_the_kernel(sgl, device):
    from types import SimpleNamespace

    layout = fmt.Int4Format(64, 64)
    pool = _pool(layout, device=device)
    k = torch.randn(5, 2, 64, dtype=torch.float16, device=device)
    v = torch.randn(5, 2, 64, dtype=torch.float16, device=device)
    loc = torch.tensor([7, 3, 50, 9, 1], device=device)
    pool.set_kv_buffer(SimpleNamespace(layer_id=1), sgl.KVWriteLoc(loc), k, v)
    kd, km, vd, vm = [t.cpu() for t in pool.get_int4_layer(1)]
    k_hat = fmt.decode(kd[loc.cpu()], km[loc.cpu()], layout, is_value=False)
    assert ((k_hat - k.cpu().double()).norm() / k.cpu().double().norm()) < 0.15
    assert torch.count_nonzero(pool.get_int4_layer(0)[0]) == 0  # other layers untouched
    # slot moves (used by SGLang's KV copy) move data and scale/offset together
    pool.move_kv_cache(torch.tensor([20, 21], device=device), torch.tensor([7, 3], device=device))
    kd, km, vd, vm = pool.get_int4_layer(1)
    assert torch.equal(kd[20], kd[7]) and torch.equal(km[21], km[3]) and torch.equal(vm[20], vm[7])


@pytest.mark.parametrize("layout", [fmt.Int4Format(64), fmt.Int4Format(64, 64)], ids=["int4", "bdr64"])
def test_pool_store_and_stage_writes_what_set_kv_buffer_writes(sgl, layout, device):
    """The combined prefill's store: the same pages as ``set_kv_buffer`` (a centered layer
    keeps its center), plus the staging rows and q in the space that layer is staged in."""
    from types import SimpleNamespace

    from sglang_sawint4.kernels.rotate import to_stored_space

    center = torch.zeros(2, 64)
    center[:, 5] = 30.0
    pools = [_pool(layout, device=device, key_centers={1: center}) for _ in range(2)]  # layer 1 centered
    q = torch.randn(5, 4, 64, dtype=torch.bfloat16, device=device)
    k = (torch.randn(5, 2, 64) + center).to(torch.bfloat16).to(device)
    v = torch.randn(5, 2, 64, dtype=torch.bfloat16, device=device)
    loc = torch.tensor([7, 3, 50, 9, 1], device=device)
    rows, rows_ref = (torch.empty(2, 5, 2, 64, dtype=torch.bfloat16, device=device) for _ in range(2))
    q_stage = pools[0].store_and_stage(1, loc, q, k, v, rows[0], rows[1], center_rows=layout.rotate_k)
    pools[1].set_kv_buffer(SimpleNamespace(layer_id=1), sgl.KVWriteLoc(loc), k, v)
    q_ref = to_stored_space(q, k, v, layout, pools[1].key_center(1, stored=True) if layout.rotate_k else None,
                            kv_out=(rows_ref[0], rows_ref[1]))[0]
    for got, exp in zip(pools[0].get_int4_layer(1), pools[1].get_int4_layer(1)):
        assert torch.equal(got, exp)
    assert torch.equal(q_stage, q_ref) and torch.equal(rows, rows_ref)
    assert torch.count_nonzero(pools[0].get_int4_layer(0)[0]) == 0  # other layers untouched


def test_pool_refuses_bf16_reads(sgl):
    from sglang_sawint4.pool import Int4KVAccessError

    pool = _pool(fmt.Int4Format(64))
    for call in (lambda: pool.get_key_buffer(0), lambda: pool.get_value_buffer(0), lambda: pool.get_kv_buffer(0),
                 lambda: pool.get_cpu_copy([0]), lambda: pool.get_contiguous_buf_infos()):
        with pytest.raises(Int4KVAccessError):
            call()
    with pool.shape_probe():
        probe = pool.get_value_buffer(0)
    assert probe.device.type == "meta" and probe.shape[-1] == 64
    with pytest.raises(Int4KVAccessError, match="pre-scaled"):
        pool.set_kv_buffer(None, torch.zeros(1, dtype=torch.long), torch.zeros(1, 2, 64), torch.zeros(1, 2, 64),
                           k_scale=1.0)


def test_pool_refuses_unequal_head_dims():
    from sglang_sawint4.pool import Int4TokenToKVPool

    with pytest.raises(ValueError, match="K and V head dims"):
        Int4TokenToKVPool(16, page_size=1, dtype=torch.bfloat16, head_num=2, head_dim=128, v_head_dim=64,
                          layer_num=1, device="cpu", enable_memory_saver=False, int4_format=fmt.Int4Format(128))


@pytest.fixture
def applied(monkeypatch):
    """Apply the patches for one test, then restore every patched SGLang attribute."""
    from sglang.srt.layers.attention import attention_registry as reg
    from sglang.srt.mem_cache import kv_cache_configurator as kcc
    from sglang.srt.model_executor import pool_configurator as pc
    from sglang.srt.models import utils as model_utils

    import sglang_sawint4.patches.sglang_0_5_17 as patches

    saved = {(kcc.KVCacheConfigurator, n): getattr(kcc.KVCacheConfigurator, n)
             for n in ("_build_mha_kv_pool", "_build_token_to_kv_pool")}
    saved.update({(pc.DefaultPoolConfigurator, n): getattr(pc.DefaultPoolConfigurator, n)
                  for n in ("_compute_cell_size", "calculate_pool_sizes")})
    from sglang.srt.managers.tokenizer_manager import TokenizerManager

    saved[(TokenizerManager, "_validate_one_request")] = TokenizerManager._validate_one_request
    backends = dict(reg.ATTENTION_BACKENDS)
    fused = model_utils.enable_fused_set_kv_buffer
    monkeypatch.setattr(patches, "_applied", None)
    cfg = KVQuantConfig("int4-bdr")
    patches.apply(cfg)
    yield patches, cfg
    for (owner, name), value in saved.items():
        setattr(owner, name, value)
    reg.ATTENTION_BACKENDS.clear()
    reg.ATTENTION_BACKENDS.update(backends)
    model_utils.enable_fused_set_kv_buffer = fused


def test_patches_target_real_sglang_objects(applied):
    from sglang.srt.layers.attention import attention_registry as reg
    from sglang.srt.mem_cache import kv_cache_configurator as kcc
    from sglang.srt.model_executor import pool_configurator as pc
    from sglang.srt.models import utils as model_utils

    patches, cfg = applied
    for fn in (kcc.KVCacheConfigurator._build_mha_kv_pool, kcc.KVCacheConfigurator._build_token_to_kv_pool,
               pc.DefaultPoolConfigurator._compute_cell_size, pc.DefaultPoolConfigurator.calculate_pool_sizes,
               reg.ATTENTION_BACKENDS["triton"], reg.ATTENTION_BACKENDS["flashinfer"],
               model_utils.enable_fused_set_kv_buffer):
        assert hasattr(fn, "__sawint4_original__"), fn
    assert model_utils.enable_fused_set_kv_buffer(None) is False
    with pytest.raises(ConfigError, match="flashinfer or triton"):
        reg.ATTENTION_BACKENDS["fa3"](None)
    # idempotent; a different config is an error
    patches.apply(cfg)
    with pytest.raises(RuntimeError, match="already applied"):
        patches.apply(KVQuantConfig("int4"))


def test_out_of_vocabulary_prompt_ids_are_refused(applied):
    from types import SimpleNamespace

    from sglang.srt.managers.tokenizer_manager import TokenizerManager

    validate = TokenizerManager._validate_one_request
    assert hasattr(validate, "__sawint4_original__")
    manager = SimpleNamespace(model_config=SimpleNamespace(vocab_size=100))
    for ids, bad in (([5, 10 ** 9], "1000000000"), ([-1, 5], "-1"), ([100], "100")):
        with pytest.raises(ValueError, match=f"token id {bad}, outside the vocabulary"):
            validate(manager, None, ids)
    # in-vocabulary ids go on to SGLang's own checks (which need attributes this stub lacks)
    with pytest.raises(AttributeError, match="context_len"):
        validate(manager, None, [0, 99])


def test_cell_size_patch_reports_int4_bytes(applied, monkeypatch, caplog, tmp_path):
    from types import SimpleNamespace

    from sglang.srt.model_executor import pool_configurator as pc

    model_config = SimpleNamespace(head_dim=128, v_head_dim=128, get_num_kv_heads=lambda tp: 8,
                                   num_hidden_layers=32, get_total_num_kv_heads=lambda: 8,
                                   hf_config=SimpleNamespace(architectures=["LlamaForCausalLM"]), dtype=torch.bfloat16)
    kvc = SimpleNamespace(use_mla_backend=False, model_config=model_config, kv_cache_dtype=torch.bfloat16,
                          kv_cache_dtype_str=None)
    monkeypatch.setattr(pc, "get_parallel", lambda: SimpleNamespace(attn_tp_size=1))
    patches, cfg = applied
    monkeypatch.setattr(patches, "prefill_uses_flashinfer", lambda: False)
    monkeypatch.setattr("sglang.srt.layers.cp.utils.get_glm_dsa_layer_split_effective_num_layers",
                        lambda kvc, n: n)
    conf = pc.DefaultPoolConfigurator.__new__(pc.DefaultPoolConfigurator)
    conf.kv_cache_dtype_str = None
    cell = pc.DefaultPoolConfigurator._compute_cell_size(conf, kvc, 32)
    assert cell == 8 * 32 * 136
    assert conf._sawint4_bf16_cell_size == 8 * 32 * 512
    # SGLang builds the configurator twice per start: the sizes are logged once
    with caplog.at_level("INFO"):
        for _ in range(2):
            pc.DefaultPoolConfigurator._compute_cell_size(conf, kvc, 31)
    assert sum("KV bytes/token" in r.getMessage() for r in caplog.records) == 1
    sizes = pc.DefaultPoolConfigurator.calculate_pool_sizes
    conf._cell_size = cell
    conf._zero_kv_max_tokens = 0
    assert sizes(conf, 136 * 8 * 32 * 1000, 1).max_total_num_tokens == 1000
    # on the FlashInfer prefill path the staging buffer comes out of the pool's memory
    monkeypatch.setattr(patches, "prefill_uses_flashinfer", lambda: True)
    pc.DefaultPoolConfigurator._compute_cell_size(conf, kvc, 32)
    staging = 2 * cfg.prefill_staging_rows * 8 * 128 * 2
    assert conf._sawint4_staging_bytes == staging
    assert sizes(conf, staging + 136 * 8 * 32 * 1000, 1).max_total_num_tokens == 1000
    with pytest.raises(ConfigError, match="kv-quant-prefill-staging-rows"):
        sizes(conf, staging // 2, 1)
    monkeypatch.setattr(patches, "prefill_uses_flashinfer", lambda: False)
    pc.DefaultPoolConfigurator._compute_cell_size(conf, kvc, 32)
    # a policy with BF16 layers: the profiler sizes the pool by the true bytes of every layer
    from sglang_sawint4.config import ENV_POLICY_FILE
    from sglang_sawint4.policy import ModelFacts, plain_policy

    path = tmp_path / "policy.json"
    plain_policy("int4-bdr", ModelFacts(32, 8, 128), 128, bf16_layers=(0, 31)).save(str(path))
    monkeypatch.setenv(ENV_POLICY_FILE, str(path))
    assert pc.DefaultPoolConfigurator._compute_cell_size(conf, kvc, 32) == 8 * (30 * 136 + 2 * 512)


def test_debug_poison_marks_freed_slots_and_reads_of_them_turn_nan(sgl, device, monkeypatch):
    """KV integrity: with --kv-quant-debug-poison, a read of a freed slot cannot pass silently."""
    from types import SimpleNamespace

    from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator
    from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator

    import sglang_sawint4.patches.sglang_0_5_17 as patches
    from sglang_sawint4.kernels.decode import int4_decode_attention

    for cls in (TokenToKVPoolAllocator, PagedTokenToKVPoolAllocator):
        monkeypatch.setattr(cls, "free", cls.free)  # restored after the test
    patches._patch_allocator_free()
    layout = fmt.Int4Format(64)
    pool = _pool(layout, size=32, device=device)
    alloc = TokenToKVPoolAllocator(32, torch.bfloat16, device, pool, need_sort=False)
    loc = alloc.alloc(6)
    k = torch.randn(6, 2, 64, dtype=torch.float16, device=device)
    pool.set_kv_buffer(SimpleNamespace(layer_id=0), sgl.KVWriteLoc(loc), k, k)
    alloc.free(loc[3:])  # a finished request's tail goes back to the allocator
    km = pool.get_int4_layer(0)[1]
    assert torch.isnan(km[loc[3:]]).all() and not torch.isnan(km[loc[:3]]).any()

    def attend(rows):
        q = torch.randn(1, 4, 64, dtype=torch.float16, device=device)
        o = torch.empty_like(q)
        int4_decode_attention(q, *pool.get_int4_layer(0), o, torch.tensor([0, len(rows)], dtype=torch.int32, device=device),
                              rows.to(torch.int32), torch.empty(1, 4, 2, 64, device=device),
                              torch.empty(1, 4, 2, device=device), torch.ones(1, dtype=torch.int32, device=device),
                              2, 0.125, layout)
        return o

    assert not torch.isnan(attend(loc[:3])).any()  # live rows only: clean
    assert torch.isnan(attend(loc)).all()  # a stale row in the read set: the output says so
    # a freed slot handed out again and rewritten is clean again
    again = alloc.alloc(3)
    pool.set_kv_buffer(SimpleNamespace(layer_id=0), sgl.KVWriteLoc(again), k[:3], k[:3])
    assert not torch.isnan(km[again]).any()
    # the radix cache frees int32 segments of req_to_token (found by the soak on the H100)
    alloc.free_segment(again.to(torch.int32), start_pos=0)
    assert torch.isnan(km[again]).all()


def test_backend_split_count_is_ours_unless_static(device):
    """Int4TritonAttnBackend.get_num_kv_splits: our rule (kernels/splits.py) on the
    backend's KV heads, cap and SM count; SGLang's static split count when asked for."""
    from sglang_sawint4.backend import Int4TritonAttnBackend
    from sglang_sawint4.kernels.splits import num_kv_splits_reference

    backend = object.__new__(Int4TritonAttnBackend)  # the method reads these attributes only
    backend.static_kv_splits, backend.device_core_count = False, 132
    backend.num_kv_head, backend.max_kv_splits = 8, 16
    backend.enable_deterministic, backend.int4_format = False, fmt.Int4Format(128, 128)
    seq_lens = torch.tensor([8192] * 32, device=device)
    splits = torch.zeros(32, dtype=torch.int32, device=device)
    backend.get_num_kv_splits(splits, seq_lens)
    assert splits.tolist() == num_kv_splits_reference([8192] * 32, 8, 16, 128, 132) == [4] * 32
    backend.static_kv_splits = True
    backend.get_num_kv_splits(splits, seq_lens)
    assert splits.tolist() == [16] * 32


def test_debug_poison_reaches_bf16_and_int4_layers(device):
    """Across mixed layers: freed slots get NaN rows in BF16 layers and NaN scales in INT4 ones."""
    from types import SimpleNamespace

    from sglang.srt.mem_cache.memory_pool import KVWriteLoc

    from sglang_sawint4.pool import Int4TokenToKVPool

    layout = fmt.Int4Format(64, 64)
    pool = Int4TokenToKVPool(32, page_size=1, dtype=torch.float16, head_num=2, head_dim=64, layer_num=3,
                             device=device, enable_memory_saver=False, int4_format=layout, bf16_layers=(1,),
                             key_centers={2: torch.ones(2, 64)})
    loc = torch.tensor([3, 4, 5], device=device)
    k = torch.randn(3, 2, 64, dtype=torch.float16, device=device)
    for layer in range(3):
        pool.set_kv_buffer(SimpleNamespace(layer_id=layer), KVWriteLoc(loc), k, k)
    assert torch.equal(pool.get_key_buffer(1)[loc], k)  # the BF16 layer stores exactly
    pool.poison_slots(loc[1:])
    assert torch.isnan(pool.get_key_buffer(1)[loc[1:]]).all() and torch.isnan(pool.get_value_buffer(1)[loc[1:]]).all()
    assert not torch.isnan(pool.get_key_buffer(1)[loc[:1]]).any()
    for layer in (0, 2):
        _, km, _, vm = pool.get_int4_layer(layer)
        assert torch.isnan(km[loc[1:]]).all() and torch.isnan(vm[loc[1:]]).all() and not torch.isnan(km[loc[:1]]).any()
    assert pool.key_center(0) is None and torch.equal(pool.key_center(2).cpu(), torch.ones(2, 64))
    k_bytes, v_bytes = pool.get_kv_size_bytes()
    assert k_bytes + v_bytes == 33 * 2 * (2 * 72 + 256)  # two INT4 layers and one BF16 layer, 33 slots
