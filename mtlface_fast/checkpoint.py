"""Checkpoint I/O: ``weights_only`` loading, atomic writes, strict key checks that name the keys."""
from __future__ import annotations

import os
import tempfile
from typing import Callable, Dict, Mapping

import torch
from torch import nn


def atomic_write(path: str, write: Callable[[str], None]) -> str:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it over ``path``."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        # mkstemp makes the file owner-only; give the result the mode a plain open() would (0666 & ~umask).
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def torch_save_atomic(obj, path: str) -> str:
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def load_state_file(path_or_state, what: str = "checkpoint") -> Dict[str, torch.Tensor]:
    """A state dict from a file (``torch.load(weights_only=True)``) or a mapping, ``module.`` prefixes stripped.

    Accepts the wrappers training scripts commonly write (``{"state_dict": ...}``, ``{"model": ...}``).
    """
    if isinstance(path_or_state, Mapping):
        state = path_or_state
    else:
        path = os.fspath(path_or_state)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{what} file not found: {path}")
        state = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model"):
        if isinstance(state, Mapping) and wrapper in state and isinstance(state[wrapper], Mapping):
            state = state[wrapper]
    if not isinstance(state, Mapping):
        raise ValueError(f"{what} does not hold a state dict (got {type(state).__name__})")
    out = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{what}: entry {key!r} is not a tensor ({type(value).__name__})")
        out[key.replace("module.", "")] = value  # DDP / DataParallel prefixes, as the official load_network
    return out


def load_state_dict_strict(module: nn.Module, state: Mapping[str, torch.Tensor], what: str = "checkpoint") -> None:
    """``load_state_dict(strict=True)`` with an error that lists missing, unexpected and mis-shaped keys."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
              for k, v in expected.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        def fmt(items, n=20):
            more = f" ... (+{len(items) - n} more)" if len(items) > n else ""
            return ", ".join(items[:n]) + more
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {fmt(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {fmt(unexpected)}")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatch(es): {fmt(shapes)}")
        raise ValueError(f"{what} does not match the model: " + "; ".join(parts))
    module.load_state_dict(state, strict=True)
