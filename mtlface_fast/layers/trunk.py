"""Fast IResNet unit: same keys and training behaviour as the reference, BatchNorm folded at inference.

* Shortcut ``MaxPool2d(1, s)`` is a strided view (``x[:, :, ::s, ::s]``; identity for s = 1) instead of
  a pooling kernel: same values, same gradients.
* In eval mode the BN after each convolution is folded into that convolution (weight * gamma / std,
  bias beta - mean * gamma / std). The folded weights are cached per weights version
  (:mod:`mtlface_fast.layers.fused`); when gradients are wanted for the parameters the fold is
  computed inline so that gradients flow to the original parameters. The leading BN stays a per-channel
  affine: folding it into a zero-padded 3x3 convolution would be wrong at the borders.
* On CPU, an fp32 channels_last input without autograd (what the fast model feeds its trunk by default) runs
  the folded convolutions with oneDNN weights packed once per weights version, the residual add fused into the
  second convolution (:mod:`mtlface_fast.layers.onednn`).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..reference.backbone import BottleneckIR
from . import onednn
from .fold import bn_scale_shift, fold_bn
from .fused import FusedLayer


class FastBottleneckIR(FusedLayer, BottleneckIR):
    """Drop-in :class:`BottleneckIR` (same state dict) with BN folding at inference."""

    def __init__(self, in_channel: int, depth: int, stride: int, se: bool = False):
        super().__init__(in_channel, depth, stride, se)
        self.stride = stride
        self._conv_shortcut = not isinstance(self.shortcut_layer, nn.MaxPool2d)
        self._has_se = len(self.res_layer) > 6
        # (weights version, operands) per (input dtype, convolution dtype)
        self._folds: Dict[Tuple[torch.dtype, torch.dtype], Tuple[object, Dict[str, torch.Tensor]]] = {}
        self._packed: Optional[Tuple[object, Dict[str, object]]] = None  # (weights version, packed operands)

    def choose_implementation(self) -> str:
        return "torch"  # the folded unit is plain PyTorch on every backend

    def describe_implementation(self) -> str:
        return "torch (BatchNorm folded at inference" + ("; oneDNN packed weights on CPU fp32)" if onednn.AVAILABLE
                                                         else ")")

    def _shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self._conv_shortcut:
            return self.shortcut_layer(x)
        return x if self.stride == 1 else x[:, :, ::self.stride, ::self.stride]

    def _build(self, in_dtype: torch.dtype, conv_dtype: torch.dtype) -> Dict[str, torch.Tensor]:
        """The folded operands: the leading BN's (1, C, 1, 1) scale and shift in the input dtype, the convolution
        weights and biases in the convolution dtype, and the PReLU weight (the parameter itself)."""
        r = self.res_layer
        s0, t0 = bn_scale_shift(r[0])
        w1, b1 = fold_bn(r[1].weight, r[2])
        w2, b2 = fold_bn(r[4].weight, r[5])
        out = dict(s0=s0.view(1, -1, 1, 1).to(in_dtype), t0=t0.view(1, -1, 1, 1).to(in_dtype), w1=w1.to(conv_dtype),
                   b1=b1.to(conv_dtype), w2=w2.to(conv_dtype), b2=b2.to(conv_dtype), a=r[3].weight)
        if self._conv_shortcut:
            ws, bs = fold_bn(self.shortcut_layer[0].weight, self.shortcut_layer[1])
            out["ws"], out["bs"] = ws.to(conv_dtype), bs.to(conv_dtype)
        return out

    def _operands(self, in_dtype: torch.dtype, conv_dtype: torch.dtype) -> Dict[str, torch.Tensor]:
        """:meth:`_build`, cached per weights version and dtype pair (so autocast runs no weight casts per
        call); built inline (differentiable) when a parameter wants a gradient; under torch.compile the prepared
        graph operands (:meth:`FusedLayer.graph_operands`)."""
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
            return self._build(in_dtype, conv_dtype)
        if torch.compiler.is_compiling():
            return self.graph_operands(("fold", in_dtype, conv_dtype), lambda: self._build(in_dtype, conv_dtype))
        version = self.weights_version()
        entry = self._folds.get((in_dtype, conv_dtype))
        if entry is None or entry[0] != version:
            with torch.no_grad():
                entry = self._folds[(in_dtype, conv_dtype)] = (version, self._build(in_dtype, conv_dtype))
        return entry[1]

    def graph_operand_builders(self, act_dtype: torch.dtype, param_dtype: torch.dtype, side: int):
        # The units' input is the activation dtype (under autocast the stem's output is already low precision),
        # and the convolutions run in it.
        return {("fold", act_dtype, act_dtype): lambda: self._build(act_dtype, act_dtype)}

    def _packed_operands(self) -> Dict[str, object]:
        """The fp32 folded operands with the convolution weights packed for oneDNN, once per weights version."""
        version = self.weights_version()
        if self._packed is None or self._packed[0] != version:
            with torch.no_grad():
                p = self._build(torch.float32, torch.float32)
                ops = dict(s0=p["s0"], t0=p["t0"], a=p["a"].detach(), c1=onednn.PackedConv(p["w1"], p["b1"], 1, 1),
                           c2=onednn.PackedConv(p["w2"], p["b2"], self.stride, 1))
                if self._conv_shortcut:
                    ops["cs"] = onednn.PackedConv(p["ws"], p["bs"], self.stride, 0)
            self._packed = (version, ops)
        return self._packed[1]

    def __getstate__(self):  # packed oneDNN weights are opaque tensors: rebuilt after a copy or unpickling
        state = super().__getstate__()
        return dict(state, _packed=None)

    def _forward_packed(self, x: torch.Tensor) -> torch.Tensor:
        p = self._packed_operands()
        y = torch.addcmul(p["t0"], x, p["s0"])
        y = F.prelu(p["c1"](y), p["a"])
        if self._conv_shortcut:
            shortcut = p["cs"](x)
        else:
            shortcut = x if self.stride == 1 else x[:, :, ::self.stride, ::self.stride]
        if self._has_se:
            return self.res_layer[6](p["c2"](y)) + shortcut
        return p["c2"](y, shortcut)  # conv + bias + shortcut in one oneDNN pass

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return self.res_layer(x) + self._shortcut(x)
        if onednn.usable(x) and not (torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())):
            return self._forward_packed(x)
        dev = x.device.type
        p = self._operands(x.dtype, torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype)
        y = torch.addcmul(p["t0"], x, p["s0"])  # the leading BN: one op
        y = F.prelu(F.conv2d(y, p["w1"], p["b1"], 1, 1), p["a"])  # nn.PReLU's own call
        y = F.conv2d(y, p["w2"], p["b2"], self.stride, 1)
        if self._has_se:
            y = self.res_layer[6](y)
        if self._conv_shortcut:
            return y + F.conv2d(x, p["ws"], p["bs"], self.stride)
        return y + (x if self.stride == 1 else x[:, :, ::self.stride, ::self.stride])
