"""The fast MTLFace: the reference module tree with fast layers injected (same API, same state dict).

The fused AFD and ICM layers plug in through the reference constructor's ``attention_layer`` and
``generator_layer`` arguments; which implementation runs is chosen by the backend switch
(:mod:`mtlface_fast.backend`).
"""
from __future__ import annotations

from .reference.model import MTLFace as ReferenceMTLFace


class MTLFace(ReferenceMTLFace):
    """Drop-in fast MTLFace; see :class:`mtlface_fast.reference.MTLFace` for the arguments and API."""
