#!/usr/bin/env python3
"""The key reconstruction error token-wise INT4 has on Gaussian data: the floor BDR can reach.

    python scripts/int4_noise_floor.py

A Hadamard rotation spreads outlier channels, which makes a token's rotated key close to
Gaussian; what is left is the error of 4-bit min/max quantization of that Gaussian vector,
which no rotation removes.  Prints, per (head_dim, block), the relative error
||k_hat - k|| / ||k|| of the served format on i.i.d. Gaussian keys, to compare with the
per-layer ``k_err`` of real models in bench/results/accuracy.json (the right-hand plots).
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sglang_sawint4 import format as fmt  # noqa: E402


def gaussian_key_error(head_dim: int, block, tokens: int = 20000, seed: int = 0) -> float:
    """Relative reconstruction error of the format (INT4, BDR with ``block`` or plain if
    None) on ``tokens`` i.i.d. standard Gaussian keys of one head."""
    x = torch.randn(tokens, 1, head_dim, generator=torch.Generator().manual_seed(seed))
    x_hat = fmt.fake_quantize(x, fmt.Int4Format(head_dim, block), is_value=False)
    return ((x_hat - x).norm() / x.norm()).item()


def main():
    print(f"{'head_dim':>8} {'block':>6} {'rel. error':>10}")
    for head_dim in (64, 128, 256):
        for block in (None,) + tuple(b for b in fmt.ALLOWED_BLOCK_SIZES if head_dim % b == 0):
            print(f"{head_dim:>8} {str(block):>6} {gaussian_key_error(head_dim, block):10.4f}")


if __name__ == "__main__":
    main()
