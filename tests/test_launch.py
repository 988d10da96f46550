"""DirectLaunch: Triton's own call for a variant not seen yet, the cached binary after."""

import inspect
from types import SimpleNamespace

import pytest
import torch

from sglang_sawint4 import format as fmt
from sglang_sawint4.kernels import launch
from sglang_sawint4.kernels.launch import DirectLaunch, specialization_key

from helpers import rel_err


def _keys(constexpr, *calls):
    return [specialization_key(constexpr, args) for args in calls]


def test_specialization_key_separates_what_triton_compiles_apart():
    t = torch.empty(64, dtype=torch.float16)
    u = torch.empty(64, dtype=torch.float16)
    plain = [False, False]
    # same dtype and alignment, integers of one class: one key
    assert specialization_key(plain, [t, 32]) == specialization_key(plain, [u, 4096])
    assert specialization_key(plain, [t, 3]) == specialization_key(plain, [t, 7])
    # each property Triton specializes on gives a key of its own
    others = [[t[1:], 32], [t.float(), 32], [t, 1], [t, 3], [t, 2**31 + 16], [t, 2**63 + 16], [t, None], [t, True],
              [t, 0.5]]
    keys = {specialization_key(plain, [t, 32])} | {specialization_key(plain, args) for args in others}
    assert len(keys) == 1 + len(others)
    # a constexpr by its value, whatever its type
    assert len(set(_keys([False, True], [t, 16], [t, 32], [t, "x"]))) == 3
    # an argument of another kind (a subclass, a string) is not keyed: Triton's own call
    assert specialization_key(plain, [torch.nn.Parameter(t.float()), 32]) is None
    assert specialization_key(plain, [t, "x"]) is None


class JITFunction:
    """Stands in for triton's JITFunction: named so, with its parameters, and a call that
    records what it was given and returns a binary."""

    def __init__(self, fn):
        sig = inspect.signature(fn)
        self.params = [SimpleNamespace(name=name, is_constexpr=p.annotation == "constexpr", default=p.default)
                       for name, p in sig.parameters.items()]
        self.calls = []
        self.binary = SimpleNamespace(function="fn", packed_metadata="meta", runs=[],
                                      launch_metadata=lambda grid, stream, *args: ("metadata", grid, stream))
        self.binary.run = lambda *a: self.binary.runs.append(a)

    def __getitem__(self, grid):
        def call(*args, **kwargs):
            self.calls.append((grid, args, kwargs))
            return self.binary
        return call


def _kernel(x_ptr, n, BLOCK: "constexpr", scale=2):
    pass


@pytest.fixture
def fake_triton(monkeypatch):
    import triton
    import triton.runtime

    monkeypatch.setenv("SGLANG_SAWINT4_DIRECT_LAUNCH", "1")
    active = SimpleNamespace(get_current_device=lambda: 0, get_current_stream=lambda device: 1234)
    monkeypatch.setattr(triton.runtime.driver, "_active", active)  # what driver.active returns
    return active


