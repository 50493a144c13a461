"""The fast TPAMI MTLFace: the reference TPAMI tree with fast layers injected (same API, same state dict).

Built by ``mtlface_fast.MTLFace(arch="tpami")`` and ``mtlface_fast.MTLFace.from_official(<release file>)``.
Injected layers: BN-folded trunk units, the fused AFD (TPAMI variant) and the compact ICM (InstanceNorm
variant) when :mod:`mtlface_fast.layers` provides them, and the StyleGAN2 layers of
:mod:`mtlface_fast.layers.stylegan2` (dense modulated convolutions). Inference on CUDA runs channels_last
(NCHW on CPU, see :mod:`mtlface_fast.model`); ``dtype=`` runs a call under autocast (bf16/fp16), as the
fast CVPR model.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import layers
from .layers.stylegan2 import FastStyledConv, FastToRGB
from .model import check_channels_last, check_groups_per_call, encoder_features, precision
from .nvtx import nvtx_range
from .reference.model import Features
from .reference.tpami import TPAMIAgingModule, TPAMIMTLFace


def compact_icm_layer() -> Optional[Callable[..., nn.Module]]:
    """The compact ICM class for the TPAMI encoder, ``cls(in_channels, age_group, repeat_num)``, if one exists.

    Uses ``layers.CompactTPAMIAgingModule`` when provided, else composes ``layers.CompactICM`` (the
    ICMBase mixin overriding ``icm``) with :class:`TPAMIAgingModule`; None when neither exists.
    """
    cls = getattr(layers, "CompactTPAMIAgingModule", None)
    if cls is not None:
        return cls
    mixin = getattr(layers, "CompactICM", None)
    if mixin is not None:
        return type("CompactTPAMIAgingModule", (mixin, TPAMIAgingModule), {})
    return None


class FastTPAMIMTLFace(TPAMIMTLFace):
    """Drop-in fast TPAMI model; see :class:`mtlface_fast.reference.tpami.TPAMIMTLFace` for the API.

    Extra keyword: ``channels_last`` (True, False, or None: CUDA only, the default), as the fast CVPR model.
    """

    def __init__(self, backbone: str = "ir50", input_size: int = 112, age_group: int = 7, *,
                 channels_last: Optional[bool] = None, **kwargs):
        kwargs.setdefault("block_layer", layers.FastBottleneckIR)
        if getattr(layers, "FusedAttentionModule", None) is not None:
            kwargs.setdefault("attention_layer", layers.FusedAttentionModule)
        icm = compact_icm_layer()
        if icm is not None:
            kwargs.setdefault("icm_layer", icm)
        gk = dict(kwargs.pop("generator_kwargs", None) or {})
        gk.setdefault("styled_conv_layer", FastStyledConv)
        gk.setdefault("to_rgb_layer", FastToRGB)
        super().__init__(backbone, input_size, age_group, generator_kwargs=gk, **kwargs)
        self.channels_last = check_channels_last(channels_last)

    def _precision(self, images, dtype: Optional[torch.dtype]):
        return precision(images, dtype)

    def features(self, images: torch.Tensor) -> Features:
        return encoder_features(self, self.encoder, images)

    def encode(self, images: torch.Tensor, flip: bool = True, dtype: Optional[torch.dtype] = None):
        with self._precision(images, dtype):
            if flip and not self.training:  # both views in one batch: one trunk pass (eval statistics)
                both = torch.cat([images, torch.flip(images, dims=(3,))], dim=0)
                res = super().encode(both, flip=False)
                B = images.size(0)
                vec = F.normalize(res.embedding[:B] + res.embedding[B:], dim=1)
                return type(res)(vec, (res.age[:B] + res.age[B:]) * 0.5,
                                 (res.group_logits[:B] + res.group_logits[B:]) * 0.5, res.x_id[:B], res.x_age[:B],
                                 res.age_logits[:B])
            return super().encode(images, flip=flip)

    def forward(self, images: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        with self._precision(images, dtype):
            return super().forward(images)

    def _latents_to_images(self, latents: torch.Tensor, noise) -> torch.Tensor:
        with nvtx_range("decoder"):
            return super()._latents_to_images(latents, noise)

    def synthesize(self, images: torch.Tensor, target_group, *, noise: Union[str, Sequence[torch.Tensor]] = "stored",
                   generator: Optional[torch.Generator] = None, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        with self._precision(images, dtype):
            return super().synthesize(images, target_group, noise=noise, generator=generator)

    def synthesize_all_ages(self, images: torch.Tensor, *, noise: Union[str, Sequence[torch.Tensor]] = "stored",
                            generator: Optional[torch.Generator] = None, dtype: Optional[torch.dtype] = None,
                            groups_per_call: Optional[int] = None) -> torch.Tensor:
        """Every age group, encoder and unconditioned latents once: (B, G, 3, H, W).

        ``groups_per_call`` groups run as one batch (default: all on CUDA, one at a time on CPU). With
        ``noise="random"`` and a ``generator`` the draws equal the reference's (per group, in group order).
        """
        groups_per_call = check_groups_per_call(images, self.age_group, groups_per_call)
        with self._precision(images, dtype):
            f = self.features(images)
            B, G = images.size(0), self.age_group
            base = self.encoder.unconditioned_latents(f.x_id)
            outs = []
            for g0 in range(0, G, groups_per_call):
                n = min(groups_per_call, G - g0)
                rep = (lambda t: t.repeat_interleave(n, dim=0)) if n > 1 else (lambda t: t)  # sample-major rows
                groups = torch.arange(g0, g0 + n, device=images.device).repeat(B)
                with nvtx_range("icm"):
                    cond = self.encoder.conditioned_latents(rep(f.x_2), rep(f.x_3), rep(f.x_4), rep(f.x_id), groups)
                latents = torch.cat([rep(base), cond], dim=1)
                if isinstance(noise, str) and noise == "random" and generator is not None:
                    # One draw per group, in group order (as the reference), rows b * n + g.
                    per_group = [self.make_noise(B, noise, generator) for _ in range(n)]
                    layer_noise = [torch.stack(maps, dim=1).flatten(0, 1) for maps in zip(*per_group)]
                else:  # stored maps (broadcast), explicit maps (repeated per group) or global-RNG draws (None)
                    layer_noise = [t if t is None or t.size(0) == 1 else rep(t)
                                   for t in self.make_noise(B, noise, generator)]
                out = self._latents_to_images(latents, layer_noise)
                outs.append(out.view(B, n, *out.shape[1:]))
            return torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]
