"""The monkey-patches that put INT4 KV pages into SGLang 0.5.17.

Each patch is thin (it wraps one SGLang function and calls through), idempotent
(applying twice is a no-op, applying with another config is an error) and
version-checked (SGLang's internals move between releases; these were read off
0.5.17 and refuse anything else).  ``apply`` runs in every SGLang process through
the plugin entry point (``sglang_sawint4.plugin``).

Patch points (see ../shared/docs/sglang.md):
    KVCacheConfigurator._build_mha_kv_pool   -> build Int4TokenToKVPool with the served KV policy
    KVCacheConfigurator._build_token_to_kv_pool -> refuse pool families we do not support
    DefaultPoolConfigurator._compute_cell_size -> the policy's true bytes/token for the profiler
    DefaultPoolConfigurator.calculate_pool_sizes -> keep the FlashInfer prefill staging out of
                                                the pool; log INT4 vs BF16 capacity
    ATTENTION_BACKENDS["flashinfer"]         -> FlashInfer prefill on INT4 pages + INT4 Triton decode
    ATTENTION_BACKENDS["triton"]             -> Int4TritonAttnBackend; other backends refuse
    models.utils.enable_fused_set_kv_buffer   -> False: fused RoPE+store writes BF16 rows
    Token/PagedTokenToKVPoolAllocator.free    -> (--kv-quant-debug-poison only) poison freed slots
    TokenizerManager._validate_one_request    -> prompt token ids outside the vocabulary get a 400
"""

from __future__ import annotations

import functools
import logging
import sys
from typing import Optional

from sglang_sawint4.config import ConfigError, KVQuantConfig

logger = logging.getLogger("sglang_sawint4")

SUPPORTED_SGLANG_VERSION = "0.5.17"
_applied: Optional[KVQuantConfig] = None


class UnsupportedSGLangVersion(RuntimeError):
    pass


def check_sglang_version(version: Optional[str] = None) -> str:
    if version is None:
        import sglang

        version = getattr(sglang, "__version__", None)
    if version != SUPPORTED_SGLANG_VERSION:
        raise UnsupportedSGLangVersion(
            f"sglang-sawint4 patches SGLang {SUPPORTED_SGLANG_VERSION} only, found {version}; "
            f"install sglang=={SUPPORTED_SGLANG_VERSION} or run without --kv-quant")
    return version


def apply(config: KVQuantConfig) -> None:
    """Install all patches for ``config`` in this process (idempotent)."""
    global _applied
    if not config.enabled:
        return
    if _applied is not None:
        if _applied != config:
            raise RuntimeError(f"INT4 KV patches already applied with {_applied}, not {config}")
        return
    check_sglang_version()
    _patch_pool_builder(config)
    _patch_cell_size(config)
    _patch_attention_backends(config)
    _patch_fused_set_kv_buffer()
    _patch_input_id_validation()
    if config.debug_poison_freed:
        _patch_allocator_free()
    _applied = config
    logger.info("sglang-sawint4: INT4 KV patches applied (%s)", config.describe())


def _mark(fn, original):
    fn.__sawint4_original__ = original
    return fn


def _model_facts(model_config):
    from sglang_sawint4.policy import ModelFacts

    return ModelFacts(int(model_config.num_hidden_layers), int(model_config.get_total_num_kv_heads()),
                      int(model_config.head_dim))


def served_policy(config: KVQuantConfig, model_config):
    """The KV policy this worker serves (``policy.served_policy``), logged once per process."""
    from sglang_sawint4.policy import served_policy as resolve

    policy = resolve(config, _model_facts(model_config))
    if policy not in _logged_policies:
        _logged_policies.add(policy)
        logger.info("sglang-sawint4: KV policy: %s", policy.describe())
    return policy


_logged_policies = set()


