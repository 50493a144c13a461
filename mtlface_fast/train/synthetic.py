"""A small synthetic cross-age face set: procedural faces with identity and age attributes.

Each identity draws fixed traits (skin tone, face shape, eye spacing and colour, hair colour and style,
mouth width, gender); age changes the hair (greying, receding), adds forehead and eye wrinkles, shrinks
the face's fullness and darkens the skin slightly. Written as PNGs plus a list file in the official format
(``id filename age gender``), so every part of the training pipeline runs on it.
"""
from __future__ import annotations

import os
import random
from typing import Optional, Sequence

from PIL import Image, ImageDraw

from ..reference.heads import AGE_GROUP_THRESHOLDS


def _mix(a, b, t):
    return tuple(int(round(x + (y - x) * t)) for x, y in zip(a, b))


def draw_face(traits: dict, age: float, size: int = 112, jitter: Optional[random.Random] = None) -> Image.Image:
    """Render one face of an identity (``traits``) at ``age`` years on a size x size canvas."""
    r = jitter or random.Random(0)
    s = size / 112.0
    t = min(max(age, 0.0), 100.0) / 100.0
    bg = tuple(traits["bg"])
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    dx, dy = r.uniform(-2, 2) * s, r.uniform(-2, 2) * s
    cx, cy = 56 * s + dx, 58 * s + dy
    w = traits["width"] * s * (1.0 - 0.06 * t + (0.08 if age < 12 else 0.0))
    h = traits["height"] * s * (0.9 if age < 12 else 1.0)
    skin = _mix(traits["skin"], (max(traits["skin"][0] - 40, 0), max(traits["skin"][1] - 45, 0),
                                 max(traits["skin"][2] - 40, 0)), 0.5 * t)
    hair = _mix(traits["hair"], (200, 200, 205), max(0.0, (age - 35) / 45.0) if age > 35 else 0.0)
    # hair mass behind the face; recedes with age
    recede = max(0.0, (age - 40) / 60.0) * traits["recede"]
    d.ellipse([cx - w - 6 * s, cy - h - 10 * s + recede * 14 * s, cx + w + 6 * s, cy + h * 0.3], fill=hair)
    d.ellipse([cx - w, cy - h, cx + w, cy + h], fill=skin)
    top = cy - h + recede * 18 * s
    d.chord([cx - w, top - 6 * s, cx + w, cy - h * 0.35], 180, 360, fill=hair)
    # eyes
    ey, es = cy - h * 0.15, traits["eye_gap"] * s
    er = 4.5 * s * (1.15 if age < 12 else 1.0)
    for ex in (cx - es, cx + es):
        d.ellipse([ex - er * 1.6, ey - er, ex + er * 1.6, ey + er], fill=(245, 245, 245))
        d.ellipse([ex - er * 0.8, ey - er * 0.8, ex + er * 0.8, ey + er * 0.8], fill=tuple(traits["iris"]))
        if age > 45:  # crow's feet
            for k in range(1 + int((age - 45) / 15)):
                off = (k - 1) * 2.5 * s
                sx = ex + (er * 2.0 if ex > cx else -er * 2.0)
                d.line([sx, ey + off, sx + (4 * s if ex > cx else -4 * s), ey + off + 1.5 * s],
                       fill=_mix(skin, (60, 40, 30), 0.5), width=max(1, int(s)))
    # brows
    brow = _mix(traits["hair"], (210, 210, 210), max(0.0, (age - 50) / 40.0))
    for ex in (cx - es, cx + es):
        d.line([ex - 7 * s, ey - 9 * s, ex + 7 * s, ey - 10 * s], fill=brow, width=max(1, int(2 * s)))
    # nose and mouth
    d.line([cx, ey + 2 * s, cx - 3 * s, cy + h * 0.3, cx + 2 * s, cy + h * 0.33], fill=_mix(skin, (80, 50, 40), 0.5),
           width=max(1, int(s)))
    mw, my = traits["mouth"] * s, cy + h * 0.55
    d.arc([cx - mw, my - 5 * s, cx + mw, my + 5 * s], 20, 160, fill=(150, 60, 60), width=max(1, int(2 * s)))
    # forehead wrinkles and nasolabial folds
    n_lines = int(max(0.0, (age - 30) / 12.0))
    for k in range(n_lines):
        y = top + (8 + 5 * k) * s
        d.arc([cx - w * 0.6, y, cx + w * 0.6, y + 6 * s], 200, 340, fill=_mix(skin, (70, 45, 35), 0.6),
              width=max(1, int(s)))
    if age > 40:
        for sign in (-1, 1):
            d.line([cx + sign * 8 * s, cy + h * 0.3, cx + sign * (mw + 3 * s), my + 2 * s],
                   fill=_mix(skin, (70, 45, 35), 0.5), width=max(1, int(s)))
    if traits["gender"] == 1 and 18 <= age:  # stubble
        d.chord([cx - w * 0.8, cy + h * 0.2, cx + w * 0.8, cy + h * 1.0], 0, 180,
                fill=_mix(skin, _mix(traits["hair"], (180, 180, 180), max(0.0, (age - 40) / 40)), 0.35))
    return img


def random_traits(rng: random.Random) -> dict:
    return dict(
        skin=(rng.randint(120, 250), rng.randint(90, 210), rng.randint(70, 190)),
        hair=(rng.randint(10, 140), rng.randint(10, 100), rng.randint(0, 80)),
        iris=(rng.randint(20, 120), rng.randint(40, 140), rng.randint(20, 160)),
        bg=(rng.randint(0, 255), rng.randint(0, 255), rng.randint(0, 255)),
        width=rng.uniform(28, 38), height=rng.uniform(38, 48), eye_gap=rng.uniform(11, 17),
        mouth=rng.uniform(7, 13), recede=rng.uniform(0.0, 1.0), gender=rng.randint(0, 1))


def make_synthetic_dataset(folder: str, identities: int = 16, images_per_identity: int = 8, size: int = 112,
                           seed: int = 0, ages: Optional[Sequence[float]] = None,
                           list_name: str = "train.txt") -> str:
    """Write ``identities * images_per_identity`` PNG faces under ``folder/images`` and the list file.

    Ages are spread over 1..90 years so that every age group (4..8 groups) is populated; each identity
    gets ages from several groups. Returns the list file's path.
    """
    for name, v in (("identities", identities), ("images_per_identity", images_per_identity), ("size", size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    rng = random.Random(seed)
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    lines = []
    edges = [0.0] + [float(x) for x in AGE_GROUP_THRESHOLDS[8]] + [90.0]
    for ident in range(identities):
        traits = random_traits(rng)
        for k in range(images_per_identity):
            if ages is not None:
                age = float(ages[(ident * images_per_identity + k) % len(ages)])
            else:  # stratified over the 8-group bins, offset per identity
                b = (k + ident) % (len(edges) - 1)
                age = round(rng.uniform(max(edges[b], 1.0) + 0.5, edges[b + 1]), 1)
            name = f"images/{ident:04d}_{k:03d}.png"
            draw_face(traits, age, size, random.Random(rng.random())).save(os.path.join(folder, name))
            lines.append(f"{ident} {name} {age:g} {traits['gender']}")
    path = os.path.join(folder, list_name)
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    return path
