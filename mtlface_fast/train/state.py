"""Training checkpoints: every piece of state a bit-exact resume needs, in one ``weights_only`` file.

Layout (all tensors, dicts, lists, numbers and strings, so ``torch.load(weights_only=True)`` reads it):
``step``, ``recipe``, ``config``, ``classes``, ``world_size``, ``modules`` (``model``: the MTLFace state dict
with the official ``backbone.`` / ``estimation_network.`` / ``generator.`` keys, plus ``head``,
``da_discriminator``, ``discriminator`` when the recipe has them), ``optimizers``, ``schedulers``,
``scalers`` and ``rng`` (torch, CUDA, numpy and Python generator states). Written to a temporary file and
renamed, so a crash never leaves a truncated checkpoint behind.
"""
from __future__ import annotations

import glob
import os
import random
from typing import Any, Dict, Optional

import numpy as np
import torch

from ..checkpoint import load_state_dict_strict, torch_load, torch_save_atomic
from ..errors import CheckpointError

LAST = "last.pt"


def rng_state() -> Dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = dict(torch=torch.get_rng_state(), python=random.getstate(),
                 numpy=dict(kind=kind, keys=torch.from_numpy(keys.astype(np.int64)), pos=int(pos),
                            has_gauss=int(has_gauss), cached=float(cached)))
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _plain(value):
    """Config values as plain lists/dicts for the checkpoint."""
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def save_checkpoint(path: str, *, step: int, recipe: str, config: Dict[str, Any], classes, world_size: int,
                    modules: Dict[str, torch.nn.Module], stateful: Dict[str, Dict[str, Any]]) -> str:
    ckpt = dict(step=int(step), recipe=recipe, config=_plain(config), classes=list(classes),
                world_size=int(world_size), rng=rng_state(),
                modules={k: {n: t.detach().cpu() for n, t in m.state_dict().items()} for k, m in modules.items()})
    for kind, objs in stateful.items():
        ckpt[kind] = {k: o.state_dict() for k, o in objs.items()}
    return torch_save_atomic(ckpt, path)


def load_checkpoint(path: str) -> Dict[str, Any]:
    ckpt = torch_load(path, "training checkpoint")
    if not isinstance(ckpt, dict) or "step" not in ckpt or "modules" not in ckpt:
        raise CheckpointError(f"training checkpoint {path} is not a training checkpoint (no 'step' / 'modules')")
    return ckpt


def restore(ckpt: Dict[str, Any], modules: Dict[str, torch.nn.Module], stateful: Dict[str, Dict[str, Any]],
            what: str) -> None:
    for name, module in modules.items():
        if name not in ckpt["modules"]:
            raise ValueError(f"{what}: no state for module {name!r} (has {sorted(ckpt['modules'])})")
        load_state_dict_strict(module, ckpt["modules"][name], what=f"{what} [{name}]")
    for kind, objs in stateful.items():
        saved = ckpt.get(kind, {})
        for name, obj in objs.items():
            if name not in saved:
                raise ValueError(f"{what}: no {kind} state {name!r}")
            obj.load_state_dict(saved[name])


def find_resume(resume: Optional[str], output: str) -> Optional[str]:
    """``auto``: OUTPUT/last.pt when it exists; a folder: its last.pt; a file: itself."""
    if not resume:
        return None
    if resume == "auto":
        path = os.path.join(output, LAST)
        return path if os.path.isfile(path) else None
    if os.path.isdir(resume):
        return os.path.join(resume, LAST)
    return resume


def prune(folder: str, keep: int) -> None:
    files = sorted(glob.glob(os.path.join(folder, "step_*.pt")))
    for f in files[:max(0, len(files) - keep)]:
        os.unlink(f)
