"""The CVPR 2021 architecture (the official training code): what it builds and how it embeds and renders.

Modules and state-dict keys (``backbone.``, ``estimation_network.``, ``generator.``):

* ``backbone``: :class:`AIResNet`, the IResNet trunk + AFD ``fsm`` + ``output_layer`` (BN2d, Dropout(0.5),
  Flatten, Linear, BN1d); the embedding is ``output_layer(x_id)``, not normalized (as the official forward);
* ``estimation_network``: the DEX age head on x_age (101 bins and the group logits);
* ``generator``: :class:`AgingModule`, the identity conditional module (BatchNorm + PReLU, ``sigma`` of the
  official code 0.1) on x_id and the U-Net decoder over the trunk's skips, residual on the input image.

Synthesis is deterministic (no generator noise).
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from ..nvtx import nvtx_range
from .afd import AttentionModule, check_afd_variant
from .backbone import AIResNet, check_backbone, check_input_size
from .common import Architecture, Features, repeat_rows
from .heads import AgeEstimationModule, check_age_group
from .icm import AgingModule, check_sigma


class CVPR(Architecture):
    """``MTLFace(arch="cvpr")``. Layer arguments: ``attention_layer`` (the AFD), ``block_layer`` (the trunk's
    residual units), ``generator_layer`` (the ICM + decoder, ``cls(age_group, repeat_num, sigma)``)."""

    name = "cvpr"
    recognition = "backbone"
    estimator = "estimation_network"
    default_flip = False
    normalized_embedding = False
    layer_names = ("attention_layer", "block_layer", "generator_layer")
    noise = False

    @classmethod
    def configure(cls, backbone: str, input_size: int, age_group: int, afd: Optional[str],
                  sigma: Optional[float]) -> Dict[str, Any]:
        return dict(arch=cls.name, backbone=check_backbone(backbone), input_size=check_input_size(input_size),
                    age_group=check_age_group(age_group), afd=check_afd_variant("cvpr" if afd is None else afd),
                    sigma=float(check_sigma(0.1 if sigma is None else sigma)))

    @classmethod
    def build(cls, model, config: Dict[str, Any], layers: Dict[str, Any]) -> None:
        cls.check_layers(layers)
        model.backbone = AIResNet(config["input_size"], config["backbone"], config["afd"],
                                  attention_layer=layers.get("attention_layer") or AttentionModule,
                                  block_layer=layers.get("block_layer"))
        model.estimation_network = AgeEstimationModule(config["input_size"], config["age_group"])
        model.generator = (layers.get("generator_layer") or AgingModule)(config["age_group"], 4, config["sigma"])

    @classmethod
    def render(cls, model, images: torch.Tensor, f: Features, context, groups: torch.Tensor, repeats: int,
               noise, generator) -> torch.Tensor:
        gen = model.generator
        with nvtx_range("icm"):
            x = gen.icm(repeat_rows(f.x_id, repeats), groups)
        with nvtx_range("decoder"):
            return gen.decode(x, repeat_rows(images, repeats), repeat_rows(f.x_2, repeats),
                              repeat_rows(f.x_3, repeats), repeat_rows(f.x_4, repeats))
