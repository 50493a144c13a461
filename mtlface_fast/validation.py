"""Argument checks shared by the reference and the fast model: clear errors before any compute."""
from __future__ import annotations

import torch


def _is_compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling())


def check_images(images, *, input_size: int, device: torch.device, dtype: torch.dtype,
                 name: str = "images", check_finite: bool = True) -> torch.Tensor:
    """Validate a batch of normalized images (B, 3, input_size, input_size) for a model on ``device``."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (B, 3, {input_size}, {input_size}), "
                        f"got {type(images).__name__}; use mtlface_fast.preprocess() for images and paths")
    if images.dim() != 4:
        raise ValueError(f"{name} must have rank 4 (B, 3, H, W), got shape {tuple(images.shape)}")
    if images.size(1) != 3:
        raise ValueError(f"{name} must have 3 channels in dim 1 (B, 3, H, W), got shape {tuple(images.shape)}")
    if images.size(0) == 0:
        raise ValueError(f"{name} must hold at least one image, got an empty batch")
    if tuple(images.shape[2:]) != (input_size, input_size):
        raise ValueError(f"{name} must be {input_size}x{input_size} (the model's input_size), got "
                         f"{images.size(2)}x{images.size(3)}; mtlface_fast.preprocess() resizes")
    if not images.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor normalized to [-1, 1], got dtype {images.dtype}; "
                        f"mtlface_fast.preprocess() converts uint8 images")
    if images.device != device:
        raise ValueError(f"{name} is on {images.device} but the model is on {device}; move one of them")
    if images.dtype != dtype and not torch.is_autocast_enabled(device.type):
        raise TypeError(f"{name} has dtype {images.dtype} but the model's parameters are {dtype}; "
                        f"cast the images or the model, or run under torch.autocast")
    if check_finite and not _is_compiling() and not bool(torch.isfinite(images).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    return images


def check_target_group(target_group, *, batch: int, age_group: int, device: torch.device,
                       name: str = "target_group") -> torch.Tensor:
    """An int or an integer tensor of shape () / (B,) with values in [0, age_group) -> LongTensor (B,)."""
    if isinstance(target_group, bool):
        raise TypeError(f"{name} must be an int or an integer tensor, got bool")
    if isinstance(target_group, int):
        if not 0 <= target_group < age_group:
            raise ValueError(f"{name} must be in [0, {age_group}), got {target_group}")
        return torch.full((batch,), target_group, dtype=torch.long, device=device)
    if not isinstance(target_group, torch.Tensor):
        raise TypeError(f"{name} must be an int or a LongTensor of shape ({batch},), "
                        f"got {type(target_group).__name__}")
    if target_group.is_floating_point() or target_group.is_complex() or target_group.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got dtype {target_group.dtype}")
    if target_group.dim() == 0:
        target_group = target_group.expand(batch)
    if target_group.dim() != 1 or target_group.size(0) != batch:
        raise ValueError(f"{name} must have shape ({batch},) to match the batch, got {tuple(target_group.shape)}")
    if not _is_compiling():
        lo, hi = int(target_group.min()), int(target_group.max())
        if lo < 0 or hi >= age_group:
            raise ValueError(f"{name} values must be in [0, {age_group}), got values in [{lo}, {hi}]")
    return target_group.to(device=device, dtype=torch.long)
