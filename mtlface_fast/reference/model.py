"""The reference MTLFace: backbone (trunk + AFD + embedding), age estimator and generator in one module.

State-dict keys are the official ones under ``backbone.``, ``estimation_network.`` and ``generator.``.
The CosFace head and the patch discriminator are training-only and live outside this module.
``MTLFace(arch="tpami")`` builds the TPAMI 2022 model instead (:mod:`.tpami`: keys ``decoder.``,
``encoder.``, ``age_estimator.`` of the authors' release), with the same public methods.
"""
from __future__ import annotations

import json
import os
import warnings
from typing import Any, Callable, Dict, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import atomic_write, load_safetensors, load_state_dict_strict, load_state_file
from ..errors import CheckpointError
from ..validation import check_images, check_target_group
from .afd import AttentionModule, check_afd_variant
from .backbone import BACKBONE_UNITS, AIResNet, check_backbone, check_input_size
from .heads import AgeEstimationModule, check_age_group, dex_age
from .icm import AgingModule, check_sigma, router_windows

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_NAME = "mtlface_fast"
ARCHS = ("cvpr", "tpami")
TPAMI_PREFIXES = ("encoder.", "decoder.", "age_estimator.")


class EncodeResult(NamedTuple):
    """What :meth:`MTLFace.encode` returns."""
    embedding: torch.Tensor      # (B, 512) identity embedding (not normalized, as the official forward)
    age: torch.Tensor            # (B,) DEX expected age in years, float32
    group_logits: torch.Tensor   # (B, G)
    x_id: torch.Tensor           # (B, 512, s, s) identity features
    x_age: torch.Tensor          # (B, 512, s, s) age features
    age_logits: torch.Tensor     # (B, 101)


class Features(NamedTuple):
    """Backbone outputs the generator needs (official ``return_shortcuts`` order)."""
    x_1: torch.Tensor
    x_2: torch.Tensor
    x_3: torch.Tensor
    x_4: torch.Tensor
    x_5: torch.Tensor
    x_id: torch.Tensor
    x_age: torch.Tensor


