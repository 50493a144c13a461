"""MTCNN face detection (boxes, scores and 5 landmarks) with facenet-pytorch's networks and weights.

Two ways to run the same detector, picked by :func:`load_mtcnn`:

- ``"facenet"``: facenet-pytorch's own ``MTCNN`` (``pip install "mtlface-fast[align]"``). facenet-pytorch
  imports torchvision when it is imported, for ``batched_nms`` and ``to_tensor`` only.
- ``"torch"``: the same P-/R-/O-Net cascade driven with plain torch, with the weights that the
  facenet-pytorch wheel ships (``facenet_pytorch/data/{pnet,rnet,onet}.pt``, loaded with
  ``weights_only=True`` from the installed package without importing it). This is the path when torchvision
  cannot be imported. torchvision's PyPI wheels are built against the CUDA build of torch: with the
  CPU-only build of torch (a small CPU install, and this project's CI) ``import torchvision`` fails
  ("operator torchvision::nms does not exist"), and with it every import of facenet-pytorch. Replacing torch
  with the CUDA build to satisfy torchvision is not an option for a CPU install, and substituting a module
  for torchvision inside someone else's import would be monkeypatching; so the cascade below is a line-by-line
  port of facenet-pytorch 2.5.3's ``detect_face`` (MIT, Copyright (c) 2019 Timothy Esler) for one image,
  with a torch NMS of torchvision's semantics (IoU without the +1 pixel, suppress above the threshold,
  scores in descending order) in the places that call ``batched_nms``, and facenet-pytorch's own "Min"
  NMS (+1 pixel areas) where it does. The networks are facenet-pytorch's definitions (same state-dict keys).
  tests/test_align.py checks that this path gives facenet-pytorch's boxes, scores and landmarks.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import os
from typing import List, Optional, Tuple

import numpy as np
import torch
from torch import nn
from torch.nn.functional import interpolate

from .errors import MissingDependencyError

EXTRA_HINT = 'pip install "mtlface-fast[align]" (facenet-pytorch>=2.5.3,!=2.6.*)'
DETECTORS = ("auto", "facenet", "torch")


class AlignExtraMissing(MissingDependencyError, ImportError):
    """facenet-pytorch (the ``align`` extra) is not installed or is a version that does not fit."""


def facenet_location() -> str:
    """The folder of the installed facenet-pytorch package, found without importing it."""
    try:
        spec = importlib.util.find_spec("facenet_pytorch")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise AlignExtraMissing(f"face detection and alignment need the 'align' extra: {EXTRA_HINT}")
    try:
        version = importlib.metadata.version("facenet-pytorch")
    except importlib.metadata.PackageNotFoundError:
        version = None
    if version is not None:
        parts = tuple(int(p) for p in (version.split("+")[0].split(".") + ["0", "0"])[:3] if p.isdigit())
        if len(parts) == 3 and (parts < (2, 5, 3) or parts[:2] == (2, 6)):
            raise AlignExtraMissing(f"facenet-pytorch {version} is installed; face alignment needs "
                                    f"facenet-pytorch>=2.5.3,!=2.6.* (2.6 pins torch<2.3): {EXTRA_HINT}")
    return list(spec.submodule_search_locations)[0]


def load_weights(name: str) -> dict:
    """facenet-pytorch's shipped state dict ``data/<name>.pt`` (plain tensors, ``weights_only=True``)."""
    path = os.path.join(facenet_location(), "data", f"{name}.pt")
    if not os.path.isfile(path):
        raise AlignExtraMissing(f"the facenet-pytorch install has no {path}; reinstall it: {EXTRA_HINT}")
    return torch.load(path, map_location="cpu", weights_only=True)


