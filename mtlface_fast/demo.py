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


LABEL_FONT_SIZE = 12


def label_font(size: int = LABEL_FONT_SIZE):
    """The font of the grids' titles, labels and notes: Pillow's bundled TrueType font at ``size`` pixels (its
    10-pixel default renders a space 2 pixels wide, and kerning closes that: "NOT a" reads "NOTa")."""
    from PIL import ImageFont
    return ImageFont.load_default(size=size)


def untrained_note(source: str) -> str:
    """The line a picture made by an untrained model carries (``source``: :func:`load_model`'s description)."""
    return f"UNTRAINED MODEL: {source}. Its ages and aged faces are meaningless; load trained weights (--weights)."


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
    """A PNG row: the input, then each age group, labelled underneath; ``title`` above and ``note`` below (in
    red), both wrapped to the picture's width. The PNG's text chunks hold them too ("Title", and "Warning" for
    the note), for a reader that looks at the file's metadata."""
    from PIL import PngImagePlugin

    size = source.shape[-1]
    font = label_font()
    pad, text_h = 4, LABEL_FONT_SIZE + 4
    cols = 1 + aged.shape[0]
    width = cols * (size + pad) + pad
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    draw.font = font
    title_lines = wrap_text(draw, title, width - 2 * pad) if title else []
    note_lines = wrap_text(draw, note, width - 2 * pad) if note else []
    top = pad + text_h * len(title_lines)
    canvas = Image.new("RGB", (width, top + size + pad + text_h * (1 + len(note_lines)) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    draw.font = font
    for k, line in enumerate(title_lines):
        draw.text((pad, 1 + k * text_h), line, fill="black")
    for i, (img, label) in enumerate([(source, "input")] + list(zip(aged, labels))):
        x = pad + i * (size + pad)
        canvas.paste(Image.fromarray(to_uint8(img)), (x, top))
        draw.text((x + 2, top + size + 1), label, fill="black")
    for k, line in enumerate(note_lines):
        draw.text((pad, top + size + pad + (1 + k) * text_h), line, fill=(160, 0, 0))
    info = PngImagePlugin.PngInfo()
    if title:
        info.add_text("Title", title)
    if note:
        info.add_text("Warning", note)
    from .checkpoint import atomic_write
    return atomic_write(path, lambda tmp: canvas.save(tmp, format="PNG", pnginfo=info))


def demo_title(report: dict, source: str) -> str:
    """The demo picture's title: both heads' answers, each with its group's years, and the model's source.

    The age head (DEX expectation) and the group head (a separate classifier) can disagree, most of all in an
    untrained model; the title says so rather than printing two answers that read as one contradiction."""
    labels, age = report["group_labels"], report["predicted_age"]
    g_age, g_head = report["group_of_predicted_age"], report["predicted_group"]
    heads = f"age head: {age:.1f} years (group {labels[g_age]}); group head: {labels[g_head]}"
    if g_age != g_head:
        heads += " (the two heads disagree)"
    return f"{heads}. Model: {source}"


def run_demo(image=None, out: str = "demo_out", weights: Optional[str] = None, generator: Optional[str] = None,
             estimator: Optional[str] = None, backbone: str = "ir50", device: str = "cpu", seed: int = 0,
             log=print) -> dict:
    from .validation import check_device
    dev = check_device(device, "--device")
    face = image if image is not None else default_face()
    if isinstance(face, (str, os.PathLike)):  # read (and check) the image before building the model
        face = read_image(face, name="--image")
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
    notes = [untrained_note(source)] if weights is None else []
    if unchanged:
        notes.append(f"The aged faces equal the input (largest change {max_residual:.2g}, below one grey level): the "
                     f"generator renders input + residual, and " + ("a random generator's residual is ~0."
                                                                    if weights is None else
                                                                    "this generator's residual is ~0."))
    note = " ".join(notes)
    grid = save_grid(os.path.join(out, "demo_grid.png"), x[0], aged[0], labels,
                     title=demo_title(report, source), note=note)
    from .checkpoint import atomic_write
    js = os.path.join(out, "demo.json")
    atomic_write(js, lambda tmp: open(tmp, "w").write(json.dumps(report, indent=2) + "\n"))
    report["files"] = {"grid": grid, "json": js}
    g_age, g_head = report["group_of_predicted_age"], report["predicted_group"]
    log(f"age head: {age:.1f} years (group {g_age}, {labels[g_age]}); group head: group {g_head} "
        f"({labels[g_head]}); embedding norm {report['embedding_norm']:.3f}; encode {encode_ms:.0f} ms, "
        f"{age_group} ages {synth_ms:.0f} ms on {dev}")
    for n in notes[1:] if weights is None else notes:  # the untrained model's note was logged above
        log("NOTE: " + n)
    log(f"wrote {grid} and {js}")
    return report