def test_direct_launch_passes_what_triton_passes(fake_triton):
    from triton import knobs

    kernel = JITFunction(_kernel)
    launcher = DirectLaunch(kernel)
    x = torch.empty(64, dtype=torch.float16)
    launcher[(4,)](x, 100, BLOCK=16, num_warps=4)  # a key not seen: Triton's call
    assert kernel.calls == [((4,), (x, 100), {"BLOCK": 16, "num_warps": 4})] and launcher.direct_launches == 0
    y = torch.empty(64, dtype=torch.float16)
    launcher[(4, 2)](y, 37, BLOCK=16, num_warps=4)  # the same key: the binary, as Triton's run launches it
    assert len(kernel.calls) == 1 and launcher.direct_launches == 1
    (run,) = kernel.binary.runs
    assert run[:7] == (4, 2, 1, 1234, "fn", "meta", ("metadata", (4, 2, 1), 1234))
    assert run[7] is knobs.runtime.launch_enter_hook and run[8] is knobs.runtime.launch_exit_hook
    assert run[9:] == (y, 37, 16, 2)  # every parameter in order: constexprs and defaults included
    # another variant of any argument or option goes back to Triton's call
    for args, kwargs in (((x[1:], 37), {"BLOCK": 16, "num_warps": 4}), ((y, 1), {"BLOCK": 16, "num_warps": 4}),
                         ((y, 37), {"BLOCK": 32, "num_warps": 4}), ((y, 37), {"BLOCK": 16, "num_warps": 8}),
                         ((y, 37), {"BLOCK": 16, "num_warps": 4, "scale": 16})):
        launcher[(1,)](*args, **kwargs)
    assert len(kernel.calls) == 6 and launcher.direct_launches == 1
    # a defaulted parameter given by keyword, of the default's class: the binary, with its value
    launcher[(1,)](y, 37, BLOCK=16, num_warps=4, scale=3)
    assert len(kernel.calls) == 6 and launcher.direct_launches == 2 and kernel.binary.runs[-1][9:] == (y, 37, 16, 3)


def test_direct_launch_runs_on_checked_triton_releases_or_when_asked(monkeypatch):
    monkeypatch.setattr(launch, "DIRECT_LAUNCH_TRITON", ("3.6.",))
    monkeypatch.delenv("SGLANG_SAWINT4_DIRECT_LAUNCH", raising=False)
    assert launch.direct_launch_enabled("3.6.0") and not launch.direct_launch_enabled("3.7.0")
    monkeypatch.setenv("SGLANG_SAWINT4_DIRECT_LAUNCH", "1")
    assert launch.direct_launch_enabled("3.7.0")
    monkeypatch.setenv("SGLANG_SAWINT4_DIRECT_LAUNCH", "0")
    launcher = DirectLaunch(JITFunction(_kernel))
    assert not launch.direct_launch_enabled("3.6.0") and not launcher.direct
    launcher.direct = True  # what the GPU test and the probe do: its parameters are known either way
    assert launcher._names == ["x_ptr", "n", "BLOCK", "scale"]
    monkeypatch.setenv("SGLANG_SAWINT4_DIRECT_LAUNCH", "yes")
    with pytest.raises(ValueError, match="must be 0 or 1"):
        launch.direct_launch_enabled("3.6.0")


def test_interpreted_kernels_take_tritons_call():
    calls = []

    class InterpretedFunction:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append((grid, args, kwargs))

    launcher = DirectLaunch(InterpretedFunction())
    for _ in range(2):
        launcher[(3,)](1, BLOCK=2)
    assert calls == [((3,), (1,), {"BLOCK": 2})] * 2 and not launcher.direct


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled binaries exist on a GPU only")
def test_direct_launches_compute_what_tritons_call_computes(rng, monkeypatch):
    """On the GPU: rotate_rows through its cached binary on fresh inputs, a misaligned view
    (a variant of its own) and back, each against the format's rotation."""
    from sglang_sawint4.kernels import rotate

    layout = fmt.Int4Format(128, 32)
    rows, heads, d = 40, 3, 128
    monkeypatch.setattr(rotate._rotate_rows_launch, "direct", True)
    before = rotate._rotate_rows_launch.direct_launches
    for offset in (0, 0, 1, 1, 0):  # offset 1: the rows start 2 bytes past a 16-byte boundary
        flat = torch.randn(rows * heads * d + 1, generator=rng).half().cuda()
        x = flat[offset: offset + rows * heads * d].view(rows, heads, d)
        assert (x.data_ptr() % 16 == 0) == (offset == 0)
        out = rotate.rotate_rows(x, layout)
        assert rel_err(out, fmt.rotate(x.cpu().double(), layout.block_size)) < 2e-3
    torch.cuda.synchronize()
    # the first aligned and first misaligned calls may compile; the others launch directly
    assert rotate._rotate_rows_launch.direct_launches - before >= 3
