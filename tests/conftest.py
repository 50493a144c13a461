import os
import sys

# Without a GPU the Triton kernels run in the interpreter; it must be switched on before triton is imported.
try:
    import ctypes.util
    _has_cuda_driver = ctypes.util.find_library("cuda") is not None
except Exception:
    _has_cuda_driver = False
if not _has_cuda_driver:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tests import the checkout's package (kernels/ is mapped into it), not a stale install.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# MTLFACE_TEST_THREADS=N runs the suite with N torch threads (every test must pass with 1 and with 2).
_threads = os.environ.get("MTLFACE_TEST_THREADS", "")
if _threads and not (_threads.isdigit() and int(_threads) >= 1):
    raise ValueError(f"MTLFACE_TEST_THREADS must be a positive integer, got {_threads!r}")
torch.set_num_threads(int(_threads) if _threads else max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _ieee_fp32_on_cuda():
    """fp32 tolerances (1e-4 relative) compare IEEE fp32 results: TF32 convolutions and matmuls (cuDNN's
    default) would put the reference itself ~1e-3 off. Tests that measure TF32 turn it back on."""
    if not torch.cuda.is_available():
        yield
        return
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old
