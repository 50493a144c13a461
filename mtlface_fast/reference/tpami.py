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

from ..validation import check_generator, check_images, check_noise_maps, check_target_group
from .afd import AttentionModule
from .backbone import AIResNet, check_backbone, check_input_size
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


class TPAMIMTLFace(nn.Module):
    """MTLFace (TPAMI 2022): recognition, age estimation and StyleGAN2-based age synthesis.

    Built by ``MTLFace(arch="tpami")`` (or :meth:`MTLFace.from_official` on the release file).

    Args:
        backbone: trunk variant (``ir50`` in the release).
        input_size: square input side, a multiple of 16 (112 in the release).
        age_group: number of age groups (7 in the release).
        attention_layer, block_layer, icm_layer: layer classes for the encoder (see :class:`TPAMIEncoder`).
        generator_kwargs: extra keyword arguments of the StyleGAN2 :class:`Generator` (layer classes).
    """

    arch = "tpami"

    def __init__(self, backbone: str = "ir50", input_size: int = 112, age_group: int = 7, *,
                 attention_layer: Optional[Callable[..., nn.Module]] = None,
                 block_layer: Optional[Callable[..., nn.Module]] = None,
                 icm_layer: Optional[Callable[..., nn.Module]] = None,
                 generator_kwargs: Optional[Dict[str, Any]] = None):
        super().__init__()
        check_backbone(backbone)
        input_size, age_group = check_input_size(input_size), check_age_group(age_group)
        self.config: Dict[str, Any] = dict(arch="tpami", backbone=backbone, input_size=input_size,
                                           age_group=age_group)
        # Registration order = the release's key order: decoder, encoder, age_estimator.
        self.decoder = TPAMIDecoder(input_size, generator_kwargs=generator_kwargs)
        self.encoder = TPAMIEncoder(input_size, age_group, backbone, attention_layer=attention_layer,
                                    block_layer=block_layer, icm_layer=icm_layer)
        self.age_estimator = AgeEstimationModule(input_size, age_group, expectation_buffer=True)

    # -- properties ------------------------------------------------------------------------------
    @property
    def input_size(self) -> int:
        return self.config["input_size"]

    @property
    def age_group(self) -> int:
        return self.config["age_group"]

    @property
    def backbone(self) -> nn.Module:
        """The recognition network (trunk, ``fsm``, ``output_layer``), named as in the CVPR model."""
        return self.encoder

    @property
    def estimation_network(self) -> nn.Module:
        """The age estimator, named as in the CVPR model."""
        return self.age_estimator

    def _check(self, images: torch.Tensor) -> torch.Tensor:
        p = next(self.parameters())
        return check_images(images, input_size=self.input_size, device=p.device, dtype=p.dtype, module=self)

    def save_pretrained(self, path: str) -> str:
        """Write ``config.json`` and ``model.safetensors`` into ``path``; ``MTLFace.from_pretrained`` reads it."""
        from .model import save_pretrained
        return save_pretrained(self, path)

    # -- recognition ---------------------------------------------------------------------------------
    def features(self, images: torch.Tensor):
        """Trunk + AFD: (x_1, x_2, x_3, x_4, x_5, x_id, x_age) as :class:`Features` (c1 = x_2, c2 = x_3, c3 = x_4)."""
        from .model import Features
        images = self._check(images)
        x_1, x_2, x_3, x_4, x_5 = self.encoder.trunk(images)
        x_id, x_age = self.encoder.fsm(x_5)
        return Features(x_1, x_2, x_3, x_4, x_5, x_id, x_age)

    def expected_age(self, age_logits: torch.Tensor) -> torch.Tensor:
        """DEX expected age with the ``expectation`` buffer, (B, 101) -> (B,)."""
        acc = torch.promote_types(age_logits.dtype, torch.float32)  # fp32 for low precision, fp64 stays fp64
        return (F.softmax(age_logits.to(acc), dim=1) * self.age_estimator.expectation.to(acc)[None, :]).sum(dim=1)

    def _single(self, images: torch.Tensor):
        f = self.features(images)
        embedding = self.encoder.embed(f.x_id)
        age_logits, group_logits = self.age_estimator(f.x_age)
        return f, embedding, age_logits, group_logits

    def encode(self, images: torch.Tensor, flip: bool = True):
        """Normalized identity embedding and expected age, as the official ``MTLFace.encode``.

        With ``flip`` (default, as official) the image and its mirror are both encoded: embedding =
        normalize(v + v_flipped), age and group logits = the means. ``x_id``, ``x_age`` and
        ``age_logits`` of the result are those of the unflipped image.
        """
        from .model import EncodeResult
        f, vec, age_logits, group_logits = self._single(images)
        age = self.expected_age(age_logits)
        if flip:
            _, vec2, age_logits2, group_logits2 = self._single(torch.flip(images, dims=(3,)))
            vec = F.normalize(vec + vec2, dim=1)
            age = (age + self.expected_age(age_logits2)) * 0.5
            group_logits = (group_logits + group_logits2) * 0.5
        return EncodeResult(vec, age, group_logits, f.x_id, f.x_age, age_logits)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalized images -> (B, 512) L2-normalized embedding (single pass, no flip)."""
        return self.encoder.embed(self.features(images).x_id)

    # -- synthesis ----------------------------------------------------------------------------------
    def make_noise(self, batch: int, noise: Union[str, Sequence[torch.Tensor]] = "stored",
                   generator: Optional[torch.Generator] = None) -> List[Optional[torch.Tensor]]:
        """Per-layer generator noise for ``batch`` samples.

        ``"stored"``: the checkpoint's fixed maps (deterministic, broadcast over the batch);
        ``"random"``: fresh N(0, 1) maps per sample, drawn from ``generator`` when given (reproducible),
        else from the global RNG inside the layers (the official behaviour); or an explicit list.
        """
        gen = self.decoder.decoder
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

    def _latents_to_images(self, latents: torch.Tensor, noise) -> torch.Tensor:
        return self.decoder(latents, noise=noise).clamp(-1.0, 1.0)

    def synthesize(self, images: torch.Tensor, target_group, *, noise: Union[str, Sequence[torch.Tensor]] = "stored",
                   generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Re-render each face at ``target_group`` (int, or LongTensor (B,)): (B, 3, H, W) in [-1, 1]."""
        f = self.features(images)
        groups = check_target_group(target_group, batch=images.size(0), age_group=self.age_group,
                                    device=images.device)
        latents = self.encoder.get_conditions(f.x_2, f.x_3, f.x_4, f.x_id, groups)
        return self._latents_to_images(latents, self.make_noise(images.size(0), noise, generator))

    def synthesize_all_ages(self, images: torch.Tensor, *, noise: Union[str, Sequence[torch.Tensor]] = "stored",
                            generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Every age group for every face: (B, G, 3, H, W). Encoder and unconditioned latents run once.

        With ``noise="random"`` each group gets its own draw, in group order.
        """
        f = self.features(images)
        B = images.size(0)
        base = self.encoder.unconditioned_latents(f.x_id)
        outs = []
        for g in range(self.age_group):
            groups = torch.full((B,), g, dtype=torch.long, device=images.device)
            cond = self.encoder.conditioned_latents(f.x_2, f.x_3, f.x_4, f.x_id, groups)
            latents = torch.cat([base, cond], dim=1)
            outs.append(self._latents_to_images(latents, self.make_noise(B, noise, generator)))
        return torch.stack(outs, dim=1)
