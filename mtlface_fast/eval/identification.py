"""Closed-set identification: CMC curves and rank-1 over a probe/gallery split (numpy only).

A probe is ranked against the gallery *identities*: each identity scores the best similarity of its
gallery images (synthesized faces added to the gallery simply count as more images of their identity).
Rank r means the probe's true identity is among the r best-scoring identities; ties count against the
probe (an impostor identity scoring exactly as high ranks ahead), so a constant similarity never
looks good. Probes whose identity has no gallery image cannot be identified in a closed set: they are
excluded and counted, not silently dropped.

Splits of a labelled image list (``path id [age] [role]`` lines, see :func:`read_identity_list`):

* ``loo``: leave-one-out (FG-NET / MORPH style): every image is a probe against all the others.
* ``role``: the list's 4th column says ``probe`` or ``gallery``.
* ``age``: probes are the images younger than ``split_age`` (e.g. a child photo), the gallery the others
  (the adult photos): the missing-children use case.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np

SPLITS = ("loo", "role", "age")


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True).clip(min=1e-12)


def cosine_matrix(a, b) -> np.ndarray:
    """(P, D) x (G, D) -> (P, G) cosine similarities (float32: a 10k x 10k split stays at 400 MB)."""
    a, b = np.asarray(a, dtype=np.float32), np.asarray(b, dtype=np.float32)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"embeddings must be (P, D) and (G, D) with the same D, got {a.shape} and {b.shape}")
    return _normalize(a) @ _normalize(b).T


def identity_ranks(similarity, probe_ids: Sequence, gallery_ids: Sequence, exclude=None) -> Dict:
    """Rank (1-based) of each probe's true identity among the gallery identities.

    Args:
        similarity: (P, G) scores, higher = more alike.
        probe_ids: (P,) identity of each probe.
        gallery_ids: (G,) identity of each gallery image (repeats allowed).
        exclude: optional (P, G) boolean mask of entries to ignore (leave-one-out: a probe's own image).

    Returns:
        dict with ``ranks`` (int array over the probes that can be identified), ``probe_index`` (their
        indices), ``n_identities`` and ``unmatched`` (indices of probes whose identity has no gallery image).
    """
    s = np.asarray(similarity)
    if not np.issubdtype(s.dtype, np.floating):
        s = s.astype(np.float64)
    p_ids, g_ids = np.asarray(probe_ids), np.asarray(gallery_ids)
    if s.ndim != 2 or s.shape != (p_ids.size, g_ids.size):
        raise ValueError(f"similarity must be (P, G) = ({p_ids.size}, {g_ids.size}) to match the ids, got {s.shape}")
    if s.size == 0:
        raise ValueError("identification needs at least one probe and one gallery image")
    if not np.isfinite(s).all():
        raise ValueError("similarity contains NaN or infinite values")
    ident, g_col = np.unique(g_ids, return_inverse=True)
    if exclude is not None:
        s = s.copy()
        ex = np.asarray(exclude, dtype=bool)
        if ex.shape != s.shape:
            raise ValueError(f"exclude must have the similarity's shape {s.shape}, got {ex.shape}")
        s[ex] = -np.inf
    # best score of each gallery identity for each probe: (P, I), one pass over identity-sorted columns
    order = np.argsort(g_col, kind="stable")
    starts = np.r_[0, np.flatnonzero(np.diff(g_col[order])) + 1]
    per_id = np.maximum.reduceat(s[:, order], starts, axis=1)
    pos = {v: i for i, v in enumerate(ident.tolist())}
    ranks, index, unmatched = [], [], []
    for i, pid in enumerate(p_ids.tolist()):
        j = pos.get(pid)
        if j is None or not np.isfinite(per_id[i, j]):
            unmatched.append(i)
            continue
        true = per_id[i, j]
        others = np.delete(per_id[i], j)
        ranks.append(1 + int((others >= true).sum()))
        index.append(i)
    return dict(ranks=np.asarray(ranks, dtype=np.int64), probe_index=np.asarray(index, dtype=np.int64),
                n_identities=int(ident.size), unmatched=unmatched)


def cmc(ranks, max_rank: Optional[int] = None) -> np.ndarray:
    """Cumulative match characteristic: ``cmc[r-1]`` = fraction of probes with rank <= r."""
    r = np.asarray(ranks, dtype=np.int64)
    if r.size == 0:
        raise ValueError("no identifiable probes: every probe's identity is missing from the gallery")
    if (r < 1).any():
        raise ValueError("ranks are 1-based")
    n = int(max_rank or r.max())
    return np.array([(r <= k).mean() for k in range(1, n + 1)], dtype=np.float64)


def identification_metrics(similarity, probe_ids, gallery_ids, exclude=None, ranks_at=(1, 5, 10)) -> Dict:
    """Rank-1, rank-k and the CMC curve (up to the number of gallery identities)."""
    r = identity_ranks(similarity, probe_ids, gallery_ids, exclude)
    curve = cmc(r["ranks"], r["n_identities"])
    return dict(n_probes=int(len(probe_ids)), n_identified=int(r["ranks"].size), n_unmatched=len(r["unmatched"]),
                unmatched_probes=r["unmatched"], n_gallery=int(len(gallery_ids)),
                n_identities=r["n_identities"], rank1=float(curve[0]),
                rank={str(k): float(curve[min(k, curve.size) - 1]) for k in ranks_at},
                cmc=[float(v) for v in curve], mean_rank=float(r["ranks"].mean()))


# -- labelled image lists ----------------------------------------------------------------------------------------
@dataclass
class IdentityList:
    source: str
    paths: List[str]
    ids: List[str]
    ages: List[Optional[float]]
    roles: List[Optional[str]]
    lines: List[int]
    missing: List[tuple]      # (line, path) of images that do not exist (excluded)


def read_identity_list(path: str, root: Optional[str] = None, check_files: bool = True) -> IdentityList:
    """Read ``path id [age] [role]`` lines (tab-separated when a line has a tab); ``-`` for an unknown age.

    Missing images are excluded and listed (with their line). Malformed lines raise ``ValueError``.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"identity list not found: {path}")
    root = os.fspath(root) if root is not None else os.path.dirname(os.path.abspath(path))
    out = IdentityList(path, [], [], [], [], [], [])
    n = 0
    with open(path, encoding="utf-8-sig") as fh:
        for lineno, raw in enumerate(fh, 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            toks = [t.strip() for t in line.split("\t")] if "\t" in line else line.split()
            where = f"{path}:{lineno}"
            if not 2 <= len(toks) <= 4:
                raise ValueError(f"{where}: expected 'path id [age] [role]', got {len(toks)} field(s): {line!r}")
            age = None
            if len(toks) >= 3 and toks[2] != "-":
                try:
                    age = float(toks[2])
                except ValueError:
                    raise ValueError(f"{where}: age {toks[2]!r} is not a number (use '-' when unknown)") from None
                if not 0 <= age <= 150:
                    raise ValueError(f"{where}: age {age} is outside [0, 150]")
            role = toks[3].lower() if len(toks) == 4 else None
            if role is not None and role not in ("probe", "gallery"):
                raise ValueError(f"{where}: role must be 'probe' or 'gallery', got {toks[3]!r}")
            n += 1
            p = toks[0] if os.path.isabs(toks[0]) else os.path.join(root, toks[0])
            if check_files and not os.path.isfile(p):
                out.missing.append((lineno, p))
                continue
            out.paths.append(p)
            out.ids.append(toks[1])
            out.ages.append(age)
            out.roles.append(role)
            out.lines.append(lineno)
    if n == 0:
        raise ValueError(f"identity list {path} is empty")
    if not out.paths:
        raise ValueError(f"identity list {path}: all {n} image(s) are missing (first: line {out.missing[0][0]}: "
                         f"{out.missing[0][1]}); check --root")
    return out


def split_probe_gallery(lst: IdentityList, split: str = "loo", split_age: float = 18.0):
    """(probe_index, gallery_index, exclude_mask or None) for a split of an identity list."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    n = len(lst.paths)
    idx = np.arange(n)
    if split == "loo":
        return idx, idx, np.eye(n, dtype=bool)
    if split == "role":
        if any(r is None for r in lst.roles):
            line = lst.lines[[r is None for r in lst.roles].index(True)]
            raise ValueError(f"split 'role' needs a 4th column probe/gallery on every line ({lst.source}:{line} has none)")
        probe = idx[[r == "probe" for r in lst.roles]]
        gallery = idx[[r == "gallery" for r in lst.roles]]
    else:
        if any(a is None for a in lst.ages):
            line = lst.lines[[a is None for a in lst.ages].index(True)]
            raise ValueError(f"split 'age' needs an age on every line ({lst.source}:{line} has none)")
        ages = np.asarray(lst.ages, dtype=np.float64)
        probe, gallery = idx[ages < split_age], idx[ages >= split_age]
    if probe.size == 0 or gallery.size == 0:
        raise ValueError(f"split {split!r} leaves {probe.size} probe(s) and {gallery.size} gallery image(s); "
                         f"both must be non-empty")
    return probe, gallery, None


def cmc_png(path: str, curves: Dict[str, Sequence[float]], max_rank: int = 20, title: str = "CMC",
            size=(640, 480)) -> str:
    """Draw CMC curves (identification rate against rank 1..max_rank) into a PNG with Pillow (atomic write)."""
    from PIL import Image, ImageDraw

    from ..checkpoint import atomic_write
    from .verification import _COLORS

    if not curves:
        raise ValueError("curves is empty: nothing to draw")
    n = max(2, min(max_rank, max(len(c) for c in curves.values())))
    W, H = size
    left, right, top, bottom = 60, 20, 30, 50
    pw, ph = W - left - right, H - top - bottom
    lo = min(min(float(c[0]), 1.0) for c in curves.values())
    lo = max(0.0, np.floor(lo * 10 - 1e-9) / 10)  # y axis from the decile below the lowest rank-1

    def xy(rank, rate):
        return left + (rank - 1) / (n - 1) * pw, top + (1 - (rate - lo) / (1 - lo if lo < 1 else 1)) * ph

    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    for r in sorted({1, *range(5, n + 1, 5), n}):
        x, _ = xy(r, lo)
        d.line([(x, top), (x, top + ph)], fill=(225, 225, 225))
        d.text((x - 4, top + ph + 4), str(r), fill="black")
    for t in np.linspace(lo, 1, 6):
        _, y = xy(1, t)
        d.line([(left, y), (left + pw, y)], fill=(225, 225, 225))
        d.text((left - 34, y - 6), f"{t:.2f}", fill="black")
    d.rectangle([left, top, left + pw, top + ph], outline="black")
    d.text((left + pw // 2 - 15, H - 20), "rank", fill="black")
    d.text((4, top - 20), "identification rate", fill="black")
    d.text((left + 150, 6), title, fill="black")
    for i, (label, c) in enumerate(curves.items()):
        color = _COLORS[i % len(_COLORS)]
        c = [float(v) for v in c]
        pts = [xy(r, c[min(r, len(c)) - 1]) for r in range(1, n + 1)]
        d.line(pts, fill=color, width=2)
        ly = top + ph - 16 * (len(curves) - i) - 4
        d.line([(left + pw - 170, ly + 6), (left + pw - 150, ly + 6)], fill=color, width=3)
        d.text((left + pw - 145, ly), str(label)[:24], fill="black")
    return atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))