def _patch_pool_builder(config: KVQuantConfig) -> None:
    from sglang.srt.mem_cache import kv_cache_configurator as kcc

    from sglang_sawint4.pool import Int4TokenToKVPool

    cls = kcc.KVCacheConfigurator
    build_mha, build_any = cls._build_mha_kv_pool, cls._build_token_to_kv_pool

    @functools.wraps(build_mha)
    def _build_mha_kv_pool(self, *, max_total_num_tokens, mha_pool_class, quant_method=None):
        from sglang.srt.runtime_context import get_parallel

        if mha_pool_class is not kcc.MHATokenToKVPool or quant_method is not None:
            raise ConfigError(
                "--kv-quant cannot be combined with another KV layout or KV quantization "
                f"({getattr(mha_pool_class, '__name__', mha_pool_class)}, {quant_method})")
        policy = served_policy(config, self.model_config)
        parallel = get_parallel()
        int4_pool = functools.partial(Int4TokenToKVPool, int4_format=policy.layout(), bf16_layers=policy.bf16_layers,
                                      key_centers=policy.rank_key_centers(parallel.attn_tp_rank, parallel.attn_tp_size))
        return build_mha(self, max_total_num_tokens=max_total_num_tokens, mha_pool_class=int4_pool)

    @functools.wraps(build_any)
    def _build_token_to_kv_pool(self, **kwargs):
        pool = build_any(self, **kwargs)
        if not isinstance(pool, Int4TokenToKVPool):
            raise ConfigError(
                f"--kv-quant {config.method} supports plain MHA/GQA KV pools only; this model needs "
                f"{type(pool).__name__} (MLA, sliding-window, hybrid or sparse attention)")
        return pool

    cls._build_mha_kv_pool = _mark(_build_mha_kv_pool, build_mha)
    cls._build_token_to_kv_pool = _mark(_build_token_to_kv_pool, build_any)


def _patch_cell_size(config: KVQuantConfig) -> None:
    from sglang.srt.model_executor import pool_configurator as pc

    cls = pc.DefaultPoolConfigurator
    compute, calculate = cls._compute_cell_size, cls.calculate_pool_sizes
    logged_cells = set()

    @functools.wraps(compute)
    def _compute_cell_size(self, kvc, num_layers):
        bf16_cell = compute(self, kvc, num_layers)
        if kvc.use_mla_backend:
            raise ConfigError(f"--kv-quant {config.method} does not support MLA models")
        policy = served_policy(config, kvc.model_config)
        # the same per-rank KV head count and layers SGLang's own formula used
        heads = kvc.model_config.get_num_kv_heads(pc.get_parallel().attn_tp_size)
        info = getattr(kvc, "layer_info", None)
        start = info.start_layer if info is not None else 0
        cell = policy.bytes_per_token(range(start, start + num_layers), heads)
        # SGLang 0.5.17 builds the configurator twice per start: log each distinct size once
        if (cell, bf16_cell) not in logged_cells:
            logged_cells.add((cell, bf16_cell))
            logger.info("sglang-sawint4: KV bytes/token %d (%s; BF16 layers %s) vs %d (%s): %.2fx",
                        cell, policy.layout(), list(policy.bf16_layers) or "none", bf16_cell,
                        kvc.kv_cache_dtype, bf16_cell / cell)
        self._sawint4_bf16_cell_size = bf16_cell
        self._sawint4_staging_bytes = _staging_bytes(config, kvc, heads)
        return cell

    @functools.wraps(calculate)
    def calculate_pool_sizes(self, available_bytes, page_size):
        staging = getattr(self, "_sawint4_staging_bytes", 0)
        if staging:
            if staging >= available_bytes:
                raise ConfigError(
                    f"--kv-quant-prefill-staging-rows {config.prefill_staging_rows} needs {staging / 2**20:.0f} MiB, "
                    f"more than the {available_bytes / 2**20:.0f} MiB left for the KV cache; lower it")
            logger.info("sglang-sawint4: %.0f MiB of the KV memory reserved for FlashInfer prefill staging "
                        "(%d rows)", staging / 2**20, config.prefill_staging_rows)
            available_bytes -= staging
        result = calculate(self, available_bytes, page_size)
        bf16_cell = getattr(self, "_sawint4_bf16_cell_size", None)
        if bf16_cell:
            bf16_tokens = available_bytes // bf16_cell // page_size * page_size
            logger.info(
                "sglang-sawint4: the KV memory holds %d tokens with INT4 KV, %d in BF16 (%.2fx); "
                "SGLang applies --max-total-tokens after this", result.max_total_num_tokens, bf16_tokens,
                result.max_total_num_tokens / max(bf16_tokens, 1))
        return result

    cls._compute_cell_size = _mark(_compute_cell_size, compute)
    cls.calculate_pool_sizes = _mark(calculate_pool_sizes, calculate)


