"""Fast U-Net step of the CVPR generator: same keys and training behaviour as the reference ``Upsample``.

At inference on CPU (fp32, no autograd: :func:`mtlface_fast.layers.onednn.usable`; the trunk ran channels_last,
which the model's ``channels_last`` decides) each step runs channels_last
with oneDNN weights packed once per weights version: the BatchNorm after each 3x3 convolution folded into it, the
1x1 shortcut and the residual adds fused into the convolution that precedes them (``conv(x) + other`` in one
pass). The pre-activation BatchNorms (on the concatenated input and on the block's sum) stay per-channel affines:
folding them into a zero-padded 3x3 convolution would be wrong at the borders. Every other call (training,
gradients, autocast, fp64, CUDA, tracing) runs the reference forward.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..reference.icm import Upsample
from . import onednn
from .fold import bn_scale_shift, fold_bn
from .fused import FusedLayer


class FastUpsample(FusedLayer, Upsample):
    """Drop-in :class:`~mtlface_fast.reference.icm.Upsample` (same state dict), packed on CPU at inference."""

    def __init__(self, x_channels: int, in_channels: int, out_channels: int, variant: str = "cvpr"):
        super().__init__(x_channels, in_channels, out_channels, variant)
        seqs = (self.conv, self.conv2)
        self._packable = all(isinstance(s[i], nn.BatchNorm2d) for s in seqs for i in (0, 3)) and all(
            isinstance(s[i], nn.PReLU) for s in seqs for i in (1, 4))
        self._packed: Optional[Tuple[object, Dict[str, object]]] = None

    def choose_implementation(self) -> str:
        return "torch"

    def describe_implementation(self) -> str:
        return "torch" + ("; oneDNN packed weights on CPU fp32" if onednn.AVAILABLE and self._packable else "")

    def __getstate__(self):  # packed oneDNN weights are opaque tensors: rebuilt after a copy or unpickling
        return dict(super().__getstate__(), _packed=None)

    def _packed_operands(self) -> Dict[str, object]:
        version = self.weights_version()
        if self._packed is None or self._packed[0] != version:
            with torch.no_grad():
                ops: Dict[str, object] = {}
                for tag, seq in (("a", self.conv), ("b", self.conv2)):
                    s, t = bn_scale_shift(seq[0], torch.float32)
                    w1, b1 = fold_bn(seq[2].weight, seq[3], seq[2].bias)
                    ops[tag] = (s.view(1, -1, 1, 1), t.view(1, -1, 1, 1), seq[1].weight.detach(),
                                onednn.PackedConv(w1, b1, 1, 1), seq[4].weight.detach(),
                                onednn.PackedConv(seq[5].weight, seq[5].bias, 1, 1))
                ops["shortcut"] = onednn.PackedConv(self.shortcut.weight, self.shortcut.bias, 1, 0)
            self._packed = (version, ops)
        return self._packed[1]

    @staticmethod
    def _pair(ops, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """BN -> PReLU -> conv3x3 (+ folded BN) -> PReLU -> conv3x3, plus ``other`` in the last convolution."""
        s, t, a0, c1, a1, c2 = ops
        y = F.prelu(torch.addcmul(t, x, s), a0)
        return c2(F.prelu(c1(y), a1), other)

    def forward(self, x: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        # Packed when the trunk ran packed (its skip, or the previous step's output, is channels_last): the
        # model's layout choice (``channels_last=False`` keeps NCHW and the PyTorch path).
        cl = torch.channels_last
        if (self.training or not self._packable or not onednn.usable(x, any_layout=True)
                or not onednn.usable(up, any_layout=True)
                or not (x.is_contiguous(memory_format=cl) or up.is_contiguous(memory_format=cl))
                or (torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()))):
            return super().forward(x, up)
        ops = self._packed_operands()
        x = x.contiguous(memory_format=cl)
        if x.size(2) < up.size(2):
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        cat = torch.cat([x, up.contiguous(memory_format=cl)], dim=1)
        p = self._pair(ops["a"], cat, ops["shortcut"](x))
        return self._pair(ops["b"], p, p)
