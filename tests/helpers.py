"""Shared test data: K/V with outlier channels, like real post-RoPE keys."""

import torch


def keys_with_outliers(num_tokens, num_heads, head_dim, gen, outlier_channels=(3, 17), magnitude=25.0,
                       dtype=torch.float32):
    """Random K rows where a few fixed channels are much larger than the rest.

    Real keys have channels whose magnitude is an order above the others, on every
    token; with one (scale, offset) per token-head they stretch the INT4 grid.
    """
    k = torch.randn(num_tokens, num_heads, head_dim, generator=gen)
    for c in outlier_channels:
        if c < head_dim:
            k[:, :, c] = k[:, :, c] * 2.0 + magnitude
    return k.to(dtype)


def rel_err(a, b):
    a = a.double().cpu()
    b = b.double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def tiny_llama(vocab_size, hidden_size, head_dim, num_hidden_layers=2):
    """A random-weight Llama (2 query heads, 1 KV head: GQA) for tests of the HF evaluation path."""
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=hidden_size,
                                   num_hidden_layers=num_hidden_layers, num_attention_heads=2,
                                   num_key_value_heads=1, head_dim=head_dim)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_gemma(head_dim, layer_types, **config):
    """A random-weight Gemma 3 text model (2 query heads, 1 KV head), one layer per entry
    of ``layer_types``; ``config``: other Gemma3TextConfig fields (sliding_window, ...)."""
    import transformers

    cfg = transformers.Gemma3TextConfig(vocab_size=64, hidden_size=64, intermediate_size=64,
                                        num_hidden_layers=len(layer_types), num_attention_heads=2,
                                        num_key_value_heads=1, head_dim=head_dim, layer_types=layer_types, **config)
    torch.manual_seed(0)
    return transformers.Gemma3ForCausalLM(cfg).eval()


def require_sglang():
    """For test modules that need SGLang: fail (never skip) with the reason when sglang==0.5.17
    is missing or does not import, e.g. a dependency the README's set-up should have installed."""
    import importlib.util

    if importlib.util.find_spec("sglang") is None:
        raise ImportError("these tests need sglang==0.5.17 installed without its GPU dependencies: run the "
                          "README's set-up command (pip install --no-deps sglang==0.5.17 after requirements-ci.txt)")
    try:
        import sglang.srt.mem_cache.memory_pool  # noqa: F401
    except Exception as e:  # noqa: BLE001 - whatever breaks the import is the message
        raise ImportError(f"sglang is installed but does not import ({type(e).__name__}: {e}); a dependency is "
                          f"missing from requirements-ci.txt or the environment") from e
