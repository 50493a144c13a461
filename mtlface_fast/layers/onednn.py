"""Inference convolutions on CPU with oneDNN weights packed once: the layout Inductor's freezing pass builds,
without compiling.

``F.conv2d`` on CPU hands oneDNN a plain weight on every call, which it reorders into its blocked layout (and,
for channels_last activations, PyTorch first copies the weight to channels_last): per call, per layer. Here a
layer packs its (folded) weight once per weights version with ``mkldnn._reorder_convolution_weight`` and runs
``mkldnn._convolution_pointwise``, whose ``binary`` form also adds a residual tensor in the same pass
(``conv(x) + other``). Activations are channels_last (oneDNN's fast fp32 layout on x86).

Only for what oneDNN runs exactly as ``F.conv2d`` would, in fp32: CPU tensors, no autograd, not under
autocast or tracing (:func:`usable`); every other call takes the layer's PyTorch path. A packed weight is an
opaque MKLDNN tensor: it is never a parameter, never saved, and is rebuilt when the weights version moves.
"""
from __future__ import annotations

from typing import Optional

import torch

_mkldnn = torch.ops.mkldnn


def available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(_mkldnn, "_convolution_pointwise")


AVAILABLE = available()  # (a constant: read in traced code)


def usable(x: torch.Tensor, any_layout: bool = False) -> bool:
    """Whether ``x`` (a layer's input) can take the packed path: a plain fp32 CPU tensor in channels_last (any
    layout with ``any_layout``: the layer converts), no gradient wanted through it, no autocast, not traced
    (torch.compile / export trace the PyTorch path)."""
    return (AVAILABLE and type(x) is torch.Tensor and x.dtype == torch.float32 and x.device.type == "cpu"
            and not x.is_cuda
            and x.dim() == 4 and (any_layout or x.is_contiguous(memory_format=torch.channels_last))
            and not (torch.is_grad_enabled() and x.requires_grad) and not torch.is_autocast_enabled("cpu")
            and not torch.compiler.is_compiling())


class PackedConv:
    """A 2-D convolution with its weight packed for oneDNN (fp32, CPU): ``__call__(x, other=None)`` returns
    ``conv(x) + bias (+ other)``, channels_last. The packing is oneDNN's generic one for the weight (the
    layout it picks for fp32 does not depend on the batch: timed at B=1 and 8, the per-shape packings were no
    faster)."""

    __slots__ = ("weight", "bias", "padding", "stride", "dilation", "groups")

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: int = 1, padding: int = 0,
                 groups: int = 1):
        weight = weight.detach().to(torch.float32).contiguous()
        self.padding, self.stride, self.dilation, self.groups = [padding, padding], [stride, stride], [1, 1], groups
        self.weight = _mkldnn._reorder_convolution_weight(weight, self.padding, self.stride, self.dilation, groups, None)
        self.bias = None if bias is None else bias.detach().to(torch.float32).contiguous()

    def __call__(self, x: torch.Tensor, other: Optional[torch.Tensor] = None) -> torch.Tensor:
        if other is None:
            return _mkldnn._convolution_pointwise(x, self.weight, self.bias, self.padding, self.stride,
                                                  self.dilation, self.groups, "none", [], "")
        return _mkldnn._convolution_pointwise.binary(x, other.contiguous(memory_format=torch.channels_last),
                                                     self.weight, self.bias, self.padding, self.stride,
                                                     self.dilation, self.groups, "add", None, None, [], None)
