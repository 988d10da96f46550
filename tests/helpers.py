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
