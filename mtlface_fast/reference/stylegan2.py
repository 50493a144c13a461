"""The StyleGAN2 generator of the TPAMI decoder (rosinality's ``stylegan2/model.py`` layout), plain PyTorch.

The official package JIT-compiles two CUDA ops at import time; here they are written in eager PyTorch
and run on any device:

* :func:`upfirdn2d` -- zero-insertion upsampling, padding, a 2-D FIR filter and downsampling, per channel;
* :func:`fused_leaky_relu` -- ``leaky_relu(x + bias, 0.2) * sqrt(2)``.

Module tree and buffers follow the official generator so that its state dict (118 keys under
``decoder.`` in the release, with the TPAMI ``latent_avg``) loads unchanged: the mapping MLP
``style.1..8``, ``input.input``, ``conv1``/``to_rgb1``, ``convs.*``, ``to_rgbs.*`` (blur and upsample
kernels are buffers) and the fixed noise maps ``noises.noise_*``.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

BLUR_KERNEL = (1, 3, 3, 1)
LRELU_GAIN = math.sqrt(2.0)  # keeps the activations' second moment through a leaky ReLU(0.2)


def make_kernel(k: Sequence[float]) -> torch.Tensor:
    """Separable FIR taps -> normalized 2-D kernel (sums to 1)."""
    k = torch.tensor(k, dtype=torch.float32)
    if k.ndim == 1:
        k = k[None, :] * k[:, None]
    return k / k.sum()


def upfirdn2d(x: torch.Tensor, kernel: torch.Tensor, up: int = 1, down: int = 1, pad=(0, 0)) -> torch.Tensor:
    """Upsample (zero insertion), pad, filter with ``kernel`` (true convolution), downsample; per channel.

    Args:
        x: (B, C, H, W) input.
        kernel: (kh, kw) FIR filter.
        up, down: integer factors, the same along both axes.
        pad: (before, after) padding after upsampling, the same along both axes; negative values crop.

    Returns:
        (B, C, (H*up + before + after - kh) // down + 1, ...) as the official op.
    """
    b, c, h, w = x.shape
    kh, kw = kernel.shape
    p0, p1 = pad
    if up > 1:
        x = x.reshape(b, c, h, 1, w, 1)
        x = F.pad(x, [0, up - 1, 0, 0, 0, up - 1]).reshape(b, c, h * up, w * up)
    x = F.pad(x, [max(p0, 0), max(p1, 0), max(p0, 0), max(p1, 0)])
    x = x[:, :, max(-p0, 0):x.shape[2] - max(-p1, 0), max(-p0, 0):x.shape[3] - max(-p1, 0)]
    # conv2d is a correlation: flip the taps to get the convolution the official op computes.
    weight = torch.flip(kernel, [0, 1]).to(x).view(1, 1, kh, kw).expand(c, 1, kh, kw)
    out = F.conv2d(x, weight, groups=c)
    return out[:, :, ::down, ::down]


def fused_leaky_relu(x: torch.Tensor, bias: torch.Tensor, negative_slope: float = 0.2,
                     scale: float = LRELU_GAIN) -> torch.Tensor:
    """``leaky_relu(x + bias, negative_slope) * scale`` with ``bias`` (C,) broadcast over dim 1."""
    shape = [1, bias.shape[0]] + [1] * (x.ndim - 2)
    return F.leaky_relu(x + bias.view(shape), negative_slope) * scale


class FusedLeakyReLU(nn.Module):
    """Bias + leaky ReLU(0.2) + sqrt(2) gain; key ``bias`` (C,)."""

    def __init__(self, channels: int, negative_slope: float = 0.2, scale: float = LRELU_GAIN):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))
        self.negative_slope, self.scale = negative_slope, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused_leaky_relu(x, self.bias, self.negative_slope, self.scale)


class PixelNorm(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(torch.mean(x ** 2, dim=1, keepdim=True) + 1e-8)


class Upsample(nn.Module):
    """x2 FIR upsampling of the RGB skip; buffer ``kernel`` (4, 4), scaled by factor**2."""

    def __init__(self, kernel=BLUR_KERNEL, factor: int = 2):
        super().__init__()
        self.factor = factor
        self.register_buffer("kernel", make_kernel(kernel) * (factor ** 2))
        p = self.kernel.shape[0] - factor
        self.pad = ((p + 1) // 2 + factor - 1, p // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upfirdn2d(x, self.kernel, up=self.factor, down=1, pad=self.pad)


class Blur(nn.Module):
    """FIR low-pass after a transposed convolution; buffer ``kernel`` (4, 4)."""

    def __init__(self, kernel, pad, upsample_factor: int = 1):
        super().__init__()
        k = make_kernel(kernel)
        if upsample_factor > 1:
            k = k * (upsample_factor ** 2)
        self.register_buffer("kernel", k)
        self.pad = tuple(pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upfirdn2d(x, self.kernel, pad=self.pad)


class EqualLinear(nn.Module):
    """Linear layer with the equalized learning rate: weight * lr_mul / sqrt(in), bias * lr_mul."""

    def __init__(self, in_dim: int, out_dim: int, bias: bool = True, bias_init: float = 0.0, lr_mul: float = 1.0,
                 activation: Optional[str] = None):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim).div_(lr_mul))
        self.bias = nn.Parameter(torch.zeros(out_dim).fill_(bias_init)) if bias else None
        self.activation = activation
        self.scale = (1 / math.sqrt(in_dim)) * lr_mul
        self.lr_mul = lr_mul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation:
            return fused_leaky_relu(F.linear(x, self.weight * self.scale), self.bias * self.lr_mul)
        bias = self.bias * self.lr_mul if self.bias is not None else None
        return F.linear(x, self.weight * self.scale, bias=bias)


class ModulatedConv2d(nn.Module):
    """Style-modulated convolution with optional demodulation and x2 upsampling (transposed conv + blur).

    Keys: ``weight`` (1, out, in, k, k), ``modulation.{weight,bias}`` and, when upsampling,
    ``blur.kernel``. The reference runs one grouped convolution over the batch with per-sample weights,
    as the official code.
    """

    def __init__(self, in_channel: int, out_channel: int, kernel_size: int, style_dim: int, demodulate: bool = True,
                 upsample: bool = False, blur_kernel=BLUR_KERNEL):
        super().__init__()
        self.eps = 1e-8
        self.kernel_size, self.in_channel, self.out_channel = kernel_size, in_channel, out_channel
        self.upsample = upsample
        if upsample:
            factor = 2
            p = (len(blur_kernel) - factor) - (kernel_size - 1)
            self.blur = Blur(blur_kernel, pad=((p + 1) // 2 + factor - 1, p // 2 + 1), upsample_factor=factor)
        self.scale = 1 / math.sqrt(in_channel * kernel_size ** 2)
        self.padding = kernel_size // 2
        self.weight = nn.Parameter(torch.randn(1, out_channel, in_channel, kernel_size, kernel_size))
        self.modulation = EqualLinear(style_dim, in_channel, bias_init=1)
        self.demodulate = demodulate

    def modulated_weight(self, style: torch.Tensor) -> torch.Tensor:
        """(B, out, in, k, k) per-sample weights from (B, style_dim) styles."""
        batch = style.shape[0]
        s = self.modulation(style).view(batch, 1, self.in_channel, 1, 1)
        weight = self.scale * self.weight * s
        if self.demodulate:
            demod = torch.rsqrt(weight.pow(2).sum([2, 3, 4]) + self.eps)
            weight = weight * demod.view(batch, self.out_channel, 1, 1, 1)
        return weight

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        batch, in_channel, height, width = x.shape
        k = self.kernel_size
        weight = self.modulated_weight(style)
        x = x.reshape(1, batch * in_channel, height, width)
        if self.upsample:
            weight = weight.transpose(1, 2).reshape(batch * in_channel, self.out_channel, k, k)
            out = F.conv_transpose2d(x, weight, padding=0, stride=2, groups=batch)
            out = out.view(batch, self.out_channel, out.shape[2], out.shape[3])
            return self.blur(out)
        out = F.conv2d(x, weight.reshape(batch * self.out_channel, in_channel, k, k), padding=self.padding,
                       groups=batch)
        return out.view(batch, self.out_channel, out.shape[2], out.shape[3])


class NoiseInjection(nn.Module):
    """``x + weight * noise``; a fresh N(0, 1) map per sample when ``noise`` is None (the official default)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, image: torch.Tensor, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        if noise is None:
            batch, _, height, width = image.shape
            noise = image.new_empty(batch, 1, height, width).normal_()
        return image + self.weight * noise


class ConstantInput(nn.Module):
    def __init__(self, channel: int, size: int = 4):
        super().__init__()
        self.input = nn.Parameter(torch.randn(1, channel, size, size))

    def forward(self, batch: int) -> torch.Tensor:
        return self.input.expand(batch, -1, -1, -1)


class StyledConv(nn.Module):
    """Modulated conv -> noise injection -> fused bias + leaky ReLU."""

    def __init__(self, in_channel: int, out_channel: int, kernel_size: int, style_dim: int, upsample: bool = False,
                 blur_kernel=BLUR_KERNEL, demodulate: bool = True):
        super().__init__()
        self.conv = ModulatedConv2d(in_channel, out_channel, kernel_size, style_dim, upsample=upsample,
                                    blur_kernel=blur_kernel, demodulate=demodulate)
        self.noise = NoiseInjection()
        self.activate = FusedLeakyReLU(out_channel)
        self.upsample = upsample

    def forward(self, x: torch.Tensor, style: torch.Tensor, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.activate(self.noise(self.conv(x, style), noise=noise))


class ToRGB(nn.Module):
    """Modulated 1x1 conv to RGB (no demodulation) + bias, plus the upsampled RGB skip of the previous level."""

    def __init__(self, in_channel: int, style_dim: int, upsample: bool = True, blur_kernel=BLUR_KERNEL):
        super().__init__()
        if upsample:
            self.upsample = Upsample(blur_kernel)
        self.conv = ModulatedConv2d(in_channel, 3, 1, style_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x: torch.Tensor, style: torch.Tensor, skip: Optional[torch.Tensor] = None) -> torch.Tensor:
        out = self.conv(x, style) + self.bias
        if skip is not None:
            out = out + self.upsample(skip)
        return out


def generator_channels(channel_multiplier: int = 2):
    return {4: 512, 8: 512, 16: 512, 32: 512, 64: 256 * channel_multiplier, 128: 128 * channel_multiplier,
            256: 64 * channel_multiplier, 512: 32 * channel_multiplier, 1024: 16 * channel_multiplier}


class Generator(nn.Module):
    """StyleGAN2 synthesis network driven by W+ latents (B, n_latent, style_dim).

    Args:
        size: output side, a power of two >= 8 (128 in the TPAMI release).
        style_dim: latent width (512).
        n_mlp: mapping-MLP depth (8); the mapping is kept for the state dict (the TPAMI model feeds W+
            latents directly and never runs it; :meth:`mapping` exposes it).
        channel_multiplier, blur_kernel, lr_mlp: as the official generator.
        styled_conv_layer, to_rgb_layer: classes for the styled convolutions and the ToRGB layers (a
            fast implementation injects its own; the state dict is unchanged).
    """

    def __init__(self, size: int = 128, style_dim: int = 512, n_mlp: int = 8, channel_multiplier: int = 2,
                 blur_kernel=BLUR_KERNEL, lr_mlp: float = 0.01, *, styled_conv_layer=None, to_rgb_layer=None):
        super().__init__()
        if isinstance(size, bool) or not isinstance(size, int) or size < 8 or size & (size - 1):
            raise ValueError(f"size must be a power of two >= 8, got {size!r}")
        styled_conv = styled_conv_layer or StyledConv
        to_rgb = to_rgb_layer or ToRGB
        self.size, self.style_dim = size, style_dim
        self.style = nn.Sequential(PixelNorm(), *[EqualLinear(style_dim, style_dim, lr_mul=lr_mlp,
                                                              activation="fused_lrelu") for _ in range(n_mlp)])
        self.channels = generator_channels(channel_multiplier)
        self.input = ConstantInput(self.channels[4])
        self.conv1 = styled_conv(self.channels[4], self.channels[4], 3, style_dim, blur_kernel=blur_kernel)
        self.to_rgb1 = to_rgb(self.channels[4], style_dim, upsample=False)
        self.log_size = int(math.log2(size))
        self.num_layers = (self.log_size - 2) * 2 + 1
        self.convs = nn.ModuleList()
        self.upsamples = nn.ModuleList()  # empty, kept for the official module tree
        self.to_rgbs = nn.ModuleList()
        self.noises = nn.Module()
        for layer_idx in range(self.num_layers):
            res = (layer_idx + 5) // 2
            self.noises.register_buffer(f"noise_{layer_idx}", torch.randn(1, 1, 2 ** res, 2 ** res))
        in_channel = self.channels[4]
        for i in range(3, self.log_size + 1):
            out_channel = self.channels[2 ** i]
            self.convs.append(styled_conv(in_channel, out_channel, 3, style_dim, upsample=True,
                                          blur_kernel=blur_kernel))
            self.convs.append(styled_conv(out_channel, out_channel, 3, style_dim, blur_kernel=blur_kernel))
            self.to_rgbs.append(to_rgb(out_channel, style_dim))
            in_channel = out_channel
        self.n_latent = self.log_size * 2 - 2

    def noise_shapes(self, batch: int = 1) -> List[tuple]:
        """Shapes of the per-layer noise maps for ``batch`` samples: (batch, 1, r, r), r = 4, 8, 8, 16, ..."""
        return [(batch, 1, 2 ** ((i + 5) // 2), 2 ** ((i + 5) // 2)) for i in range(self.num_layers)]

    def stored_noise(self) -> List[torch.Tensor]:
        """The fixed noise maps of the checkpoint, (1, 1, r, r) each (broadcast over the batch)."""
        return [getattr(self.noises, f"noise_{i}") for i in range(self.num_layers)]

    def mapping(self, z: torch.Tensor) -> torch.Tensor:
        """Z (B, style_dim) -> W (B, style_dim) through the mapping MLP."""
        return self.style(z)

    def forward(self, latent: torch.Tensor, noise: Optional[Sequence[Optional[torch.Tensor]]] = None) -> torch.Tensor:
        """W+ latents (B, n_latent, style_dim) -> images (B, 3, size, size).

        ``noise``: one map per layer (see :meth:`noise_shapes`; batch 1 broadcasts), or None entries /
        ``noise=None`` for fresh N(0, 1) noise per sample (the official ``randomize_noise=True``).
        """
        if latent.dim() != 3 or latent.shape[1] != self.n_latent or latent.shape[2] != self.style_dim:
            raise ValueError(f"latent must have shape (B, {self.n_latent}, {self.style_dim}), "
                             f"got {tuple(latent.shape)}")
        if noise is None:
            noise = [None] * self.num_layers
        if len(noise) != self.num_layers:
            raise ValueError(f"noise must hold {self.num_layers} maps (one per layer), got {len(noise)}")
        out = self.input(latent.shape[0])
        out = self.conv1(out, latent[:, 0], noise=noise[0])
        skip = self.to_rgb1(out, latent[:, 1])
        i = 1
        for conv1, conv2, noise1, noise2, to_rgb in zip(self.convs[::2], self.convs[1::2], noise[1::2], noise[2::2],
                                                        self.to_rgbs):
            out = conv1(out, latent[:, i], noise=noise1)
            out = conv2(out, latent[:, i + 1], noise=noise2)
            skip = to_rgb(out, latent[:, i + 2], skip)
            i += 2
        return skip
