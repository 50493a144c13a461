"""Identity conditional module (ICM) and the CVPR generator (official ``common/networks.py``).

An ICM maps the identity feature map to an age-conditioned one. Each age group g owns a window of
``unit_count`` channels starting at ``starts[g]``; adjacent windows share ``sigma * unit_count``
channels (the weight-sharing strategy). The reference multiplies full-width activations by a 0/1
mask after each convolution, exactly as the official ``TaskRouter`` does.

``variant="cvpr"``: BatchNorm2d + PReLU, ``conv2`` = 1x1 conv + BN + PReLU (the CVPR AgingModule).
``variant="tpami"``: InstanceNorm2d (no affine) + LeakyReLU(0.2), ``conv2`` = 1x1 conv only.
"""
from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F
from torch import nn

ICM_VARIANTS = ("cvpr", "tpami")


def check_sigma(sigma: float) -> float:
    if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real) or not (0.0 < float(sigma) <= 1.0):
        shown = float(sigma) if isinstance(sigma, numbers.Real) and not isinstance(sigma, bool) else repr(sigma)
        raise ValueError(f"sigma must be a number in (0, 1], got {shown}")
    return float(sigma)


def router_windows(unit_count: int, age_group: int, sigma: float):
    """``(conv_dim, starts)`` computed exactly as the official TaskRouter (int() truncation at each step)."""
    sigma = check_sigma(sigma)
    if age_group < 1:
        raise ValueError(f"age_group must be >= 1, got {age_group!r}")
    conv_dim = int((age_group - (age_group - 1) * sigma) * unit_count)
    starts, start = [], 0
    for _ in range(age_group):
        starts.append(start)
        start = int(start + (1 - sigma) * unit_count)
    return conv_dim, starts


