"""Helpers shared by the kernel files: the decomposition table, the kernel-or-twin decision, launch checks.

``DECOMPOSITIONS`` maps each ``torch.ops.mtlface_fast.*`` overload to a function made of standard
aten ops with the same semantics. Export paths (ONNX, TensorRT) pass it to
``ExportedProgram.run_decompositions`` so that no custom op reaches a runtime that lacks it.
Each kernel module registers its ops here when it is imported.
"""
from __future__ import annotations

from typing import Callable, Dict

import torch

from mtlface_fast.backend import interpreter_enabled

try:  # private module, present in every torch that has triton_op (2.6+); guarded all the same
    from torch._subclasses.fake_tensor import FakeTensor as _FakeTensor
    from torch._subclasses.fake_tensor import is_fake as _torch_is_fake
except ImportError:  # pragma: no cover
    _FakeTensor = ()

    def _torch_is_fake(x) -> bool:
        return False

DECOMPOSITIONS: Dict[object, Callable] = {}


def register_decomposition(op, fn: Callable) -> Callable:
    """Record ``fn`` (aten-only, same signature and outputs as ``op``) as the decomposition of ``op``."""
    DECOMPOSITIONS[op] = fn
    return fn


def check_same_device(**tensors: torch.Tensor) -> torch.device:
    """All named tensors on one device, else a ValueError naming them."""
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        raise ValueError("tensors must be on one device, got " + ", ".join(f"{n} on {d}" for n, d in devices.items()))
    return next(iter(devices.values()))


def is_fake(x: torch.Tensor) -> bool:
    """True when ``x`` has no data to compute on: a ``FakeTensor`` (fake shape propagation, torch.compile
    and torch.export tracing, opcheck's fake half), any wrapper around one (functional tensors, functorch
    wrappers: ``torch._subclasses.fake_tensor.is_fake`` unwraps them), or a ``meta`` tensor.
    Real CPU/CUDA tensors give False. Never raises, never syncs."""
    return x.device.type == "meta" or bool(_torch_is_fake(x))


def use_kernel(x: torch.Tensor) -> bool:
    """Whether an op given its main input ``x`` goes on to its Triton launch (True) or computes with
    its PyTorch twin (False). The one rule of every op in kernels/:

    * CUDA tensors, real or fake: True. A fake CUDA tensor is being traced (torch.compile, export,
      fake propagation); the op then allocates its outputs and reaches ``wrap_triton``, which records the
      launch in the graph, or stops before the launch when :func:`shapes_only` says so.
    * CPU tensors: True only when the Triton interpreter is on and ``x`` is real (the interpreter cannot
      run on fake tensors, and Inductor emits no user Triton kernels for CPU), so traced CPU code and
      CPU runs without the interpreter take the twin.
    * anything else (meta, other devices): False.

    It decides the implementation only; the backend switch (``mtlface_fast.use_backend``) is applied by
    the caller (the layers), and input validation stays with each op. ``torch.compiler.is_compiling()``
    does not enter: a CUDA op under compile must still launch (through ``wrap_triton``), and a CPU op
    under compile sees fake tensors, which already give False."""
    if x.is_cuda:
        return True
    return x.device.type == "cpu" and interpreter_enabled() and not is_fake(x)


def proxy_tracing() -> bool:
    """Whether make_fx's proxy mode (the graph tracing of torch.compile/export) is active."""
    try:
        return torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.PROXY) is not None
    except AttributeError:  # pragma: no cover
        return False


def shapes_only(x: torch.Tensor) -> bool:
    """True for a bare ``FakeTensor`` outside graph tracing (fake shape propagation, e.g. the fake half of
    ``torch.library.opcheck``): the op allocates its outputs and launches nothing. Under graph tracing
    (torch.compile's functional tensors, make_fx's proxy mode) it is False, so the op goes on to
    ``wrap_triton``, which records the launch. Only meaningful where :func:`use_kernel` is True."""
    return isinstance(x, _FakeTensor) and not proxy_tracing()
