"""Verification metrics on genuine/impostor pair scores (numpy only).

* :func:`kfold_accuracy`: the LFW protocol. Pairs are split into ``n_folds`` consecutive blocks (as the
  standard evaluation code's unshuffled ``KFold`` does); for each fold the threshold that maximizes accuracy
  on the other folds is applied to it. The result is the mean (and std) of the per-fold accuracies.
* :func:`roc_curve` / :func:`tar_at_far`: the ROC of the similarity scores, accepting a pair when its score is
  at or above a threshold, and the true-accept rate at fixed false-accept rates.
* :func:`roc_png`: the ROC drawn with Pillow (log false-accept axis).
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

DEFAULT_FARS = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6)


def _scores_labels(scores, labels) -> Tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels)
    if s.ndim != 1:
        raise ValueError(f"scores must be a 1-D array of pair similarities, got shape {s.shape}")
    if y.shape != s.shape:
        raise ValueError(f"labels must have the same shape as scores {s.shape}, got {y.shape}")
    if s.size == 0:
        raise ValueError("scores is empty: no pairs to evaluate")
    if not np.isfinite(s).all():
        raise ValueError(f"scores contains {int((~np.isfinite(s)).sum())} NaN or infinite value(s)")
    if y.dtype != np.bool_:
        if not np.isin(y, (0, 1)).all():
            raise ValueError("labels must be booleans or 0/1 (1 = same identity)")
        y = y.astype(bool)
    return s, y


def cosine_similarity(a, b) -> np.ndarray:
    """Row-wise cosine similarity of two (N, D) arrays -> (N,)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"a and b must both be (N, D) arrays of the same shape, got {a.shape} and {b.shape}")
    na = np.linalg.norm(a, axis=1).clip(min=1e-12)
    nb = np.linalg.norm(b, axis=1).clip(min=1e-12)
    return (a * b).sum(1) / (na * nb)