def prefill_uses_flashinfer() -> bool:
    """Whether this SGLang process prefills through our FlashInfer path (its server args)."""
    from sglang.srt.server_args import get_global_server_args

    prefill, _ = get_global_server_args().get_attention_backends()
    return prefill == "flashinfer"


def _staging_bytes(config: KVQuantConfig, kvc, heads: int) -> int:
    """Device bytes the FlashInfer prefill staging takes on this rank (0 on the Triton path)."""
    if not prefill_uses_flashinfer():
        return 0
    from sglang_sawint4.flashinfer_prefill import staging_bytes

    return staging_bytes(config.prefill_staging_rows, heads, int(kvc.model_config.head_dim), kvc.model_config.dtype)


def _patch_attention_backends(config: KVQuantConfig) -> None:
    from sglang.srt.layers.attention import attention_registry as reg

    def create_int4_triton_backend(runner):
        from sglang_sawint4.backend import Int4TritonAttnBackend

        return Int4TritonAttnBackend(runner)

    def create_int4_flashinfer_backend(runner):
        from sglang_sawint4.flashinfer_prefill import create_int4_flashinfer_backend as create

        return create(runner, config.prefill_staging_rows)

    def refuse(name, create):
        @functools.wraps(create)
        def create_refused(runner):
            raise ConfigError(
                f"--kv-quant needs --attention-backend flashinfer or triton (also for prefill/decode "
                f"overrides); got {name!r}")

        return create_refused

    ours = {"triton": create_int4_triton_backend, "flashinfer": create_int4_flashinfer_backend}
    for name, create in list(reg.ATTENTION_BACKENDS.items()):
        reg.ATTENTION_BACKENDS[name] = _mark(ours[name] if name in ours else refuse(name, create), create)


def _patch_fused_set_kv_buffer() -> None:
    # Some models (qwen3_moe, gpt_oss, ...) fuse RoPE with a BF16 write straight into
    # the pool's buffers, bypassing set_kv_buffer: that would scribble BF16 rows over
    # packed INT4 pages.  With INT4 KV it is always off.
    from sglang.srt.models import utils as model_utils

    original = model_utils.enable_fused_set_kv_buffer

    def enable_fused_set_kv_buffer(forward_batch):
        return False

    _mark(enable_fused_set_kv_buffer, original)
    model_utils.enable_fused_set_kv_buffer = enable_fused_set_kv_buffer
    # Model modules imported before us hold their own reference to the function.
    for name, module in list(sys.modules.items()):
        if name.startswith("sglang.srt.models.") and getattr(module, "enable_fused_set_kv_buffer", None) is original:
            module.enable_fused_set_kv_buffer = enable_fused_set_kv_buffer


def _patch_input_id_validation() -> None:
    """Refuse prompt token ids outside [0, vocab_size) with SGLang's normal 400.

    SGLang 0.5.17 has such a check (``_validate_input_ids_in_vocab``) but never calls
    it: one out-of-vocabulary id reaches the embedding gather, fails a device-side
    assert and takes the scheduler down with every request in flight (found by
    sglang_sawint4.bench.reliability's bad-request injection on the H100).
    """
    from sglang.srt.managers.tokenizer_manager import TokenizerManager

    validate = TokenizerManager._validate_one_request

    @functools.wraps(validate)
    def _validate_one_request(self, obj, input_ids):
        if input_ids:
            vocab = self.model_config.vocab_size
            lo, hi = min(input_ids), max(input_ids)
            if lo < 0 or hi >= vocab:
                raise ValueError(f"input_ids contains token id {hi if hi >= vocab else lo}, "
                                 f"outside the vocabulary [0, {vocab})")
        return validate(self, obj, input_ids)

    TokenizerManager._validate_one_request = _mark(_validate_one_request, validate)


def _patch_allocator_free() -> None:
    """Debug mode: every slot SGLang frees gets NaN scales in the INT4 pool."""
    from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator
    from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator

    from sglang_sawint4.pool import Int4TokenToKVPool

    for cls in (TokenToKVPoolAllocator, PagedTokenToKVPoolAllocator):
        free = cls.free

        @functools.wraps(free)
        def poisoning_free(self, free_index, _free=free):
            pool = self.get_kvcache()
            # inside a free group SGLang only collects; the group's end frees (and we poison) once
            if self.is_not_in_free_group and isinstance(pool, Int4TokenToKVPool):
                pool.poison_slots(free_index)
            return _free(self, free_index)

        cls.free = _mark(poisoning_free, free)
