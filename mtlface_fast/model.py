"""The fast MTLFace: the reference model with fast layers injected (same API, same state dict, every
architecture).

Injected layers (:mod:`mtlface_fast.layers`), per architecture (:data:`FAST_LAYERS`): trunk units with
BatchNorm folded at inference, the fused AFD, the compact ICM (CVPR: BatchNorm + PReLU; TPAMI:
InstanceNorm + LeakyReLU) and, for TPAMI, the StyleGAN2 layers with dense modulated convolutions and the
fused noise/bias/LeakyReLU op. Which implementation of each fused op runs (Triton or PyTorch, see
:mod:`mtlface_fast.backend`) is chosen once per layer and listed by :meth:`MTLFace.implementations`.

Layout: channels_last on CUDA (cuDNN's fast convolutions are NHWC) and for fp32 inference on CPU, where the
trunk units and the CVPR decoder steps run oneDNN convolutions on weights packed once per weights version
(:mod:`mtlface_fast.layers.onednn`; their fp32 error is that of channels_last convolutions, as
``torch.compile(reference)``'s); ``channels_last=False`` keeps NCHW and the PyTorch path (closer to the fp64
reference per layer, slower). Mixed precision is asked for explicitly, never hidden in ``forward``: the
``dtype=`` keyword of the public methods runs that call under ``torch.autocast``.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn

from . import layers
from .reference.model import MTLFace as ReferenceMTLFace
from .precision import DTYPES, dtype_name
from .reference.model import get_architecture

#: The layer classes the fast model builds each architecture with.
FAST_LAYERS: Dict[str, Dict[str, type]] = {
    "cvpr": dict(block_layer=layers.FastBottleneckIR, attention_layer=layers.FusedAttentionModule,
                 generator_layer=layers.CompactAgingModule),
    "tpami": dict(block_layer=layers.FastBottleneckIR, attention_layer=layers.FusedAttentionModule,
                  icm_layer=layers.CompactTPAMIAgingModule, styled_conv_layer=layers.FastStyledConv,
                  to_rgb_layer=layers.FastToRGB),
}


class MTLFace(layers.WeightsVersioned, ReferenceMTLFace):
    """Drop-in fast MTLFace, for every architecture; see :class:`mtlface_fast.reference.MTLFace` for the
    arguments and API. ``channels_last`` defaults to None (CUDA, and CPU fp32 inference on packed oneDNN
    weights); layer keywords override the fast layers of :data:`FAST_LAYERS`.
    """

    flip_in_one_batch = True

    # weights_version() (from layers.WeightsVersioned): moves on load_state_dict, .to(), train()/eval(), every
    # optimizer step and weights_changed() of the model; what captured or compiled artifacts key on.

    def __init__(self, backbone: str = "ir50", input_size: int = 112, age_group: int = 7,
                 afd: Optional[str] = None, sigma: Optional[float] = None, *, arch: str = "cvpr",
                 channels_last: Optional[bool] = None, **layer_classes):
        fast = dict(FAST_LAYERS[get_architecture(arch).name])
        fast.update(layer_classes)
        super().__init__(backbone, input_size, age_group, afd, sigma, arch=arch, channels_last=channels_last, **fast)
        layers.fused.watch_optimizers()  # before any call, compiled ones included, reads a weights version

    def _layout(self, images: torch.Tensor) -> torch.Tensor:
        """channels_last where the fast layers want it: on CUDA, and on CPU for fp32 inference without autograd
        (the trunk's oneDNN packed path); ``channels_last=True/False`` forces the choice."""
        if self.channels_last is None and images.device.type == "cpu" and not images.is_cuda:
            if (not self.training and images.dtype == torch.float32 and layers.onednn.AVAILABLE
                    and not torch.is_autocast_enabled("cpu")
                    and not (torch.is_grad_enabled() and (images.requires_grad
                                                          or any(p.requires_grad for p in self.parameters())))):
                return images.contiguous(memory_format=torch.channels_last)
            return images
        return super()._layout(images)

    # -- implementation choice -----------------------------------------------------------------------
    def fused_layers(self):
        """(name, layer) of every fused layer of the model, in module order."""
        return [(name, m) for name, m in self.named_modules() if isinstance(m, layers.FusedLayer)]

    def implementations(self) -> Dict[str, str]:
        """What runs each kind of fused layer: ``{"FastBottleneckIR": "torch (BatchNorm folded at
        inference)", "FusedAttentionModule": "triton", ...}`` (chosen once per layer; see
        :mod:`mtlface_fast.layers.fused`)."""
        out: Dict[str, str] = {}
        for _, m in self.fused_layers():
            kind = type(m).__name__
            desc = m.describe_implementation()
            if out.setdefault(kind, desc) != desc:
                out[kind] = "mixed"
        return out

    def weights_changed(self) -> "MTLFace":
        """Announce a change of the weights that no tracked event made (an in-place edit by hand, a changed
        ``eps``): the fused layers rebuild their cached folded/packed weights at the next call, and
        :meth:`weights_version` moves. Loading, ``.to()``, ``train()``/``eval()`` and optimizer steps need no
        call. Returns the model."""
        super().weights_changed()
        for _, m in self.fused_layers():
            m.weights_changed()
        return self

    def extra_repr(self) -> str:
        try:
            impls = ", ".join(f"{k}: {v}" for k, v in self.implementations().items())
        except RuntimeError as exc:  # a backend that cannot run here (e.g. triton on CPU without the interpreter)
            impls = f"unavailable ({exc})"
        return f"arch={self.config['arch']}, implementations={{{impls}}}"

    # -- compile -------------------------------------------------------------------------------------
    def compile(self, *args, **kwargs) -> "MTLFace":
        """Compile the public entry points in place: ``forward``, ``encode``, ``synthesize`` and
        ``synthesize_all_ages`` (``nn.Module.compile`` would compile ``forward`` alone).

        Arguments go to :func:`torch.compile`; ``fullgraph`` defaults to True (the fused ops are
        ``torch.library`` custom ops and never break the graph). ``mode="reduce-overhead"`` adds CUDA
        graphs, recorded once per batch size. Returns the model. The compiled callables live on the
        instance and are dropped by ``copy.deepcopy`` and pickling (the copy runs eagerly).

        Folded weights (BatchNorm folded into the trunk's convolutions, the AFD's folded operands, the ICM's
        packed windows) are built eagerly before a compiled call, once per weights version and dtype
        (:meth:`prepare_graph_operands`), and enter the graph as inputs: no fold runs inside the graph, and a
        change of the weights (loading, an optimizer step, ...) neither recompiles nor serves stale weights.
        """
        kwargs.setdefault("fullgraph", True)
        for name in COMPILED:
            self.__dict__[name] = _PreparedCall(self, torch.compile(getattr(type(self), name).__get__(self),
                                                                    *args, **kwargs))
        return self

    def prepare_graph_operands(self, dtype=None) -> None:
        """Build what compiled eval calls with ``dtype=`` read (see :meth:`compile`) for the current weights;
        nothing when already built for this weights version and dtype, or in training mode."""
        if self.training:
            return
        version = self.weights_version()
        prepared = self.__dict__.get("_graph_prepared")
        if prepared is None or prepared[0] != version:
            prepared = self.__dict__["_graph_prepared"] = (version, set())
        name = "fp32" if dtype is None else dtype_name(dtype)
        if name in prepared[1]:
            return
        param_dtype = next(self.parameters()).dtype
        act_dtype = param_dtype if name == "fp32" else DTYPES[name]
        side = self.input_size // 16
        for _, layer in self.fused_layers():
            layer.prepare_graph_operands(act_dtype, param_dtype, side)
        prepared[1].add(name)

    def __getstate__(self):
        state = self.__dict__.copy()
        for name in COMPILED:
            state.pop(name, None)
        state.pop("_graph_prepared", None)
        return state

    # -- CUDA graphs ---------------------------------------------------------------------------------
    def cuda_graphs(self, batch_sizes=(1, 8, 64, 256), dtype=None, *, _recorder=None):
        """CUDA-graph replays of ``forward``, ``encode``, ``synthesize`` and ``synthesize_all_ages``, one
        capture per batch bucket (the smallest bucket >= the batch; larger batches in chunks of the largest),
        captured at first use into one shared memory pool and dropped when :meth:`weights_version` moves.
        ``dtype``: None/fp32, bf16 or fp16 (the autocast of the methods' ``dtype=``). The model must be on
        CUDA and in eval mode at each call. Returns a :class:`mtlface_fast.cuda_graphs.GraphedMTLFace`.
        """
        from .cuda_graphs import GraphedMTLFace

        return GraphedMTLFace(self, batch_sizes, dtype, _recorder=_recorder)


COMPILED = ("forward", "encode", "synthesize", "synthesize_all_ages")


class _PreparedCall:
    """A compiled entry point that first makes sure the graph operands of the model's current weights exist."""

    def __init__(self, model: MTLFace, compiled):
        self.model, self.compiled = model, compiled
        self.__wrapped__ = compiled

    def __call__(self, *args, **kwargs):
        self.model.prepare_graph_operands(kwargs.get("dtype"))
        return self.compiled(*args, **kwargs)


def is_mtlface(model: nn.Module) -> bool:
    """Whether ``model`` is an MTLFace (fast or reference, any architecture)."""
    return isinstance(model, ReferenceMTLFace)
