"""Host-side launch plumbing shared by the kernels: buffer checks and stride arguments."""

import torch

from sglang_sawint4 import format as fmt


def check_layer_buffers(data: torch.Tensor, meta: torch.Tensor, num_heads: int, head_dim: int, name: str) -> None:
    """Raise unless (data, meta) are one layer's K or V buffers in the format's layout."""
    if data.dtype != fmt.DATA_DTYPE or data.dim() != 3 or data.shape[1:] != (num_heads, head_dim // 2):
        raise ValueError(
            f"{name} data must be [slots, {num_heads}, {head_dim // 2}] uint8, "
            f"got {tuple(data.shape)} {data.dtype}")
    if meta.dtype != fmt.META_DTYPE or meta.shape != (data.shape[0], num_heads, fmt.META_FIELDS):
        raise ValueError(
            f"{name} meta must be [slots, {num_heads}, {fmt.META_FIELDS}] float16, "
            f"got {tuple(meta.shape)} {meta.dtype}")
    if data.stride(-1) != 1 or meta.stride(-1) != 1:
        raise ValueError(f"{name} buffers must be contiguous in the last axis")


def check_center(center, num_heads: int, head_dim: int) -> None:
    """Raise unless ``center`` is None or one layer's key center: [num_heads, head_dim]
    float32, contiguous (kernels read it as head * head_dim + channel)."""
    if center is None:
        return
    if center.dtype != torch.float32 or center.shape != (num_heads, head_dim) or not center.is_contiguous():
        raise ValueError(f"key center must be [{num_heads}, {head_dim}] float32 contiguous, "
                         f"got {tuple(center.shape)} {center.dtype}")


def row_head_args(*tensors: torch.Tensor) -> tuple:
    """(tensor, row stride, head stride) for each [rows, heads, ...] tensor, flattened."""
    return tuple(x for t in tensors for x in (t, t.stride(0), t.stride(1)))


def use_ptx(kernel, device: torch.device) -> bool:
    """Whether ``kernel`` may take its inline-PTX paths on ``device``.

    Only compiled kernels on NVIDIA GPUs: Triton's interpreter (CPU tests) and other
    targets run the portable path, which computes the same values.
    """
    interpreted = type(kernel).__name__ == "InterpretedFunction"
    return device.type == "cuda" and torch.version.hip is None and not interpreted
