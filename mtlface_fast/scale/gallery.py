"""Galleries for 1:N search: a FAISS index over the faces of a ``run`` output folder.

``mtlface-fast index OUT/`` reads OUT/embeddings.npy and OUT/index.jsonl (written by ``mtlface-fast run``) and
writes OUT/gallery/:

    index.faiss     the FAISS index over the L2-normalized embeddings (inner product = cosine similarity)
    gallery.json    its type and parameters, the rows it holds, the run's model settings and, for an
                    approximate index, the recall@10 measured against exact search when it was built or grown

Up to ``exact_max`` faces (default 100,000) the index is exact: ``IndexFlatIP``, 2 KiB per face (512 float32).
Beyond, it is ``IndexIVFFlat`` (inner product): ``nlist`` k-means cells (default about sqrt(N)), a query visits
``nprobe`` of them. Too few probes silently miss matches, so ``nprobe`` is chosen by measurement: the smallest
power of two whose recall@10 against exact search, on up to ``recall_queries`` gallery faces used as queries,
reaches ``target_recall`` (default 0.99), each query leaving itself out (a gallery face then stands in for a
new photo of its person), times a safety factor of 2 (new photos lie farther from the cells than the gallery
faces k-means was trained on); it is written down with the recall it reached.

Growing a gallery: ``mtlface-fast run PHOTOS --out OUT`` again embeds only the new photos (the run resumes), then
``mtlface-fast index OUT/`` adds only the new rows to the existing index (an IVF index keeps its cells; its recall
is measured again and ``nprobe`` raised when needed). ``--rebuild`` starts over.

``mtlface-fast search QUERY --index OUT/ --top-k K``: QUERY is a photo or a folder; each face found is aligned
and embedded by the same model (checked against the run's settings) and matched against the gallery; one JSON line
per query face: its box and the K nearest gallery faces (photo, face number, cosine score).
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Callable, Dict, List, Optional, Sequence

from . import require

GALLERY, INDEX_FILE, META_FILE = "gallery", "index.faiss", "gallery.json"
EXACT_MAX = 100_000
TARGET_RECALL = 0.99
RECALL_QUERIES = 1000
RECALL_K = 10


def _faiss():
    return require("faiss", "the gallery (FAISS)")


def normalized(emb):
    """Rows scaled to unit L2 norm (float32, C-contiguous); a zero row stays zero."""
    import numpy as np
    x = np.ascontiguousarray(emb, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be (N, D), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("embeddings hold NaN or infinite values")
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(norm, 1e-12), dtype=np.float32)


def read_run(out: str):
    """(embeddings (N, D) float32 memory-mapped, labels [(photo, face)] by row, run settings) of a run folder."""
    import numpy as np

    from ..folder import EMBEDDINGS, INDEX, RUN, _read_index
    if not os.path.isdir(out):
        raise FileNotFoundError(f"run folder not found: {out} (write one with: mtlface-fast run PHOTOS --out {out})")
    for name in (INDEX, RUN):
        if not os.path.isfile(os.path.join(out, name)):
            raise FileNotFoundError(f"{out} is not a finished run folder: {name} is missing "
                                    f"(write one with: mtlface-fast run PHOTOS --out {out})")
    with open(os.path.join(out, RUN), encoding="utf-8") as fh:
        run = json.load(fh)
    if run.get("status") != "done":
        raise ValueError(f"the run in {out} has not finished (run.json status {run.get('status')!r}); rerun "
                         f"mtlface-fast run with --out {out} to complete it")
    labels: Dict[int, tuple] = {}
    for rec in _read_index(os.path.join(out, INDEX)):
        for f in rec.get("faces", []):
            labels[int(f["embedding_row"])] = (rec["photo"], int(f["face"]))
    path = os.path.join(out, EMBEDDINGS)
    if not labels:
        raise ValueError(f"{out} holds no face: nothing to index")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: the run's index.jsonl refers to {len(labels)} face(s)")
    emb = np.load(path, mmap_mode="r")
    if emb.ndim != 2 or emb.shape[0] != len(labels) or sorted(labels) != list(range(emb.shape[0])):
        raise ValueError(f"{path} has shape {emb.shape} but index.jsonl refers to rows "
                         f"{min(labels)}..{max(labels)} ({len(labels)} faces): the run folder is inconsistent")
    return emb, [labels[i] for i in range(emb.shape[0])], run.get("settings", {})


def recall_at_k(approx_ids, exact_ids, k: int = RECALL_K) -> float:
    """Mean over queries of |approximate top-k ∩ exact top-k| / k."""
    import numpy as np
    a, e = np.asarray(approx_ids)[:, :k], np.asarray(exact_ids)[:, :k]
    hits = sum(len(set(x[x >= 0].tolist()) & set(y[y >= 0].tolist())) for x, y in zip(a, e))
    return hits / float(e.shape[0] * k)


def _sample_rows(n: int, count: int, seed: int = 0):
    import numpy as np
    return np.sort(np.random.default_rng(seed).choice(n, size=min(n, count), replace=False))


def tune_nprobe(index, xb, target_recall: float = TARGET_RECALL, queries: int = RECALL_QUERIES, k: int = RECALL_K,
                start: int = 1, safety: int = 2) -> Dict:
    """``safety`` times the smallest power-of-two ``nprobe`` (>= ``start``) with recall@k >= ``target_recall``
    against exact search, measured on ``queries`` rows of ``xb`` used as queries (each leaving itself out of its
    neighbours); sets it on ``index``; returns the figures. The factor: gallery faces sit where k-means put the
    cells, new photos of the same people do not (bench/gallery.py measures the recall of held-out queries)."""
    import numpy as np
    faiss = _faiss()
    k = min(k, xb.shape[0] - 1)
    rows = _sample_rows(xb.shape[0], queries)
    q = xb[rows]
    flat = faiss.IndexFlatIP(xb.shape[1])
    flat.add(xb)

    def others(ids):  # each query's neighbours but itself: a gallery face stands in for a new photo of its person
        return np.array([[i for i in row if i != r][:k] for row, r in zip(ids, rows)])
    _, exact = flat.search(q, k + 1)
    exact = others(exact)
    nprobe, tried = max(1, start), []
    while True:
        nprobe = min(nprobe, index.nlist)
        index.nprobe = nprobe
        _, approx = index.search(q, k + 1)
        recall = recall_at_k(others(approx), exact, k)
        tried.append({"nprobe": nprobe, "recall": round(recall, 5)})
        if recall >= target_recall or nprobe >= index.nlist:
            break
        nprobe *= 2
    reached = nprobe
    if safety > 1 and nprobe < index.nlist:  # new photos are farther from the cells than gallery faces are
        nprobe = min(index.nlist, nprobe * safety)
        index.nprobe = nprobe
        _, approx = index.search(q, k + 1)
        recall = recall_at_k(others(approx), exact, k)
        tried.append({"nprobe": nprobe, "recall": round(recall, 5)})
    return {"nprobe": nprobe, "recall_at_k": recall, "k": k, "recall_queries": int(q.shape[0]),
            "target_recall": target_recall, "target_reached_at": reached, "safety": safety, "tried": tried}


def make_index(xb, kind: str, nlist: Optional[int] = None, seed: int = 0):
    """An empty, trained FAISS index of ``kind`` ("flat" or "ivf") for vectors like ``xb`` (normalized)."""
    faiss = _faiss()
    d = xb.shape[1]
    if kind == "flat":
        return faiss.IndexFlatIP(d), {"type": "flat", "faiss": "IndexFlatIP", "metric": "inner_product"}
    if kind != "ivf":
        raise ValueError(f"index kind must be 'flat' or 'ivf', got {kind!r}")
    n = xb.shape[0]
    nlist = nlist or int(min(65536, max(16, round(math.sqrt(n)))))
    if isinstance(nlist, bool) or not isinstance(nlist, int) or nlist < 1:
        raise ValueError(f"nlist must be a positive int, got {nlist!r}")
    if nlist > n:
        raise ValueError(f"nlist {nlist} is more than the {n} vectors to train the cells on")
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
    train = xb[_sample_rows(n, 256 * nlist, seed)]  # FAISS's k-means uses at most 256 points per cell
    index.cp.seed = seed
    index.train(train)
    return index, {"type": "ivf", "faiss": f"IndexIVFFlat(IndexFlatIP, nlist={nlist}, METRIC_INNER_PRODUCT)",
                   "metric": "inner_product", "nlist": nlist, "trained_on": int(train.shape[0])}


def bytes_per_face(meta: Dict, d: int = 512) -> int:
    """Memory of one face in the index: the vector, plus the 8-byte id an IVF list keeps."""
    return 4 * d + (8 if meta["type"] == "ivf" else 0)


def _write_index(index, path: str) -> None:
    from ..checkpoint import atomic_write
    faiss = _faiss()
    atomic_write(path, lambda tmp: faiss.write_index(index, tmp))


def build_gallery(out: str, *, exact_max: int = EXACT_MAX, kind: Optional[str] = None, nlist: Optional[int] = None,
                  target_recall: float = TARGET_RECALL, recall_queries: int = RECALL_QUERIES, rebuild: bool = False,
                  log: Callable[[str], None] = print) -> Dict:
    """Build or grow OUT/gallery from the run folder ``out`` (see the module doc); returns gallery.json's content."""
    from ..folder import _write_text
    faiss = _faiss()
    if isinstance(exact_max, bool) or not isinstance(exact_max, int) or exact_max < 0:
        raise ValueError(f"exact_max must be a non-negative int, got {exact_max!r}")
    if not 0.0 < target_recall <= 1.0:
        raise ValueError(f"target_recall must be in (0, 1], got {target_recall!r}")
    if kind not in (None, "flat", "ivf"):
        raise ValueError(f"kind must be 'flat', 'ivf' or None (by size), got {kind!r}")
    emb, labels, settings = read_run(out)
    n, d = emb.shape
    folder = os.path.join(out, GALLERY)
    index_path, meta_path = os.path.join(folder, INDEX_FILE), os.path.join(folder, META_FILE)
    meta = None
    if not rebuild and os.path.isfile(meta_path) and os.path.isfile(index_path):
        with open(meta_path, encoding="utf-8") as fh:
            meta = json.load(fh)
        if meta.get("settings") != settings:
            raise ValueError(f"{folder} was built from a run with other model settings; use --rebuild")
        if kind is not None and kind != meta["type"]:
            raise ValueError(f"{folder} holds a {meta['type']} index, --kind {kind} asked; use --rebuild to change it")
        if meta["rows"] > n:
            raise ValueError(f"{folder} holds {meta['rows']} faces, the run only {n}; use --rebuild")
    start = time.perf_counter()
    if meta is None:
        kind = kind or ("flat" if n <= exact_max else "ivf")
        xb = normalized(emb)
        index, params = make_index(xb, kind, nlist)
        index.add(xb)
        added = n
        meta = dict(params, rows=n, dim=d, settings=settings)
        log(f"building a {kind} index over {n} face(s)")
    else:
        index = faiss.read_index(index_path)
        if index.ntotal != meta["rows"]:
            raise ValueError(f"{index_path} holds {index.ntotal} vectors, gallery.json says {meta['rows']}; "
                             f"use --rebuild")
        added = n - meta["rows"]
        if added:
            index.add(normalized(emb[meta["rows"]:]))
        meta["rows"] = n
        log(f"{added} new face(s) added to the {meta['type']} index ({n} in all)")
        xb = normalized(emb) if meta["type"] == "ivf" and added else None
    if meta["type"] == "ivf" and xb is not None:
        meta["recall"] = tune_nprobe(index, xb, target_recall, recall_queries, start=1)
        meta["nprobe"] = meta["recall"]["nprobe"]
        log(f"nprobe {meta['nprobe']} of {meta['nlist']}: recall@{meta['recall']['k']} "
            f"{meta['recall']['recall_at_k']:.4f} against exact search on {meta['recall']['recall_queries']} queries")
    meta["seconds"] = round(time.perf_counter() - start, 3)
    meta["bytes_per_face"] = bytes_per_face(meta, d)
    os.makedirs(folder, exist_ok=True)
    if added or not os.path.isfile(index_path):
        _write_index(index, index_path)
    _write_text(meta_path, json.dumps(meta, indent=2) + "\n")
    return meta