# The three networks, as facenet_pytorch/models/mtcnn.py defines them (same module names, so the shipped
# state dicts load strictly).
class PNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 10, kernel_size=3)
        self.prelu1 = nn.PReLU(10)
        self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(10, 16, kernel_size=3)
        self.prelu2 = nn.PReLU(16)
        self.conv3 = nn.Conv2d(16, 32, kernel_size=3)
        self.prelu3 = nn.PReLU(32)
        self.conv4_1 = nn.Conv2d(32, 2, kernel_size=1)
        self.softmax4_1 = nn.Softmax(dim=1)
        self.conv4_2 = nn.Conv2d(32, 4, kernel_size=1)

    def forward(self, x):
        x = self.prelu1(self.conv1(x))
        x = self.pool1(x)
        x = self.prelu2(self.conv2(x))
        x = self.prelu3(self.conv3(x))
        return self.conv4_2(x), self.softmax4_1(self.conv4_1(x))


class RNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 28, kernel_size=3)
        self.prelu1 = nn.PReLU(28)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(28, 48, kernel_size=3)
        self.prelu2 = nn.PReLU(48)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(48, 64, kernel_size=2)
        self.prelu3 = nn.PReLU(64)
        self.dense4 = nn.Linear(576, 128)
        self.prelu4 = nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.softmax5_1 = nn.Softmax(dim=1)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x):
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.prelu3(self.conv3(x))
        x = x.permute(0, 3, 2, 1).contiguous()  # the Caffe weights flatten (W, H, C)
        x = self.prelu4(self.dense4(x.view(x.shape[0], -1)))
        return self.dense5_2(x), self.softmax5_1(self.dense5_1(x))


class ONet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, kernel_size=3)
        self.prelu1 = nn.PReLU(32)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3)
        self.prelu2 = nn.PReLU(64)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(64, 64, kernel_size=3)
        self.prelu3 = nn.PReLU(64)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4 = nn.Conv2d(64, 128, kernel_size=2)
        self.prelu4 = nn.PReLU(128)
        self.dense5 = nn.Linear(1152, 256)
        self.prelu5 = nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.softmax6_1 = nn.Softmax(dim=1)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x):
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu4(self.conv4(x))
        x = x.permute(0, 3, 2, 1).contiguous()
        x = self.prelu5(self.dense5(x.view(x.shape[0], -1)))
        return self.dense6_2(x), self.dense6_3(x), self.softmax6_1(self.dense6_1(x))


