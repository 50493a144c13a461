"""StyleGAN2 noise injection + bias + leaky ReLU + gain in one pass (the TPAMI decoder's activation).

``y = leaky_relu(x + strength * noise + bias, slope) * gain`` with x (B, C, H, W) in NCHW or channels_last
memory, noise (B or 1, 1, H, W), strength (1,) and bias (C,). Eager PyTorch spends five elementwise
passes on this (mul, add, add, leaky_relu, mul); the kernel reads x once and writes y once.
Backward is elementwise plus per-channel sums, done with aten ops (deterministic, no atomics).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .configs import pick
from .utils import check_same_device, register_decomposition, use_kernel


def _configs():
    return pick([triton.Config({"BLOCK": 1024}, num_warps=4), triton.Config({"BLOCK": 2048}, num_warps=8),
                 triton.Config({"BLOCK": 4096}, num_warps=8)])


@triton.autotune(configs=_configs(), key=["N", "C", "CHANNELS_LAST"])
@triton.jit
def _noise_bias_lrelu_fwd_kernel(
    x_ptr,         # (B, C, H, W) input, contiguous in NCHW or NHWC memory order
    noise_ptr,     # (B or 1, 1, H, W) noise, contiguous
    strength_ptr,  # (1,) noise strength
    bias_ptr,      # (C,) bias
    out_ptr,       # (B, C, H, W) output, same memory order as x
    N, C, HW, noise_bstride,  # numel; channels; H*W; HW if noise has B rows else 0 (broadcast)
    slope, gain,
    CHANNELS_LAST: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    # Walk memory order (coalesced for either layout) and recover the channel and pixel of each element.
    if CHANNELS_LAST:
        c = offs % C
        pix = offs // C  # b * HW + hw
    else:
        c = (offs // HW) % C
        pix = (offs // (C * HW)) * HW + offs % HW
    b = pix // HW
    hw = pix % HW
    # fp32 arithmetic for fp32 and lower, fp64 for fp64 inputs (the aten path's dtype).
    acc = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(acc)
    nz = tl.load(noise_ptr + b * noise_bstride + hw, mask=mask, other=0.0).to(acc)
    bias = tl.load(bias_ptr + c, mask=mask, other=0.0).to(acc)
    s = tl.load(strength_ptr).to(acc)
    z = x + s * nz + bias
    y = tl.where(z > 0, z, z * slope) * gain
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def noise_bias_lrelu_reference(x: torch.Tensor, noise: torch.Tensor, strength: torch.Tensor, bias: torch.Tensor,
                               slope: float, gain: float) -> torch.Tensor:
    """The aten formulation (CPU path, decomposition for export)."""
    z = x + strength.to(x.dtype) * noise.to(x.dtype) + bias.to(x.dtype).view(1, -1, 1, 1)
    return torch.nn.functional.leaky_relu(z, slope) * gain


def _is_channels_last(x: torch.Tensor) -> bool:
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def noise_bias_lrelu_forward(x: torch.Tensor, noise: torch.Tensor, strength: torch.Tensor, bias: torch.Tensor,
                             slope: float, gain: float) -> torch.Tensor:
    """Launch the fused kernel.

    Args:
        x: (B, C, H, W), NCHW- or channels_last-contiguous (else made contiguous).
        noise: (B, 1, H, W) or (1, 1, H, W).
        strength: (1,) noise strength; bias: (C,).
        slope, gain: leaky ReLU slope and output gain.

    Returns:
        (B, C, H, W) in x's dtype and memory format.
    """
    check_same_device(x=x, noise=noise, strength=strength, bias=bias)
    B, C, H, W = x.shape
    if noise.dim() != 4 or noise.shape[1] != 1 or tuple(noise.shape[2:]) != (H, W) or noise.shape[0] not in (1, B):
        raise ValueError(f"noise must have shape ({B} or 1, 1, {H}, {W}), got {tuple(noise.shape)}")
    if bias.shape != (C,) or strength.numel() != 1:
        raise ValueError(f"bias must be ({C},) and strength (1,), got {tuple(bias.shape)} and {tuple(strength.shape)}")
    cl = _is_channels_last(x)
    if not cl:
        x = x.contiguous()
    noise = noise.contiguous()
    out = torch.empty_like(x)
    N = x.numel()

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK"]),)

    wrap_triton(_noise_bias_lrelu_fwd_kernel)[grid](
        x, noise, strength, bias, out, N, C, H * W, H * W if noise.shape[0] == B and B > 1 else 0,
        float(slope), float(gain), CHANNELS_LAST=cl)
    return out


@triton_op("mtlface_fast::noise_bias_lrelu", mutates_args=())
def noise_bias_lrelu_op(x: torch.Tensor, noise: torch.Tensor, strength: torch.Tensor, bias: torch.Tensor,
                        slope: float, gain: float) -> torch.Tensor:
    if not use_kernel(x):  # CPU without the interpreter, and traced CPU tensors: the aten twin
        return noise_bias_lrelu_reference(x, noise, strength, bias, slope, gain)
    return noise_bias_lrelu_forward(x, noise, strength, bias, slope, gain)


def _setup_context(ctx, inputs, output):
    x, noise, strength, bias, slope, gain = inputs
    ctx.save_for_backward(output, noise, strength)
    ctx.slope, ctx.gain, ctx.noise_batch, ctx.bias_dtype = slope, gain, noise.shape[0], bias.dtype


def _backward(ctx, grad):
    out, noise, strength = ctx.saved_tensors
    # y > 0 exactly where the pre-activation is > 0 (gain > 0): no need to keep the input.
    # As autograd through ``leaky_relu(z, slope) * gain``: the gain first, then the slope where z <= 0.
    g = grad * ctx.gain
    dz = torch.where(out > 0, g, g * ctx.slope)
    dz32 = dz.to(torch.float64 if dz.dtype == torch.float64 else torch.float32)  # fp32 sums, fp64 for fp64
    d_bias = dz32.sum(dim=(0, 2, 3)).to(ctx.bias_dtype)
    d_strength = (dz32 * noise.to(dz32.dtype)).sum().reshape(1).to(strength.dtype)
    d_noise = dz32.sum(dim=1, keepdim=True) * strength.to(dz32.dtype)
    if ctx.noise_batch == 1:
        d_noise = d_noise.sum(dim=0, keepdim=True)
    return dz, d_noise.to(noise.dtype), d_strength, d_bias, None, None


noise_bias_lrelu_op.register_autograd(_backward, setup_context=_setup_context)
register_decomposition(torch.ops.mtlface_fast.noise_bias_lrelu.default, noise_bias_lrelu_reference)


def noise_bias_lrelu(x, noise, strength, bias, slope: float = 0.2, gain: float = 2 ** 0.5) -> torch.Tensor:
    """``leaky_relu(x + strength * noise + bias, slope) * gain`` as one custom op."""
    return torch.ops.mtlface_fast.noise_bias_lrelu(x, noise, strength, bias, float(slope), float(gain))
