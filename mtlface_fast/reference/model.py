"""The reference MTLFace: one model class for every architecture, plain eager PyTorch, the oracle.

:class:`MTLFace` owns what every MTLFace does: input checks, the ``dtype=`` precision switch, NVTX ranges,
flip test-time augmentation, the grouped synthesize-all-ages loop, and save/load. What differs between the
architectures lives in one module each (:mod:`.cvpr`, :mod:`.tpami`): the modules they build (and so the
state-dict keys of their releases: ``backbone.``/``estimation_network.``/``generator.`` for the CVPR code,
``decoder.``/``encoder.``/``age_estimator.`` for the authors' TPAMI release), how the embedding is taken,
and how one rendering pass runs. ``MTLFace(arch="tpami")`` is an ``MTLFace`` like any other.
The CosFace head and the patch discriminator are training-only and live outside this module.
"""
from __future__ import annotations

import json
import os
import warnings
from typing import Any, Dict, Optional, Sequence, Type, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import atomic_write, load_safetensors, load_state_dict_strict, load_state_file
from ..errors import CheckpointError
from ..nvtx import nvtx_range
from ..precision import autocast
from ..validation import check_images, check_target_group
from .backbone import BACKBONE_UNITS
from .common import Architecture, EncodeResult, Features
from .cvpr import CVPR
from .icm import router_windows
from .tpami import TPAMI

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_NAME = "mtlface_fast"
ARCHITECTURES: Dict[str, Type[Architecture]] = {a.name: a for a in (CVPR, TPAMI)}
ARCHS = tuple(ARCHITECTURES)
TPAMI_PREFIXES = ("encoder.", "decoder.", "age_estimator.")

__all__ = ["ARCHITECTURES", "ARCHS", "EncodeResult", "Features", "MTLFace"]


def get_architecture(arch: str) -> Type[Architecture]:
    """The :class:`~.common.Architecture` named ``arch``, else a ValueError listing the names."""
    if not isinstance(arch, str) or arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    return ARCHITECTURES[arch]


def check_channels_last(channels_last) -> Optional[bool]:
    if channels_last is not None and not isinstance(channels_last, bool):
        raise ValueError(f"channels_last must be True, False or None (CUDA only), got {channels_last!r}")
    return channels_last


def check_groups_per_call(groups_per_call: Optional[int]) -> Optional[int]:
    if groups_per_call is not None and (isinstance(groups_per_call, bool) or not isinstance(groups_per_call, int)
                                        or groups_per_call < 1):
        raise ValueError(f"groups_per_call must be a positive int, got {groups_per_call!r}")
    return groups_per_call


def check_flip(flip) -> bool:
    if not isinstance(flip, bool):
        raise TypeError(f"flip must be True or False, got {flip!r}")
    return flip


