"""Pair lists for face verification: reading, resolving image paths, reporting missing files.

Formats (detected from the first data line; one format per file):

``paths``   ``left right label`` per line, label ``1/0``, ``same/diff``, ``true/false``,
            ``genuine/impostor`` (or ``match/mismatch``). Tab-separated when the line has a tab (paths with
            spaces), else whitespace-separated. The generic format for any ``image_pairs`` file.
``lfw``     LFW ``pairs.txt``: an optional header (``folds pairs_per_fold`` or ``pairs``), then
            ``name n1 n2`` (same person) and ``name1 n1 name2 n2`` (different people); the image is
            ``<root>/<name>/<name>_<n:04d><ext>``. ECAF's ``image_pairs/*.txt`` follow LFW.
``calfw``   CALFW / CPLFW ``pairs_*.txt``: two lines per pair, ``file label``; label 0 on both lines for a
            negative pair, a positive identity index for a positive one.

Insightface-style verification ``.bin`` files (AgeDB-30, CALFW, CFP-FP, LFW as distributed with
ArcFace training data) are unpacked by :func:`extract_bin` into images and a ``paths`` list.

Any format may start with an LFW-style header (``folds pairs_per_fold``, giving folds of
``2 * pairs_per_fold`` consecutive pairs, or a pair count). Lines that are empty or start with ``#`` are skipped. A malformed line raises ``ValueError`` naming the
file and line. Pairs whose images do not exist are *excluded and reported* (line number and path) --
never silently dropped. Folds follow the order of the full list (consecutive blocks, or the header's
fold size), so excluding a pair does not move the others between folds.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

from .verification import consecutive_folds

FORMATS = ("auto", "paths", "lfw", "calfw")
_TRUE = {"1", "same", "true", "genuine", "match", "positive", "pos", "yes"}
_FALSE = {"0", "diff", "different", "false", "impostor", "mismatch", "negative", "neg", "no", "-1"}


@dataclass
class Pair:
    left: str      # resolved image path
    right: str
    same: bool     # True = same identity
    line: int      # 1-based line number in the list (the first line of a two-line pair)
    index: int     # position in the full list (before exclusion)


@dataclass
class PairList:
    """A parsed pair list: the usable pairs, and what was excluded and why."""
    source: str
    format: str
    root: str
    pairs: List[Pair]
    folds: np.ndarray                      # fold of each usable pair
    n_folds: int
    n_total: int                           # pairs in the file
    excluded: List[Pair] = field(default_factory=list)
    missing: List[Tuple[int, str]] = field(default_factory=list)   # (line, path) of every missing image

    @property
    def labels(self) -> np.ndarray:
        return np.array([p.same for p in self.pairs], dtype=bool)

    def images(self) -> List[str]:
        """Unique image paths of the usable pairs, in first-use order."""
        seen: Dict[str, None] = {}
        for p in self.pairs:
            seen.setdefault(p.left)
            seen.setdefault(p.right)
        return list(seen)

    def summary(self) -> Dict:
        return dict(source=self.source, format=self.format, root=self.root, n_total=self.n_total,
                    n_used=len(self.pairs), n_excluded=len(self.excluded),
                    n_missing_files=len({p for _, p in self.missing}),
                    missing=[dict(line=ln, path=p) for ln, p in self.missing], n_folds=self.n_folds)


def _label(tok: str, where: str) -> bool:
    t = tok.lower()
    if t in _TRUE:
        return True
    if t in _FALSE:
        return False
    raise ValueError(f"{where}: label {tok!r} is not one of 1/0, same/diff, true/false, genuine/impostor")


def _is_int(tok: str) -> bool:
    return tok.isdigit()


def _split(line: str) -> List[str]:
    return [t.strip() for t in line.split("\t")] if "\t" in line else line.split()


def _detect(first: List[str], where: str) -> str:
    if len(first) == 4 and _is_int(first[1]) and _is_int(first[3]):
        return "lfw"
    if len(first) == 3 and _is_int(first[1]) and _is_int(first[2]):
        return "lfw"
    if len(first) == 3:
        return "paths"
    if len(first) == 2 and first[1].lstrip("-").isdigit():
        return "calfw"
    raise ValueError(f"{where}: cannot tell the pair-list format from {' '.join(first)!r}; expected "
                     f"'left right label', LFW 'name n1 n2' / 'name1 n1 name2 n2', or CALFW 'file label' lines")


def read_pairs(path: str, root: Optional[str] = None, fmt: str = "auto", n_folds: int = 10, ext: str = ".jpg",
               check_files: bool = True) -> PairList:
    """Read a pair list.

    Args:
        path: the list file.
        root: folder that image paths are relative to (default: the list's folder). Absolute paths in the
            list are used as they are.
        fmt: ``auto`` (detect), ``paths``, ``lfw`` or ``calfw``.
        n_folds: folds for cross-validation when the list has no LFW header.
        ext: image extension of LFW-style names.
        check_files: exclude (and report) pairs whose images are missing.

    Raises:
        FileNotFoundError: the list does not exist. ValueError: malformed lines, no pairs, unknown format.
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pair list not found: {path}")
    root = os.fspath(root) if root is not None else os.path.dirname(os.path.abspath(path))
    rows: List[Tuple[int, List[str]]] = []
    with open(path, encoding="utf-8-sig") as fh:
        for lineno, raw in enumerate(fh, 1):
            line = raw.strip()
            if line and not line.startswith("#"):
                rows.append((lineno, _split(line)))
    if not rows:
        raise ValueError(f"pair list {path} is empty (no pairs)")
    fold_size = None
    head_line, head = rows[0]
    if 1 <= len(head) <= 2 and all(_is_int(t) for t in head):  # LFW-style header: 'folds pairs_per_fold' or 'pairs'
        rows = rows[1:]
        if len(head) == 2:
            if int(head[0]) < 1 or int(head[1]) < 1:
                raise ValueError(f"{path}:{head_line}: header must be 'folds pairs_per_fold' (positive)")
            fold_size = 2 * int(head[1])  # each LFW fold: `per` matched then `per` mismatched pairs
    if not rows:
        raise ValueError(f"pair list {path} holds no pairs (only a header)")
    if fmt == "auto":
        fmt = _detect(rows[0][1], f"{path}:{rows[0][0]}")

    def res(p: str) -> str:
        return p if os.path.isabs(p) else os.path.join(root, p)

    raw_pairs: List[Tuple[str, str, bool, int]] = []
    if fmt == "paths":
        for lineno, toks in rows:
            where = f"{path}:{lineno}"
            if len(toks) != 3:
                raise ValueError(f"{where}: expected 'left right label' (3 fields), got {len(toks)}: {' '.join(toks)!r}")
            raw_pairs.append((res(toks[0]), res(toks[1]), _label(toks[2], where), lineno))
    elif fmt == "lfw":
        def img(name: str, num: str) -> str:
            return res(os.path.join(name, f"{name}_{int(num):04d}{ext}"))

        for lineno, toks in rows:
            where = f"{path}:{lineno}"
            if len(toks) == 3 and _is_int(toks[1]) and _is_int(toks[2]):
                raw_pairs.append((img(toks[0], toks[1]), img(toks[0], toks[2]), True, lineno))
            elif len(toks) == 4 and _is_int(toks[1]) and _is_int(toks[3]):
                raw_pairs.append((img(toks[0], toks[1]), img(toks[2], toks[3]), False, lineno))
            else:
                raise ValueError(f"{where}: expected LFW 'name n1 n2' or 'name1 n1 name2 n2', got {' '.join(toks)!r}")
    else:  # calfw
        if len(rows) % 2:
            raise ValueError(f"{path}: CALFW lists hold two lines per pair, got an odd number ({len(rows)}) of lines")
        for (l1, a), (l2, b) in zip(rows[0::2], rows[1::2]):
            for lineno, toks in ((l1, a), (l2, b)):
                if len(toks) != 2 or not toks[1].lstrip("-").isdigit():
                    raise ValueError(f"{path}:{lineno}: expected CALFW 'file label', got {' '.join(toks)!r}")
            la, lb = int(a[1]), int(b[1])
            if (la > 0) != (lb > 0):
                raise ValueError(f"{path}:{l1}-{l2}: the two lines of a pair disagree (labels {la} and {lb})")
            raw_pairs.append((res(a[0]), res(b[0]), la > 0, l1))

    n_total = len(raw_pairs)
    if n_total == 0:
        raise ValueError(f"pair list {path} holds no pairs")
    if fold_size is not None and n_total % fold_size == 0 and n_total // fold_size >= 2:
        all_folds = np.arange(n_total) // fold_size
    else:
        # Short lists get fewer folds (a one-pair list gets one fold; cross-validation then refuses it).
        all_folds = consecutive_folds(n_total, min(n_folds, n_total)) if n_total >= 2 else np.zeros(1, np.int64)
    exists: Dict[str, bool] = {}
    pairs, excluded, missing, kept = [], [], [], []
    for i, (a, b, same, lineno) in enumerate(raw_pairs):
        pair = Pair(a, b, same, lineno, i)
        gone = []
        if check_files:
            for p in (a, b):
                if p not in exists:
                    exists[p] = os.path.isfile(p)
                if not exists[p]:
                    gone.append(p)
        if gone:
            excluded.append(pair)
            missing.extend((lineno, p) for p in gone)
        else:
            pairs.append(pair)
            kept.append(i)
    if not pairs:
        raise ValueError(f"pair list {path}: all {n_total} pair(s) refer to missing images "
                         f"(first: line {missing[0][0]}: {missing[0][1]}); check --root")
    folds = all_folds[np.asarray(kept)]
    return PairList(source=path, format=fmt, root=root, pairs=pairs, folds=folds,
                    n_folds=int(np.unique(folds).size), n_total=n_total, excluded=excluded, missing=missing)


def format_missing(pl: PairList, limit: int = 20) -> str:
    """A human-readable account of the excluded pairs (empty string when none)."""
    if not pl.excluded:
        return ""
    lines = [f"{pl.source}: {len(pl.excluded)} of {pl.n_total} pair(s) excluded, "
             f"{len({p for _, p in pl.missing})} missing image file(s) (relative to {pl.root}):"]
    for lineno, p in pl.missing[:limit]:
        lines.append(f"  line {lineno}: {p}")
    if len(pl.missing) > limit:
        lines.append(f"  ... and {len(pl.missing) - limit} more (all listed in the JSON report)")
    return "\n".join(lines)


# -- insightface verification .bin files (agedb_30.bin, calfw.bin, cfp_fp.bin, lfw.bin, ...) ---------------------
_BIN_GLOBALS = {
    ("_codecs", "encode"),                      # bytes pickled by Python 2 (protocol 2)
    ("numpy", "dtype"), ("numpy", "ndarray"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
}


def _restricted_unpickler(fh):
    import pickle

    class _Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) in _BIN_GLOBALS:
                return super().find_class(module, name)
            raise ValueError(f"refusing to load {module}.{name} from a verification .bin: it may only hold "
                             f"encoded images and booleans")

    return _Unpickler(fh, encoding="bytes")


def extract_bin(path: str, out_dir: str) -> str:
    """Unpack an insightface-style verification ``.bin`` (a pickle of ``(encoded images, issame list)``,
    images ``2i`` and ``2i+1`` forming pair ``i``) into ``out_dir/images`` and write ``out_dir/pairs.txt``
    ('left right label' lines, in the file's order, so the consecutive 10 folds match the standard code).

    The pickle is read with a restricted unpickler (only bytes, lists, booleans and numpy scalars/arrays);
    anything else is refused. Returns the pair-list path. An existing complete extraction is reused.
    """
    import pickle

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"verification .bin not found: {path}")
    pairs_txt = os.path.join(out_dir, "pairs.txt")
    stamp = os.path.join(out_dir, "source.txt")
    src_id = f"{os.path.abspath(path)} {os.path.getsize(path)} {os.stat(path).st_mtime_ns}\n"
    if os.path.isfile(pairs_txt) and os.path.isfile(stamp) and open(stamp).read() == src_id:
        return pairs_txt
    with open(path, "rb") as fh:
        try:
            data = _restricted_unpickler(fh).load()
        except (pickle.UnpicklingError, EOFError) as exc:
            raise ValueError(f"{path} is not a verification .bin (pickle of images and labels): {exc}") from None
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        raise ValueError(f"{path}: expected a pickled (images, issame) pair, got {type(data).__name__}")
    images, issame = data
    issame = [bool(v) for v in (issame.tolist() if hasattr(issame, "tolist") else issame)]
    if len(images) != 2 * len(issame) or not issame:
        raise ValueError(f"{path}: {len(images)} images for {len(issame)} labels; expected two images per label")
    from ..checkpoint import atomic_write
    img_dir = os.path.join(out_dir, "images")
    os.makedirs(img_dir, exist_ok=True)
    names = []
    for i, blob in enumerate(images):
        if hasattr(blob, "tobytes"):
            blob = blob.tobytes()
        if not isinstance(blob, (bytes, bytearray)):
            raise ValueError(f"{path}: image {i} is {type(blob).__name__}, expected encoded image bytes")
        ext = ".png" if blob[:8] == b"\x89PNG\r\n\x1a\n" else ".jpg"
        name = f"images/{i:06d}{ext}"
        with open(os.path.join(out_dir, name), "wb") as out:
            out.write(blob)
        names.append(name)
    lines = "".join(f"{names[2 * k]} {names[2 * k + 1]} {int(s)}\n" for k, s in enumerate(issame))
    atomic_write(pairs_txt, lambda tmp: open(tmp, "w").write(lines))
    atomic_write(stamp, lambda tmp: open(tmp, "w").write(src_id))
    return pairs_txt
