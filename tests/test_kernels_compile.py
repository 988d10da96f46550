"""Every kernel variant the wrappers launch compiles for an H100/H200 (sm_90), without a GPU.

The CPU tests run the kernels in Triton's interpreter, which accepts code the compiler would
reject; this compiles what the wrappers launch through Triton's NVIDIA backend
(tests/compile_for_gpu.py, in a process without TRITON_INTERPRET).  On a GPU the kernel tests
compile for the real device, so this is skipped there.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

# every kernel the package launches (tests/compile_for_gpu.py captures them from the wrappers)
KERNELS = {"_rotate_quantize_store_kernel", "_store_and_stage_kernel", "_dequantize_pages_kernel",
           "_rotate_qkv_kernel", "_rotate_rows_kernel", "_decode_stage1", "_decode_stage2", "_num_kv_splits_kernel"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernel tests compile for the device itself")
def test_every_launched_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(__file__), "compile_for_gpu.py")
    out = subprocess.run([sys.executable, script, "--arch", "90"], env=env, capture_output=True, text=True,
                         timeout=1200)
    assert out.returncode == 0, out.stderr[-4000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["failed"] == 0 and set(summary["compiled"]) == KERNELS, summary