def nms(boxes: torch.Tensor, scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """torchvision.ops.nms semantics: indices kept, in descending score order; a box is dropped when its IoU
    (areas ``(x2 - x1) * (y2 - y1)``) with a higher-scored kept box exceeds ``threshold``."""
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    order = torch.sort(scores, descending=True, stable=True)[1]
    b = boxes[order]
    x1, y1, x2, y2 = b.unbind(1)
    areas = (x2 - x1) * (y2 - y1)
    suppressed = torch.zeros(len(b), dtype=torch.bool, device=b.device)
    keep = []
    sup = suppressed.cpu().numpy()  # the greedy loop on host, its IoU rows vectorized on b's device
    for i in range(len(b)):
        if sup[i]:
            continue
        keep.append(i)
        rest = slice(i + 1, None)
        w = (torch.minimum(x2[i], x2[rest]) - torch.maximum(x1[i], x1[rest])).clamp(min=0)
        h = (torch.minimum(y2[i], y2[rest]) - torch.maximum(y1[i], y1[rest])).clamp(min=0)
        inter = w * h
        iou = inter / (areas[i] + areas[rest] - inter)
        sup[i + 1:] |= (iou > threshold).cpu().numpy()
    return order[torch.as_tensor(keep, dtype=torch.long, device=b.device)]


def nms_min(boxes: torch.Tensor, scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """facenet-pytorch's ``nms_numpy(..., 'Min')`` (stage 3): overlap over the smaller box, +1 pixel areas."""
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    b = boxes.cpu().numpy()
    s = scores.cpu().numpy()
    x1, y1, x2, y2 = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
    area = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(s)
    pick = []
    while order.size > 0:
        i = order[-1]
        pick.append(i)
        idx = order[:-1]
        w = np.maximum(0.0, np.minimum(x2[i], x2[idx]) - np.maximum(x1[i], x1[idx]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[idx]) - np.maximum(y1[i], y1[idx]) + 1)
        o = (w * h) / np.minimum(area[i], area[idx])
        order = idx[o <= threshold]
    return torch.as_tensor(np.asarray(pick, dtype=np.int64), device=boxes.device)


def _bbreg(boundingbox, reg):
    w = boundingbox[:, 2] - boundingbox[:, 0] + 1
    h = boundingbox[:, 3] - boundingbox[:, 1] + 1
    b1 = boundingbox[:, 0] + reg[:, 0] * w
    b2 = boundingbox[:, 1] + reg[:, 1] * h
    b3 = boundingbox[:, 2] + reg[:, 2] * w
    b4 = boundingbox[:, 3] + reg[:, 3] * h
    boundingbox[:, :4] = torch.stack([b1, b2, b3, b4]).permute(1, 0)
    return boundingbox


def _generate_bounding_box(reg, probs, scale, thresh):
    stride, cellsize = 2, 12
    reg = reg.permute(1, 0, 2, 3)
    mask = probs >= thresh
    mask_inds = mask.nonzero()
    score = probs[mask]
    reg = reg[:, mask].permute(1, 0)
    bb = mask_inds[:, 1:].type(reg.dtype).flip(1)
    q1 = ((stride * bb + 1) / scale).floor()
    q2 = ((stride * bb + cellsize - 1 + 1) / scale).floor()
    return torch.cat([q1, q2, score.unsqueeze(1), reg], dim=1)


def _pad(boxes, w, h):
    boxes = boxes.trunc().int().cpu().numpy()
    x, y, ex, ey = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    x[x < 1] = 1
    y[y < 1] = 1
    ex[ex > w] = w
    ey[ey > h] = h
    return y, ey, x, ex


def _rerec(bbox):
    h = bbox[:, 3] - bbox[:, 1]
    w = bbox[:, 2] - bbox[:, 0]
    side = torch.max(w, h)
    bbox[:, 0] = bbox[:, 0] + w * 0.5 - side * 0.5
    bbox[:, 1] = bbox[:, 1] + h * 0.5 - side * 0.5
    bbox[:, 2:4] = bbox[:, :2] + side.repeat(2, 1).permute(1, 0)
    return bbox


def _crops(img, boxes, size):
    y, ey, x, ex = _pad(boxes, img.shape[3], img.shape[2])
    crops = [interpolate(img[:, :, (y[k] - 1):ey[k], (x[k] - 1):ex[k]], size=(size, size), mode="area")
             for k in range(len(y)) if ey[k] > (y[k] - 1) and ex[k] > (x[k] - 1)]
    return (torch.cat(crops, dim=0) - 127.5) * 0.0078125


def _batched(net, data, batch_size=512):
    outs = [net(data[i:i + batch_size]) for i in range(0, len(data), batch_size)]
    return tuple(torch.cat(v, dim=0) for v in zip(*outs))


def detect_face(img: torch.Tensor, minsize: int, pnet, rnet, onet, threshold, factor) -> Tuple[np.ndarray,
                                                                                                 np.ndarray]:
    """facenet-pytorch's ``detect_face`` for one image ``(1, 3, H, W)`` float in [0, 255] on the nets' device.

    Returns ``(boxes (N, 5) [x1, y1, x2, y2, score], points (N, 5, 2))`` as float32 numpy arrays.
    """
    h, w = img.shape[2:4]
    m = 12.0 / minsize
    minl = min(h, w) * m
    scales, scale_i = [], m  # the image pyramid
    while minl >= 12:
        scales.append(scale_i)
        scale_i = scale_i * factor
        minl = minl * factor
    empty = (np.zeros((0, 5), np.float32), np.zeros((0, 5, 2), np.float32))
    if not scales:
        return empty

    # First stage: P-Net over the pyramid, NMS within each scale, then over all of them.
    boxes = []
    for scale in scales:
        im_data = interpolate(img, size=(int(h * scale + 1), int(w * scale + 1)), mode="area")
        reg, probs = pnet((im_data - 127.5) * 0.0078125)
        boxes_scale = _generate_bounding_box(reg, probs[:, 1], scale, threshold[0])
        boxes.append(boxes_scale[nms(boxes_scale[:, :4], boxes_scale[:, 4], 0.5)])
    boxes = torch.cat(boxes, dim=0)
    boxes = boxes[nms(boxes[:, :4], boxes[:, 4], 0.7)]
    regw = boxes[:, 2] - boxes[:, 0]
    regh = boxes[:, 3] - boxes[:, 1]
    qq1 = boxes[:, 0] + boxes[:, 5] * regw
    qq2 = boxes[:, 1] + boxes[:, 6] * regh
    qq3 = boxes[:, 2] + boxes[:, 7] * regw
    qq4 = boxes[:, 3] + boxes[:, 8] * regh
    boxes = _rerec(torch.stack([qq1, qq2, qq3, qq4, boxes[:, 4]]).permute(1, 0))
    if len(boxes) == 0:
        return empty

    # Second stage: R-Net on 24x24 crops.
    out0, out1 = (o.permute(1, 0) for o in _batched(rnet, _crops(img, boxes, 24)))
    score = out1[1, :]
    ipass = score > threshold[1]
    boxes = torch.cat((boxes[ipass, :4], score[ipass].unsqueeze(1)), dim=1)
    mv = out0[:, ipass].permute(1, 0)
    pick = nms(boxes[:, :4], boxes[:, 4], 0.7)
    boxes = _rerec(_bbreg(boxes[pick], mv[pick]))
    if len(boxes) == 0:
        return empty

    # Third stage: O-Net on 48x48 crops, landmarks, "Min" NMS.
    out0, out1, out2 = (o.permute(1, 0) for o in _batched(onet, _crops(img, boxes, 48)))
    score = out2[1, :]
    ipass = score > threshold[2]
    points = out1[:, ipass]
    boxes = torch.cat((boxes[ipass, :4], score[ipass].unsqueeze(1)), dim=1)
    mv = out0[:, ipass].permute(1, 0)
    w_i = boxes[:, 2] - boxes[:, 0] + 1
    h_i = boxes[:, 3] - boxes[:, 1] + 1
    points_x = w_i.repeat(5, 1) * points[:5, :] + boxes[:, 0].repeat(5, 1) - 1
    points_y = h_i.repeat(5, 1) * points[5:10, :] + boxes[:, 1].repeat(5, 1) - 1
    points = torch.stack((points_x, points_y)).permute(2, 1, 0)
    boxes = _bbreg(boxes, mv)
    pick = nms_min(boxes[:, :4], boxes[:, 4], 0.7)
    return boxes[pick].cpu().numpy(), points[pick].cpu().numpy()


@contextlib.contextmanager
def limited_cpu_threads(device: torch.device, n: Optional[int]):
    """On CPU, ``n`` intra-op threads for the block (then the caller's count again). MTCNN's small convolutions
    over a dozen pyramid levels gain nothing from more: 2 threads were slower than 1 on a 2-core machine (0.26 s
    against 0.4-6.8 s for a 512x512 photo, the worst when other processes hold the cores)."""
    if device.type != "cpu" or n is None or n == torch.get_num_threads():
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class TorchMTCNN(nn.Module):
    """The MTCNN cascade in plain torch with facenet-pytorch's shipped weights (see the module docstring)."""

    name = "torch"

    def __init__(self, min_face_size: int = 20, thresholds=(0.6, 0.7, 0.7), factor: float = 0.709,
                 device=None, cpu_threads: Optional[int] = 1):
        super().__init__()
        self.min_face_size, self.thresholds, self.factor = min_face_size, list(thresholds), factor
        self.cpu_threads = cpu_threads
        self.pnet, self.rnet, self.onet = PNet(), RNet(), ONet()
        for name in ("pnet", "rnet", "onet"):
            getattr(self, name).load_state_dict(load_weights(name), strict=True)
        self.eval().requires_grad_(False)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.to(self.device)

    @torch.no_grad()
    def detect(self, image: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """(H, W, 3) uint8 RGB -> boxes (N, 5) with scores, landmarks (N, 5, 2)."""
        img = torch.from_numpy(np.array(image, dtype=np.uint8)).to(self.device).permute(2, 0, 1)[None]
        with limited_cpu_threads(self.device, self.cpu_threads):
            return detect_face(img.float(), self.min_face_size, self.pnet, self.rnet, self.onet, self.thresholds,
                               self.factor)


class FacenetMTCNN:
    """facenet-pytorch's ``MTCNN`` (needs an importable torchvision)."""

    name = "facenet"

    def __init__(self, min_face_size: int = 20, thresholds=(0.6, 0.7, 0.7), factor: float = 0.709,
                 device=None, cpu_threads: Optional[int] = 1):
        facenet_location()  # the extra's version check
        self.cpu_threads = cpu_threads
        from facenet_pytorch import MTCNN
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.mtcnn = MTCNN(min_face_size=min_face_size, thresholds=list(thresholds), factor=factor,
                           select_largest=False, keep_all=True, device=self.device).eval()

    def detect(self, image: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        with limited_cpu_threads(self.device, self.cpu_threads):
            boxes, probs, points = self.mtcnn.detect(np.ascontiguousarray(image), landmarks=True)
        if boxes is None:
            return np.zeros((0, 5), np.float32), np.zeros((0, 5, 2), np.float32)
        boxes = np.concatenate([np.asarray(boxes, np.float32), np.asarray(probs, np.float32)[:, None]], axis=1)
        return boxes, np.asarray(points, np.float32)


_TORCHVISION_ERROR: List[Optional[str]] = []


def torchvision_error() -> Optional[str]:
    """Why torchvision cannot be imported here (None when it can); tried once per process."""
    if not _TORCHVISION_ERROR:
        try:
            import torchvision.ops  # noqa: F401
            import torchvision.transforms.functional  # noqa: F401
            _TORCHVISION_ERROR.append(None)
        except Exception as exc:  # a CUDA-built torchvision over CPU torch raises RuntimeError, not ImportError
            _TORCHVISION_ERROR.append(f"{type(exc).__name__}: {exc}")
    return _TORCHVISION_ERROR[0]


def load_mtcnn(detector: str = "auto", device=None, min_face_size: int = 20, thresholds=(0.6, 0.7, 0.7),
               factor: float = 0.709, cpu_threads: Optional[int] = 1):
    """The MTCNN detector: ``"facenet"`` (facenet-pytorch's MTCNN), ``"torch"`` (the torch-only cascade with
    facenet-pytorch's weights) or ``"auto"`` (facenet when torchvision imports, else torch). On CPU it runs with
    ``cpu_threads`` intra-op threads (:func:`limited_cpu_threads`; None: the caller's count)."""
    if detector not in DETECTORS:
        raise ValueError(f"detector must be one of {DETECTORS}, got {detector!r}")
    if isinstance(min_face_size, bool) or not isinstance(min_face_size, int) or min_face_size < 12:
        raise ValueError(f"min_face_size must be an int >= 12 (MTCNN's smallest window), got {min_face_size!r}")
    if len(thresholds) != 3 or not all(0.0 <= float(t) <= 1.0 for t in thresholds):
        raise ValueError(f"thresholds must be three probabilities (P-, R-, O-Net), got {thresholds!r}")
    if not 0.0 < factor < 1.0:
        raise ValueError(f"factor (the pyramid's scale step) must be in (0, 1), got {factor!r}")
    facenet_location()
    if detector == "auto":
        detector = "facenet" if torchvision_error() is None else "torch"
    elif detector == "facenet" and torchvision_error() is not None:
        raise MissingDependencyError(f"detector 'facenet' needs torchvision, which cannot be imported here "
                                     f"({torchvision_error()}); use detector='torch'")
    cls = FacenetMTCNN if detector == "facenet" else TorchMTCNN
    if cpu_threads is not None and (isinstance(cpu_threads, bool) or not isinstance(cpu_threads, int)
                                    or cpu_threads < 1):
        raise ValueError(f"cpu_threads must be a positive int or None (the caller's count), got {cpu_threads!r}")
    return cls(min_face_size=min_face_size, thresholds=thresholds, factor=factor, device=device,
               cpu_threads=cpu_threads)
