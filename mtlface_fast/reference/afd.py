"""Attention-based feature decomposition (AFD): the official ``fsm`` AttentionModule, both variants.

CVPR 2021 (``backbone/aifr.py``): SPP avg and max pools (sizes 1, 2, 3) **summed** feed the channel
MLP; the attention picks the age part: ``x_age = (x*cs + x*ss)/2`` and ``x_id = x - x_age``.

TPAMI 2022 (``python_package/mtlface/modules.py``): SPP avg and max pools **concatenated** (avg
first); the attention picks the identity part: ``x_id = x*(cs + ss)/2`` and ``x_age = x - x_id``.

Both return ``(x_id, x_age)``. Plain eager PyTorch on purpose: this is the oracle for the kernels.
"""
from __future__ import annotations

import torch
from torch import nn

AFD_VARIANTS = ("cvpr", "tpami")
SPP_SIZES = (1, 2, 3)


def check_afd_variant(afd: str) -> str:
    if afd not in AFD_VARIANTS:
        raise ValueError(f"afd must be one of {AFD_VARIANTS}, got {afd!r}")
    return afd


class SPPModule(nn.Module):
    """Adaptive pools at several sizes, each flattened in (C, h, w) order, concatenated: (B, C*sum(s^2), 1, 1)."""

    def __init__(self, pool_mode: str = "avg", sizes=SPP_SIZES):
        super().__init__()
        if pool_mode == "avg":
            pool = nn.AdaptiveAvgPool2d
        elif pool_mode == "max":
            pool = nn.AdaptiveMaxPool2d
        else:
            raise ValueError(f"pool_mode must be 'avg' or 'max', got {pool_mode!r}")
        self.pool_blocks = nn.ModuleList([nn.Sequential(pool(s), nn.Flatten()) for s in sizes])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([block(x) for block in self.pool_blocks], dim=1)
        return x.view(x.size(0), x.size(1), 1, 1)


class AttentionModule(nn.Module):
    """The official AFD module (state-dict keys ``spatial.*`` and ``channel.*``, 13 in all).

    Args:
        channels: channels of the feature map (512 in every official model).
        reduction: channel-MLP reduction of the pooled vector (16).
        variant: ``"cvpr"`` or ``"tpami"`` (see the module docstring).
    """

    def __init__(self, channels: int = 512, reduction: int = 16, variant: str = "cvpr"):
        super().__init__()
        self.variant = check_afd_variant(variant)
        self.channels = channels
        kernel_size = 7
        self.avg_spp = SPPModule("avg", SPP_SIZES)
        self.max_spp = SPPModule("max", SPP_SIZES)
        self.spatial = nn.Sequential(
            nn.Conv2d(2, 1, kernel_size, stride=1, padding=(kernel_size - 1) // 2, bias=False),
            nn.BatchNorm2d(1, eps=1e-5, momentum=0.01),
            nn.Sigmoid(),
        )
        pooled = channels * sum(s * s for s in SPP_SIZES) * (2 if variant == "tpami" else 1)
        self.channel = nn.Sequential(
            nn.Conv2d(pooled, pooled // reduction, 1, bias=False),
            nn.ReLU(inplace=True),
            nn.Conv2d(pooled // reduction, channels, 1, bias=False),
            nn.BatchNorm2d(channels, eps=1e-5, momentum=0.01),
            nn.Sigmoid(),
        )

    def channel_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.variant == "cvpr":
            return self.avg_spp(x) + self.max_spp(x)
        return torch.cat([self.avg_spp(x), self.max_spp(x)], dim=1)

    def scales(self, x: torch.Tensor):
        """(channel_scale (B,C,1,1), spatial_scale (B,1,H,W)) before they are averaged."""
        channel_scale = self.channel(self.channel_input(x))
        spatial_input = torch.cat((torch.max(x, 1)[0].unsqueeze(1), torch.mean(x, 1).unsqueeze(1)), dim=1)
        spatial_scale = self.spatial(spatial_input)
        return channel_scale, spatial_scale

    def forward(self, x: torch.Tensor):
        channel_scale, spatial_scale = self.scales(x)
        if self.variant == "cvpr":
            x_age = (x * channel_scale + x * spatial_scale) * 0.5
            return x - x_age, x_age
        x_id = x * ((channel_scale + spatial_scale) * 0.5)
        return x_id, x - x_id
