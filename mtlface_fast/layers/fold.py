"""Eval-mode BatchNorm folding, the one place the package writes the formula.

An eval ``BatchNorm`` is the per-channel affine ``y = x * scale + shift`` with
``scale = gamma / sqrt(running_var + eps)`` and ``shift = beta - running_mean * scale``; after a
convolution (or a linear layer) it folds into that layer: ``weight' = weight * scale`` along the
output dimension, ``bias' = shift + bias * scale``. The fold is computed in fp32 for every
low-precision dtype and in fp64 when any of its sources is fp64, so a float64 model stays float64
end to end (a fast path then equals the reference to round-off).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn


def acc_dtype(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    """fp64 when any of ``tensors`` is fp64, else fp32: the dtype folds and statistics are computed in."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def bn_scale_shift(bn: nn.modules.batchnorm._BatchNorm, dtype: Optional[torch.dtype] = None
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (scale, shift) of ``bn`` with its running statistics, in ``dtype`` (default
    :func:`acc_dtype` of its tensors)."""
    acc = dtype or acc_dtype(bn.weight, bn.running_var)
    scale = bn.weight.to(acc) * torch.rsqrt(bn.running_var.to(acc) + bn.eps)
    return scale, bn.bias.to(acc) - bn.running_mean.to(acc) * scale


def fold_bn(weight: torch.Tensor, bn: nn.modules.batchnorm._BatchNorm, bias: Optional[torch.Tensor] = None
            ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(weight', bias') of ``bn(layer(x, weight, bias))`` as one layer; ``weight``'s dim 0 is the output
    channel. In :func:`acc_dtype` of the sources."""
    acc = acc_dtype(weight, bias, bn.weight, bn.running_var)
    scale, shift = bn_scale_shift(bn, acc)
    w = weight.to(acc) * scale.view(-1, *([1] * (weight.dim() - 1)))
    return w, shift if bias is None else shift + bias.to(acc) * scale
