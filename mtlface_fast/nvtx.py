"""NVTX ranges for profilers (Nsight Systems): off by default, free when off.

Enable with ``MTLFACE_FAST_NVTX=1`` or :func:`enable`. Ranges are skipped while torch.compile or
torch.export trace (a context manager there would break the graph).
"""
from __future__ import annotations

import contextlib
import os

import torch

_enabled = os.environ.get("MTLFACE_FAST_NVTX", "0") not in ("", "0")
_NULL = contextlib.nullcontext()


def enable(flag: bool = True) -> None:
    global _enabled
    _enabled = bool(flag)


def enabled() -> bool:
    return _enabled


def nvtx_range(name: str):
    """A context manager that marks ``name`` on the NVTX timeline when enabled."""
    if not _enabled or torch.compiler.is_compiling():
        return _NULL
    try:
        import nvtx
    except ImportError:  # the `nvtx` package is optional: fall back to torch's own NVTX bindings on CUDA
        if torch.cuda.is_available():
            return torch.cuda.nvtx.range(f"mtlface_fast.{name}")
        return _NULL
    return nvtx.annotate(f"mtlface_fast.{name}", domain="mtlface_fast")
