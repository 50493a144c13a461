"""Images in, normalized model input out: the official transform (ToTensor, Normalize(0.5, 0.5)).

numpy, Pillow and torch are imported on first use: the package's ``__init__`` imports this module (its
``preprocess`` function is the public ``mtlface_fast.preprocess``), and ``import mtlface_fast`` stays light.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

# Float tensor images are documented as [0, 1]; a margin absorbs the overshoot of a caller's own resampling.
FLOAT_RANGE = (-0.1, 1.1)


# Pillow modes that hold more than 8 bits per sample, and the value that means white in each. Pillow's own
# convert("RGB") clips them to 8 bits instead of scaling (a 16-bit PNG comes out almost white, a float TIFF black).
HIGH_DEPTH_MODES = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535, "F": 1.0}


def to_rgb(img, name: str = "image"):
    """A PIL image of any mode as an 8-bit RGB PIL image; errors name ``name``.

    16-bit images (modes ``I;16*``, and ``I`` with values in [0, 65535]: Pillow's mode for 16-bit grayscale
    PNG and TIFF files) are scaled by 255 / 65535. Float images (mode ``F``, e.g. a 32-bit float TIFF) must
    hold values in [0, 1] (within the margin of FLOAT_RANGE, clipped); other values are refused. Grayscale is
    repeated, alpha dropped, palettes and CMYK converted by Pillow. An empty image (a side of 0) is refused.
    """
    import numpy as np
    from PIL import Image

    if img.width == 0 or img.height == 0:
        raise ValueError(f"{name} is empty (size {img.width}x{img.height})")
    if img.mode not in HIGH_DEPTH_MODES:
        try:
            return img.convert("RGB")
        except (ValueError, OSError) as exc:  # a mode Pillow cannot convert (e.g. LAB, HSV without a matrix)
            raise ValueError(f"{name}: cannot convert a Pillow image of mode {img.mode} to RGB ({exc})") from None
    white = HIGH_DEPTH_MODES[img.mode]
    values = np.asarray(img, dtype=np.float64)
    if not np.isfinite(values).all():
        raise ValueError(f"{name}: the {img.mode}-mode image holds NaN or infinite values")
    lo, hi = float(values.min()), float(values.max())
    if img.mode == "F":
        if lo < FLOAT_RANGE[0] or hi > FLOAT_RANGE[1]:
            raise ValueError(f"{name}: a float image (mode F) must hold values in [0, 1], got values in "
                             f"[{lo:.4g}, {hi:.4g}]; rescale it to [0, 1] or save it as 8- or 16-bit")
    elif lo < 0 or hi > white:
        raise ValueError(f"{name}: a 32-bit integer image (mode {img.mode}) is read as 16-bit (0 black, 65535 white), "
                         f"got values in [{lo:.0f}, {hi:.0f}]; save it as 8- or 16-bit")
    gray = np.rint(np.clip(values / white, 0.0, 1.0) * 255.0).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(gray)).convert("RGB")  # mode L (2-D) -> RGB


def _pil_to_uint8(img, size: int, name: str = "image"):
    import numpy as np
    from PIL import Image

    img = to_rgb(img, name)
    w, h = img.size
    if (w, h) != (size, size):
        if w != h:  # shorter side to `size` (the official notebook's Resize(112)), then a centre crop
            scale = size / min(w, h)
            img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
            w, h = img.size
            left, top = (w - size) // 2, (h - size) // 2
            img = img.crop((left, top, left + size, top + size))
        else:
            img = img.resize((size, size), Image.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def read_image(path, name: Optional[str] = None):
    """An image file as an 8-bit RGB PIL image, decoded now: the one reader of every image path in the package.

    The file's EXIF orientation is applied (a phone photo stored sideways is read upright), 16-bit and float
    images are scaled (:func:`to_rgb`), and every failure is a ValueError (FileNotFoundError,
    IsADirectoryError) that names the file: not an image, truncated, empty, or larger than Pillow's
    decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS`` pixels, twice that refused; between the two a
    DecompressionBombWarning naming the file). ``name``, when given, prefixes the messages of a missing file or
    a folder (e.g. ``--image``).
    """
    import warnings

    from PIL import Image, ImageOps

    path = os.fspath(path)
    prefix = f"{name}: " if name else ""
    if os.path.isdir(path):
        raise IsADirectoryError(f"{prefix}image path {path} is a directory, expected an image file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{prefix}image file not found: {path}")
    if os.path.getsize(path) == 0:
        raise ValueError(f"cannot read image file {path}: the file is empty")
    try:
        with Image.open(path) as img:  # Image.open raises DecompressionBombError (or warns) from the header
            pixels = img.width * img.height
            img.load()
            img = ImageOps.exif_transpose(img)
    except Image.DecompressionBombError as exc:
        raise ValueError(f"cannot read image file {path}: {exc} (a decompression bomb, or a photo larger than "
                         f"PIL.Image.MAX_IMAGE_PIXELS allows)") from None
    except (OSError, SyntaxError, ValueError) as exc:  # UnidentifiedImageError and truncated files are OSErrors
        raise ValueError(f"cannot read image file {path}: not an image file Pillow can decode ({exc})") from None
    limit = Image.MAX_IMAGE_PIXELS
    if limit and pixels > limit:  # Pillow's own warning does not say which file
        warnings.warn(f"image file {path} has {pixels} pixels, more than PIL.Image.MAX_IMAGE_PIXELS ({limit}): "
                      f"a possible decompression bomb", Image.DecompressionBombWarning, stacklevel=2)
    return to_rgb(img, f"image file {path}")


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
