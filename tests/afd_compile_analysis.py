"""What torch.compile's analysis of each AFD Triton kernel finds written and read, printed as JSON.

Inductor keeps a user Triton kernel by the tensors that its analysis of the kernel's Triton IR finds
written; tests/test_afd_kernels.py compares that with what each kernel really writes. The ops are called
on fake CUDA tensors (no GPU needed) with the launches recorded instead of run, so the arguments are the
ones a CUDA call passes. Building Triton IR needs a process without ``TRITON_INTERPRET``: the interpreter
replaces the language functions that the IR builder uses. Without a GPU the IR is built for sm_90.

    python tests/afd_compile_analysis.py    (prints {"launches": [...]} or {"skip": reason})
"""
from __future__ import annotations

import json
import os
import sys


def _skip(reason: str) -> None:
    print(json.dumps({"skip": reason}))
    sys.exit(0)


def _accesses(twk, kernel, kwargs):
    """(written, read or None): private torch API, in the two forms it has had."""
    if hasattr(twk, "identify_accessed_tensors"):  # torch >= 2.13: reads and writes
        acc = twk.identify_accessed_tensors(kernel, kwargs, {})
        return sorted(d.name for d in acc.read_writes.writes), sorted(d.name for d in acc.read_writes.reads)
    try:
        written = twk.identify_mutated_tensors(kernel, kwargs, {})
    except TypeError:  # torch < 2.6: no TMA metadata argument
        written = twk.identify_mutated_tensors(kernel, kwargs)
    return sorted(written), None


def main() -> None:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        _skip("TRITON_INTERPRET is set; Triton IR cannot be built in the interpreter")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import torch
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.runtime.jit import JITFunction
        import torch._higher_order_ops.triton_kernel_wrap as twk
    except ImportError as e:
        _skip(f"no triton or no torch analysis of user Triton kernels: {e}")
    if not (hasattr(twk, "identify_accessed_tensors") or hasattr(twk, "identify_mutated_tensors")):
        _skip("this torch has no analysis of user Triton kernels")
    from torch._subclasses.fake_tensor import FakeTensorMode

    from mtlface_fast.kernels import afd as ops

    if not torch.cuda.is_available():
        target = GPUTarget("cuda", 90, 32)
        try:
            triton.compiler.compiler.make_backend(target)
        except Exception as e:  # a triton build without the NVIDIA backend
            _skip(f"triton cannot build CUDA IR here: {e}")

        class _Sm90:
            def get_current_target(self):
                return target

        triton.runtime.driver.set_active(_Sm90())

    launches = []

    class _Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append((self.kernel, args, kwargs))
            return launch

    ops.wrap_triton = _Recorder
    ops._shapes_only = lambda x: False  # go on to the launch with fake tensors
    with FakeTensorMode():
        x = torch.randn(2, 512, 7, 7, device="cuda")
        cs, ss = torch.rand(2, 512, device="cuda"), torch.rand(2, 7, 7, device="cuda")
        for concat in (False, True):
            feat, fidx, sp, sidx = ops.afd_pool(x, concat, True)
            ops.afd_pool(x, concat, False)
            ops.afd_pool_backward(x, torch.randn_like(feat), fidx, torch.randn_like(sp), sidx, concat)
            ops.afd_apply(x, cs, ss, concat)
            ops.afd_apply_backward(x, cs, ss, x * 2, x * 3, concat)
    out = []
    for kernel, args, kwargs in launches:
        jit = kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn)
        call = dict(zip(jit.arg_names, args))
        call.update({k: v for k, v in kwargs.items() if k in jit.arg_names})
        written, read = _accesses(twk, jit, call)
        out.append({"kernel": jit.fn.__name__, "written": written, "read": read,
                    "tensors": sorted(k for k, v in call.items() if isinstance(v, torch.Tensor)),
                    "constexprs": {k: v for k, v in kwargs.items() if isinstance(v, (bool, int))}})
    print(json.dumps({"launches": out, "versions": f"torch {torch.__version__}, triton {triton.__version__}"}))


if __name__ == "__main__":
    main()
