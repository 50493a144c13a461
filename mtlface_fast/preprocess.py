"""Images in, normalized model input out: the official transform (ToTensor, Normalize(0.5, 0.5)).

numpy, Pillow and torch are imported on first use: the package's ``__init__`` imports this module (its
``preprocess`` function is the public ``mtlface_fast.preprocess``), and ``import mtlface_fast`` stays light.
"""
from __future__ import annotations

import os
from typing import Sequence

from .images import FLOAT_RANGE, HIGH_DEPTH_MODES, _pil_to_uint8, read_image, to_rgb  # noqa: F401 (public names)


def _one(item, size: int):
    """One image -> (3, size, size) float32 in [0, 1]."""
    import numpy as np
    import torch
    from PIL import Image

    if isinstance(item, (str, os.PathLike)):
        arr = _pil_to_uint8(read_image(item), size)
    elif isinstance(item, Image.Image):
        arr = _pil_to_uint8(item, size, name=f"PIL image (mode {item.mode})")
    elif isinstance(item, np.ndarray):
        if item.dtype != np.uint8:
            raise TypeError(f"numpy images must be uint8 (H, W, 3) or (H, W), got dtype {item.dtype}")
        if item.ndim == 2:
            item = np.stack([item] * 3, axis=-1)
        if item.ndim != 3 or item.shape[2] not in (3, 4):
            raise ValueError(f"numpy images must have shape (H, W, 3) or (H, W), got {item.shape}")
        if item.shape[0] == 0 or item.shape[1] == 0:
            raise ValueError(f"numpy image is empty (shape {item.shape})")
        arr = _pil_to_uint8(Image.fromarray(np.ascontiguousarray(item[..., :3])), size)
    elif isinstance(item, torch.Tensor):
        return _tensor_images(item.unsqueeze(0) if item.dim() == 3 else item, size, single=True)[0]
    else:
        raise TypeError(f"cannot preprocess {type(item).__name__}: expected a PIL image, a path, a uint8 numpy "
                        f"array or a tensor")
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def check_float_range(x) -> None:
    """Float tensor images must be in [0, 1] (FLOAT_RANGE): [0, 255] floats and [-1, 1] (already normalized)
    input are refused. An immediate ValueError on CPU, a device-side assertion on CUDA (no host sync)."""
    import torch

    from .validation import immediate_checks

    lo, hi = torch.aminmax(x.detach())
    ok = (lo >= FLOAT_RANGE[0]) & (hi <= FLOAT_RANGE[1])  # False for NaN too
    hint = ("float tensor images must be in [0, 1] (pass uint8 for [0, 255] pixels; do not normalize before "
            "preprocess)")
    if not immediate_checks(x):
        torch._assert_async(ok, hint)
    elif not bool(ok):
        raise ValueError(f"{hint}, got values in [{float(lo):.4g}, {float(hi):.4g}]")


def _tensor_images(x, size: int, single: bool = False):
    """(B, 3, H, W) uint8 [0, 255] or float [0, 1] -> (B, 3, size, size) float32 in [0, 1]."""
    import torch
    import torch.nn.functional as F

    if x.dim() != 4 or x.size(1) != 3:
        want = "(3, H, W)" if single else "(B, 3, H, W) or (3, H, W)"
        raise ValueError(f"tensor images must have shape {want} (channels first), got {tuple(x.shape)}")
    if x.size(0) == 0 or x.size(2) == 0 or x.size(3) == 0:
        raise ValueError(f"tensor images are empty (shape {tuple(x.shape)})")
    if x.dtype == torch.uint8:
        x = x.float().div(255.0)
    elif x.is_floating_point():
        x = x.float()
        check_float_range(x)
    else:
        raise TypeError(f"tensor images must be uint8 or floating, got dtype {x.dtype}")
    if tuple(x.shape[2:]) != (size, size):
        h, w = x.shape[2:]
        if h != w:
            scale = size / min(h, w)
            nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
            x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
            top, left = (nh - size) // 2, (nw - size) // 2
            x = x[:, :, top:top + size, left:left + size]
        else:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x


def preprocess(images, size: int = 112, device=None, align: bool = False):
    """Turn faces into model input: (B, 3, size, size) float32 in [-1, 1] (RGB, (x - 0.5) / 0.5).

    Args:
        images: a PIL image, an image path, a uint8 numpy array (H, W, 3), a tensor (3, H, W) or
            (B, 3, H, W) (uint8 in [0, 255] or float in [0, 1]), or a list of these.
            Square images of another size are resized (bilinear); non-square ones have their
            shorter side resized to ``size`` and are centre-cropped. Faces should be aligned crops.
            Files are read by :func:`read_image`: EXIF orientation applied, 16-bit images scaled by
            255 / 65535, float images (mode F) accepted in [0, 1]. Empty images are refused.
        size: the model's input size (a positive multiple of 16; 112 for every official model).
        device: where to put the result (a device this machine has: ``"cuda"`` without CUDA is a ValueError).
        align: find the largest face of each photo with MTCNN and warp it onto the 5-point template
            (:mod:`mtlface_fast.align`, the ``align`` extra); a photo without a face raises ValueError.
    """
    import torch

    from .reference.backbone import check_input_size
    from .validation import check_device

    device = check_device(device)
    try:
        size = check_input_size(size)
    except ValueError:
        raise ValueError(f"size must be a model input size, a positive multiple of 16 (112 for every official "
                         f"model), got {size!r}") from None
    if align:
        from .align import align_faces
        if isinstance(images, torch.Tensor) and images.dim() == 4:
            images = list(images)
        images = align_faces(images, size=size, device=device)
    if isinstance(images, torch.Tensor) and images.dim() == 4:
        batch = _tensor_images(images, size)
    elif isinstance(images, Sequence) and not isinstance(images, (str, bytes)):
        if len(images) == 0:
            raise ValueError("images is an empty list")
        batch = torch.stack([_one(item, size) for item in images])
    else:
        batch = _one(images, size).unsqueeze(0)
    batch = (batch - 0.5) / 0.5
    return batch.to(device) if device is not None else batch
