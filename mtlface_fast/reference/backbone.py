"""IResNet trunks with the AFD module (the official ``AIResNet``, ``backbone/aifr.py`` + ``irse.py``).

Module tree and state-dict keys are the official ones: ``input_layer``, ``block1..4``,
``output_layer``, ``fsm``. The input size is a parameter; the feature map after block4 is
``input_size // 16`` on a side.
"""
from __future__ import annotations

import numbers
from typing import Callable, Optional

import torch
from torch import nn

from .afd import AttentionModule, check_afd_variant

BACKBONE_UNITS = {
    "ir34": ((3, 4, 6, 3), "ir"),
    "ir50": ((3, 4, 14, 3), "ir"),
    "ir64": ((3, 4, 10, 3), "ir"),  # sic: the official "ir64" is smaller than ir50
    "ir101": ((3, 13, 30, 3), "ir"),
    "irse101": ((3, 13, 30, 3), "ir_se"),
}


def check_backbone(name: str) -> str:
    if not isinstance(name, str) or name not in BACKBONE_UNITS:
        raise ValueError(f"backbone must be one of {sorted(BACKBONE_UNITS)}, got {name!r}")
    return name


def check_input_size(input_size: int) -> int:
    """An int (numpy integers too) that is a positive multiple of 16 -> int."""
    if (isinstance(input_size, bool) or not isinstance(input_size, numbers.Integral) or input_size < 16
            or input_size % 16):
        raise ValueError(f"input_size must be a positive multiple of 16 (112 in every official model), "
                         f"got {input_size!r}")
    return int(input_size)


class SEModule(nn.Module):
    def __init__(self, channels: int, reduction: int):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, channels // reduction, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(channels // reduction, channels, 1, bias=False)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x):
        return x * self.sigmoid(self.fc2(self.relu(self.fc1(self.avg_pool(x)))))


class BottleneckIR(nn.Module):
    """BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN [-> SE], plus a shortcut; no activation after the add."""

    def __init__(self, in_channel: int, depth: int, stride: int, se: bool = False):
        super().__init__()
        if in_channel == depth:
            self.shortcut_layer = nn.MaxPool2d(1, stride)  # strided subsample, no keys
        else:
            self.shortcut_layer = nn.Sequential(nn.Conv2d(in_channel, depth, 1, stride, bias=False),
                                                nn.BatchNorm2d(depth))
        layers = [nn.BatchNorm2d(in_channel), nn.Conv2d(in_channel, depth, 3, 1, 1, bias=False),
                  nn.BatchNorm2d(depth), nn.PReLU(depth), nn.Conv2d(depth, depth, 3, stride, 1, bias=False),
                  nn.BatchNorm2d(depth)]
        if se:
            layers.append(SEModule(depth, 16))
        self.res_layer = nn.Sequential(*layers)

    def forward(self, x):
        return self.res_layer(x) + self.shortcut_layer(x)


def _stage(in_channel: int, depth: int, units: int, se: bool, block=BottleneckIR) -> nn.Sequential:
    return nn.Sequential(block(in_channel, depth, 2, se), *[block(depth, depth, 1, se) for _ in range(units - 1)])


class AIResNet(nn.Module):
    """The official AIResNet: IResNet trunk + ``fsm`` (AFD) + ``output_layer`` on x_id.

    Args:
        input_size: square input side (112 in the official models), a multiple of 16.
        backbone: one of ``ir34, ir50, ir64, ir101, irse101``.
        afd: ``"cvpr"`` or ``"tpami"`` AFD variant.
        attention_layer: the AFD module class (fast implementations inject theirs here).
        block_layer: the residual unit class, ``BottleneckIR`` or a subclass with the same keys.
        dropout: output-layer dropout (0.5 in the CVPR code, 0.4 in the TPAMI one).
    """

    def __init__(self, input_size: int = 112, backbone: str = "ir50", afd: str = "cvpr",
                 attention_layer: Optional[Callable[..., nn.Module]] = None, dropout: float = 0.5,
                 block_layer: Optional[Callable[..., nn.Module]] = None):
        super().__init__()
        units, mode = BACKBONE_UNITS[check_backbone(backbone)]
        self.input_size = check_input_size(input_size)
        self.backbone_name, self.afd = backbone, check_afd_variant(afd)
        se = mode == "ir_se"
        self.input_layer = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.PReLU(64))
        block = block_layer or BottleneckIR
        self.block1 = _stage(64, 64, units[0], se, block)
        self.block2 = _stage(64, 128, units[1], se, block)
        self.block3 = _stage(128, 256, units[2], se, block)
        self.block4 = _stage(256, 512, units[3], se, block)
        # Registered before fsm, as in the official class (output_layer comes first in the state dict).
        side = input_size // 16
        self.output_layer = nn.Sequential(nn.BatchNorm2d(512), nn.Dropout(dropout), nn.Flatten(),
                                          nn.Linear(512 * side * side, 512), nn.BatchNorm1d(512))
        self.fsm = (attention_layer or AttentionModule)(512, 16, variant=afd)
        self._initialize_weights()

    def _initialize_weights(self):
        # Official init: xavier_uniform for Conv2d/Linear (bias 0), BN weight 1 / bias 0, PReLU 0.25.
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def trunk(self, x: torch.Tensor):
        """(x_1, x_2, x_3, x_4, x_5): stem and the four stages' outputs."""
        x_1 = self.input_layer(x)
        x_2 = self.block1(x_1)
        x_3 = self.block2(x_2)
        x_4 = self.block3(x_3)
        x_5 = self.block4(x_4)
        return x_1, x_2, x_3, x_4, x_5

    def forward(self, x: torch.Tensor, return_age: bool = False, return_shortcuts: bool = False):
        """As the official forward: embedding; (embedding, x_id, x_age); or the 7 shortcut tensors."""
        x_1, x_2, x_3, x_4, x_5 = self.trunk(x)
        x_id, x_age = self.fsm(x_5)
        embedding = self.output_layer(x_id)  # runs even when shortcuts are asked for, as official
        if return_shortcuts:
            return x_1, x_2, x_3, x_4, x_5, x_id, x_age
        if return_age:
            return embedding, x_id, x_age
        return embedding
