"""Compact ICM: the identity conditional module computed on each sample's own channel window.

The reference ICM (:mod:`mtlface_fast.reference.icm`) runs every convolution over all ``conv_dim``
channels and then multiplies by a 0/1 mask that keeps the ``unit_count`` channels
``S_g = [s_g, s_g + unit_count)`` of the sample's target group g. Because the masked input of a layer
is zero outside ``S_g`` and its output is masked to ``S_g``, each layer equals a convolution with the
weight block ``W[S_g, S_g]`` (``W[S_g, :]`` for the 512 -> conv_dim ``conv1``, ``W[:, S_g]`` for the
conv_dim -> 512 ``conv2``). The compact state is ``(B, unit_count, h, w)``; the per-channel BN
parameters, PReLU slopes and biases are sliced to the window. PReLU/LeakyReLU of a zero is zero, so the
reference's ``act(residual + x)`` over the full width stays zero outside the window and the compact
state is exact.

Normalization statistics in training mode (``bn_stats``):

* ``"reference"`` (default, exact): the reference BatchNorm statistics run over every sample and every
  channel, including channels outside a sample's window, where the pre-mask convolution output is *not*
  zero (``conv1`` reads the full 512-channel input; the 3x3 convolutions have a bias and cross-window
  weights). This mode therefore computes the full-width pre-mask output ``conv(x_window, W[:, S_g])``
  (``unit_count`` input channels instead of ``conv_dim``: still ~6x cheaper than the reference) for the
  statistics and the running-stat update, then keeps the window. Forward and gradients equal the
  reference's.
* ``"active"``: the statistics of channel c run only over the samples whose window holds c (the
  outputs that survive the mask). Running statistics of a channel that no sample in the batch holds are
  left unchanged; the others are updated as ``nn.BatchNorm2d`` does (unbiased variance, momentum or
  cumulative average, ``num_batches_tracked`` + 1).

Eval mode folds BN into the window's weights. InstanceNorm (TPAMI variant) is per sample and per
channel, so it is exact in compact form in both modes.

Which implementation runs follows :mod:`mtlface_fast.backend`. Each path reads top to bottom over the one
layer walk :func:`~mtlface_fast.layers.icm_common.icm_layers`:

* :mod:`mtlface_fast.layers.icm_triton`: the Triton kernels. Inference is one persistent launch
  (:mod:`mtlface_fast.kernels.icm_forward`); training one ``icm_conv`` launch per layer for the whole batch
  (:mod:`mtlface_fast.kernels.icm_conv`). No host synchronization.
* :mod:`mtlface_fast.layers.icm_torch`: PyTorch, the batch sorted by group, one convolution per present
  group and layer (a grouped convolution over the groups in eval mode).
* :mod:`mtlface_fast.layers.icm_common`: argument checks, the layer walk, norm helpers, the weights cache.

This module holds the modules (:class:`CompactICM`, :class:`CompactAgingModule`) and re-exports the names
other modules import from it.
"""
from __future__ import annotations

import torch

from ..reference.icm import AgingModule, ICMBase
from ..reference.tpami import TPAMIAgingModule
from .fused import FusedLayer
from .icm_common import (BN_STATS, IcmLayer, autocast_dtype, check_bn_stats, check_icm_inputs,  # noqa: F401
                         icm_layers, uses_batch_stats)
from .icm_torch import compact_icm_torch, group_segments  # noqa: F401
from .icm_triton import compact_icm_triton, forward_supported, pack_forward  # noqa: F401

__all__ = ["BN_STATS", "CompactAgingModule", "CompactICM", "CompactTPAMIAgingModule", "check_bn_stats",
           "check_icm_inputs",
           "compact_icm_torch", "compact_icm_triton", "group_segments", "icm_layers"]


class CompactICM(FusedLayer):
    """Mixin for any :class:`ICMBase` subclass: replaces :meth:`icm` by the compact implementation.

    Use as ``class Fast(CompactICM, SomeICM)``; set ``bn_stats`` (``"reference"`` or ``"active"``) as
    an attribute or through :meth:`set_bn_stats`. The state dict and the module tree are unchanged.
    """

    bn_stats: str = "reference"

    def set_bn_stats(self, bn_stats: str):
        self.bn_stats = check_bn_stats(bn_stats)
        return self

    def choose_implementation(self) -> str:
        p = next(self.parameters())
        if p.dtype == torch.float64:
            # The window-convolution kernels accumulate in fp32: fp64 takes the PyTorch twin (fp64 throughout).
            return "torch"
        return super().choose_implementation()

    def graph_operand_builders(self, act_dtype: torch.dtype, param_dtype: torch.dtype, side: int):
        # What a traced inference call reads: the packed windows of the one-launch forward (icm_triton).
        return {("icm_packed", act_dtype): lambda: pack_forward(self, act_dtype)}

    def icm(self, x_id: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        groups = check_icm_inputs(self, x_id, condition)
        bn_stats = check_bn_stats(self.bn_stats)
        if x_id.size(0) == 0:
            return ICMBase.icm(self, x_id, groups)
        if self.implementation() == "triton" or torch.compiler.is_compiling():
            # Traced graphs take the op path (on CPU the ops' aten bodies): the per-group PyTorch loop needs
            # the group counts on the host.
            return compact_icm_triton(self, x_id, groups, bn_stats)
        return compact_icm_torch(self, x_id, groups, bn_stats)


class CompactAgingModule(CompactICM, AgingModule):
    """The CVPR generator with the compact ICM; same constructor arguments and state dict as AgingModule."""

    def __init__(self, age_group: int = 7, repeat_num: int = 4, sigma: float = 0.1, unit_count: int = 128, *,
                 bn_stats: str = "reference", upsample_layer=None):
        from .decoder import FastUpsample

        super().__init__(age_group, repeat_num, sigma, unit_count, upsample_layer=upsample_layer or FastUpsample)
        self.bn_stats = check_bn_stats(bn_stats)


class CompactTPAMIAgingModule(CompactICM, TPAMIAgingModule):
    """The TPAMI ICM (InstanceNorm + LeakyReLU) with the compact implementation; same arguments and state dict
    as :class:`~mtlface_fast.reference.tpami.TPAMIAgingModule`."""
