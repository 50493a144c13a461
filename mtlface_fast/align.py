"""From a photo to model input: MTCNN faces and 5 landmarks, each warped onto the ArcFace template.

The official TPAMI package aligns a photo before the model sees it: MTCNN's five landmarks (eyes, nose tip,
mouth corners) are mapped by a least-squares similarity transform (rotation, uniform scale, translation;
scikit-image's ``SimilarityTransform``) onto the standard 112x112 template below, and the photo is warped
bilinearly with black outside it. For another input size the template is scaled by ``size / 112``.

Needs the ``align`` extra (``pip install "mtlface-fast[align]"``: facenet-pytorch, whose MTCNN weights ship
inside its wheel; nothing is downloaded). See :mod:`mtlface_fast.mtcnn` for the two ways the detector runs.

    >>> aligner = FaceAligner(size=112)
    >>> faces = aligner("photo.jpg")                 # largest face first; keep="all" for every face
    >>> faces[0].crop                                # (112, 112, 3) uint8, faces[0].box / .landmarks / .score
    >>> x = preprocess("photo.jpg", align=True)      # (1, 3, 112, 112) in [-1, 1], ready for the model
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from .mtcnn import AlignExtraMissing, load_mtcnn  # noqa: F401  (AlignExtraMissing: part of this API)

# The 5-point ArcFace / insightface template for 112x112 crops (x, y): left eye, right eye, nose tip, left and
# right mouth corners, as the official package uses it (its 96x112 template shifted right by 8 pixels).
TEMPLATE_112 = np.array([[38.2946, 51.6963],
                         [73.5318, 51.5014],
                         [56.0252, 71.7366],
                         [41.5493, 92.3655],
                         [70.7299, 92.2041]], dtype=np.float64)

KEEP = ("largest", "all")


def template(size: int = 112) -> np.ndarray:
    """The template's 5 points (x, y) for a ``size`` x ``size`` crop."""
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise ValueError(f"size must be a positive int, got {size!r}")
    return TEMPLATE_112 * (size / 112.0)


def load_image(item, name: str = "image") -> np.ndarray:
    """A photo as (H, W, 3) uint8 RGB: a path, a PIL image, a uint8 numpy array ((H, W), (H, W, 1|3|4)) or a
    tensor ((C, H, W) with C in 1, 3, 4, or (H, W); uint8 or float in [0, 1]). Grayscale is repeated, alpha
    dropped; files are read by :func:`mtlface_fast.images.read_image` (EXIF orientation applied, 16-bit and
    float images scaled) and PIL images converted by :func:`mtlface_fast.images.to_rgb`. Bad input raises
    ValueError / TypeError / FileNotFoundError naming ``name`` (or the file)."""
    from .images import FLOAT_RANGE, read_image, to_rgb

    if isinstance(item, (str, os.PathLike)):
        arr = np.array(read_image(item, name=name), dtype=np.uint8)
    elif isinstance(item, Image.Image):
        arr = np.array(to_rgb(item, name), dtype=np.uint8)
    elif isinstance(item, torch.Tensor):
        x = item.detach().cpu()
        if x.dim() == 2:
            x = x.unsqueeze(0)
        if x.dim() != 3 or x.size(0) not in (1, 3, 4):
            raise ValueError(f"{name}: tensor photos must be (C, H, W) with C in 1, 3, 4 (channels first) or "
                             f"(H, W), got shape {tuple(item.shape)}")
        if x.dtype == torch.uint8:
            pass
        elif x.is_floating_point():
            if not torch.isfinite(x).all():
                raise ValueError(f"{name}: the tensor photo has NaN or infinite values")
            lo, hi = (float(x.min()), float(x.max())) if x.numel() else (0.0, 0.0)
            if lo < FLOAT_RANGE[0] or hi > FLOAT_RANGE[1]:
                raise ValueError(f"{name}: float tensor photos must be in [0, 1], got values in [{lo:.4g}, {hi:.4g}] "
                                 f"(pass uint8 for [0, 255] pixels)")
            x = (x.float().clamp(0, 1) * 255.0).round().to(torch.uint8)
        else:
            raise TypeError(f"{name}: tensor photos must be uint8 or float in [0, 1], got dtype {x.dtype}")
        arr = x.permute(1, 2, 0).numpy()
    elif isinstance(item, np.ndarray):
        if item.dtype != np.uint8:
            raise TypeError(f"{name}: numpy photos must be uint8, got dtype {item.dtype}")
        arr = item
    else:
        raise TypeError(f"{name}: cannot read a photo from {type(item).__name__}; expected a path, a PIL image, "
                        f"a uint8 numpy array or a tensor")
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise ValueError(f"{name}: photos must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {arr.shape})")
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return np.ascontiguousarray(arr[..., :3])


def similarity_matrix(landmarks, size: int = 112) -> np.ndarray:
    """The 3x3 similarity transform (least squares, Umeyama) taking the 5 landmarks to the template."""
    from skimage.transform import SimilarityTransform
    src = np.asarray(landmarks, dtype=np.float64)
    if src.shape != (5, 2) or not np.isfinite(src).all():
        raise ValueError(f"landmarks must be 5 finite (x, y) points, shape (5, 2), got {src.shape}")
    dst = template(size)
    if hasattr(SimilarityTransform, "from_estimate"):  # scikit-image >= 0.26
        tform = SimilarityTransform.from_estimate(src, dst)
        ok = bool(tform)
    else:
        tform = SimilarityTransform()
        ok = tform.estimate(src, dst)
    if not ok or not np.isfinite(tform.params).all():
        raise ValueError(f"no similarity transform fits these landmarks (degenerate points): {src.tolist()}")
    return np.asarray(tform.params, dtype=np.float64)


