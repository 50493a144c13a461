"""Helpers shared by the kernel files: the decomposition table and launch-side checks.

``DECOMPOSITIONS`` maps each ``torch.ops.mtlface_fast.*`` overload to a function made of standard
aten ops with the same semantics. Export paths (ONNX, TensorRT) pass it to
``ExportedProgram.run_decompositions`` so that no custom op reaches a runtime that lacks it.
Each kernel module registers its ops here when it is imported.
"""
from __future__ import annotations

from typing import Callable, Dict

import torch

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
