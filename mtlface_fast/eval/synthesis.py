"""Synthesis quality: identity preservation and age accuracy of generated faces, and a contact sheet.

For each real face and each target age group g, the generator's output is embedded and its age estimated:

* identity preservation: cosine similarity between the real face's embedding and the aged face's;
* age accuracy: the fraction of outputs whose estimated age falls in the target group (:func:`age2group`),
  and the mean estimated age per target group (it should rise with g).
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np

from ..reference.heads import age2group, check_age_group


def synthesis_metrics(real_embeddings, aged_embeddings, aged_ages, age_group: int = 7) -> Dict:
    """Args: real_embeddings (B, D); aged_embeddings (B, G, D); aged_ages (B, G) estimated ages of the outputs."""
    r = np.asarray(real_embeddings, dtype=np.float64)
    a = np.asarray(aged_embeddings, dtype=np.float64)
    ages = np.asarray(aged_ages, dtype=np.float64)
    check_age_group(age_group)
    if r.ndim != 2 or a.ndim != 3 or a.shape[0] != r.shape[0] or a.shape[2] != r.shape[1] or a.shape[1] != age_group:
        raise ValueError(f"expected real (B, D) and aged (B, {age_group}, D) embeddings, got {r.shape} and {a.shape}")
    if ages.shape != a.shape[:2]:
        raise ValueError(f"aged_ages must be (B, G) = {a.shape[:2]}, got {ages.shape}")
    if r.shape[0] == 0:
        raise ValueError("no faces to evaluate")
    rn = r / np.linalg.norm(r, axis=1, keepdims=True).clip(min=1e-12)
    an = a / np.linalg.norm(a, axis=2, keepdims=True).clip(min=1e-12)
    cos = np.einsum("bd,bgd->bg", rn, an)
    hit = age2group(ages, age_group) == np.arange(age_group)[None, :]
    return dict(n_faces=int(r.shape[0]), age_group=age_group,
                identity_cosine_mean=float(cos.mean()), identity_cosine_min=float(cos.min()),
                identity_cosine_per_group=[float(v) for v in cos.mean(0)],
                age_accuracy=float(hit.mean()), age_accuracy_per_group=[float(v) for v in hit.mean(0)],
                mean_age_per_group=[float(v) for v in ages.mean(0)])


def contact_sheet(path: str, sources, aged, labels: Sequence[str], captions: Optional[Sequence[str]] = None,
                  title: str = "") -> str:
    """A PNG grid: one row per face (the input, then each age group), group labels on top.

    Args:
        sources: (B, 3, H, W) inputs in [-1, 1]; aged: (B, G, 3, H, W) outputs in [-1, 1].
    """
    from PIL import Image, ImageDraw

    from ..checkpoint import atomic_write
    from ..demo import to_uint8

    B, G = aged.shape[:2]
    if len(labels) != G:
        raise ValueError(f"labels must name the {G} age groups, got {len(labels)}")
    size = sources.shape[-1]
    pad, text_h = 4, 14
    head = text_h * (2 if title else 1)
    canvas = Image.new("RGB", ((G + 1) * (size + pad) + pad, head + pad + B * (size + pad + (text_h if captions
                                                                                             else 0))), "white")
    d = ImageDraw.Draw(canvas)
    if title:
        d.text((pad, 1), title, fill="black")
    for j, lab in enumerate(["input", *labels]):
        d.text((pad + j * (size + pad) + 2, head - text_h + 1), lab, fill="black")
    y = head + pad
    for b in range(B):
        canvas.paste(Image.fromarray(to_uint8(sources[b])), (pad, y))
        for g in range(G):
            canvas.paste(Image.fromarray(to_uint8(aged[b, g])), (pad + (g + 1) * (size + pad), y))
        y += size + pad
        if captions:
            d.text((pad, y - 2), str(captions[b])[:120], fill="black")
            y += text_h
    return atomic_write(path, lambda tmp: canvas.save(tmp, format="PNG"))