class Gallery:
    """A built gallery: its FAISS index, the (photo, face) of every row and gallery.json."""

    def __init__(self, out: str):
        faiss = _faiss()
        folder = os.path.join(out, GALLERY)
        meta_path, index_path = os.path.join(folder, META_FILE), os.path.join(folder, INDEX_FILE)
        if not os.path.isfile(meta_path) or not os.path.isfile(index_path):
            raise FileNotFoundError(f"no gallery in {out}: {folder}/{META_FILE} and {INDEX_FILE} are missing "
                                    f"(build one with: mtlface-fast index {out})")
        with open(meta_path, encoding="utf-8") as fh:
            self.meta = json.load(fh)
        self.index = faiss.read_index(index_path)
        if self.meta["type"] == "ivf":
            self.index.nprobe = int(self.meta["nprobe"])
        _, labels, settings = read_run(out)
        if len(labels) < self.index.ntotal:
            raise ValueError(f"{folder} holds {self.index.ntotal} faces but the run only {len(labels)}; rebuild it "
                             f"with: mtlface-fast index {out} --rebuild")
        self.labels = labels[:self.index.ntotal]
        self.settings = settings
        self.out = out

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def check_model(self, config: Dict) -> None:
        """The gallery's faces were embedded by a model of ``config``; else a ValueError naming the difference."""
        mine = self.settings.get("config", {})
        differ = sorted(k for k in set(mine) | set(config) if mine.get(k) != config.get(k))
        if differ:
            raise ValueError(f"the gallery in {self.out} was embedded by another model ({', '.join(differ)}: "
                             f"{[mine.get(k) for k in differ]} there, {[config.get(k) for k in differ]} now); "
                             f"pass the --weights the run used")

    def search(self, queries, k: int) -> List[List[Dict]]:
        """For each query embedding (Q, D) its ``k`` nearest gallery faces: rank, photo, face, score (cosine)."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"top-k must be a positive int, got {k!r}")
        q = normalized(queries)
        if q.shape[1] != self.index.d:
            raise ValueError(f"query embeddings have {q.shape[1]} dimensions, the gallery {self.index.d}")
        if q.shape[0] == 0:
            return []
        scores, ids = self.index.search(q, min(k, len(self)))
        return [[{"rank": r + 1, "photo": self.labels[i][0], "face": self.labels[i][1], "score": round(float(s), 6)}
                 for r, (s, i) in enumerate(zip(srow, irow)) if i >= 0] for srow, irow in zip(scores, ids)]


def search_photos(query: str, out: str, top_k: int = 5, *, model=None, weights: Optional[str] = None,
                  generator: Optional[str] = None, estimator: Optional[str] = None, backbone: str = "ir50",
                  seed: int = 0, device: str = "cpu", batch_size: int = 32, keep: str = "all",
                  detector: str = "auto", min_face_size: int = 20) -> List[Dict]:
    """Search every face of ``query`` (a photo or a folder) in the gallery of ``out``: one dict per query face (or
    per photo without a usable face, with its status and reason)."""
    from ..align import FaceAligner
    from ..folder import list_photos
    from ..photo_work import PhotoWork
    from ..validation import check_device
    from ..loading import load_model
    from ..mtcnn import facenet_location
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"--top-k must be a positive int, got {top_k!r}")
    facenet_location()
    gallery = Gallery(out)
    if os.path.isdir(query):
        root, rels = query, list_photos(query, os.path.join(query, ".none"))
        if not rels:
            raise ValueError(f"query folder {query} holds no file")
    elif os.path.isfile(query):
        root, rels = os.path.dirname(os.path.abspath(query)), [os.path.basename(query)]
    else:
        raise FileNotFoundError(f"query photo or folder not found: {query}")
    dev = check_device(device)
    if model is None:
        model, _ = load_model(weights, generator, estimator, backbone, seed)
    model = model.to(dev).eval()
    gallery.check_model(json.loads(json.dumps(model.config)))
    aligner = FaceAligner(size=int(model.config["input_size"]), device=dev, detector=detector,
                          min_face_size=min_face_size)
    work = PhotoWork(model, aligner, keep=keep, batch_size=batch_size, min_face_size=min_face_size)
    results = []
    for s in range(0, len(rels), batch_size):
        records, emb = work(root, rels[s:s + batch_size], None)
        matches = gallery.search(emb, top_k)
        for rec in records:
            if rec["status"] != "ok":
                results.append({"query": rec["photo"], "status": rec["status"], "reason": rec["reason"],
                                "matches": []})
            for f in rec["faces"]:
                results.append({"query": rec["photo"], "status": "ok", "face": f["face"], "box": f["box"],
                                "score": f["score"], "matches": matches[f["embedding_row"]]})
    return results


# -- the commands --------------------------------------------------------------------------------------------------
def add_index_arguments(p) -> None:
    p.add_argument("out", metavar="OUT", help="a folder written by mtlface-fast run (the gallery goes to OUT/gallery)")
    p.add_argument("--exact-max", type=int, default=EXACT_MAX,
                   help=f"exact search (IndexFlatIP) up to this many faces, IVF beyond ({EXACT_MAX})")
    p.add_argument("--kind", choices=("flat", "ivf"), help="force the index type (default: by --exact-max)")
    p.add_argument("--nlist", type=int, help="IVF cells (default: about sqrt(faces))")
    p.add_argument("--target-recall", type=float, default=TARGET_RECALL,
                   help=f"IVF: smallest nprobe with this recall@10 against exact search ({TARGET_RECALL})")
    p.add_argument("--rebuild", action="store_true", help="build anew instead of adding the new faces")


def execute_index(args) -> int:
    meta = build_gallery(args.out, exact_max=args.exact_max, kind=args.kind, nlist=args.nlist,
                         target_recall=args.target_recall, rebuild=args.rebuild)
    print(f"gallery: {meta['rows']} face(s), {meta['faiss']}"
          + (f", nprobe {meta['nprobe']}" if meta["type"] == "ivf" else "")
          + f" -> {os.path.join(args.out, GALLERY)}")
    return 0


def add_search_arguments(p) -> None:
    from ..loading import add_model_arguments
    p.add_argument("query", metavar="QUERY", help="a photo or a folder of photos")
    p.add_argument("--index", required=True, metavar="OUT", help="a run folder with a gallery (mtlface-fast index)")
    p.add_argument("--top-k", type=int, default=5, help="gallery faces per query face (5)")
    p.add_argument("--output", help="write the JSON lines to this file (default: standard output)")
    add_model_arguments(p)
    p.add_argument("--device", default="cpu", help="cpu or cuda (cpu)")
    p.add_argument("--batch-size", type=int, default=32, help="faces per model batch (32)")
    p.add_argument("--largest-face", action="store_true", help="only the largest face of each photo (default: all)")


def execute_search(args) -> int:
    from ..folder import _write_text
    results = search_photos(args.query, args.index, args.top_k, weights=args.weights, generator=args.generator,
                            estimator=args.estimator, backbone=args.backbone, seed=args.seed, device=args.device,
                            batch_size=args.batch_size, keep="largest" if args.largest_face else "all")
    text = "".join(json.dumps(r) + "\n" for r in results)
    if args.output:
        _write_text(args.output, text)
    else:
        print(text, end="")
    return 0
