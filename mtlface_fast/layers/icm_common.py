"""What every compact-ICM path shares: argument checks, the one walk over the ICM's layers, the norm and
activation helpers, and the cache of derived (folded, packed) parameters per weights version.

See :mod:`mtlface_fast.layers.icm` for the compact formulation.
"""
from __future__ import annotations

from typing import Callable, List, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..reference.icm import ICMBase

BN_STATS = ("reference", "active")


def check_bn_stats(bn_stats: str) -> str:
    if bn_stats not in BN_STATS:
        raise ValueError(f"bn_stats must be one of {BN_STATS}, got {bn_stats!r}")
    return bn_stats


def check_icm_inputs(module: ICMBase, x_id: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
    """Validate ``icm`` arguments; returns the groups as a 1-D int64 tensor on ``x_id``'s device.

    The group values are checked on the host only when they already live there (CPU tensors, eager): a device
    tensor is never read back (no synchronization). The Triton forward then writes NaN for a sample whose
    group is out of range.
    """
    if not isinstance(x_id, torch.Tensor) or x_id.dim() != 4:
        raise ValueError(f"x_id must be a (B, C, h, w) tensor, got "
                         f"{tuple(x_id.shape) if isinstance(x_id, torch.Tensor) else type(x_id).__name__}")
    if x_id.size(1) != module.in_channels:
        raise ValueError(f"x_id must have {module.in_channels} channels, got {x_id.size(1)}")
    if not isinstance(condition, torch.Tensor):
        raise TypeError(f"condition must be an integer tensor of target groups, got {type(condition).__name__}")
    if condition.dtype.is_floating_point or condition.dtype.is_complex or condition.dtype == torch.bool:
        raise TypeError(f"condition must have an integer dtype, got {condition.dtype}")
    if condition.dim() != 1 or condition.numel() != x_id.size(0):
        raise ValueError(f"condition must have shape ({x_id.size(0)},) (one group per sample), "
                         f"got {tuple(condition.shape)}")
    on_host = condition.device.type == "cpu" and not condition.is_cuda
    if on_host and not torch.compiler.is_compiling() and condition.numel() > 0:
        lo, hi = int(condition.min()), int(condition.max())
        if lo < 0 or hi >= module.age_group:
            raise ValueError(f"condition values must be age groups in [0, {module.age_group}), "
                             f"got values in [{lo}, {hi}]")
    return condition.to(device=x_id.device, dtype=torch.long)


class IcmLayer(NamedTuple):
    """One convolution of the ICM with what follows it: ``act(norm(conv(x)) [+ block input])``."""
    conv: nn.Conv2d
    norm: Optional[nn.Module]
    act: Optional[nn.Module]
    win_in: bool            # input channels are the sample's window
    win_out: bool           # output channels are the sample's window
    takes_residual: bool    # second convolution of a residual block: adds the block input before act


def icm_layers(module: ICMBase) -> List[IcmLayer]:
    """Every layer of the ICM in order: conv1, the two 3x3 convolutions of each block, conv2 (walked once per
    module: its children are fixed after construction, as the reference's are)."""
    layers = module.__dict__.get("_icm_layers")
    if layers is None:
        layers = module.__dict__["_icm_layers"] = _walk(module)
    return layers


def _walk(module: ICMBase) -> List[IcmLayer]:
    c1, c2 = module.conv1, module.conv2
    out = [IcmLayer(c1[0], c1[1], c1[2], False, True, False)]
    for block in module.transform:
        out.append(IcmLayer(block.conv1[0], block.conv1[1], block.relu1, True, True, False))
        out.append(IcmLayer(block.conv2[0], block.conv2[1], block.relu2, True, True, True))
    out.append(IcmLayer(c2[0], c2[1] if len(c2) > 1 else None, c2[2] if len(c2) > 2 else None, True, False, False))
    return out


def uses_batch_stats(norm: Optional[nn.Module]) -> bool:
    return isinstance(norm, nn.modules.batchnorm._BatchNorm) and (norm.training or norm.running_mean is None)


def is_batch_norm(norm: Optional[nn.Module]) -> bool:
    return isinstance(norm, nn.modules.batchnorm._BatchNorm)


def apply_act(act: Optional[nn.Module], x: torch.Tensor, window: slice = slice(None)) -> torch.Tensor:
    if act is None:
        return x
    if isinstance(act, nn.PReLU):
        w = act.weight
        return F.prelu(x, w[window] if w.numel() > 1 else w)
    if isinstance(act, nn.LeakyReLU):
        return F.leaky_relu(x, act.negative_slope)
    raise TypeError(f"unsupported ICM activation {type(act).__name__}")


def instance_norm(norm: nn.InstanceNorm2d, x: torch.Tensor, window: slice = slice(None)) -> torch.Tensor:
    if norm.track_running_stats and not norm.training:
        raise NotImplementedError("compact ICM supports InstanceNorm2d without running statistics only")
    w = norm.weight[window] if norm.affine else None
    b = norm.bias[window] if norm.affine else None
    return F.instance_norm(x, weight=w, bias=b, use_input_stats=True, eps=norm.eps)


def bn_momentum(bn: nn.modules.batchnorm._BatchNorm) -> float:
    """The momentum ``nn.BatchNorm2d.forward`` would use (after incrementing num_batches_tracked)."""
    if bn.momentum is None:
        return 1.0 / float(bn.num_batches_tracked)
    return bn.momentum


def bn_momentum_for_call(bn: nn.modules.batchnorm._BatchNorm) -> float:
    """Update ``num_batches_tracked`` as ``nn.BatchNorm2d.forward`` does and return the momentum to use."""
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        return bn_momentum(bn)
    return 0.0 if bn.momentum is None else bn.momentum


def update_running_stats(bn, counts: torch.Tensor, mean: torch.Tensor, sq: torch.Tensor) -> None:
    """nn.BatchNorm2d's running-stat update for channels held by some sample (``counts`` > 0 values each);
    channels no sample holds keep their statistics."""
    if not (bn.training and bn.track_running_stats and bn.running_mean is not None):
        return
    with torch.no_grad():
        bn.num_batches_tracked.add_(1)
        m = bn_momentum(bn)
        held = counts > 0
        unbiased = sq / (counts - 1.0).clamp_min(1.0)
        bn.running_mean.copy_(torch.where(held, (1 - m) * bn.running_mean + m * mean, bn.running_mean))
        bn.running_var.copy_(torch.where(held, (1 - m) * bn.running_var + m * unbiased, bn.running_var))


def autocast_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def wants_grad(module: nn.Module, x: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in module.parameters()))


class WeightsCache:
    """Derived inference parameters of a fused ICM (``build(module, dtype)``), one entry per dtype, rebuilt when
    the module's weights version moves (:mod:`mtlface_fast.layers.fused`)."""

    def __init__(self, build: Callable):
        self.build, self.entries = build, {}

    def get(self, module: nn.Module, dtype: torch.dtype):
        version = module.weights_version()
        entry = self.entries.get(dtype)
        if entry is not None and entry[0] == version:
            return entry[1]
        with torch.no_grad():
            params = self.build(module, dtype)
        self.entries[dtype] = (version, params)
        return params


def module_cache(module: nn.Module, name: str, build: Callable) -> WeightsCache:
    """The :class:`WeightsCache` ``name`` of ``module`` (created on first use, outside the module's state)."""
    cache = module.__dict__.get(name)
    if cache is None:
        cache = module.__dict__[name] = WeightsCache(build)
    return cache