class TaskRouter(nn.Module):
    """0/1 channel mask per age group, stored as the persistent buffer ``_unit_mapping`` (G, conv_dim)."""

    def __init__(self, unit_count: int, age_group: int, sigma: float):
        super().__init__()
        conv_dim, starts = router_windows(unit_count, age_group, sigma)
        mapping = torch.zeros(age_group, conv_dim)
        for g, s in enumerate(starts):
            mapping[g, s:s + unit_count] = 1
        self.register_buffer("_unit_mapping", mapping)
        self.unit_count, self.age_group, self.sigma = unit_count, age_group, float(sigma)
        self.conv_dim, self.starts = conv_dim, starts

    def forward(self, inputs: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        mask = torch.index_select(self._unit_mapping, 0, task_ids.long()).unsqueeze(2).unsqueeze(3)
        return inputs * mask


def _norm(variant: str, channels: int) -> nn.Module:
    return nn.BatchNorm2d(channels) if variant == "cvpr" else nn.InstanceNorm2d(channels)


def _act(variant: str, channels: int) -> nn.Module:
    return nn.PReLU(channels) if variant == "cvpr" else nn.LeakyReLU(0.2, inplace=True)


class ResidualBlock(nn.Module):
    """conv3x3 -> norm -> mask -> act -> conv3x3 -> norm -> mask, then act(residual + x)."""

    def __init__(self, unit_count: int, age_group: int, sigma: float, variant: str = "cvpr"):
        super().__init__()
        conv_dim, _ = router_windows(unit_count, age_group, sigma)
        self.conv1 = nn.Sequential(nn.Conv2d(conv_dim, conv_dim, 3, 1, 1), _norm(variant, conv_dim))
        self.router1 = TaskRouter(unit_count, age_group, sigma)
        self.conv2 = nn.Sequential(nn.Conv2d(conv_dim, conv_dim, 3, 1, 1), _norm(variant, conv_dim))
        self.router2 = TaskRouter(unit_count, age_group, sigma)
        self.relu1 = _act(variant, conv_dim)
        self.relu2 = _act(variant, conv_dim)

    def forward(self, inputs):
        # The official blocks pass {0: x, 1: task_ids} through nn.Sequential; kept for key/behaviour parity.
        x, task_ids = inputs[0], inputs[1]
        residual = x
        x = self.router1(self.conv1(x), task_ids)
        x = self.relu1(x)
        x = self.router2(self.conv2(x), task_ids)
        return {0: self.relu2(residual + x), 1: task_ids}


class ICMBase(nn.Module):
    """Builds ``conv1``, ``router``, ``transform`` and ``conv2`` and runs them in :meth:`icm`.

    Subclasses keep these as direct children (the official key layout) and add what they need.
    A fast implementation overrides :meth:`icm` only.
    """

    def __init__(self, in_channels: int, age_group: int, unit_count: int, sigma: float,
                 repeat_num: int = 4, variant: str = "cvpr"):
        super().__init__()
        if variant not in ICM_VARIANTS:
            raise ValueError(f"variant must be one of {ICM_VARIANTS}, got {variant!r}")
        conv_dim, starts = router_windows(unit_count, age_group, sigma)
        self.icm_variant, self.in_channels, self.age_group = variant, in_channels, age_group
        self.unit_count, self.sigma, self.conv_dim, self.starts = unit_count, float(sigma), conv_dim, starts
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, conv_dim, 1, 1, 0), _norm(variant, conv_dim),
                                   _act(variant, conv_dim))
        self.router = TaskRouter(unit_count, age_group, sigma)
        self.transform = nn.Sequential(*[ResidualBlock(unit_count, age_group, sigma, variant)
                                         for _ in range(repeat_num)])
        if variant == "cvpr":
            self.conv2 = nn.Sequential(nn.Conv2d(conv_dim, in_channels, 1, 1, 0), nn.BatchNorm2d(in_channels),
                                       nn.PReLU(in_channels))
        else:
            self.conv2 = nn.Sequential(nn.Conv2d(conv_dim, in_channels, 1, 1, 0))

    def icm(self, x_id: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, h, w) identity features, (B,) target groups -> (B, in_channels, h, w)."""
        x = self.router(self.conv1(x_id), condition)
        x = self.transform({0: x, 1: condition})[0]
        return self.conv2(x)


class Upsample(nn.Module):
    """U-Net step: (bilinear x2 if smaller) -> pre-activation conv pair on cat[x, skip] + 1x1 shortcut, then a residual conv pair."""

    def __init__(self, x_channels: int, in_channels: int, out_channels: int, variant: str = "cvpr"):
        super().__init__()
        self.conv = nn.Sequential(
            _norm(variant, in_channels), _act(variant, in_channels),
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
            _norm(variant, out_channels), _act(variant, out_channels),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.conv2 = nn.Sequential(
            _norm(variant, out_channels), _act(variant, out_channels),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
            _norm(variant, out_channels), _act(variant, out_channels),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.shortcut = nn.Conv2d(x_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if x.size(2) < up.size(2):
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        p = self.conv(torch.cat([x, up], dim=1)) + self.shortcut(x)
        return p + self.conv2(p)


class AgingModule(ICMBase):
    """The CVPR generator: ICM on x_id, then a U-Net decoder over the backbone's skips, residual on the image.

    ``sigma`` is 0.1 in the official code (hard-coded there; the paper's default is 1/8).
    """

    def __init__(self, age_group: int = 7, repeat_num: int = 4, sigma: float = 0.1, unit_count: int = 128, *,
                 upsample_layer=None):
        super().__init__(512, age_group, unit_count, sigma, repeat_num, variant="cvpr")
        up = upsample_layer or Upsample  # (a subclass with the same keys: fast implementations inject theirs)
        self.up_1 = up(512, 512 + 256, 256)
        self.up_2 = up(256, 256 + 128, 128)
        self.up_3 = up(128, 128 + 64, 64)
        self.up_4 = up(64, 64 + 3, 32)
        self.conv3 = nn.Conv2d(32, 3, 1, 1, 0)
        self._init_weights()

    def _init_weights(self):
        # Official init: every Conv gets N(0, 0.01) weights and zero bias; BN/PReLU keep their defaults.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def decode(self, x: torch.Tensor, input_img, x_2, x_3, x_4) -> torch.Tensor:
        x = self.up_1(x, x_4)
        x = self.up_2(x, x_3)
        x = self.up_3(x, x_2)
        x = self.up_4(x, input_img)
        return input_img + self.conv3(x)

    def forward(self, input_img, x_1, x_2, x_3, x_4, x_5, x_id, x_age, condition):
        # Same signature as the official module; x_1, x_5 and x_age are unused there too.
        return self.decode(self.icm(x_id, condition), input_img, x_2, x_3, x_4)


def group_onehot_map(groups: torch.Tensor, age_group: int, size: int) -> torch.Tensor:
    """One-hot group labels tiled to (B, G, size, size)."""
    onehot = F.one_hot(groups.long().reshape(-1), age_group).float()
    return onehot[:, :, None, None].expand(-1, -1, size, size)


class PatchDiscriminator(nn.Module):
    """Conditional PatchGAN of the official FAS recipe (``PatchDiscriminator(G, norm_layer='sn', repeat_num=4)``).

    Old-style spectral norm (keys ``weight_orig``/``weight_u``/``weight_v``), one-hot condition
    concatenated after ``conv1``. 112x112 input gives (B, 1, 5, 5) patch logits.
    """

    def __init__(self, age_group: int = 7, conv_dim: int = 64, repeat_num: int = 4, spectral_norm: bool = True):
        super().__init__()
        self.age_group = age_group
        sn = nn.utils.spectral_norm if spectral_norm else (lambda m: m)
        self.conv1 = nn.Conv2d(3, conv_dim, 4, 2, 1)
        layers, mult = [], 1
        for n in range(1, repeat_num):
            prev, mult = mult, min(2 ** n, 8)
            layers += [sn(nn.Conv2d(conv_dim * prev + (age_group if n == 1 else 0), conv_dim * mult, 4, 2, 1)),
                       nn.LeakyReLU(0.2, True)]
        prev, mult = mult, min(2 ** repeat_num, 8)
        layers += [sn(nn.Conv2d(conv_dim * prev, conv_dim * mult, 4, 1, 1)), nn.LeakyReLU(0.2, True),
                   nn.Conv2d(conv_dim * mult, 1, 4, 1, 1)]
        self.main = nn.Sequential(*layers)

    def forward(self, inputs: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        x = F.leaky_relu(self.conv1(inputs), 0.2)
        cond = group_onehot_map(condition.to(x.device), self.age_group, x.size(2)).to(x.dtype)
        return self.main(torch.cat([x, cond], dim=1))
