"""One switch that picks the implementation of every fused op.

``MTLFACE_FAST_BACKEND`` (environment) or :func:`use_backend` (code) selects:

* ``auto``   -- Triton kernels for CUDA tensors, the PyTorch implementation elsewhere (default);
* ``triton`` -- Triton kernels everywhere; on CPU tensors they run in the Triton interpreter, which
  needs ``TRITON_INTERPRET=1`` set before triton is imported (slow; meant for tests);
* ``torch``  -- the PyTorch implementation everywhere.
"""
from __future__ import annotations

import contextlib
import os
import threading

import torch

BACKENDS = ("auto", "triton", "torch")
_ENV = "MTLFACE_FAST_BACKEND"
_state = threading.local()


def _validate(name: str) -> str:
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name.lower()


def get_backend() -> str:
    """The backend in force: the innermost :func:`use_backend`, else ``$MTLFACE_FAST_BACKEND``, else auto."""
    override = getattr(_state, "stack", None)
    if override:
        return override[-1]
    return _validate(os.environ.get(_ENV, "auto"))


@contextlib.contextmanager
def use_backend(name: str):
    """Context manager that selects a backend for the code inside it (thread-local)."""
    name = _validate(name)
    stack = getattr(_state, "stack", None)
    if stack is None:
        stack = _state.stack = []
    stack.append(name)
    try:
        yield name
    finally:
        stack.pop()


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton_for(tensor: torch.Tensor) -> bool:
    """Whether a fused op given ``tensor`` should launch its Triton kernels under the current backend."""
    backend = get_backend()
    if backend == "torch":
        return False
    if backend == "auto":
        return tensor.is_cuda and triton_available()
    # backend == "triton"
    if not triton_available():
        raise RuntimeError("backend 'triton' was requested but triton is not installed (pip install triton)")
    if not tensor.is_cuda and not interpreter_enabled():
        raise RuntimeError(
            "backend 'triton' on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 "
            "before importing triton (or use backend 'auto'/'torch' on CPU)")
    return True
