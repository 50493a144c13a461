"""The TPAMI 2022 MTLFace (the official ``python_package``): encoder, StyleGAN2 decoder, age estimator.

Module tree and state-dict keys are those of the authors' release ``mtlface_checkpoints.tar`` (843 keys,
top-level ``decoder.``, ``encoder.``, ``age_estimator.``, buffers included):

* ``encoder``: IR-50 trunk (``input_layer``, ``block1..4``), ``output_layer`` = [BN2d, Flatten, Dropout(0.4),
  Linear, BN1d with its scale frozen at 1], the TPAMI AFD ``fsm`` (attention gives x_id), twelve
  :class:`StyleBlock` heads ``styles.*``, U-Net steps ``upsample1..3`` (InstanceNorm + LeakyReLU),
  lateral convs ``latlayer1/2`` and three identity conditional modules ``aging1..3`` (InstanceNorm,
  LeakyReLU 0.2, sigma 1/8, unit = channels/4 -> 800/400/200 channels);
* ``decoder``: ``latent_avg`` (1, 1, 512) + a 128 px StyleGAN2 generator fed W+ latents; its output is
  resized to the input size (bilinear, align_corners=True) and the model clamps it to [-1, 1];
* ``age_estimator``: the DEX head with the ``expectation`` buffer (0..100).

Noise: the official ``aging`` draws fresh generator noise on every call. Here the default is the
checkpoint's stored noise maps (deterministic); ``noise="random"`` draws fresh maps, from ``generator``
when one is given.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..nvtx import nvtx_range
from ..validation import check_generator, check_noise_maps
from .afd import AttentionModule
from .backbone import AIResNet, check_backbone, check_input_size
from .common import Architecture, Features, repeat_rows
from .heads import AgeEstimationModule, check_age_group
from .icm import ICMBase, Upsample
from .stylegan2 import Generator

TPAMI_SIGMA = 1 / 8
N_COARSE, N_MIDDLE = 3, 7  # latents [0, 3) from x_id, [3, 7) from the 14x14 level, the rest from 56x56
NOISE_MODES = ("stored", "random")


def n_styles(input_size: int) -> int:
    """Number of W+ latents: ceil(log2(input_size)) * 2 - 2 (12 at 112)."""
    return math.ceil(math.log2(input_size)) * 2 - 2


class StyleBlock(nn.Module):
    """log2(spatial) stride-2 3x3 convs with LeakyReLU(0.2), global average pool, Linear: (B, C, s, s) -> (B, C)."""

    def __init__(self, in_c: int, out_c: int, spatial: int):
        super().__init__()
        self.out_c, self.spatial = out_c, spatial
        mods: List[nn.Module] = []
        for i in range(max(int(math.log2(spatial)), 1)):
            mods += [nn.Conv2d(in_c if i == 0 else out_c, out_c, 3, stride=2, padding=1),
                     nn.LeakyReLU(0.2, inplace=True)]
        mods.append(nn.AdaptiveAvgPool2d(1))
        self.convs = nn.Sequential(*mods)
        self.linear = nn.Linear(out_c, out_c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.convs(x).view(-1, self.out_c))


class TPAMIAgingModule(ICMBase):
    """TPAMI identity conditional module: ICM with InstanceNorm + LeakyReLU(0.2), sigma 1/8, unit = C/4.

    Keys ``conv1.0.*``, ``router._unit_mapping``, ``transform.{0..3}.*``, ``conv2.0.*`` (29 in all).
    Output has the input's shape (no skip to the input).
    """

    def __init__(self, in_channels: int, age_group: int = 7, repeat_num: int = 4):
        super().__init__(in_channels, age_group, in_channels // 4, TPAMI_SIGMA, repeat_num, variant="tpami")

    def forward(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        return self.icm(x, condition)


class TPAMIEncoder(AIResNet):
    """The TPAMI encoder: the IResNet trunk + TPAMI AFD + embedding layer, plus the latent predictor.

    Args:
        input_size: square input side (112 in the release), a multiple of 16.
        age_group: number of age groups (7 in the release).
        backbone: trunk variant (``ir50`` in the release).
        repeat_num: residual blocks per ICM (4).
        attention_layer, block_layer, icm_layer: classes of the AFD module, the trunk units and the ICMs
            (``icm_layer(in_channels, age_group, repeat_num)``); fast implementations inject theirs.
    """

    def __init__(self, input_size: int = 112, age_group: int = 7, backbone: str = "ir50", repeat_num: int = 4, *,
                 attention_layer: Optional[Callable[..., nn.Module]] = None,
                 block_layer: Optional[Callable[..., nn.Module]] = None,
                 icm_layer: Optional[Callable[..., nn.Module]] = None):
        super().__init__(input_size, backbone, "tpami", attention_layer=attention_layer or AttentionModule,
                         dropout=0.4, block_layer=block_layer)
        side = input_size // 16
        # Same parameter indices (0, 3, 4) as the CVPR layer; Flatten and Dropout swap places.
        self.output_layer = nn.Sequential(nn.BatchNorm2d(512), nn.Flatten(), nn.Dropout(0.4),
                                          nn.Linear(512 * side * side, 512), nn.BatchNorm1d(512))
        features = self.output_layer[4]
        nn.init.ones_(features.weight)
        features.weight.requires_grad_(False)  # frozen scale of the embedding BN (the bias trains)
        for m in [self.input_layer, self.block1, self.block2, self.block3, self.block4, self.output_layer]:
            for mod in m.modules():
                if isinstance(mod, (nn.Conv2d, nn.Linear)):
                    nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")
                    if mod.bias is not None:
                        nn.init.zeros_(mod.bias)
        self.n_styles = n_styles(input_size)
        self.styles = nn.ModuleList()
        for i in range(self.n_styles):
            spatial = input_size // 16 if i < N_COARSE else input_size // 8 if i < N_MIDDLE else input_size // 2
            self.styles.append(StyleBlock(512, 512, spatial))
        self.upsample1 = Upsample(512, 512 + 256, 256, variant="tpami")
        self.upsample2 = Upsample(256, 256 + 128, 128, variant="tpami")
        self.upsample3 = Upsample(128, 128 + 64, 64, variant="tpami")
        self.latlayer1 = nn.Conv2d(256, 512, 3, 1, 1)
        self.latlayer2 = nn.Conv2d(64, 512, 3, 1, 1)
        icm = icm_layer or TPAMIAgingModule
        self.aging1 = icm(512, age_group, repeat_num)
        self.aging2 = icm(256, age_group, repeat_num)
        self.aging3 = icm(128, age_group, repeat_num)

    def embed(self, x_id: torch.Tensor) -> torch.Tensor:
        """L2-normalized identity embedding (B, 512) from x_id."""
        return F.normalize(self.output_layer(x_id), dim=1)

    def encode(self, x: torch.Tensor):
        """As the official ``Encoder.encode``: (x_id, x_vec, x_age, c1, c2, c3)."""
        _, c1, c2, c3, x5 = self.trunk(x)
        x_id, x_age = self.fsm(x5)
        return x_id, self.embed(x_id), x_age, c1, c2, c3

    def unconditioned_latents(self, x_id: torch.Tensor) -> torch.Tensor:
        """Latents 0..2 (B, 3, 512): they depend on x_id only, not on the target age."""
        return torch.stack([self.styles[j](x_id) for j in range(N_COARSE)], dim=1)

    def conditioned_latents(self, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor, x_id: torch.Tensor,
                            conditions: torch.Tensor) -> torch.Tensor:
        """Latents 3.. (B, n_styles - 3, 512) for target groups ``conditions`` (B,)."""
        latents = []
        p3 = self.upsample1(self.aging1(x_id, conditions), c3)
        lat = self.latlayer1(p3)
        latents += [self.styles[j](lat) for j in range(N_COARSE, N_MIDDLE)]
        p4 = self.upsample2(self.aging2(p3, conditions), c2)
        p4 = self.upsample3(self.aging3(p4, conditions), c1)
        lat = self.latlayer2(p4)
        latents += [self.styles[j](lat) for j in range(N_MIDDLE, self.n_styles)]
        return torch.stack(latents, dim=1)

    def get_conditions(self, c1, c2, c3, x_id, conditions) -> torch.Tensor:
        """All W+ latents (B, n_styles, 512), as the official ``Encoder.get_conditions``."""
        return torch.cat([self.unconditioned_latents(x_id),
                          self.conditioned_latents(c1, c2, c3, x_id, conditions)], dim=1)


class TPAMIDecoder(nn.Module):
    """``latent_avg`` + StyleGAN2 generator at 2**ceil(log2(input_size)) px, resized to ``input_size``."""

    def __init__(self, input_size: int = 112, *, generator_kwargs: Optional[Dict[str, Any]] = None):
        super().__init__()
        self.input_size = input_size
        self.decoder = Generator(2 ** math.ceil(math.log2(input_size)), style_dim=512, n_mlp=8,
                                 **(generator_kwargs or {}))
        self.register_buffer("latent_avg", torch.zeros(1, 1, 512))

    def forward(self, codes: torch.Tensor, noise=None) -> torch.Tensor:
        """W+ codes (B, n, 512) -> images (B, 3, input_size, input_size), not clamped (as official)."""
        images = self.decoder(codes + self.latent_avg, noise=noise)
        return F.interpolate(images, size=self.input_size, mode="bilinear", align_corners=True)


class TPAMI(Architecture):
    """``MTLFace(arch="tpami")``, the authors' release. Layer arguments: ``attention_layer`` (the AFD),
    ``block_layer`` (trunk units), ``icm_layer`` (the ICMs, ``cls(in_channels, age_group, repeat_num)``),
    ``styled_conv_layer`` and ``to_rgb_layer`` (the StyleGAN2 layers)."""

    name = "tpami"
    recognition = "encoder"
    estimator = "age_estimator"
    default_flip = True
    normalized_embedding = True
    layer_names = ("attention_layer", "block_layer", "icm_layer", "styled_conv_layer", "to_rgb_layer")
    noise = True

    @classmethod
    def configure(cls, backbone: str, input_size: int, age_group: int, afd: Optional[str],
                  sigma: Optional[float]) -> Dict[str, Any]:
        if afd not in (None, "tpami"):
            raise ValueError(f"the tpami architecture has the 'tpami' AFD (leave afd unset), got afd={afd!r}")
        if sigma is not None and sigma != TPAMI_SIGMA:
            raise ValueError(f"the tpami architecture fixes sigma at 1/8 (leave sigma unset), got sigma={sigma!r}")
        return dict(arch=cls.name, backbone=check_backbone(backbone), input_size=check_input_size(input_size),
                    age_group=check_age_group(age_group), afd="tpami", sigma=TPAMI_SIGMA)

    @classmethod
    def build(cls, model, config: Dict[str, Any], layers: Dict[str, Any]) -> None:
        cls.check_layers(layers)
        size, groups = config["input_size"], config["age_group"]
        gen_layers = {k: layers[k] for k in ("styled_conv_layer", "to_rgb_layer") if layers.get(k) is not None}
        # Registration order = the release's key order: decoder, encoder, age_estimator.
        model.decoder = TPAMIDecoder(size, generator_kwargs=gen_layers)
        model.encoder = TPAMIEncoder(size, groups, config["backbone"], attention_layer=layers.get("attention_layer"),
                                     block_layer=layers.get("block_layer"), icm_layer=layers.get("icm_layer"))
        model.age_estimator = AgeEstimationModule(size, groups, expectation_buffer=True)

    @classmethod
    def embed(cls, model, x_id: torch.Tensor) -> torch.Tensor:
        return model.encoder.embed(x_id)

    @classmethod
    def synthesis_context(cls, model, f: Features) -> torch.Tensor:
        return model.encoder.unconditioned_latents(f.x_id)  # latents 0..2 do not depend on the target age

    @classmethod
    def render(cls, model, images: torch.Tensor, f: Features, context: torch.Tensor, groups: torch.Tensor,
               repeats: int, noise, generator: Optional[torch.Generator]) -> torch.Tensor:
        def rep(t):
            return repeat_rows(t, repeats)

        with nvtx_range("icm"):
            cond = model.encoder.conditioned_latents(rep(f.x_2), rep(f.x_3), rep(f.x_4), rep(f.x_id), groups)
        latents = torch.cat([rep(context), cond], dim=1)
        batch = f.x_id.size(0)
        if isinstance(noise, str) and noise == "random" and generator is not None:
            # One draw per repeat (target group), in order, rows b * repeats + r: the reference's draws.
            draws = [cls.make_noise(model, batch, noise, generator) for _ in range(repeats)]
            layer_noise = [torch.stack(maps, dim=1).flatten(0, 1) for maps in zip(*draws)]
        else:  # stored maps (broadcast), explicit maps (repeated), or global-RNG draws inside the layers (None)
            layer_noise = [t if t is None or t.size(0) == 1 else rep(t)
                           for t in cls.make_noise(model, batch, noise, generator)]
        with nvtx_range("decoder"):
            return model.decoder(latents, noise=layer_noise).clamp(-1.0, 1.0)

    @classmethod
    def make_noise(cls, model, batch: int, noise: Union[str, Sequence[torch.Tensor]] = "stored",
                   generator: Optional[torch.Generator] = None) -> List[Optional[torch.Tensor]]:
        """Per-layer generator noise for ``batch`` samples; see :meth:`MTLFace.make_noise`."""
        gen = model.decoder.decoder
        check_generator(generator)
        if isinstance(noise, str):
            if noise not in NOISE_MODES:
                raise ValueError(f"noise must be one of {NOISE_MODES} or a list of tensors, got {noise!r}")
            if noise == "stored":
                if generator is not None:
                    raise ValueError("generator= is only used with noise='random'")
                return gen.stored_noise()
            if generator is None:
                return [None] * gen.num_layers
            dev = gen.input.input.device
            dtype = gen.input.input.dtype
            return [torch.randn(s, generator=generator, device=generator.device).to(dev, dtype)
                    for s in gen.noise_shapes(batch)]
        return check_noise_maps(noise, gen.noise_shapes(batch), gen.input.input.device)
