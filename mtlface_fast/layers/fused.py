"""What every fused layer shares: the implementation it runs, chosen once, and the weights version its caches
of derived weights (folded BatchNorm, packed ICM groups, the AFD spatial matrix) hang on.

* Implementation: :meth:`FusedLayer.implementation` asks :func:`mtlface_fast.backend.choose` for the layer's
  device the first time it is needed after the layer was built, moved (``.to()``, ``.cuda()``, ``.half()``),
  switched between train and eval, or after the backend changed (:func:`mtlface_fast.backend.token`); a call
  reads the stored answer.
* Weights version: :meth:`FusedLayer.weights_version` is a small tuple that moves on ``load_state_dict``,
  ``.to()``, ``train()``/``eval()``, every ``torch.optim`` optimizer step (a global step hook) and
  :meth:`FusedLayer.weights_changed`. Caches compare it, never a key over every tensor. A change made by
  hand (an in-place edit of a parameter or statistic, ``param.data = ...``, a changed ``eps``) is announced
  with ``model.weights_changed()`` (or the layer's); until then the layer may serve the weights it cached.
* Compiled calls: a traced graph cannot compare weights versions without recompiling for each one, so under
  ``torch.compile`` a layer reads the operands :meth:`FusedLayer.prepare_graph_operands` put in its
  ``_graph_ops`` (``MTLFace.compile()`` prepares them eagerly before a compiled call whenever the model's
  weights version or the call's dtype is new: once per weights version, outside the graph) and the graph takes
  them as inputs; a layer nobody prepared builds them inline in the graph (what a plain ``torch.compile`` of
  the model gets). Every tracked event empties ``_graph_ops``.
"""
from __future__ import annotations

from typing import Callable, Dict, Tuple

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from .. import backend

_steps = 0          # optimizer steps seen since import (any optimizer)
_watching = False


def _count_step(optimizer, args, kwargs) -> None:
    global _steps
    _steps += 1


def watch_optimizers() -> None:
    """Register the global optimizer step hook once (torch.optim's public registry)."""
    global _watching
    if not _watching:
        register_optimizer_step_post_hook(_count_step)
        _watching = True


class WeightsVersioned:
    """Mixin (first among an ``nn.Module`` subclass's bases): :meth:`weights_version` and the tracked events."""

    def weights_version(self) -> Tuple[int, int]:
        if not _watching and not torch.compiler.is_compiling():  # (a compiled graph uses no cached weights)
            watch_optimizers()
        return self.__dict__.get("_fused_version", 0), _steps

    def weights_changed(self) -> None:
        """Announce a change of the weights that no tracked event made (see the module doc)."""
        d = self.__dict__
        d["_fused_version"] = d.get("_fused_version", 0) + 1
        d["_fused_impl"] = None
        d["_graph_ops"] = {}

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        self.weights_changed()
        return out

    def train(self, mode: bool = True):
        out = super().train(mode)
        self.weights_changed()
        return out

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.weights_changed()


class FusedLayer(WeightsVersioned):
    """Mixin for a fast layer (put it first in the bases of an ``nn.Module`` subclass)."""

    def implementation(self) -> str:
        """``"triton"`` or ``"torch"``: what runs this layer's fused ops (chosen once, see the module doc)."""
        d = self.__dict__
        tok = backend.token()
        impl = d.get("_fused_impl")
        if impl is None or d.get("_fused_token") != tok:
            impl = d["_fused_impl"] = self.choose_implementation()
            d["_fused_token"] = tok
        return impl

    def choose_implementation(self) -> str:
        p = next(self.parameters(), None)
        return backend.choose(p.device if p is not None else torch.device("cpu"))

    # -- operands of compiled calls (see the module doc) --------------------------------------------
    def graph_operands(self, key, build: Callable[[], object]):
        """Under tracing: the prepared operands for ``key``, else ``build()`` inline."""
        ops = self.__dict__.get("_graph_ops", {}).get(key)
        return build() if ops is None else ops

    def graph_operand_builders(self, act_dtype: torch.dtype, param_dtype: torch.dtype, side: int
                               ) -> Dict[object, Callable]:
        """key -> builder of what a traced eval call with activations in ``act_dtype`` reads (override);
        ``side``: the side of the trunk's last feature map (the model's input size / 16)."""
        return {}

    def prepare_graph_operands(self, act_dtype: torch.dtype, param_dtype: torch.dtype, side: int) -> None:
        """Build (eagerly, no autograd) the operands a compiled eval call reads, for the current weights."""
        self.implementation()  # chosen here, eagerly: a graph reading an unchosen one would recompile
        ops = self.__dict__.setdefault("_graph_ops", {})
        with torch.no_grad():
            for key, build in self.graph_operand_builders(act_dtype, param_dtype, side).items():
                value = build()
                for t in (value.values() if isinstance(value, dict) else value if isinstance(value, (tuple, list))
                          else (value,)):
                    if isinstance(t, torch.Tensor) and t.is_cuda:
                        torch._dynamo.mark_static_address(t)  # CUDA graphs of reduce-overhead: no per-call copy
                ops[key] = value

    def describe_implementation(self) -> str:
        """One line for :meth:`MTLFace.implementations`: what runs this layer."""
        return self.implementation()
