import os
import shutil
import subprocess
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


# The C++ runner of AOTInductor packages (CMakeLists.txt, cpp/mtlface_infer.cpp), built once per session.
@pytest.fixture(scope="session")
def runner_binary(tmp_path_factory):
    cmake, cxx = shutil.which("cmake"), shutil.which("c++") or shutil.which("g++")
    if cmake is None or cxx is None:
        pytest.skip("the C++ runner test needs cmake and a C++ compiler on PATH")
    build = tmp_path_factory.mktemp("cpp_build")
    prefix = torch.utils.cmake_prefix_path
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    subprocess.run([cmake, "-S", ROOT, "-B", str(build), *gen, "-DCMAKE_BUILD_TYPE=Release",
                    f"-DCMAKE_PREFIX_PATH={prefix}"], check=True, capture_output=True, text=True)
    done = subprocess.run([cmake, "--build", str(build), "--target", "mtlface_infer"], capture_output=True, text=True)
    assert done.returncode == 0, f"building mtlface_infer failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    binary = build / "mtlface_infer"
    assert binary.is_file()
    return str(binary)