class MTLFace(nn.Module):
    """MTLFace (CVPR 2021): age-invariant face recognition + face age synthesis.

    Args:
        backbone: ``ir34``, ``ir50`` (default), ``ir64``, ``ir101`` or ``irse101``.
        input_size: square input side in pixels, a multiple of 16 (112 in every official model).
        age_group: number of age groups, 4..8 (official 7).
        afd: AFD variant, ``"cvpr"`` (default) or ``"tpami"``.
        sigma: fraction of an age group's ICM channels shared with the next group, in (0, 1]
            (official CVPR code: 0.1; the paper's default: 1/8).
        attention_layer, generator_layer, block_layer: module classes to build ``backbone.fsm``,
            ``generator`` and the backbone's residual units with (the fast model injects its fused layers
            here; the state dict is unchanged).
        arch: ``"cvpr"`` (this class) or ``"tpami"``: ``MTLFace(arch="tpami", backbone=..., input_size=...,
            age_group=..., **layers)`` returns the TPAMI model (:meth:`tpami_class`), which takes no
            ``afd``/``sigma`` (both are fixed by that architecture).
    """

    @classmethod
    def tpami_class(cls):
        """The class ``MTLFace(arch="tpami")`` builds (the fast model returns its own)."""
        from .tpami import TPAMIMTLFace
        return TPAMIMTLFace

    def __new__(cls, *args, arch: str = "cvpr", **kwargs):
        if arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
        if arch == "tpami":
            # Not an instance of cls, so Python does not call cls.__init__ on it afterwards.
            return cls.tpami_class()(*args, **kwargs)
        return super().__new__(cls)

    def __init__(self, backbone: str = "ir50", input_size: int = 112, age_group: int = 7, afd: str = "cvpr",
                 sigma: float = 0.1, *, arch: str = "cvpr", attention_layer: Optional[Callable[..., nn.Module]] = None,
                 generator_layer: Optional[Callable[..., nn.Module]] = None,
                 block_layer: Optional[Callable[..., nn.Module]] = None):
        super().__init__()
        check_backbone(backbone)
        input_size, age_group = check_input_size(input_size), check_age_group(age_group)
        check_afd_variant(afd)
        sigma = check_sigma(sigma)
        self.config: Dict[str, Any] = dict(arch="cvpr", backbone=backbone, input_size=input_size, age_group=age_group,
                                           afd=afd, sigma=float(sigma))
        self.backbone = AIResNet(input_size, backbone, afd, attention_layer=attention_layer or AttentionModule,
                                 block_layer=block_layer)
        self.estimation_network = AgeEstimationModule(input_size, age_group)
        self.generator = (generator_layer or AgingModule)(age_group, 4, sigma)

    # -- properties ------------------------------------------------------------------------------
    @property
    def input_size(self) -> int:
        return self.config["input_size"]

    @property
    def age_group(self) -> int:
        return self.config["age_group"]

    def _param(self) -> torch.Tensor:
        return next(self.parameters())

    def _check(self, images: torch.Tensor) -> torch.Tensor:
        p = self._param()
        return check_images(images, input_size=self.input_size, device=p.device, dtype=p.dtype, module=self)

    # -- recognition ---------------------------------------------------------------------------------
    def features(self, images: torch.Tensor) -> Features:
        """Trunk + AFD: the seven tensors of the official ``return_shortcuts`` forward."""
        images = self._check(images)
        x_1, x_2, x_3, x_4, x_5 = self.backbone.trunk(images)
        x_id, x_age = self.backbone.fsm(x_5)
        return Features(x_1, x_2, x_3, x_4, x_5, x_id, x_age)

    def encode(self, images: torch.Tensor) -> EncodeResult:
        """Identity embedding, expected age and group logits (and the decomposed features)."""
        f = self.features(images)
        embedding = self.backbone.output_layer(f.x_id)
        age_logits, group_logits = self.estimation_network(f.x_age)
        return EncodeResult(embedding, dex_age(age_logits), group_logits, f.x_id, f.x_age, age_logits)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalized images -> (B, 512) identity embedding."""
        f = self.features(images)
        return self.backbone.output_layer(f.x_id)

    # -- synthesis ----------------------------------------------------------------------------------
    def _generate(self, images: torch.Tensor, f: Features, groups: torch.Tensor) -> torch.Tensor:
        return self.generator(images, f.x_1, f.x_2, f.x_3, f.x_4, f.x_5, f.x_id, f.x_age, groups)

    def synthesize(self, images: torch.Tensor, target_group) -> torch.Tensor:
        """Re-render each face at ``target_group`` (int, or LongTensor (B,)): (B, 3, H, W)."""
        f = self.features(images)
        groups = check_target_group(target_group, batch=images.size(0), age_group=self.age_group,
                                    device=images.device)
        return self._generate(images, f, groups)

    def synthesize_all_ages(self, images: torch.Tensor) -> torch.Tensor:
        """Every age group for every face, encoder run once: (B, G, 3, H, W)."""
        f = self.features(images)
        outs = []
        for g in range(self.age_group):
            groups = torch.full((images.size(0),), g, dtype=torch.long, device=images.device)
            outs.append(self._generate(images, f, groups))
        return torch.stack(outs, dim=1)

    # -- checkpoints -------------------------------------------------------------------------------
    def save_pretrained(self, path: str) -> str:
        """Write ``config.json`` and ``model.safetensors`` into the folder ``path`` (atomically)."""
        return save_pretrained(self, path)

    @classmethod
    def from_pretrained(cls, path: str, map_location="cpu", **kwargs):
        """Load a folder written by :meth:`save_pretrained` (strict: every key must match, weights finite).

        Errors name the file and what is wrong with it (:class:`~mtlface_fast.errors.CheckpointError`).
        """
        path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"saved model folder not found: {path}")
        if not os.path.isdir(path):
            raise CheckpointError(f"{path} is a file; from_pretrained reads a folder written by save_pretrained "
                                  f"({CONFIG_FILE} + {WEIGHTS_FILE}); official checkpoint files load with "
                                  f"MTLFace.from_official")
        cfg_path, w_path = os.path.join(path, CONFIG_FILE), os.path.join(path, WEIGHTS_FILE)
        for p in (cfg_path, w_path):
            if not os.path.isfile(p):
                raise FileNotFoundError(f"not a saved MTLFace folder: {p} is missing")
        try:
            with open(cfg_path, encoding="utf-8") as fh:
                config = json.load(fh)
        except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
            raise CheckpointError(f"{cfg_path} is not valid JSON ({exc})") from None
        if not isinstance(config, dict):
            raise CheckpointError(f"{cfg_path} must hold a JSON object, got {type(config).__name__}")
        if config.pop("format", None) != FORMAT_NAME:
            raise CheckpointError(f"{cfg_path} was not written by save_pretrained (no format={FORMAT_NAME!r})")
        config.setdefault("arch", "cvpr")
        try:
            model = cls(**config, **kwargs)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{cfg_path} does not describe a model: {exc}") from None
        load_state_dict_strict(model, load_safetensors(w_path, "weights file", device=str(map_location)),
                               what=w_path)
        return model

    @classmethod
    def from_official(cls, backbone_ckpt, generator_ckpt=None, estimation_ckpt=None, *, sigma: Optional[float] = None,
                      **kwargs):
        """Load official weights: the TPAMI release file, or the CVPR training code's per-module checkpoints.

        The architecture is read from the file's keys: ``encoder.``/``decoder.``/``age_estimator.`` keys
        (the authors' ``mtlface_checkpoints.tar``) build ``MTLFace(arch="tpami")`` and load it strictly
        (the other checkpoint arguments must then be omitted); otherwise the file is a CVPR backbone.

        Args:
            backbone_ckpt: the TPAMI release file, or the ``backbone-{iter}`` file (or a state dict);
                ``module.`` prefixes are stripped. Backbone variant, AFD variant and input size are read
                from its keys and shapes.
            generator_ckpt: the ``generator-{iter}`` file, optional (else the generator keeps its init).
            estimation_ckpt: the ``estimation_network-{iter}`` file, optional.
            sigma: the ICM overlap; read from the generator's router windows when omitted.
        """
        bb = load_state_file(backbone_ckpt, "backbone checkpoint")
        if any(k.startswith(TPAMI_PREFIXES) for k in bb):
            if generator_ckpt is not None or estimation_ckpt is not None or sigma is not None:
                raise ValueError("the TPAMI release checkpoint holds the whole model: do not pass generator_ckpt, "
                                 "estimation_ckpt or sigma with it")
            what = backbone_ckpt if isinstance(backbone_ckpt, (str, os.PathLike)) else "TPAMI checkpoint"
            try:
                config = infer_tpami_config(bb)
            except ValueError as exc:
                raise CheckpointError(f"{os.fspath(what)}: {exc}") from None
            config.update(kwargs.pop("config", {}))
            model = cls(arch="tpami", **config, **kwargs)
            load_state_dict_strict(model, bb, what=str(what))
            return model
        try:
            config = infer_backbone_config(bb)
        except ValueError as exc:
            raise CheckpointError(f"{_label(backbone_ckpt, 'backbone checkpoint')}: {exc}") from None
        gen = load_state_file(generator_ckpt, "generator checkpoint") if generator_ckpt is not None else None
        est = load_state_file(estimation_ckpt, "estimation checkpoint") if estimation_ckpt is not None else None
        age_group, found_sigma = 7, 0.1
        if gen is not None:
            try:
                age_group, found_sigma = infer_router_config(gen)
            except ValueError as exc:
                raise CheckpointError(f"{_label(generator_ckpt, 'generator checkpoint')}: {exc}") from None
        elif est is not None and "group_output_layer.weight" in est:
            age_group = est["group_output_layer.weight"].shape[0]
        if sigma is None:
            sigma = found_sigma
        config.update(age_group=age_group, sigma=sigma)
        config.update(kwargs.pop("config", {}))
        model = cls(**config, **kwargs)
        load_state_dict_strict(model.backbone, bb, what=_label(backbone_ckpt, "backbone checkpoint"))
        if gen is not None:
            load_state_dict_strict(model.generator, gen, what=_label(generator_ckpt, "generator checkpoint"))
        else:
            warnings.warn("from_official: no generator checkpoint given; synthesize() uses untrained weights")
        if est is not None:
            load_state_dict_strict(model.estimation_network, est, what=_label(estimation_ckpt, "estimation checkpoint"))
        else:
            warnings.warn("from_official: no estimation checkpoint given; ages come from untrained weights")
        return model


def _label(ckpt, what: str) -> str:
    """How an error names a checkpoint argument: ``what`` and the path (a state dict has none)."""
    return f"{what} {os.fspath(ckpt)}" if isinstance(ckpt, (str, os.PathLike)) else what


def save_pretrained(model: nn.Module, path: str) -> str:
    """Write ``model.config`` (with the format tag) and the state dict into the folder ``path`` (atomically)."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    config = dict(format=FORMAT_NAME, **model.config)
    atomic_write(os.path.join(path, WEIGHTS_FILE), lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    atomic_write(os.path.join(path, CONFIG_FILE),
                 lambda tmp: open(tmp, "w").write(json.dumps(config, indent=2, sort_keys=True) + "\n"))
    return path


def infer_tpami_config(state: Dict[str, torch.Tensor]) -> Dict[str, Any]:
    """Backbone, input size and age groups of a TPAMI release-layout state dict (keys under ``encoder.``)."""
    enc = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    if "output_layer.3.weight" not in enc or "age_estimator.group_output_layer.weight" not in state:
        raise ValueError("not a TPAMI MTLFace checkpoint: encoder.output_layer.3.weight or "
                         "age_estimator.group_output_layer.weight is missing")
    config = infer_backbone_config(enc)
    if config["afd"] != "tpami":
        raise ValueError(f"TPAMI checkpoint with a {config['afd']} AFD layout (encoder.fsm.channel.0.weight)")
    return dict(backbone=config["backbone"], input_size=config["input_size"],
                age_group=int(state["age_estimator.group_output_layer.weight"].shape[0]))


def infer_backbone_config(state: Dict[str, torch.Tensor]) -> Dict[str, Any]:
    """Backbone name, AFD variant and input size from an official backbone state dict."""
    if "input_layer.0.weight" not in state or "fsm.channel.0.weight" not in state:
        raise ValueError("not an MTLFace backbone checkpoint: input_layer.0.weight / fsm.channel.0.weight missing")
    units = []
    for k in range(1, 5):
        idx = {int(key.split(".")[1]) for key in state if key.startswith(f"block{k}.")}
        units.append(max(idx) + 1 if idx else 0)
    se = any(".res_layer.6." in key for key in state)
    name = next((n for n, (u, mode) in BACKBONE_UNITS.items() if tuple(units) == u and (mode == "ir_se") == se), None)
    if name is None:
        raise ValueError(f"unknown backbone layout: units per stage {units}, SE={se}")
    pooled = state["fsm.channel.0.weight"].shape[1]
    afd = {512 * 14: "cvpr", 512 * 28: "tpami"}.get(pooled)
    if afd is None:
        raise ValueError(f"unknown AFD variant: fsm.channel.0.weight has {pooled} input channels")
    side2 = state["output_layer.3.weight"].shape[1] // 512
    side = int(round(side2 ** 0.5))
    return dict(backbone=name, afd=afd, input_size=side * 16)


def infer_router_config(state: Dict[str, torch.Tensor], prefix: str = "router._unit_mapping"):
    """(age_group, sigma) that reproduce a generator's router windows exactly."""
    if prefix not in state:
        raise ValueError(f"not an MTLFace generator checkpoint: {prefix} missing")
    mapping = state[prefix]
    groups, conv_dim = mapping.shape
    unit = int(mapping[0].sum().item())
    if groups == 1:
        return groups, 0.1
    step = int(mapping[1].nonzero()[0].item())
    for cand in (0.1, 1 / 8, 1 - step / unit, 1 - (step + 0.5) / unit):
        if not 0 < cand <= 1:
            continue
        dim, starts = router_windows(unit, groups, cand)
        expect = torch.zeros(groups, dim)
        for g, s in enumerate(starts):
            expect[g, s:s + unit] = 1
        if dim == conv_dim and torch.equal(expect, mapping.float().cpu()):
            return groups, cand
    raise ValueError(f"could not find a sigma that reproduces the router windows of {prefix} {tuple(mapping.shape)}")
