"""``mtlface-fast demo``: encode one face and render it at every age group, on CPU or GPU.

Writes ``<out>/demo_grid.png`` (input + one column per age group) and ``<out>/demo.json`` (predicted
age and group, embedding norm, timings, configuration).
"""
from __future__ import annotations

import json
import os
import platform
import time
from typing import Optional

import numpy as np
import torch
from PIL import Image, ImageDraw

from .loading import load_model
from .preprocess import preprocess, read_image
from .reference.heads import AGE_GROUP_THRESHOLDS, age2group

# A face crop of scikit-image's bundled astronaut photograph (public domain, NASA), roughly aligned the
# way the official 112x112 crops are (eyes near the template's height).
ASTRONAUT_FACE_BOX = (161, 46, 288, 173)


def default_face() -> Image.Image:
    """A real face that ships with scikit-image (no download)."""
    try:
        from skimage import data
    except ImportError as exc:  # pragma: no cover - scikit-image is a dependency
        from .errors import MissingDependencyError
        raise MissingDependencyError("the default demo image comes from scikit-image: pip install scikit-image, "
                                     "or pass --image PATH") from exc
    return Image.fromarray(data.astronaut()).crop(ASTRONAUT_FACE_BOX)


def demo_face(image, size: int, device, log=print):
    """(face, alignment): the photo's largest face aligned onto the 5-point template when the ``align`` extra is
    installed, else the image as given (resized by preprocess) with a note. Without ``image``, scikit-image's
    astronaut photo (aligned) or a crop of it."""
    from .mtcnn import AlignExtraMissing
    try:
        from .align import default_aligner, load_image
        aligner = default_aligner(size, device)
    except AlignExtraMissing as exc:
        if image is not None:
            log(f"NOTE: the photo is resized, not aligned ({exc})")
        return (image if image is not None else default_face()), {"aligned": False, "reason": str(exc)}
    if image is None:
        from skimage import data
        image = data.astronaut()
    faces = aligner.align(load_image(image, name="--image"))
    if not faces:
        log("NOTE: no face found in the image; it is resized, not aligned")
        return image, {"aligned": False, "reason": "no face found"}
    f = faces[0]
    return f.crop, {"aligned": True, "detector": f"mtcnn ({aligner.detector})", "score": round(f.score, 5),
                    "box": [round(float(v), 2) for v in f.box],
                    "landmarks": [[round(float(v), 2) for v in p] for p in f.landmarks]}


def group_labels(age_group: int):
    t = AGE_GROUP_THRESHOLDS[age_group]
    labels, lo = [], 0
    for hi in t:
        labels.append(f"{lo}-{hi}")
        lo = hi + 1
    labels.append(f"{lo}+")
    return labels


