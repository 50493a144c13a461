"""One switch that picks the implementation of every fused op.

``MTLFACE_FAST_BACKEND`` (environment) or :func:`use_backend` (code) selects:

* ``auto``   -- Triton kernels for CUDA tensors, the PyTorch implementation elsewhere (default);
* ``triton`` -- Triton kernels everywhere; on CPU tensors they run in the Triton interpreter, which
  needs ``TRITON_INTERPRET=1`` set before triton is imported (slow; meant for tests);
* ``torch``  -- the PyTorch implementation everywhere.

The choice is made once per layer, not per call: a fused layer asks :func:`choose` the first time it
runs after it was built, moved (``.to()``), switched between train and eval, or after the backend changed
(every :func:`use_backend` entry and exit moves :func:`token`); ``MTLFace.implementations()`` lists the
choices. The environment variable is read when a choice is made.
"""
from __future__ import annotations

import contextlib
import os
import threading

import torch

from .errors import MissingDependencyError

BACKENDS = ("auto", "triton", "torch")
_ENV = "MTLFACE_FAST_BACKEND"
_state = threading.local()
_token = 0  # moved by every use_backend entry and exit: fused layers choose again when it moved


def token() -> int:
    """A number that changes whenever the backend in force may have changed (see the module doc)."""
    return _token


def _moved() -> None:
    global _token
    _token += 1


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
    _moved()
    try:
        yield name
    finally:
        stack.pop()
        _moved()


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def choose(device: torch.device) -> str:
    """``"triton"`` or ``"torch"``: what the backend in force runs the fused ops on ``device`` with.

    Raises:
        MissingDependencyError (a RuntimeError): backend ``triton`` without triton installed, or on CPU
            without the interpreter.
    """
    backend = get_backend()
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if not triton_available():
        raise MissingDependencyError("backend 'triton' was requested but triton is not installed "
                                     "(pip install triton)")
    if device.type != "cuda" and not interpreter_enabled():
        raise MissingDependencyError(
            "backend 'triton' on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 "
            "before importing triton (or use backend 'auto'/'torch' on CPU)")
    return "triton"


def use_triton_for(tensor: torch.Tensor) -> bool:
    """Whether a fused op given ``tensor`` would launch its Triton kernels under the current backend."""
    return choose(tensor.device) == "triton"