class MTLFace(nn.Module):
    """MTLFace: age-invariant face recognition + face age synthesis, for every architecture.

    Args:
        backbone: ``ir34``, ``ir50`` (default), ``ir64``, ``ir101`` or ``irse101``.
        input_size: square input side in pixels, a multiple of 16 (112 in every official model).
        age_group: number of age groups, 4..8 (official 7).
        afd: AFD variant; ``"cvpr"`` (default) or ``"tpami"`` for the CVPR architecture; fixed for TPAMI.
        sigma: fraction of an age group's ICM channels shared with the next group, in (0, 1] (CVPR
            architecture; official code 0.1, the paper's default 1/8); fixed at 1/8 for TPAMI.
        arch: ``"cvpr"`` (the CVPR 2021 code) or ``"tpami"`` (the authors' TPAMI 2022 release).
        channels_last: run the convolutions in channels_last (True), NCHW (False, the reference's default),
            or channels_last on CUDA tensors only (None).
        **layers: layer classes the architecture builds with (fast implementations inject theirs; the state
            dict is unchanged): see :class:`~.cvpr.CVPR` and :class:`~.tpami.TPAMI`.

    What both architectures share is here; ``self.architecture`` (:mod:`.cvpr`, :mod:`.tpami`) says how they
    differ. ``backbone`` is the recognition network (trunk, ``fsm``, ``output_layer``) and
    ``estimation_network`` the age head, whatever their state-dict names.
    """

    #: eval-mode flip TTA runs both views as one batch of 2B (one trunk pass); the reference runs two passes.
    flip_in_one_batch: bool = False

    def __init__(self, backbone: str = "ir50", input_size: int = 112, age_group: int = 7,
                 afd: Optional[str] = None, sigma: Optional[float] = None, *, arch: str = "cvpr",
                 channels_last: Optional[bool] = False, **layers):
        super().__init__()
        architecture = get_architecture(arch)
        self.config: Dict[str, Any] = architecture.configure(backbone, input_size, age_group, afd, sigma)
        self.channels_last = check_channels_last(channels_last)
        architecture.build(self, self.config, {k: v for k, v in layers.items() if v is not None})

    # -- what the architecture decides ---------------------------------------------------------------
    @property
    def architecture(self) -> Type[Architecture]:
        return ARCHITECTURES[self.config["arch"]]

    @property
    def input_size(self) -> int:
        return self.config["input_size"]

    @property
    def age_group(self) -> int:
        return self.config["age_group"]

    @property
    def backbone(self) -> nn.Module:
        """The recognition network (``trunk``, ``fsm``, ``output_layer``): ``backbone`` (CVPR), ``encoder`` (TPAMI)."""
        return self._modules[self.architecture.recognition]

    @property
    def estimation_network(self) -> nn.Module:
        """The age head: ``estimation_network`` (CVPR), ``age_estimator`` (TPAMI)."""
        return self._modules[self.architecture.estimator]

    # -- shared plumbing -----------------------------------------------------------------------------
    def check_images(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` checked against the model: (B, 3, S, S), floating, on the model's device and dtype."""
        p = next(self.parameters())
        return check_images(images, input_size=self.input_size, device=p.device, dtype=p.dtype, module=self)

    def precision(self, images, dtype=None):
        """The context a public call runs under for its ``dtype=`` argument: autocast to bf16/fp16 (a torch
        dtype or ``"bf16"``/``"fp16"``), nothing for None or fp32 (fp32 weights stay fp32)."""
        device = images.device if isinstance(images, torch.Tensor) else next(self.parameters()).device
        return autocast(device, dtype)

    def _layout(self, images: torch.Tensor) -> torch.Tensor:
        channels_last = images.is_cuda if self.channels_last is None else self.channels_last
        return images.contiguous(memory_format=torch.channels_last) if channels_last else images

    def _features(self, images: torch.Tensor) -> Features:
        net = self.backbone
        with nvtx_range("backbone"):
            x_1, x_2, x_3, x_4, x_5 = net.trunk(self._layout(images))
        with nvtx_range("afd"):
            x_id, x_age = net.fsm(x_5)
        # The heads flatten x_id / x_age (and dropout draws its mask in memory order): NCHW for them.
        return Features(x_1, x_2, x_3, x_4, x_5, x_id.contiguous(), x_age.contiguous())

    def _heads(self, f: Features):
        with nvtx_range("heads"):
            embedding = self.architecture.embed(self, f.x_id)
            age_logits, group_logits = self.estimation_network(f.x_age)
        return embedding, age_logits, group_logits

    def _check_noise(self, noise, generator) -> None:
        if not self.architecture.noise and not (isinstance(noise, str) and noise == "stored" and generator is None):
            raise ValueError(f"the {self.config['arch']} architecture renders without generator noise: "
                             f"noise= and generator= do not apply")

    # -- recognition ---------------------------------------------------------------------------------
    def features(self, images: torch.Tensor) -> Features:
        """Trunk + AFD: the seven tensors of the official ``return_shortcuts`` forward."""
        return self._features(self.check_images(images))

    def forward(self, images: torch.Tensor, *, dtype=None) -> torch.Tensor:
        """(B, 3, H, W) normalized images -> (B, 512) identity embedding (one pass, no flip; TPAMI:
        L2-normalized, CVPR: not normalized, as the official forwards)."""
        with self.precision(images, dtype):
            f = self.features(images)
            with nvtx_range("heads"):
                return self.architecture.embed(self, f.x_id)

    def encode(self, images: torch.Tensor, flip: Optional[bool] = None, *, dtype=None) -> EncodeResult:
        """Identity embedding, expected age and group logits (and the decomposed features).

        Args:
            images: (B, 3, S, S) normalized images.
            flip: horizontal-flip test-time augmentation: the image and its mirror are both encoded;
                embedding = normalize(normalize(v) + normalize(v_flipped)), age and group logits their means;
                ``x_id``, ``x_age`` and ``age_logits`` are the unflipped image's. Default: the architecture's
                (TPAMI: on, as the release's ``encode``; CVPR: off).
            dtype: run under autocast to bf16/fp16 (None/fp32: the model's dtype).
        """
        flip = self.architecture.default_flip if flip is None else check_flip(flip)
        with self.precision(images, dtype):
            images = self.check_images(images)
            B = images.size(0)
            if flip and self.flip_in_one_batch and not self.training:
                f = self._features(torch.cat([images, torch.flip(images, dims=(3,))], dim=0))
                emb, age_logits, group_logits = self._heads(f)
                age = self.estimation_network.expected_age(age_logits)
                return self._flip_result(emb[:B], emb[B:], age[:B], age[B:], group_logits[:B], group_logits[B:],
                                         f.x_id[:B], f.x_age[:B], age_logits[:B])
            f = self._features(images)
            emb, age_logits, group_logits = self._heads(f)
            age = self.estimation_network.expected_age(age_logits)
            if not flip:
                return EncodeResult(emb, age, group_logits, f.x_id, f.x_age, age_logits)
            f2 = self._features(torch.flip(images, dims=(3,)))
            emb2, age_logits2, group_logits2 = self._heads(f2)
            age2 = self.estimation_network.expected_age(age_logits2)
            return self._flip_result(emb, emb2, age, age2, group_logits, group_logits2, f.x_id, f.x_age, age_logits)

    def _flip_result(self, emb, emb2, age, age2, group_logits, group_logits2, x_id, x_age, age_logits):
        if not self.architecture.normalized_embedding:
            emb, emb2 = F.normalize(emb, dim=1), F.normalize(emb2, dim=1)
        return EncodeResult(F.normalize(emb + emb2, dim=1), (age + age2) * 0.5, (group_logits + group_logits2) * 0.5,
                            x_id, x_age, age_logits)

    # -- synthesis -----------------------------------------------------------------------------------
    def _generate(self, images: torch.Tensor, f: Features, groups: torch.Tensor) -> torch.Tensor:
        """One rendering pass from computed features (training recipes): images (B, 3, S, S) at ``groups`` (B,),
        with the architecture's default noise."""
        arch = self.architecture
        return arch.render(self, images, f, arch.synthesis_context(self, f), groups, 1, "stored", None)

    def make_noise(self, batch: int, noise: Union[str, Sequence[torch.Tensor]] = "stored",
                   generator: Optional[torch.Generator] = None):
        """Per-layer generator noise for ``batch`` samples (architectures with a noisy generator: TPAMI).

        ``"stored"``: the checkpoint's fixed maps (deterministic, broadcast over the batch); ``"random"``:
        fresh N(0, 1) maps per sample, drawn from ``generator`` when given (reproducible), else from the global
        RNG inside the layers (the official behaviour); or an explicit list, one map per layer.
        """
        if not self.architecture.noise:
            raise ValueError(f"the {self.config['arch']} architecture renders without generator noise")
        return self.architecture.make_noise(self, batch, noise, generator)

    def synthesize(self, images: torch.Tensor, target_group, *, noise: Union[str, Sequence[torch.Tensor]] = "stored",
                   generator: Optional[torch.Generator] = None, dtype=None) -> torch.Tensor:
        """Re-render each face at ``target_group`` (int, or integer tensor (B,)): (B, 3, H, W).

        ``noise``/``generator``: the generator noise of architectures that have one (TPAMI; see
        :meth:`make_noise`); the CVPR generator is deterministic. ``dtype``: as in :meth:`encode`.
        """
        with self.precision(images, dtype):
            images = self.check_images(images)
            f = self._features(images)
            groups = check_target_group(target_group, batch=images.size(0), age_group=self.age_group,
                                        device=images.device)
            self._check_noise(noise, generator)
            arch = self.architecture
            return arch.render(self, images, f, arch.synthesis_context(self, f), groups, 1, noise, generator)

    def synthesize_all_ages(self, images: torch.Tensor, *, noise: Union[str, Sequence[torch.Tensor]] = "stored",
                            generator: Optional[torch.Generator] = None, dtype=None,
                            groups_per_call: Optional[int] = None) -> torch.Tensor:
        """Every age group for every face, encoder and shared synthesis work run once: (B, G, 3, H, W).

        ``groups_per_call`` groups render as one batch (default: all of them on CUDA in eval mode, where one
        B*G batch keeps the GPU busy; one at a time otherwise: B*G-sized activations of the 112 px decoder
        thrash CPU caches, and training-mode normalization must see each group's batch alone). With
        ``noise="random"`` and a ``generator`` each group gets its own draw, in group order, whatever
        ``groups_per_call``.
        """
        groups_per_call = check_groups_per_call(groups_per_call)
        with self.precision(images, dtype):
            images = self.check_images(images)
            self._check_noise(noise, generator)
            B, G = images.size(0), self.age_group
            if groups_per_call is None:
                groups_per_call = G if images.is_cuda and not self.training else 1
            arch = self.architecture
            f = self._features(images)
            context = arch.synthesis_context(self, f)
            outs = []
            for g0 in range(0, G, groups_per_call):
                n = min(groups_per_call, G - g0)
                groups = torch.arange(g0, g0 + n, device=images.device).repeat(B)  # sample-major rows
                out = arch.render(self, images, f, context, groups, n, noise, generator)
                outs.append(out.view(B, n, *out.shape[1:]))
            return torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]

    # -- checkpoints ---------------------------------------------------------------------------------
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
