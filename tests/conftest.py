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

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
