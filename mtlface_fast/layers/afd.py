"""Fused AFD (attention-based feature decomposition): same keys and behaviour as the reference module.

The reference ``AttentionModule`` runs about forty small ops. The fused one, with the Triton backend:

* eval, nothing to differentiate: ``afd_eval``, three kernels (pooling; the channel MLP's first GEMM + ReLU
  and the spatial branch; the second GEMM + sigmoid fused into the pass that writes ``x_id`` and
  ``x_age``), with every BatchNorm folded (cached per weights version, :mod:`.fused`) and the
  7x7 spatial convolution as a matrix on the map;
* otherwise three stages: ``pool`` (one pass over ``x``: the channel-MLP input, SPP avg/max at sizes 1, 2,
  3, summed for CVPR or concatenated for TPAMI, and the spatial-branch input, max and mean over channels,
  in fp32, plus the argmax of every max so that backward routes gradients like PyTorch does); the two
  branches as PyTorch ops (train: fp32 batch statistics, running statistics updated like
  ``nn.BatchNorm2d``, unbiased variance, the module's momentum); ``apply`` (one pass that writes both
  outputs). All differentiable.

The kernels live in :mod:`mtlface_fast.kernels.afd`, their PyTorch twins (the torch backend, and the
decompositions for export) in :mod:`mtlface_fast.kernels.afd_torch`, re-exported here.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..reference.afd import SPP_SIZES, AttentionModule  # noqa: F401 (SPP_SIZES: public name kept)
from ..kernels.afd_torch import (SPP_BINS, apply_backward_torch, apply_torch, pool_backward_torch,  # noqa: F401
                                 pool_torch, stats_dtype)
from .fold import fold_bn
from .fused import FusedLayer

MAX_PIXELS = 4096  # H*W of one feature map held by one kernel tile row (64x64)
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# ----------------------------------------------------------------------------------------------------
# The module
# ----------------------------------------------------------------------------------------------------

def _batch_norm_train(z: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
    """BatchNorm with fp32 batch statistics over all dims but 1; running stats updated as nn.BatchNorm2d.

    When the module's affine parameters and statistics have z's dtype (fp32 weights, also under autocast)
    this is ``F.batch_norm``, the function ``nn.BatchNorm2d`` itself calls: one op (forward and backward)
    instead of a dozen. Otherwise (a low-precision module) it is spelled out, statistics in z's dtype.
    """
    dims = [d for d in range(z.dim()) if d != 1]
    n = z.numel() // z.shape[1]
    if n <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(z.shape)}")
    stats = bn.track_running_stats and bn.running_mean is not None
    if all(t is None or t.dtype == z.dtype for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var)):
        momentum = 0.0
        if stats:
            with torch.no_grad():
                bn.num_batches_tracked.add_(1)
            momentum = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
        return F.batch_norm(z, bn.running_mean if stats else None, bn.running_var if stats else None,
                            bn.weight, bn.bias, True, momentum, bn.eps)
    mean = z.mean(dims, keepdim=True)
    var = z.var(dims, unbiased=False, keepdim=True)
    if stats:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            momentum = bn.momentum if bn.momentum is not None else 1.0 / bn.num_batches_tracked.item()
            rm, rv = bn.running_mean, bn.running_var
            rm.mul_(1 - momentum).add_(mean.detach().flatten().to(rm.dtype), alpha=momentum)
            rv.mul_(1 - momentum).add_((var.detach().flatten() * (n / (n - 1))).to(rv.dtype), alpha=momentum)
    shape = [1] * z.dim()
    shape[1] = -1
    y = (z - mean) * torch.rsqrt(var + bn.eps)
    return y * bn.weight.to(z.dtype).view(shape) + bn.bias.to(z.dtype).view(shape)


class FusedAttentionModule(FusedLayer, AttentionModule):
    """Drop-in :class:`~mtlface_fast.reference.afd.AttentionModule` (same constructor and state dict).

    Args:
        channels: channels of the feature map (512 in every official model).
        reduction: channel-MLP reduction of the pooled vector (16).
        variant: ``"cvpr"`` or ``"tpami"``.
    """

    def __init__(self, channels: int = 512, reduction: int = 16, variant: str = "cvpr"):
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ValueError(f"channels must be a positive int, got {channels!r}")
        if isinstance(reduction, bool) or not isinstance(reduction, int) or reduction < 1:
            raise ValueError(f"reduction must be a positive int, got {reduction!r}")
        pooled = channels * SPP_BINS * (2 if variant == "tpami" else 1)
        if pooled // reduction < 1:
            raise ValueError(f"reduction {reduction} leaves no hidden unit for {pooled} pooled features")
        super().__init__(channels, reduction, variant)
        # Eval-mode GEMM/conv operands per (compute dtype, map size), valid for one weights version.
        self._eval_key, self._eval_ops = None, {}

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"x must be 4-D (B, C, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != self.channels:
            raise ValueError(f"x must have {self.channels} channels (dim 1), got shape {tuple(x.shape)}")
        if x.dtype not in _DTYPES:
            raise TypeError(f"x must be float32, float16, bfloat16 or float64, got {x.dtype}")
        if x.shape[0] < 1 or x.shape[2] < 1 or x.shape[3] < 1:
            raise ValueError(f"x must be non-empty, got shape {tuple(x.shape)}")
        if x.shape[2] * x.shape[3] > MAX_PIXELS:
            raise ValueError(f"x spatial size H*W must be at most {MAX_PIXELS}, got {tuple(x.shape[2:])}")
        w = self.channel[0].weight
        if x.device != w.device:
            raise ValueError(f"x is on {x.device} but the module's parameters are on {w.device}")

    def _build_eval(self, compute_dtype: torch.dtype, hw: Optional[Tuple[int, int]] = None):
        """BN-folded eval operands in ``compute_dtype`` (GEMM weights) and its stats dtype (biases, the
        spatial weight). With ``hw = (H, W)`` also ``ts``: the folded 7x7 convolution on an H x W map as a
        (2, HW, HW) matrix, the convolution of the one-hot basis (each entry one weight: exact)."""
        acc = stats_dtype(compute_dtype)
        w2, b2 = fold_bn(self.channel[2].weight.flatten(1), self.channel[3])
        ws, bs = fold_bn(self.spatial[0].weight, self.spatial[1])
        ops = dict(w1=self.channel[0].weight.flatten(1).to(compute_dtype), w2=w2.to(compute_dtype),
                   b2=b2.to(acc), ws=ws.to(acc), bs=bs.to(acc))
        if hw is not None:
            H, W = hw
            ws = ops["ws"]
            basis = torch.eye(2 * H * W, device=ws.device, dtype=acc).view(2 * H * W, 2, H, W)
            with torch.autocast(ws.device.type, enabled=False):
                ts = F.conv2d(basis, ws, padding=self.spatial[0].padding)
            ops["ts"] = ts.reshape(2, H * W, H * W)
        return ops

    def _fold_sources(self) -> Tuple[Tuple[torch.Tensor, ...], Tuple[float, float]]:
        """Every tensor and the two BN epsilons that :meth:`_build_eval` reads (read from the module dicts
        directly: Sequential indexing and nn.Module attribute lookup cost microseconds each)."""
        ch, sp = self._modules["channel"]._modules, self._modules["spatial"]._modules
        c3, s1 = ch["3"], sp["1"]
        p3, b3, p1, b1 = c3._parameters, c3._buffers, s1._parameters, s1._buffers
        return ((ch["0"]._parameters["weight"], ch["2"]._parameters["weight"], p3["weight"], p3["bias"],
                 b3["running_mean"], b3["running_var"], sp["0"]._parameters["weight"], p1["weight"], p1["bias"],
                 b1["running_mean"], b1["running_var"]), (c3.eps, s1.eps))

    def _eval_operands(self, compute_dtype: torch.dtype, hw: Optional[Tuple[int, int]] = None):
        """BN-folded operands in the compute dtype, cached per weights version (:mod:`.fused`).

        Built inline (differentiable, traceable) under torch.compile or when a parameter wants a gradient.
        """
        if torch.is_grad_enabled() and self._grad_wanted():
            return self._build_eval(compute_dtype, hw)
        if torch.compiler.is_compiling():
            return self.graph_operands(("eval", compute_dtype, hw), lambda: self._build_eval(compute_dtype, hw))
        key = self.weights_version()
        if key != self._eval_key:
            self._eval_key, self._eval_ops = key, {}
        operands = self._eval_ops.get((compute_dtype, hw))
        if operands is None:
            with torch.no_grad():
                operands = self._eval_ops[(compute_dtype, hw)] = self._build_eval(compute_dtype, hw)
        return operands

    def graph_operand_builders(self, act_dtype: torch.dtype, param_dtype: torch.dtype, side: int):
        # The Triton path keys on the feature map's size, the PyTorch one does not: both, at the model's size.
        keys = [(act_dtype, None), (act_dtype, (side, side))]
        return {("eval",) + k: (lambda k=k: self._build_eval(*k)) for k in keys}

    def _grad_wanted(self) -> bool:
        return any(t.requires_grad for t in self._fold_sources()[0])

    def branch_scales(self, feat: torch.Tensor, sp: torch.Tensor, compute_dtype: torch.dtype
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
        """(channel scale (B, C), spatial scale (B, H, W)) from the pooled tensors, in ``feat.dtype``.

        The GEMMs run in ``compute_dtype`` (the input's dtype) with fp32 outputs of the BatchNorms.
        """
        acc = feat.dtype
        pad = self.spatial[0].padding
        if self.training:
            h = F.relu(F.linear(feat.to(compute_dtype), self.channel[0].weight.flatten(1).to(compute_dtype)))
            z = F.linear(h, self.channel[2].weight.flatten(1).to(compute_dtype)).to(acc)
            cs = torch.sigmoid(_batch_norm_train(z, self.channel[3]))
            s = F.conv2d(sp, self.spatial[0].weight.to(acc), padding=pad).to(acc)  # (autocast may lower it)
            ss = torch.sigmoid(_batch_norm_train(s, self.spatial[1]))
        else:
            # Fewest ops on the host: the fp32 bias add promotes a low-precision GEMM output exactly as
            # .to(fp32) would, and the activations run in place on tensors made here.
            p = self._eval_operands(compute_dtype)
            h = F.linear(feat.to(compute_dtype), p["w1"]).relu_()
            cs = (F.linear(h, p["w2"]) + p["b2"]).sigmoid_()
            ss = F.conv2d(sp, p["ws"], p["bs"], padding=pad).to(acc).sigmoid_()
        return cs, ss[:, 0]

    def forward(self, x: torch.Tensor):
        self._check_input(x)
        concat = self.variant == "tpami"
        att_is_age = self.variant == "cvpr"
        if self.implementation() == "triton":
            from ..kernels import afd as ops
            if not self.training and not (torch.is_grad_enabled() and (x.requires_grad or self._grad_wanted())):
                p = self._eval_operands(x.dtype, (int(x.shape[2]), int(x.shape[3])))
                return ops.eval_forward(x, p["w1"], p["w2"], p["b2"], p["ts"], p["bs"], concat, att_is_age)
            pool, apply = ops.pool, ops.apply
        else:
            pool, apply = pool_torch, apply_torch
        with_idx = torch.is_grad_enabled() and x.requires_grad  # argmax bookkeeping only for backward
        feat, _, sp, _ = pool(x, concat, with_idx)
        cs, ss = self.branch_scales(feat, sp, x.dtype)
        return apply(x, cs, ss, att_is_age)
