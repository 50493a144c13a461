"""The fast MTLFace: the reference module tree with fast layers injected (same API, same state dict).

Layers injected through the reference constructor (see :mod:`mtlface_fast.layers`):
``block_layer`` (trunk units with BN folded at inference), and the fused AFD / ICM layers when they are
available. Which implementation of a fused op runs is chosen by the backend switch
(:mod:`mtlface_fast.backend`). Inference on CUDA runs channels_last (cuDNN's fast convolutions are NHWC);
on CPU it stays NCHW: oneDNN's fp32 NHWC convolutions are several times less accurate there (about 2e-6
relative against fp64 for a 3x3 512-channel layer, 3e-7 in NCHW) and no faster for this model; NVTX ranges mark backbone, AFD, heads, ICM and decoder when enabled
(:mod:`mtlface_fast.nvtx`). Mixed precision is asked for explicitly, never hidden in ``forward``: the
``dtype=`` keyword of the public methods runs that call under ``torch.autocast`` (bf16 or fp16; fp32
weights stay fp32), or the caller uses ``torch.autocast`` / ``model.to(torch.bfloat16)`` directly.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

from . import layers
from .nvtx import nvtx_range
from .reference.heads import dex_age
from .reference.model import EncodeResult, Features
from .reference.model import MTLFace as ReferenceMTLFace


def precision(images: torch.Tensor, dtype: Optional[torch.dtype]):
    """The context a public method runs under for its ``dtype=`` keyword: autocast to bf16/fp16, or nothing."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be torch.bfloat16, torch.float16 or torch.float32, got {dtype}")
    device = images.device.type if isinstance(images, torch.Tensor) else "cpu"
    return torch.autocast(device_type=device, dtype=dtype)


def channels_last_for(model, images: torch.Tensor) -> bool:
    """The layout switch: ``model.channels_last`` when set, else channels_last on CUDA only (see module doc)."""
    if model.channels_last is None:
        return images.is_cuda
    return bool(model.channels_last)


def check_channels_last(channels_last) -> Optional[bool]:
    if channels_last is not None and not isinstance(channels_last, bool):
        raise ValueError(f"channels_last must be True, False or None (CUDA only), got {channels_last!r}")
    return channels_last


def encoder_features(model, encoder, images: torch.Tensor) -> Features:
    """The fast models' encoder pass: checked input, channels_last trunk, AFD, NVTX ranges."""
    images = model._check(images)
    if channels_last_for(model, images):
        images = images.contiguous(memory_format=torch.channels_last)
    with nvtx_range("backbone"):
        x_1, x_2, x_3, x_4, x_5 = encoder.trunk(images)
    with nvtx_range("afd"):
        x_id, x_age = encoder.fsm(x_5)
    # The heads flatten x_id / x_age (and dropout draws its mask in memory order): hand them over in the
    # reference's NCHW layout so that a seeded training step draws the same mask.
    return Features(x_1, x_2, x_3, x_4, x_5, x_id.contiguous(), x_age.contiguous())


def check_groups_per_call(images, age_group: int, groups_per_call: Optional[int]) -> int:
    """``synthesize_all_ages``' generator batch: all groups at once on CUDA, one at a time elsewhere."""
    if groups_per_call is None:
        return age_group if isinstance(images, torch.Tensor) and images.is_cuda else 1
    if isinstance(groups_per_call, bool) or not isinstance(groups_per_call, int) or groups_per_call < 1:
        raise ValueError(f"groups_per_call must be a positive int, got {groups_per_call!r}")
    return groups_per_call


