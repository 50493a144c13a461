"""Autotune configurations of every kernel, device-aware, in one place.

``MTLFACE_FAST_AUTOTUNE=0`` (and the Triton interpreter) collapse each list to its first config so
CI and interpreter runs compile one variant only.
"""
from __future__ import annotations

import os


def autotune_enabled() -> bool:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return False
    return os.environ.get("MTLFACE_FAST_AUTOTUNE", "1") not in ("", "0")


def pick(configs):
    """The full list when autotuning is on, else only its first (default) config."""
    configs = list(configs)
    return configs if autotune_enabled() else configs[:1]
