"""What the architectures share with the model class: its outputs and the interface an architecture fills in.

:class:`~mtlface_fast.reference.model.MTLFace` owns everything every MTLFace does (input checks, precision,
NVTX ranges, flip test-time augmentation, the grouped synthesize-all loop, save/load). An architecture
(:mod:`.cvpr`, :mod:`.tpami`) is an :class:`Architecture`: it builds the model's modules (which fixes the
state-dict keys of its release) and says how three things are computed from them: the identity embedding,
the per-image synthesis context and one rendering pass. Architectures hold no state; the model stores its
architecture's name in ``model.config["arch"]``.
"""
from __future__ import annotations

from typing import Any, Dict, NamedTuple, Optional, Sequence

import torch
from torch import nn


class EncodeResult(NamedTuple):
    """What :meth:`MTLFace.encode` returns."""
    embedding: torch.Tensor      # (B, 512) identity embedding (CVPR: not normalized, as the official forward)
    age: torch.Tensor            # (B,) DEX expected age in years (float32; float64 for a float64 model)
    group_logits: torch.Tensor   # (B, G)
    x_id: torch.Tensor           # (B, 512, s, s) identity features
    x_age: torch.Tensor          # (B, 512, s, s) age features
    age_logits: torch.Tensor     # (B, 101)


class Features(NamedTuple):
    """Trunk and AFD outputs (the official ``return_shortcuts`` order)."""
    x_1: torch.Tensor
    x_2: torch.Tensor
    x_3: torch.Tensor
    x_4: torch.Tensor
    x_5: torch.Tensor
    x_id: torch.Tensor
    x_age: torch.Tensor


class Architecture:
    """How one MTLFace architecture differs from the others (class attributes and class methods only).

    Attributes:
        name: the ``arch`` argument that selects it.
        recognition: name of the child module with ``trunk``, ``fsm`` and ``output_layer`` (the recognition
            network); the model's ``backbone`` property returns it.
        estimator: name of the child with the age head (``AgeEstimationModule``); ``estimation_network``.
        default_flip: whether :meth:`MTLFace.encode` uses flip test-time augmentation by default (as the
            release's ``encode`` does).
        normalized_embedding: whether :meth:`embed` returns L2-normalized embeddings.
        layer_names: the layer-class keywords :meth:`build` accepts (fast implementations inject theirs).
        noise: whether synthesis draws generator noise (the ``noise=``/``generator=`` arguments).
    """

    name: str = ""
    recognition: str = ""
    estimator: str = ""
    default_flip: bool = False
    normalized_embedding: bool = False
    layer_names: Sequence[str] = ()
    noise: bool = False

    @classmethod
    def configure(cls, backbone: str, input_size: int, age_group: int, afd: Optional[str],
                  sigma: Optional[float]) -> Dict[str, Any]:
        """The checked, complete configuration (``model.config``) for these arguments."""
        raise NotImplementedError

    @classmethod
    def build(cls, model: nn.Module, config: Dict[str, Any], layers: Dict[str, Any]) -> None:
        """Register the architecture's modules on ``model`` (in the release's key order)."""
        raise NotImplementedError

    @classmethod
    def embed(cls, model: nn.Module, x_id: torch.Tensor) -> torch.Tensor:
        """(B, 512) identity embedding from x_id."""
        return getattr(model, cls.recognition).output_layer(x_id)

    @classmethod
    def synthesis_context(cls, model: nn.Module, f: Features) -> Optional[torch.Tensor]:
        """Per-image work every target group shares (computed once per call), or None."""
        return None

    @classmethod
    def render(cls, model: nn.Module, images: torch.Tensor, f: Features, context: Optional[torch.Tensor],
               groups: torch.Tensor, repeats: int, noise, generator: Optional[torch.Generator]) -> torch.Tensor:
        """Images (B * repeats, 3, S, S) for target ``groups`` (B * repeats,), sample-major: row ``b * repeats
        + r`` renders sample b. ``f`` and ``context`` hold B rows; the renderer repeats what it reads."""
        raise NotImplementedError

    @classmethod
    def check_layers(cls, layers: Dict[str, Any]) -> Dict[str, Any]:
        unknown = sorted(set(layers) - set(cls.layer_names))
        if unknown:
            raise TypeError(f"the {cls.name} architecture takes the layer arguments {tuple(cls.layer_names)}, "
                            f"got {', '.join(unknown)}")
        return layers


def repeat_rows(t: Optional[torch.Tensor], repeats: int) -> Optional[torch.Tensor]:
    """Each row ``repeats`` times in a row (sample-major), or ``t`` itself for one repeat."""
    if t is None or repeats == 1:
        return t
    return t.repeat_interleave(repeats, dim=0)