class MTLFace(ReferenceMTLFace):
    """Drop-in fast MTLFace; see :class:`mtlface_fast.reference.MTLFace` for the arguments and API.

    Extra keyword: ``channels_last``: run convolutions in channels_last layout (True), in NCHW (False), or
    channels_last on CUDA tensors only (None, the default; see the module doc).
    """

    def __init__(self, backbone: str = "ir50", input_size: int = 112, age_group: int = 7, afd: str = "cvpr",
                 sigma: float = 0.1, *, channels_last: Optional[bool] = None, **kwargs):
        kwargs.setdefault("block_layer", layers.FastBottleneckIR)
        if getattr(layers, "FusedAttentionModule", None) is not None:
            kwargs.setdefault("attention_layer", layers.FusedAttentionModule)
        if getattr(layers, "CompactAgingModule", None) is not None:
            kwargs.setdefault("generator_layer", layers.CompactAgingModule)
        super().__init__(backbone, input_size, age_group, afd, sigma, **kwargs)
        self.channels_last = check_channels_last(channels_last)

    @classmethod
    def tpami_class(cls):
        """``MTLFace(arch="tpami")`` builds the fast TPAMI model."""
        from .tpami import FastTPAMIMTLFace
        return FastTPAMIMTLFace

    def _precision(self, images: torch.Tensor, dtype: Optional[torch.dtype]):
        return precision(images, dtype)

    def features(self, images: torch.Tensor) -> Features:
        return encoder_features(self, self.backbone, images)

    def encode(self, images: torch.Tensor, dtype: Optional[torch.dtype] = None) -> EncodeResult:
        with self._precision(images, dtype):
            f = self.features(images)
            with nvtx_range("heads"):
                embedding = self.backbone.output_layer(f.x_id)
                age_logits, group_logits = self.estimation_network(f.x_age)
        return EncodeResult(embedding, dex_age(age_logits), group_logits, f.x_id, f.x_age, age_logits)

    def forward(self, images: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        with self._precision(images, dtype):
            f = self.features(images)
            with nvtx_range("heads"):
                return self.backbone.output_layer(f.x_id)

    def synthesize(self, images: torch.Tensor, target_group, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        with self._precision(images, dtype):
            return super().synthesize(images, target_group)

    def _generate(self, images: torch.Tensor, f: Features, groups: torch.Tensor) -> torch.Tensor:
        with nvtx_range("icm"):
            x = self.generator.icm(f.x_id, groups)
        with nvtx_range("decoder"):
            return self.generator.decode(x, images, f.x_2, f.x_3, f.x_4)

    def synthesize_all_ages(self, images: torch.Tensor, dtype: Optional[torch.dtype] = None,
                            groups_per_call: Optional[int] = None) -> torch.Tensor:
        """Every age group with the encoder run once: (B, G, 3, H, W).

        The generator runs on ``groups_per_call`` groups of the whole batch at a time: all G at once on
        CUDA (one B*G batch keeps the GPU busy), one at a time on CPU (B*G-sized activations of the
        112x112 decoder thrash CPU caches and measured slower).
        """
        groups_per_call = check_groups_per_call(images, self.age_group, groups_per_call)
        with self._precision(images, dtype):
            f = self.features(images)
            B, G = images.size(0), self.age_group
            outs = []
            for g0 in range(0, G, groups_per_call):
                n = min(groups_per_call, G - g0)
                rep = lambda t: t.repeat_interleave(n, dim=0) if n > 1 else t  # noqa: E731 (sample-major)
                groups = torch.arange(g0, g0 + n, device=images.device).repeat(B)
                # only what _generate reads (x_1, x_5 and x_age are not): no needless copies
                fr = f._replace(x_2=rep(f.x_2), x_3=rep(f.x_3), x_4=rep(f.x_4), x_id=rep(f.x_id))
                outs.append(self._generate(rep(images), fr, groups).view(B, n, *images.shape[1:]))
            return torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]

    def compile(self, *args, **kwargs) -> "MTLFace":
        """Compile the public entry points in place: ``forward``, ``encode``, ``synthesize`` and
        ``synthesize_all_ages`` (``nn.Module.compile`` would compile ``forward`` alone).

        Arguments go to :func:`torch.compile`; ``fullgraph`` defaults to True (the fused ops are
        ``torch.library`` custom ops and never break the graph). ``mode="reduce-overhead"`` adds CUDA
        graphs, recorded once per batch size. Returns the model. The compiled callables live on the
        instance: ``copy.deepcopy`` / pickling of a compiled model is not supported.
        """
        kwargs.setdefault("fullgraph", True)
        for name in ("forward", "encode", "synthesize", "synthesize_all_ages"):
            self.__dict__[name] = torch.compile(getattr(type(self), name).__get__(self), *args, **kwargs)
        return self