def to_uint8(img: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [-1, 1] -> (H, W, 3) uint8."""
    x = ((img.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 0).numpy()


def wrap_text(draw: ImageDraw.ImageDraw, text: str, width: int) -> list:
    """``text`` split into lines no wider than ``width`` pixels (at word boundaries; long words are cut)."""
    lines, line = [], ""
    for word in text.split():
        while draw.textlength(word) > width:  # a word wider than the picture: cut it
            cut = max(1, max(i for i in range(1, len(word) + 1) if draw.textlength(word[:i]) <= width or i == 1))
            if line:
                lines.append(line)
                line = ""
            lines.append(word[:cut])
            word = word[cut:]
        candidate = f"{line} {word}" if line else word
        if line and draw.textlength(candidate) > width:
            lines.append(line)
            line = word
        else:
            line = candidate
    if line:
        lines.append(line)
    return lines


def save_grid(path: str, source: torch.Tensor, aged: torch.Tensor, labels, title: str = "", note: str = "") -> str:
    """A PNG row: the input, then each age group, labelled underneath; ``title`` above and ``note`` below,
    both wrapped to the picture's width."""
    size = source.shape[-1]
    pad, text_h = 4, 14
    cols = 1 + aged.shape[0]
    width = cols * (size + pad) + pad
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    title_lines = wrap_text(draw, title, width - 2 * pad) if title else []
    note_lines = wrap_text(draw, note, width - 2 * pad) if note else []
    top = pad + text_h * len(title_lines)
    canvas = Image.new("RGB", (width, top + size + pad + text_h * (1 + len(note_lines)) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for k, line in enumerate(title_lines):
        draw.text((pad, 1 + k * text_h), line, fill="black")
    for i, (img, label) in enumerate([(source, "input")] + list(zip(aged, labels))):
        x = pad + i * (size + pad)
        canvas.paste(Image.fromarray(to_uint8(img)), (x, top))
        draw.text((x + 2, top + size + 1), label, fill="black")
    for k, line in enumerate(note_lines):
        draw.text((pad, top + size + pad + (1 + k) * text_h), line, fill=(160, 0, 0))
    from .checkpoint import atomic_write
    return atomic_write(path, lambda tmp: canvas.save(tmp, format="PNG"))


def run_demo(image=None, out: str = "demo_out", weights: Optional[str] = None, generator: Optional[str] = None,
             estimator: Optional[str] = None, backbone: str = "ir50", device: str = "cpu", seed: int = 0,
             log=print) -> dict:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but CUDA is not available; use --device cpu")
    face = image if image is not None else default_face()
    if isinstance(face, (str, os.PathLike)):  # read (and check) the image before building the model
        face = read_image(face)
    model, source = load_model(weights, generator, estimator, backbone, seed)
    if weights is None:
        log(f"NOTE: no --weights given; using a {source}. Ages and aged faces are meaningless.")
    model = model.to(dev).eval()
    face, alignment = demo_face(face if image is not None else None, model.config["input_size"], dev, log)
    x = preprocess(face, size=model.config["input_size"], device=dev)

    def timed(fn):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        result = fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return result, (time.perf_counter() - t0) * 1e3

    with torch.inference_mode():
        enc, encode_ms = timed(lambda: model.encode(x))
        aged, synth_ms = timed(lambda: model.synthesize_all_ages(x))
    age_group = model.config["age_group"]
    labels = group_labels(age_group)
    age = float(enc.age[0])
    # The generator outputs input + residual: a random one's residual is ~0, so every tile can equal the input.
    max_residual = float((aged[0].float() - x[0].float()).abs().max())
    unchanged = all(np.array_equal(to_uint8(t), to_uint8(x[0])) for t in aged[0])
    report = {
        "image": str(image) if isinstance(image, (str, os.PathLike)) else ("astronaut (scikit-image)" if image is None
                                                                           else type(image).__name__),
        "weights": source,
        "alignment": alignment,
        "config": model.config,
        "device": str(dev),
        "predicted_age": round(age, 3),                          # the age head (DEX expectation), years
        "group_of_predicted_age": int(age2group(age, age_group)),
        "predicted_group": int(enc.group_logits[0].argmax()),    # the group head (a separate classifier)
        "max_residual": max_residual,
        "aged_faces_equal_input": unchanged,
        "group_labels": labels,
        "embedding_norm": round(float(enc.embedding[0].float().norm()), 4),
        "timings_ms": {"encode": round(encode_ms, 2), "synthesize_all_ages": round(synth_ms, 2)},
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
    }
    os.makedirs(out, exist_ok=True)
    note = ""
    if unchanged:
        note = (f"The aged faces equal the input (largest change {max_residual:.2g}, below one grey level): the "
                f"generator renders input + residual, and " + ("a random generator's residual is ~0; load trained "
                "weights (--weights) to see synthesis." if weights is None else "this generator's residual is ~0."))
    age_line = (f"age head {age:.1f} years, group head {labels[report['predicted_group']]}")
    grid = save_grid(os.path.join(out, "demo_grid.png"), x[0], aged[0], labels,
                     title=f"{age_line} ({source})", note=note)
    from .checkpoint import atomic_write
    js = os.path.join(out, "demo.json")
    atomic_write(js, lambda tmp: open(tmp, "w").write(json.dumps(report, indent=2) + "\n"))
    report["files"] = {"grid": grid, "json": js}
    g_age, g_head = report["group_of_predicted_age"], report["predicted_group"]
    log(f"age head: {age:.1f} years (group {g_age}, {labels[g_age]}); group head: group {g_head} "
        f"({labels[g_head]}); embedding norm {report['embedding_norm']:.3f}; encode {encode_ms:.0f} ms, "
        f"{age_group} ages {synth_ms:.0f} ms on {dev}")
    if note:
        log("NOTE: " + note)
    log(f"wrote {grid} and {js}")
    return report
