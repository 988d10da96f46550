"""Host-side launch plumbing shared by the kernels: buffer checks, stride arguments, and a
launch path that skips Triton's per-call dispatch."""

import inspect
import os
from typing import Dict, Optional, Tuple

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


def check_written_like(name: str, dst: torch.Tensor, src: torch.Tensor) -> None:
    """Raise unless ``dst``, which a kernel writes ``src``'s rows into (e.g. rows of a staging
    buffer), has ``src``'s shape and dtype and unit channel stride."""
    if dst.shape != src.shape or dst.dtype != src.dtype or dst.stride(-1) != 1:
        raise ValueError(f"{name} must be {tuple(src.shape)} {src.dtype} with unit channel stride, "
                         f"got {tuple(dst.shape)} {dst.dtype}")


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


# Triton releases on which a GPU run has checked DirectLaunch (its launch arguments and key
# mirror 3.6's JITFunction.run): on there by default; SGLANG_SAWINT4_DIRECT_LAUNCH=1 forces it
# on, =0 off
DIRECT_LAUNCH_TRITON: Tuple[str, ...] = ("3.6.0",)


def direct_launch_enabled(triton_version: str) -> bool:
    forced = os.environ.get("SGLANG_SAWINT4_DIRECT_LAUNCH", "")
    if forced not in ("", "0", "1"):
        raise ValueError(f"SGLANG_SAWINT4_DIRECT_LAUNCH must be 0 or 1, got {forced!r}")
    return forced == "1" or (forced == "" and triton_version.startswith(DIRECT_LAUNCH_TRITON))


_I32 = range(-2**31, 2**31)
_U64 = 2**63
# each argument's key by its exact type (a subclass, e.g. a Parameter, is not known here)
_ARG_KEYS = {
    torch.Tensor: lambda a: (a.dtype, a.data_ptr() % 16 == 0),
    int: lambda a: (a in _I32, a < _U64, a == 1, a % 16 == 0),
    bool: lambda a: bool,
    float: lambda a: float,
    type(None): lambda a: None,
}


def specialization_key(constexpr, args) -> Optional[tuple]:
    """What Triton compiles a variant for, read from one call's arguments.

    Args:
        constexpr: [bool] per kernel parameter, in order: whether it is a ``tl.constexpr``.
        args: the call's arguments, one per parameter.
    Returns a hashable key, or None for an argument of a kind this does not know.  Triton
    (3.6) specializes a constexpr on its value, a tensor on its dtype and the 16-byte
    alignment of its data pointer, an integer on its width (32 or 64 bits), on being 1 and
    on divisibility by 16; a bool, float or None on its kind.  The key records each of these
    for every argument, including where the kernel opts out (do_not_specialize...): a finer
    key than Triton's costs a cache entry, a coarser one would launch a binary compiled for
    other arguments.
    """
    try:
        return tuple(a if c else _ARG_KEYS[type(a)](a) for c, a in zip(constexpr, args))
    except KeyError:
        return None


class DirectLaunch:
    """``DirectLaunch(kernel)[grid](*args, **kwargs)``: a ``@triton.jit`` kernel's call that,
    once Triton has compiled the variant for the call's arguments, launches that binary
    without Triton's per-call dispatch.

    Triton's ``JITFunction.run`` binds the arguments, specializes each, builds its cache key
    and looks the binary up on every call: on the H200 hosts measured a store or dequantize
    launch cost 26-73 us of host time against 3-12 us on the GPU, and a prefill over a cached
    prefix makes such launches in every layer (docs/design-notes.md).  Here the binary is
    found by ``specialization_key`` and launched with the arguments Triton's own launch
    passes (every parameter in order, constexprs included; the same stream and launch
    hooks).  A key not seen yet goes through Triton's call, which compiles if needed and
    returns the binary.  Under Triton's interpreter (the CPU tests), or where
    ``direct_launch_enabled`` says no, every call is Triton's.
    """

    def __init__(self, kernel):
        import triton

        self.kernel = kernel
        jit = type(kernel).__name__ == "JITFunction"
        self.direct = jit and direct_launch_enabled(triton.__version__)
        self.direct_launches = 0  # counted for the tests
        self._binaries: Dict[tuple, object] = {}
        if jit:
            from triton import knobs
            from triton.runtime import driver

            self._knobs, self._driver = knobs.runtime, driver
            self._names = [p.name for p in kernel.params]
            self._names_set = frozenset(self._names)
            self._constexpr = [p.is_constexpr for p in kernel.params]
            self._defaults = {p.name: p.default for p in kernel.params if p.default is not inspect.Parameter.empty}

    def __getitem__(self, grid: Tuple[int, ...]):
        if not self.direct:
            return self.kernel[grid]
        return lambda *args, **kwargs: self._launch(grid, args, kwargs)

    def _launch(self, grid, args, kwargs):
        names = self._names
        ordered = list(args)
        for name in names[len(args):]:
            ordered.append(kwargs[name] if name in kwargs else self._defaults[name])
        options = tuple(sorted((k, v) for k, v in kwargs.items() if k not in self._names_set))
        key = specialization_key(self._constexpr, ordered)
        driver = self._driver.active
        device = driver.get_current_device()
        binary = self._binaries.get((device, options, key)) if key is not None else None
        if binary is None:
            binary = self.kernel[grid](*args, **kwargs)
            if hasattr(binary, "result"):  # an asynchronous compile's future
                binary = binary.result()
            if key is not None:
                self._binaries[(device, options, key)] = binary
            return
        stream = driver.get_current_stream(device)
        grid = tuple(grid) + (1,) * (3 - len(grid))
        binary.run(grid[0], grid[1], grid[2], stream, binary.function, binary.packed_metadata,
                   binary.launch_metadata(grid, stream, *ordered), self._knobs.launch_enter_hook,
                   self._knobs.launch_exit_hook, *ordered)
        self.direct_launches += 1
