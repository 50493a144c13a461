"""Heads of MTLFace: DEX age estimation, CosFace, gradient reversal, age->group mapping."""
from __future__ import annotations

import numbers

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

AGE_BINS = 101
# Upper bounds (inclusive, on integer ages) of every group but the last; group = #thresholds < age.
AGE_GROUP_THRESHOLDS = {
    4: (30, 40, 50),
    5: (20, 30, 40, 50),
    6: (10, 20, 30, 40, 50),
    7: (10, 20, 30, 40, 50, 60),
    8: (12, 18, 25, 35, 45, 55, 65),
}


def check_age_group(age_group: int) -> int:
    """An int (numpy integers too) among the supported group counts -> int (7.0 is refused: not an int)."""
    if (isinstance(age_group, bool) or not isinstance(age_group, numbers.Integral)
            or int(age_group) not in AGE_GROUP_THRESHOLDS):
        raise ValueError(f"age_group must be an int, one of {sorted(AGE_GROUP_THRESHOLDS)}, got {age_group!r}")
    return int(age_group)


def age2group(age, age_group: int = 7):
    """Age group of each age: the number of thresholds strictly below it (official ``age2group``).

    Works on numbers, numpy arrays and tensors; returns int / int64 array / LongTensor.
    """
    thresholds = AGE_GROUP_THRESHOLDS[check_age_group(age_group)]
    if isinstance(age, torch.Tensor):
        return (age.unsqueeze(-1) > torch.tensor(thresholds, dtype=age.dtype, device=age.device)).sum(-1)
    arr = np.asarray(age)
    out = (arr[..., None] > np.asarray(thresholds)).sum(-1).astype(np.int64)
    return int(out) if out.ndim == 0 else out


def dex_age(age_logits: torch.Tensor) -> torch.Tensor:
    """DEX expected age: softmax over the 101 bins times 0..100, summed. (B, 101) -> (B,)."""
    acc = torch.promote_types(age_logits.dtype, torch.float32)  # fp32 for low precision, fp64 stays fp64
    bins = torch.arange(age_logits.size(-1), device=age_logits.device, dtype=acc)
    return (F.softmax(age_logits.to(acc), dim=-1) * bins).sum(-1)


class AgeEstimationModule(nn.Module):
    """Age head on x_age: ``age_output_layer`` -> 101 logits, ``group_output_layer`` on the raw logits.

    Returns ``(age_logits (B,101), group_logits (B,G))`` as the CVPR module does. With
    ``expectation_buffer=True`` (the TPAMI layout) it carries the ``expectation`` buffer (0..100) in
    its state dict; the forward is the same.
    """

    def __init__(self, input_size: int = 112, age_group: int = 7, expectation_buffer: bool = False):
        super().__init__()
        side = input_size // 16
        self.age_group = age_group
        self.age_output_layer = nn.Sequential(
            nn.BatchNorm2d(512), nn.Flatten(), nn.Linear(512 * side * side, 512), nn.ReLU(inplace=True),
            nn.Linear(512, AGE_BINS))
        self.group_output_layer = nn.Linear(AGE_BINS, age_group)
        if expectation_buffer:
            self.register_buffer("expectation", torch.arange(AGE_BINS).float())

    def forward(self, x_age: torch.Tensor):
        age_logits = self.age_output_layer(x_age)
        return age_logits, self.group_output_layer(age_logits)

    def expected_age(self, age_logits: torch.Tensor) -> torch.Tensor:
        """DEX expected age (B,): with the ``expectation`` buffer when the module has one (TPAMI layout, as
        the official ``MTLFace.encode``), else :func:`dex_age` (the same bins, 0..100)."""
        expectation = self._buffers.get("expectation")
        if expectation is None:
            return dex_age(age_logits)
        acc = torch.promote_types(age_logits.dtype, torch.float32)  # fp32 for low precision, fp64 stays fp64
        return (F.softmax(age_logits.to(acc), dim=1) * expectation.to(acc)[None, :]).sum(dim=1)


class CosFace(nn.Module):
    """Large-margin cosine head: s * (cos(theta) - m * onehot(label)); param ``weight`` (classes, features)."""

    def __init__(self, in_features: int = 512, out_features: int = 1000, s: float = 64.0, m: float = 0.35):
        super().__init__()
        self.in_features, self.out_features, self.s, self.m = in_features, out_features, s, m
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.xavier_uniform_(self.weight)

    def forward(self, embedding: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        cosine = F.linear(F.normalize(embedding), F.normalize(self.weight))
        one_hot = torch.zeros_like(cosine).scatter_(1, label.view(-1, 1).long(), 1.0)
        return self.s * (cosine - self.m * one_hot)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, s={self.s}, m={self.m}"


class _GradientReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, coeff):
        ctx.coeff = coeff
        return x * 1.0

    @staticmethod
    def backward(ctx, grad):
        return grad.neg() * ctx.coeff, None


def grad_reverse(x: torch.Tensor, coeff: float = 1.0) -> torch.Tensor:
    """Identity forward, ``-coeff * grad`` backward."""
    return _GradientReverse.apply(x, coeff)


class GradientReverseLayer(nn.Module):
    """The official GRL (coefficient 1.0, constant)."""

    def __init__(self, coeff: float = 1.0):
        super().__init__()
        self.coeff = coeff

    def forward(self, x):
        return grad_reverse(x, self.coeff)
