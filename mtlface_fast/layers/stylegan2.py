"""Fast StyleGAN2 layers: the same modules and state dict as the reference, cheaper formulations.

* Modulated convolution as ``conv(x * s, W) * d`` (modulate the activations, convolve with the one
  shared weight, demodulate the output channels) instead of a grouped convolution over per-sample
  weights: one dense convolution for the whole batch, channels_last and autocast friendly, and no
  (B, out, in, k, k) weight tensor. ``d = rsqrt(s^2 @ sum_k(W^2)^T + eps)`` is the reference's
  demodulation factor written without materializing the per-sample weights.
* On CUDA the activations run channels_last (set at the first layer, kept by the rest).
* The x2 FIR upsampling of the RGB skip as a depthwise transposed convolution (no zero insertion),
  the blur after the transposed convolution as a depthwise convolution.
* Noise injection, bias, leaky ReLU and the sqrt(2) gain in one pass
  (the Triton op of ``kernels/stylegan2.py`` on CUDA, PyTorch elsewhere; see :mod:`mtlface_fast.backend`).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..backend import use_triton_for
from ..reference.stylegan2 import LRELU_GAIN, StyledConv, ToRGB
from .fold import acc_dtype
from .fused import FusedLayer


def fir_upsample2x(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """``upfirdn2d(x, kernel, up=2, pad=(2, 1))`` for a 4x4 kernel as a depthwise transposed convolution."""
    c = x.shape[1]
    k = kernel.to(x.dtype).view(1, 1, *kernel.shape).expand(c, 1, *kernel.shape)
    # Zero insertion + pad (2, 1) + true convolution == full transposed convolution cropped by one.
    return F.conv_transpose2d(x, k, stride=2, padding=1, groups=c)


def fir_blur(x: torch.Tensor, kernel: torch.Tensor, pad) -> torch.Tensor:
    """``upfirdn2d(x, kernel, pad=(p, p))`` (symmetric, non-negative padding) as a depthwise convolution."""
    c = x.shape[1]
    kh, kw = kernel.shape
    k = torch.flip(kernel, [0, 1]).to(x.dtype).view(1, 1, kh, kw).expand(c, 1, kh, kw)
    return F.conv2d(x, k, padding=pad[0], groups=c)


def noise_bias_lrelu(x: torch.Tensor, noise: torch.Tensor, strength: torch.Tensor, bias: torch.Tensor,
                     negative_slope: float = 0.2, scale: float = LRELU_GAIN,
                     use_triton: Optional[bool] = None) -> torch.Tensor:
    """``leaky_relu(x + strength * noise + bias, slope) * scale``; noise (B or 1, 1, H, W), bias (C,).

    The fused Triton op when ``use_triton`` (a layer passes its chosen implementation; None asks the backend
    switch, :func:`mtlface_fast.backend.use_triton_for`).
    """
    if use_triton is None:
        use_triton = use_triton_for(x)
    if use_triton:
        from ..kernels.stylegan2 import noise_bias_lrelu as fused
        return fused(x, noise, strength, bias, negative_slope, scale)
    y = x + strength * noise + bias.view(1, -1, 1, 1).to(x.dtype)
    return F.leaky_relu(y, negative_slope) * scale


def _modulate(conv, style: torch.Tensor):
    """(styles (B, in), demodulation (B, out) or None, weight (out, in, k, k)) of a ModulatedConv2d."""
    s = conv.modulation(style)
    w = conv.weight[0] * conv.scale
    d = None
    if conv.demodulate:  # fp32 for low precision, fp64 for fp64 (the reference's dtype then)
        acc = acc_dtype(s, w)
        d = torch.rsqrt((s * s).to(acc) @ w.to(acc).pow(2).sum([2, 3]).t() + conv.eps).to(s.dtype)
    return s, d, w


class FastStyledConv(FusedLayer, StyledConv):
    """Drop-in :class:`StyledConv` (same keys): activation modulation, dense conv, fused noise/bias/act."""

    def forward(self, x: torch.Tensor, style: torch.Tensor, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        conv = self.conv
        s, d, w = _modulate(conv, style)
        xs = x * s.to(x.dtype)[:, :, None, None]
        if xs.is_cuda:  # cuDNN's fast convolutions are NHWC; later layers keep the layout
            xs = xs.contiguous(memory_format=torch.channels_last)
        if conv.upsample:
            out = F.conv_transpose2d(xs, w.to(xs.dtype).transpose(0, 1), stride=2)
            if d is not None:
                out = out * d.to(out.dtype)[:, :, None, None]
            out = fir_blur(out, conv.blur.kernel, conv.blur.pad)
        else:
            out = F.conv2d(xs, w.to(xs.dtype), padding=conv.padding)
            if d is not None:
                out = out * d.to(out.dtype)[:, :, None, None]
        if noise is None:
            batch, _, height, width = out.shape
            noise = out.new_empty(batch, 1, height, width).normal_()
        return noise_bias_lrelu(out, noise.to(out.dtype), self.noise.weight.to(out.dtype), self.activate.bias,
                                self.activate.negative_slope, self.activate.scale,
                                use_triton=self.implementation() == "triton")


class FastToRGB(ToRGB):
    """Drop-in :class:`ToRGB` (same keys): modulated 1x1 conv as a dense conv, skip upsampling by transposed conv."""

    def forward(self, x: torch.Tensor, style: torch.Tensor, skip: Optional[torch.Tensor] = None) -> torch.Tensor:
        s, _, w = _modulate(self.conv, style)
        out = F.conv2d(x * s.to(x.dtype)[:, :, None, None], w.to(x.dtype)) + self.bias.to(x.dtype)
        if skip is not None:
            out = out + fir_upsample2x(skip, self.upsample.kernel).to(out.dtype)
        return out
