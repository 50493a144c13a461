"""Fast IResNet unit: same keys and training behaviour as the reference, BatchNorm folded at inference.

* Shortcut ``MaxPool2d(1, s)`` is a strided view (``x[:, :, ::s, ::s]``; identity for s = 1) instead of
  a pooling kernel: same values, same gradients.
* In eval mode the BN after each convolution is folded into that convolution (weight * gamma / std,
  bias beta - mean * gamma / std). The folded weights are cached per weights version
  (:mod:`mtlface_fast.layers.fused`); when gradients are wanted for the parameters the fold is
  computed inline so that gradients flow to the original parameters. The leading BN stays a per-channel
  affine: folding it into a zero-padded 3x3 convolution would be wrong at the borders.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..reference.backbone import BottleneckIR
from .fold import bn_scale_shift, fold_bn
from .fused import FusedLayer


class FoldCache:
    """Memoizes a function of a fused layer's weights, rebuilt when its weights version moves."""

    def __init__(self):
        self._key = None
        self._value = None

    def get(self, module: FusedLayer, build):
        if torch.compiler.is_compiling() or (torch.is_grad_enabled() and
                                             any(p.requires_grad for p in module.parameters())):
            return build()  # differentiable / traceable: no cached tensors
        key = module.weights_version()
        if key != self._key:
            with torch.no_grad():
                self._value = build()
            self._key = key
        return self._value


class FastBottleneckIR(FusedLayer, BottleneckIR):
    """Drop-in :class:`BottleneckIR` (same state dict) with BN folding at inference."""

    def __init__(self, in_channel: int, depth: int, stride: int, se: bool = False):
        super().__init__(in_channel, depth, stride, se)
        self.stride = stride
        self._folds: Dict[Tuple[torch.dtype, torch.dtype], FoldCache] = {}

    def choose_implementation(self) -> str:
        return "torch"  # the folded unit is plain PyTorch on every backend

    def describe_implementation(self) -> str:
        return "torch (BatchNorm folded at inference)"

    def _shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.shortcut_layer, nn.MaxPool2d):
            return x if self.stride == 1 else x[:, :, ::self.stride, ::self.stride]
        return self.shortcut_layer(x)

    def _build(self) -> Dict[str, torch.Tensor]:
        r = self.res_layer
        s0, t0 = bn_scale_shift(r[0])
        w1, b1 = fold_bn(r[1].weight, r[2])
        w2, b2 = fold_bn(r[4].weight, r[5])
        out = dict(s0=s0, t0=t0, w1=w1, b1=b1, w2=w2, b2=b2)
        if not isinstance(self.shortcut_layer, nn.MaxPool2d):
            out["ws"], out["bs"] = fold_bn(self.shortcut_layer[0].weight, self.shortcut_layer[1])
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return self.res_layer(x) + self._shortcut(x)
        dt = x.dtype if not torch.is_autocast_enabled(x.device.type) else \
            torch.get_autocast_dtype(x.device.type)
        # Folded operands already cast to the input dtype (affine) and the convolution dtype (weights):
        # one cache per dtype pair, so autocast runs no weight casts per call.
        cache = self._folds.setdefault((x.dtype, dt), FoldCache())
        p = cache.get(self, lambda: {k: v.to(x.dtype if k in ("s0", "t0") else dt) for k, v in self._build().items()})
        r = self.res_layer
        y = torch.addcmul(p["t0"].view(1, -1, 1, 1), x, p["s0"].view(1, -1, 1, 1))  # the leading BN: one op
        y = F.conv2d(y, p["w1"], p["b1"], 1, 1)
        y = r[3](y)
        y = F.conv2d(y, p["w2"], p["b2"], self.stride, 1)
        if len(r) > 6:
            y = r[6](y)
        if "ws" in p:
            sc = F.conv2d(x, p["ws"], p["bs"], self.stride)
        else:
            sc = self._shortcut(x)
        return y + sc
