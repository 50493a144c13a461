"""Selective fine-tuning (TPAMI): synthetic faces of the training identities at other ages, selected.

For up to ``synth_per_identity`` images of every identity, the trained generator renders the face at every
other age group. A rendering is kept when its embedding stays close to the source's (cosine >=
``min_similarity``) and, with ``check_group``, when the age estimator puts it in the target group. Kept
faces are written as PNGs with a list file in the official format (identity, file, age = the target
group's representative age, gender); the recognition model is then fine-tuned on real + kept faces with
the AIFR objective.
"""
from __future__ import annotations

import os
import sys
from typing import List

import torch
import torch.nn.functional as F
from PIL import Image

from ..checkpoint import atomic_write
from ..reference.heads import AGE_GROUP_THRESHOLDS, age2group
from .data import FaceList, load_image


def group_ages(age_group: int) -> List[float]:
    """A representative age (years) of each group: the middle of its range (open ends: 5 years out)."""
    t = AGE_GROUP_THRESHOLDS[age_group]
    edges = [max(t[0] - 10, 0)] + list(t) + [t[-1] + 10]
    return [float((edges[g] + edges[g + 1]) / 2 + (0.5 if g else 0)) for g in range(age_group)]


@torch.no_grad()
def build_synthetic_set(model, faces: FaceList, cfg, device: torch.device, folder: str, batch_size: int = 16) -> str:
    """Write the selected synthetic faces and ``folder/list.txt``; returns the list path."""
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    was = model.training
    model.eval()
    G = model.age_group
    rep_age = group_ages(G)
    per_id: dict = {}
    for i, label in enumerate(faces.labels):
        lst = per_id.setdefault(int(label), [])
        if len(lst) < cfg.synth_per_identity:
            lst.append(i)
    rows = sorted(i for lst in per_id.values() for i in lst)
    lines, tried = [], 0
    try:
        for b0 in range(0, len(rows), batch_size):
            idx = rows[b0:b0 + batch_size]
            src = torch.stack([load_image(faces.paths[i], cfg.input_size, False) for i in idx]).to(device)
            own = age2group(faces.ages[idx], G)
            ref = F.normalize(model(src).float(), dim=1)
            for g in range(G):
                keep_src = [k for k in range(len(idx)) if own[k] != g]
                if not keep_src:
                    continue
                x = src[keep_src]
                fake = model.synthesize(x, g).clamp(-1, 1)
                enc = model.encode(fake)
                sim = (F.normalize(enc.embedding.float(), dim=1) * ref[keep_src]).sum(1)
                est = enc.group_logits.argmax(1)
                tried += len(keep_src)
                for n, k in enumerate(keep_src):
                    if sim[n] < cfg.min_similarity or (cfg.check_group and int(est[n]) != g):
                        continue
                    i = idx[k]
                    name = f"images/{i:08d}_g{g}.png"
                    arr = ((fake[n].float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
                    Image.fromarray(arr.permute(1, 2, 0).cpu().numpy()).save(os.path.join(folder, name))
                    lines.append(f"{faces.classes[faces.labels[i]]} {name} {rep_age[g]:g} {faces.genders[i]}")
    finally:
        model.train(was)
    if not lines:
        raise ValueError(f"selective fine-tuning: none of {tried} synthesized faces passed the selection "
                         f"(min_similarity={cfg.min_similarity}, check_group={cfg.check_group}); lower the "
                         "threshold or train the generator longer")
    path = os.path.join(folder, "list.txt")
    atomic_write(path, lambda tmp: open(tmp, "w").write("\n".join(lines) + "\n"))
    print(f"selective fine-tuning: kept {len(lines)} of {tried} synthesized faces -> {path}", file=sys.stderr)
    return path
