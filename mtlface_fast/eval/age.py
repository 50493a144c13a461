"""Age estimation metrics (MAE, group accuracy, cumulative score) and age-label files.

Label files:

* text: ``path age`` per line (tab-separated when the line has a tab), ``#`` comments;
* JSON: a mapping ``{path: entry}`` or a list of entries, each entry a number or an object with the path
  under ``path`` / ``file`` / ``filename`` / ``image`` and the age under ``age``, ``attributes.age`` or
  ``faces[0].attributes.age`` (a number, or an object with ``value`` as Face++ writes it). ECAF's
  ``data.json`` holds Face++ attributes per image; entries without an age are skipped and counted.
"""
from __future__ import annotations

import json
import os
from typing import Dict, Optional, Tuple

import numpy as np

from ..reference.heads import age2group, check_age_group


def _ages(x, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of ages, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return a


def age_metrics(pred_age, true_age, age_group: int = 7, group_logits=None, cs_years: Tuple[int, ...] = (5, 10)) -> Dict:
    """MAE (years), group accuracy and cumulative score of predicted ages against labels.

    Args:
        pred_age: (N,) predicted ages (e.g. the DEX expectation).
        true_age: (N,) labelled ages.
        age_group: G; the groups are :func:`age2group` bins.
        group_logits: optional (N, G) logits of the group head; adds ``group_accuracy_head``.
        cs_years: report the fraction of predictions within these many years (cumulative score).
    """
    p, t = _ages(pred_age, "pred_age"), _ages(true_age, "true_age")
    if p.shape != t.shape:
        raise ValueError(f"pred_age and true_age must have the same length, got {p.size} and {t.size}")
    if p.size == 0:
        raise ValueError("no ages to evaluate")
    check_age_group(age_group)
    err = np.abs(p - t)
    g_true, g_pred = age2group(t, age_group), age2group(p, age_group)
    out = dict(n=int(p.size), mae=float(err.mean()), median_abs_error=float(np.median(err)),
               group_accuracy=float((g_true == g_pred).mean()),
               cumulative_score={str(k): float((err <= k).mean()) for k in cs_years},
               per_group={})
    if group_logits is not None:
        gl = np.asarray(group_logits, dtype=np.float64)
        if gl.shape != (p.size, age_group):
            raise ValueError(f"group_logits must be ({p.size}, {age_group}), got {gl.shape}")
        out["group_accuracy_head"] = float((gl.argmax(1) == g_true).mean())
    for g in range(age_group):
        m = g_true == g
        if m.any():
            out["per_group"][str(g)] = dict(n=int(m.sum()), mae=float(err[m].mean()),
                                            accuracy=float((g_pred[m] == g).mean()))
    return out


def _entry_age(entry) -> Optional[float]:
    if isinstance(entry, bool):
        return None
    if isinstance(entry, (int, float)):
        return float(entry)
    if not isinstance(entry, dict):
        return None
    for holder in (entry, entry.get("attributes"), *(f.get("attributes") for f in entry.get("faces", [])[:1]
                                                      if isinstance(f, dict))):
        if isinstance(holder, dict) and "age" in holder:
            a = holder["age"]
            if isinstance(a, dict):
                a = a.get("value")
            if isinstance(a, (int, float)) and not isinstance(a, bool):
                return float(a)
            if isinstance(a, str):
                try:
                    return float(a)
                except ValueError:
                    return None
    return None


def read_age_labels(path: str, root: Optional[str] = None) -> Tuple[Dict[str, float], Dict]:
    """``({image path: age}, info)`` from a text or JSON label file; paths resolved against ``root``
    (default: the file's folder). ``info`` counts the entries without a usable age."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"age label file not found: {path}")
    root = os.fspath(root) if root is not None else os.path.dirname(os.path.abspath(path))

    def res(p: str) -> str:
        return p if os.path.isabs(p) else os.path.join(root, p)

    labels: Dict[str, float] = {}
    skipped = 0
    if path.lower().endswith(".json"):
        with open(path, encoding="utf-8") as fh:
            try:
                data = json.load(fh)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: not valid JSON ({exc})") from None
        if isinstance(data, dict):
            items = list(data.items())
        elif isinstance(data, list):
            items = []
            for i, e in enumerate(data):
                key = next((e[k] for k in ("path", "file", "filename", "image", "img") if isinstance(e, dict)
                            and isinstance(e.get(k), str)), None)
                if key is None:
                    raise ValueError(f"{path}: entry {i} has no path/file/filename/image field")
                items.append((key, e))
        else:
            raise ValueError(f"{path}: expected a JSON object or list, got {type(data).__name__}")
        for key, entry in items:
            a = _entry_age(entry)
            if a is None:
                skipped += 1
            else:
                labels[res(key)] = a
    else:
        with open(path, encoding="utf-8-sig") as fh:
            for lineno, raw in enumerate(fh, 1):
                line = raw.strip()
                if not line or line.startswith("#"):
                    continue
                toks = [t.strip() for t in line.split("\t")] if "\t" in line else line.split()
                if len(toks) != 2:
                    raise ValueError(f"{path}:{lineno}: expected 'path age', got {line!r}")
                try:
                    labels[res(toks[0])] = float(toks[1])
                except ValueError:
                    raise ValueError(f"{path}:{lineno}: age {toks[1]!r} is not a number") from None
    if not labels:
        raise ValueError(f"age label file {path} holds no ages")
    bad = [p for p, a in labels.items() if not 0 <= a <= 150]
    if bad:
        raise ValueError(f"{path}: {len(bad)} age(s) outside [0, 150], e.g. {bad[0]}: {labels[bad[0]]}")
    return labels, dict(source=path, n_labels=len(labels), n_without_age=skipped)
