"""Dtype names and the one autocast helper of the package.

``DTYPES`` maps the names every command and artifact uses (``fp32``, ``bf16``, ``fp16``) to torch dtypes;
:func:`dtype_name` goes back; :func:`autocast` is the context a ``dtype=`` argument runs under (autocast to
bf16/fp16, nothing for fp32 or None).
"""
from __future__ import annotations

import contextlib
from typing import Union

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LOW_PRECISION = (torch.bfloat16, torch.float16)


def dtype_name(dtype) -> str:
    """``"fp32"``/``"fp16"``/``"bf16"`` for a torch dtype or one of those names, else a ValueError."""
    if isinstance(dtype, str) and dtype in DTYPES:
        return dtype
    for name, value in DTYPES.items():
        if dtype == value:
            return name
    raise ValueError(f"dtype must be one of {sorted(DTYPES)} or the torch dtype, got {dtype!r}")


def to_dtype(dtype) -> torch.dtype:
    """The torch dtype of a name in :data:`DTYPES` or of a torch dtype among them, else a ValueError."""
    return DTYPES[dtype_name(dtype)]


def autocast(device: Union[str, torch.device], dtype=None):
    """``torch.autocast`` on ``device``'s type to ``dtype`` (bf16/fp16, a torch dtype or its name); a null
    context for None or fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    dtype = to_dtype(dtype)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    return torch.autocast(device_type=device_type, dtype=dtype)
