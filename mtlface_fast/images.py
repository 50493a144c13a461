"""Reading photos: one reader for every path the package opens (EXIF orientation applied, 16-bit and float
images scaled, decompression bombs refused with the file's name), and the conversion of PIL images to 8-bit RGB.

numpy and Pillow are imported on first use (:mod:`mtlface_fast.preprocess` imports this module, and
``import mtlface_fast`` stays light).
"""
from __future__ import annotations

import os
from typing import Optional

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
