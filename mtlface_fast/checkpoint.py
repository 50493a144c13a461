"""Checkpoint I/O: ``weights_only`` loading, atomic writes, strict key checks that name the keys.

Every read error names the file and says what is wrong with it (:class:`~mtlface_fast.errors.CheckpointError`,
a ``ValueError``); weights are checked finite once, when they are loaded (:func:`load_state_dict_strict`).
"""
from __future__ import annotations

import os
import pickle
import tempfile
from typing import Callable, Dict, Mapping

import torch
from torch import nn

from .errors import CheckpointError


def _first_line(exc: BaseException) -> str:
    """``Type: first sentence of the message`` (torch's messages go on for lines)."""
    text = str(exc).strip().splitlines()
    first = text[0].split(". ")[0] if text else ""
    return f"{type(exc).__name__}: {first}".rstrip(": ")


def check_file(path, what: str = "checkpoint") -> str:
    """``path`` as a string if it is a non-empty regular file; else a FileNotFoundError / CheckpointError (a
    TypeError when ``path`` is not a path at all)."""
    if not isinstance(path, (str, bytes, os.PathLike)):
        raise TypeError(f"{what} must be a file path (str or os.PathLike), got {type(path).__name__}: {path!r:.60}")
    path = os.fsdecode(os.fspath(path))
    if os.path.isdir(path):
        raise CheckpointError(f"{what} {path} is a directory, expected a file (a folder written by save_pretrained "
                              f"loads with MTLFace.from_pretrained)")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    if not os.path.isfile(path):
        raise CheckpointError(f"{what} {path} is not a regular file")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{what} {path} is empty (0 bytes)")
    return path


def torch_load(path, what: str = "checkpoint"):
    """``torch.load(path, map_location="cpu", weights_only=True)`` with errors that name the file."""
    path = check_file(path, what)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        detail = text.split("WeightsUnpickler error:", 1)[-1].strip().splitlines()
        detail = detail[0].strip() if detail else _first_line(exc)
        if "global" in text.lower() and "weights only" in text.lower():  # a class that weights_only refuses
            raise CheckpointError(f"{what} {path} holds objects other than tensors and plain containers, which "
                                  f"torch.load(weights_only=True) refuses: {detail}") from None
        raise CheckpointError(f"{what} {path} is not a readable torch checkpoint (truncated, or not written by "
                              f"torch.save): {detail}") from None
    except Exception as exc:  # EOFError, miniz RuntimeError, KeyError of a text file, UnicodeDecodeError, ...
        raise CheckpointError(f"{what} {path} is not a readable torch checkpoint (truncated, or not written by "
                              f"torch.save): {_first_line(exc)}") from None


def load_safetensors(path, what: str = "weights file", device: str = "cpu") -> Dict[str, torch.Tensor]:
    """``safetensors.torch.load_file`` with errors that name the file; ``device`` (where the tensors go) must
    exist on this machine (a ValueError, not a "corrupt file" error, for ``"cuda"`` without CUDA)."""
    from safetensors.torch import load_file

    from .validation import check_device

    device = check_device(device, "map_location")
    if device is None:
        raise ValueError("map_location must be a device such as 'cpu' or 'cuda', got None")
    path = check_file(path, what)
    try:
        return load_file(path, device=str(device))
    except Exception as exc:  # SafetensorError (truncated header / data), OSError
        raise CheckpointError(f"{what} {path} is not a readable safetensors file (truncated or corrupt): "
                              f"{_first_line(exc)}") from None


def check_finite_state(state: Mapping[str, torch.Tensor], what: str = "checkpoint") -> None:
    """Every floating tensor of ``state`` finite; else a CheckpointError listing the keys (load time, once)."""
    bad = [k for k, v in state.items()
           if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        more = f" ... (+{len(bad) - 10} more)" if len(bad) > 10 else ""
        raise CheckpointError(f"{what} holds NaN or infinite values in {len(bad)} tensor(s): "
                              f"{', '.join(bad[:10])}{more}")


def atomic_write(path: str, write: Callable[[str], None], keep_suffix: bool = False) -> str:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it over ``path``; on any
    error the temporary file is removed and ``path`` is left as it was.

    ``keep_suffix=True`` gives the temporary file ``path``'s suffix (``.x.pt2`` -> ``.x.<random>.pt2``), for
    writers that check it (``torch.export.save`` and AOTInductor for ``.pt2``); otherwise it ends in ``.tmp``.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    if keep_suffix:
        stem, suffix = os.path.splitext(os.path.basename(path))
        fd, tmp = tempfile.mkstemp(prefix=f".{stem}.", suffix=suffix, dir=folder)
    else:
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
    Errors name the file (``what`` followed by the path).
    """
    if isinstance(path_or_state, Mapping):
        state = path_or_state
    elif not isinstance(path_or_state, (str, bytes, os.PathLike)):
        raise TypeError(f"{what} must be a file path or a state dict (a mapping of tensors), got "
                        f"{type(path_or_state).__name__}: {path_or_state!r:.60}")
    else:
        state = torch_load(path_or_state, what)
        what = f"{what} {os.fspath(path_or_state)}"
    for wrapper in ("state_dict", "model"):
        if isinstance(state, Mapping) and wrapper in state and isinstance(state[wrapper], Mapping):
            state = state[wrapper]
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{what} does not hold a state dict (got {type(state).__name__})")
    out = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{what}: entry {key!r} is not a tensor ({type(value).__name__})")
        out[key.replace("module.", "")] = value  # DDP / DataParallel prefixes, as the official load_network
    return out


def load_state_dict_strict(module: nn.Module, state: Mapping[str, torch.Tensor], what: str = "checkpoint") -> None:
    """``load_state_dict(strict=True)`` with an error that lists missing, unexpected and mis-shaped keys, after
    checking that every floating tensor is finite (the one finiteness check of weights: not per call)."""
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
        raise CheckpointError(f"{what} does not match the model: " + "; ".join(parts))
    check_finite_state(state, what)
    module.load_state_dict(state, strict=True)