def warp(image: np.ndarray, matrix: np.ndarray, size: int) -> np.ndarray:
    """``image`` (H, W, 3) uint8 warped by ``matrix`` (image -> crop coordinates, pixel centres at integers as
    in OpenCV's warpAffine) into a ``size`` x ``size`` uint8 crop, bilinear, black outside the photo."""
    from skimage.transform import AffineTransform, warp as sk_warp
    inverse = AffineTransform(matrix=np.linalg.inv(matrix))
    out = sk_warp(image, inverse, output_shape=(size, size), order=1, mode="constant", cval=0.0,
                  preserve_range=True)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def align_crop(image, landmarks, size: int = 112) -> np.ndarray:
    """One face: the photo warped so that its 5 landmarks land on the template; (size, size, 3) uint8."""
    arr = load_image(image)
    return warp(arr, similarity_matrix(landmarks, size), size)


@dataclass
class Face:
    """One detected face: its box (x1, y1, x2, y2) and landmarks (5, 2) in photo pixels, MTCNN's score and the
    aligned crop (size, size, 3) uint8."""
    box: np.ndarray
    landmarks: np.ndarray
    score: float
    crop: np.ndarray = field(repr=False)

    @property
    def area(self) -> float:
        return float(max(self.box[2] - self.box[0], 0) * max(self.box[3] - self.box[1], 0))


class FaceAligner:
    """Detects faces with MTCNN and aligns each onto the template for a ``size`` x ``size`` model input.

    Args:
        size: the model's input size (``model.config["input_size"]``).
        device: where MTCNN runs (the model's device).
        detector: ``"auto"``, ``"facenet"`` or ``"torch"`` (:func:`mtlface_fast.mtcnn.load_mtcnn`).
        min_face_size, thresholds, factor: MTCNN's settings (facenet-pytorch's defaults).
        cpu_threads: intra-op threads of the detector on CPU (1, faster than more; None: leave the count).
    """

    def __init__(self, size: int = 112, device=None, detector: str = "auto", min_face_size: int = 20,
                 thresholds: Sequence[float] = (0.6, 0.7, 0.7), factor: float = 0.709,
                 cpu_threads: Optional[int] = 1):
        template(size)  # validates size
        self.size = size
        self.min_face_size = min_face_size
        self.mtcnn = load_mtcnn(detector, device=device, min_face_size=min_face_size, thresholds=thresholds,
                                factor=factor, cpu_threads=cpu_threads)

    @property
    def detector(self) -> str:
        return self.mtcnn.name

    def detect(self, image) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(boxes (N, 4), scores (N,), landmarks (N, 5, 2))``, float32, the largest box first."""
        arr = load_image(image)
        if min(arr.shape[:2]) < self.min_face_size:  # smaller than the smallest face searched for
            return np.zeros((0, 4), np.float32), np.zeros((0,), np.float32), np.zeros((0, 5, 2), np.float32)
        boxes, points = self.mtcnn.detect(arr)
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        order = np.argsort(-area, kind="stable")
        return boxes[order, :4], boxes[order, 4], points[order]

    def align(self, image, keep: str = "largest") -> List[Face]:
        """The faces of one photo, aligned: the largest one (``keep="largest"``) or all, largest first; an empty
        list when there is none."""
        if keep not in KEEP:
            raise ValueError(f"keep must be one of {KEEP}, got {keep!r}")
        arr = load_image(image)
        boxes, scores, points = self.detect(arr)
        if keep == "largest":
            boxes, scores, points = boxes[:1], scores[:1], points[:1]
        return [Face(box=b, landmarks=p, score=float(s), crop=warp(arr, similarity_matrix(p, self.size), self.size))
                for b, s, p in zip(boxes, scores, points)]

    __call__ = align


_DEFAULT: dict = {}


def default_aligner(size: int = 112, device=None) -> FaceAligner:
    """One FaceAligner per (size, device) for this process (loading MTCNN takes a moment)."""
    key = (size, str(torch.device(device) if device is not None else torch.device("cpu")))
    if key not in _DEFAULT:
        _DEFAULT[key] = FaceAligner(size=size, device=device)
    return _DEFAULT[key]


def align_faces(images, size: int = 112, device=None, aligner: Optional[FaceAligner] = None) -> List[np.ndarray]:
    """The largest face of each photo as an aligned (size, size, 3) uint8 crop; ValueError naming the photo when
    one has no face."""
    items = list(images) if isinstance(images, (list, tuple)) else [images]
    if not items:
        raise ValueError("images is an empty list")
    aligner = aligner or default_aligner(size, device)
    if aligner.size != size:
        raise ValueError(f"the aligner makes {aligner.size}x{aligner.size} crops, size is {size}")
    crops = []
    for i, item in enumerate(items):
        label = f"image {os.fspath(item)}" if isinstance(item, (str, os.PathLike)) else f"image {i}"
        faces = aligner.align(load_image(item, name=label))
        if not faces:
            raise ValueError(f"no face found in {label}")
        crops.append(faces[0].crop)
    return crops