def consecutive_folds(n: int, n_folds: int = 10) -> np.ndarray:
    """Fold index of each of ``n`` items split into consecutive blocks (unshuffled KFold sizes:
    the first ``n % n_folds`` folds hold one item more)."""
    if isinstance(n_folds, bool) or not isinstance(n_folds, int) or n_folds < 2:
        raise ValueError(f"n_folds must be an int >= 2, got {n_folds!r}")
    if n < n_folds:
        raise ValueError(f"{n} pair(s) cannot be split into {n_folds} folds; use fewer folds")
    sizes = np.full(n_folds, n // n_folds, dtype=np.int64)
    sizes[: n % n_folds] += 1
    return np.repeat(np.arange(n_folds), sizes)


def best_threshold(scores, labels) -> Tuple[float, float]:
    """(threshold, accuracy): the threshold maximizing accuracy of ``score >= threshold`` on these pairs.

    Every cut between two distinct sorted scores is a candidate (plus accept-all and reject-all); the
    threshold sits at the midpoint of the gap, so a held-out score in the margin goes to the nearer side
    (``+inf`` when rejecting everything is best, ``-inf`` when accepting everything is).
    Among equally accurate cuts the strictest (fewest accepted pairs) wins.
    """
    s, y = _scores_labels(scores, labels)
    order = np.argsort(-s, kind="stable")
    s_sorted, y_sorted = s[order], y[order]
    # Accept the top k pairs, k = 0..n; only k at boundaries between distinct scores are valid cuts.
    tp = np.concatenate([[0], np.cumsum(y_sorted)])
    fp = np.concatenate([[0], np.cumsum(~y_sorted)])
    n_neg = int((~y).sum())
    correct = tp + (n_neg - fp)
    valid = np.ones(s.size + 1, dtype=bool)
    valid[1:-1] = s_sorted[:-1] != s_sorted[1:]
    k = int(np.flatnonzero(valid)[np.argmax(correct[valid])])
    if k == 0:  # reject all, held-out pairs included
        thr = np.inf
    elif k == s.size:  # accept all
        thr = -np.inf
    else:
        thr = 0.5 * (s_sorted[k - 1] + s_sorted[k])
    return float(thr), float(correct[k] / s.size)


def kfold_accuracy(scores, labels, n_folds: int = 10, folds: Optional[Sequence[int]] = None) -> Dict:
    """LFW-protocol accuracy: per fold, the threshold is chosen on the other folds.

    Args:
        scores: (N,) similarities (higher = more alike).
        labels: (N,) booleans (True = same identity).
        n_folds: number of consecutive blocks when ``folds`` is not given.
        folds: (N,) fold index of each pair (e.g. kept from the full list when some pairs were excluded).

    Returns:
        dict with ``accuracy`` (mean), ``std``, ``fold_accuracies``, ``thresholds`` (one per fold),
        ``fold_sizes`` and ``threshold`` (chosen on all pairs, for deployment).
    """
    s, y = _scores_labels(scores, labels)
    f = consecutive_folds(s.size, n_folds) if folds is None else np.asarray(folds)
    if f.shape != s.shape:
        raise ValueError(f"folds must have one entry per pair ({s.size}), got shape {f.shape}")
    ids = np.unique(f)
    if ids.size < 2:
        raise ValueError("cross-validation needs at least 2 non-empty folds")
    accs, thrs, sizes = [], [], []
    for k in ids:
        test = f == k
        thr, _ = best_threshold(s[~test], y[~test])
        accs.append(float(((s[test] >= thr) == y[test]).mean()))
        thrs.append(thr)
        sizes.append(int(test.sum()))
    return dict(accuracy=float(np.mean(accs)), std=float(np.std(accs)), fold_accuracies=accs, thresholds=thrs,
                fold_sizes=sizes, threshold=best_threshold(s, y)[0])


def accuracy_by_gap(scores, labels, gaps, folds, thresholds, bins=(0, 10, 20, 30, 40)) -> Dict:
    """Cross-validated accuracy split by the age gap of the pairs.

    Each pair is classified with its own fold's threshold (as in :func:`kfold_accuracy`), and the right
    answers are pooled per gap bin ``[bins[i], bins[i+1])`` (the last bin open-ended). Pairs with an unknown
    gap (NaN) are counted under ``n_unknown``.

    Args:
        gaps: (N,) absolute age differences in years (NaN when a side has no label).
        folds: (N,) fold of each pair; thresholds: ``{fold: threshold}``.
    """
    s, y = _scores_labels(scores, labels)
    g = np.asarray(gaps, dtype=np.float64)
    f = np.asarray(folds)
    if g.shape != s.shape or f.shape != s.shape:
        raise ValueError(f"gaps and folds must have one entry per pair ({s.size}), got {g.shape} and {f.shape}")
    thr = np.array([thresholds[k] for k in f.tolist()], dtype=np.float64)
    correct = (s >= thr) == y
    known = np.isfinite(g)
    out = dict(n_unknown=int((~known).sum()), bins={})
    edges = list(bins) + [np.inf]
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = known & (g >= lo) & (g < hi)
        if m.any():
            key = f"{lo:g}-{hi:g}" if np.isfinite(hi) else f"{lo:g}+"
            out["bins"][key] = dict(n_pairs=int(m.sum()), n_genuine=int(y[m].sum()),
                                    accuracy=float(correct[m].mean()))
    return out


def roc_curve(scores, labels) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds): one point per distinct score, accepting ``score >= threshold``, from
    (0, 0) at threshold +inf to (1, 1) at the lowest score. Needs both genuine and impostor pairs."""
    s, y = _scores_labels(scores, labels)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"a ROC needs genuine and impostor pairs, got {n_pos} genuine and {n_neg} impostor")
    order = np.argsort(-s, kind="stable")
    s_sorted, y_sorted = s[order], y[order]
    last = np.r_[np.flatnonzero(s_sorted[:-1] != s_sorted[1:]), s.size - 1]  # last index of each distinct score
    tp = np.cumsum(y_sorted)[last]
    fp = np.cumsum(~y_sorted)[last]
    tpr = np.r_[0.0, tp / n_pos]
    fpr = np.r_[0.0, fp / n_neg]
    thr = np.r_[np.inf, s_sorted[last]]
    return fpr, tpr, thr


def far_key(far: float) -> str:
    """``1e-03`` for powers of ten, else the shortest exact form (``0.25``)."""
    key = f"{far:.0e}"
    return key if float(key) == far else f"{far:g}"


def tar_at_far(scores, labels, fars: Iterable[float] = DEFAULT_FARS, min_impostors_per_far: float = 1.0) -> Dict:
    """True-accept rate at each false-accept rate: the highest TPR of a ROC point whose FPR <= far.

    A FAR is reported only when the impostor count resolves it (``far * n_impostor >= min_impostors_per_far``);
    the others are listed under ``skipped`` with the reason.

    Returns:
        dict ``{"tar": {far: tar}, "threshold": {far: thr}, "skipped": {far: reason}, "n_genuine", "n_impostor"}``
        (FAR keys from :func:`far_key`, e.g. ``"1e-03"``).
    """
    fpr, tpr, thr = roc_curve(scores, labels)
    y = np.asarray(labels).astype(bool)
    n_neg = int((~y).sum())
    out = dict(tar={}, threshold={}, skipped={}, n_genuine=int(y.sum()), n_impostor=n_neg)
    for far in fars:
        far = float(far)
        if not 0.0 < far <= 1.0:
            raise ValueError(f"fars must lie in (0, 1], got {far}")
        key = far_key(far)
        if far * n_neg < min_impostors_per_far:
            out["skipped"][key] = f"{n_neg} impostor pairs cannot resolve FAR {key}"
            continue
        ok = np.flatnonzero(fpr <= far + 1e-12)
        i = ok[np.argmax(tpr[ok])]
        out["tar"][key] = float(tpr[i])
        out["threshold"][key] = float(thr[i])
    return out


def equal_error_rate(scores, labels) -> float:
    """The error rate where the false-accept and false-reject rates cross (linear between ROC points)."""
    fpr, tpr, _ = roc_curve(scores, labels)
    fnr = 1.0 - tpr
    d = fpr - fnr  # increasing from -1 to 1
    i = int(np.argmax(d >= 0))
    if i == 0 or d[i] == 0:
        return float(fpr[i])
    w = -d[i - 1] / (d[i] - d[i - 1])
    return float(fpr[i - 1] + w * (fpr[i] - fpr[i - 1]))


def verification_metrics(scores, labels, n_folds: int = 10, folds=None, fars: Iterable[float] = DEFAULT_FARS) -> Dict:
    """Everything the verification report holds for one pair list."""
    s, y = _scores_labels(scores, labels)
    out = dict(n_pairs=int(s.size), n_genuine=int(y.sum()), n_impostor=int((~y).sum()))
    out.update(kfold_accuracy(s, y, n_folds=n_folds, folds=folds))
    if out["n_genuine"] and out["n_impostor"]:
        t = tar_at_far(s, y, fars)
        out.update(tar_at_far=t["tar"], tar_threshold=t["threshold"], tar_skipped=t["skipped"],
                   eer=equal_error_rate(s, y))
        fpr, tpr, _ = roc_curve(s, y)
        out["auc"] = float(np.trapezoid(tpr, fpr)) if hasattr(np, "trapezoid") else float(np.trapz(tpr, fpr))
    out["genuine_mean"] = float(s[y].mean()) if y.any() else None
    out["impostor_mean"] = float(s[~y].mean()) if (~y).any() else None
    return out


# -- ROC picture -------------------------------------------------------------------------------------------------
_COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127)]


def roc_png(path: str, curves: Dict[str, Tuple[np.ndarray, np.ndarray]], title: str = "ROC",
            size: Tuple[int, int] = (640, 480)) -> str:
    """Draw ROC curves (TAR against log10 FAR) into a PNG with Pillow and write it atomically.

    Args:
        path: output .png.
        curves: ``{label: (fpr, tpr)}``.
    """
    from PIL import Image, ImageDraw

    from ..checkpoint import atomic_write

    if not curves:
        raise ValueError("curves is empty: nothing to draw")
    W, H = size
    left, right, top, bottom = 60, 20, 30, 50
    pw, ph = W - left - right, H - top - bottom
    positive = [f[f > 0].min() for f, _ in (map(np.asarray, c) for c in curves.values()) if (np.asarray(f) > 0).any()]
    # one decade below the smallest non-zero FAR, so the first ROC step is visible
    lo = int(np.floor(np.log10(min(positive)) - 1e-9)) if positive else -6
    lo = max(min(lo, -1), -8)
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)

    def xy(fpr, tpr):
        lx = np.log10(np.clip(fpr, 10.0 ** lo, 1.0))
        return left + (lx - lo) / (0 - lo) * pw, top + (1 - tpr) * ph

    for e in range(lo, 1):  # vertical grid at each decade
        x, _ = xy(10.0 ** e, 0)
        d.line([(x, top), (x, top + ph)], fill=(225, 225, 225))
        d.text((x - 12, top + ph + 4), f"1e{e}" if e else "1", fill="black")
    for t in np.linspace(0, 1, 6):
        _, yy = xy(1, t)
        d.line([(left, yy), (left + pw, yy)], fill=(225, 225, 225))
        d.text((left - 30, yy - 6), f"{t:.1f}", fill="black")
    d.rectangle([left, top, left + pw, top + ph], outline="black")
    d.text((left + pw // 2 - 70, H - 20), "false accept rate (log)", fill="black")
    d.text((4, top - 20), "TAR", fill="black")
    d.text((left + 4, 6), title, fill="black")
    for i, (label, (fpr, tpr)) in enumerate(curves.items()):
        color = _COLORS[i % len(_COLORS)]
        fpr, tpr = np.asarray(fpr, dtype=np.float64), np.asarray(tpr, dtype=np.float64)
        # Step curve: from each point, TAR holds until the next FAR.
        pts: List[Tuple[float, float]] = []
        for j in range(fpr.size):
            if j:
                pts.append(xy(fpr[j], tpr[j - 1]))
            pts.append(xy(fpr[j], tpr[j]))
        d.line(pts, fill=color, width=2)
        ly = top + ph - 16 * (len(curves) - i) - 4
        d.line([(left + pw - 150, ly + 6), (left + pw - 130, ly + 6)], fill=color, width=3)
        d.text((left + pw - 125, ly), str(label)[:22], fill="black")
    return atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))
