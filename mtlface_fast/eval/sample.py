"""A small evaluation set built from the face crops that ship with scikit-image (no download).

``python -m mtlface_fast.eval.sample OUT [--variants K]`` writes, under OUT:

* ``images/fNNN_vK.png``: each of the 100 LFW crops of ``skimage.data.lfw_subset()`` (25x25 grayscale)
  upsampled to 112x112 RGB, in K variants (variant 0 as is; the others shifted by a pixel or two, with
  brightness and contrast changed);
* ``pairs.txt``: 'left right label' lines, genuine = two variants of one crop, impostor = two different
  crops, interleaved so every fold holds both;
* ``identities.txt``: 'path id' lines (one identity per crop) for leave-one-out identification.

The crops are faces of real people but their identities are not labelled here, so "genuine" means
"the same photograph, perturbed": a smoke test and a throughput workload, not a benchmark.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
from PIL import Image, ImageEnhance


def write_sample(out: str, variants: int = 2, size: int = 112, n_faces: int = 100, seed: int = 0) -> dict:
    if isinstance(variants, bool) or not isinstance(variants, int) or variants < 2:
        raise ValueError(f"variants must be an int >= 2 (genuine pairs need two variants), got {variants!r}")
    if not 2 <= n_faces <= 100:
        raise ValueError(f"n_faces must be in [2, 100] (lfw_subset holds 100 faces), got {n_faces}")
    from skimage import data
    faces = data.lfw_subset()[:n_faces]
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    names = [[f"images/f{i:03d}_v{k}.png" for k in range(variants)] for i in range(n_faces)]
    for i, a in enumerate(faces):
        base = Image.fromarray((a * 255).round().astype(np.uint8)).convert("RGB").resize((size, size), Image.BICUBIC)
        for k in range(variants):
            img = base
            if k:
                dx, dy = rng.integers(-2, 3, size=2)
                img = img.transform(img.size, Image.AFFINE, (1, 0, int(dx), 0, 1, int(dy)), Image.BILINEAR)
                img = ImageEnhance.Brightness(img).enhance(float(rng.uniform(0.85, 1.15)))
                img = ImageEnhance.Contrast(img).enhance(float(rng.uniform(0.85, 1.15)))
            img.save(os.path.join(out, names[i][k]))
    lines = []
    for i in range(n_faces):
        for k in range(1, variants):
            lines.append(f"{names[i][0]} {names[i][k]} 1")
            j = (i + k) % n_faces
            lines.append(f"{names[i][k]} {names[j][0]} 0")
    with open(os.path.join(out, "pairs.txt"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    with open(os.path.join(out, "identities.txt"), "w") as fh:
        fh.write("".join(f"{n} face{i:03d}\n" for i in range(n_faces) for n in names[i]))
    return dict(images=n_faces * variants, pairs=len(lines), folder=out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mtlface_fast.eval.sample", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="output folder")
    p.add_argument("--variants", type=int, default=2, help="variants per face (2): images = 100 x variants")
    p.add_argument("--size", type=int, default=112, help="image side (112)")
    args = p.parse_args(argv)
    info = write_sample(args.out, args.variants, args.size)
    print(f"wrote {info['images']} images and {info['pairs']} pairs under {info['folder']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
