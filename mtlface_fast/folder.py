"""``mtlface-fast run PHOTOS/ --out OUT/``: every photo of a folder -> aligned faces, embeddings, ages, age grids.

Each file under PHOTOS (recursively; hidden files and OUT itself skipped) is read, its faces found with MTCNN
and aligned onto the 5-point template at the model's input size (:mod:`mtlface_fast.align`), and the crops go
through the model in batches on its device. OUT holds

    index.jsonl      one JSON line per photo: {"photo", "status": "ok" | "no_face" | "unreadable" | "error",
                     "reason", "width", "height", "faces": [{"face", "box", "landmarks", "score", "crop",
                     "embedding_row", "predicted_age", "age_group", "predicted_group", "grid"}]}
    embeddings.npy   (faces, 512) float32; row ``embedding_row`` of index.jsonl
    faces/           the aligned crops, <photo path>_<face>.png (photo.jpg -> faces/photo.jpg_0.png)
    grids/           with --synthesize: each face at every age group, <photo path>_<face>.png
    run.json         the settings, counts and the photos without a face or unreadable, with reasons

A photo that cannot be read or has no face is recorded with the reason; the run goes on. A rerun with the same
OUT skips the photos already in index.jsonl (an interrupted run resumes where it stopped); it refuses other
settings (model, input size, faces kept, --synthesize, detector), which would mix results in one file.
"""
from __future__ import annotations

import json
import os
from typing import Callable, List, Optional

from .photo_work import PhotoWork  # the per-batch work of both engines

INDEX, EMBEDDINGS, RUN, PARTS = "index.jsonl", "embeddings.npy", "run.json", ".embedding_parts"


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`run_folder`: still a KeyboardInterrupt, with a message that says where the run stopped
    and that a rerun with the same output folder resumes."""


def list_photos(root: str, out: str) -> List[str]:
    """Every non-hidden file under ``root`` (sorted, relative, '/'-separated), ``out`` excluded."""
    root_abs, out_abs = os.path.abspath(root), os.path.abspath(out)
    found = []
    for folder, dirs, files in os.walk(root_abs):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and os.path.join(folder, d) != out_abs)
        for name in files:
            if not name.startswith("."):
                found.append(os.path.relpath(os.path.join(folder, name), root_abs).replace(os.sep, "/"))
    return sorted(found)


def _read_index(path: str) -> List[dict]:
    """The complete lines of index.jsonl (a line cut short by an interrupted run is dropped)."""
    if not os.path.isfile(path):
        return []
    records = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if not line.endswith("\n"):
                break
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return records


class _Embeddings:
    """embeddings.npy plus the batches written since it was last assembled (``.embedding_parts/<row>.npy``).

    A batch's part is written before its photos' index lines, so after an interruption every row that the index
    refers to is on disk; parts and rows that no index line refers to are dropped."""

    def __init__(self, out: str, needed: int):
        import numpy as np
        self.np, self.out = np, out
        self.parts_dir = os.path.join(out, PARTS)
        path = os.path.join(out, EMBEDDINGS)
        self.base = np.load(path, mmap_mode="r") if os.path.isfile(path) else None
        self.base_rows = min(needed, 0 if self.base is None else self.base.shape[0])
        self.parts, rows = [], self.base_rows
        names = sorted(os.listdir(self.parts_dir)) if os.path.isdir(self.parts_dir) else []
        for name in names:
            part = os.path.join(self.parts_dir, name)
            start = int(name.split(".")[0]) if name.split(".")[0].isdigit() else -1
            n = np.load(part, mmap_mode="r").shape[0] if start == rows else 0
            if start == rows and rows + n <= needed:
                self.parts.append(part)
                rows += n
            else:
                os.remove(part)  # assembled already, or written just before an interruption
        self.rows = rows
        self.dirty = bool(self.parts) or (self.base is not None and self.base_rows < self.base.shape[0])

    def append(self, emb) -> int:
        from .checkpoint import atomic_write
        start = self.rows
        os.makedirs(self.parts_dir, exist_ok=True)
        part = os.path.join(self.parts_dir, f"{start:010d}.npy")
        atomic_write(part, lambda tmp: _save_npy(tmp, emb))
        self.parts.append(part)
        self.rows += emb.shape[0]
        self.dirty = True
        return start

    def assemble(self) -> None:
        """Write embeddings.npy with every row, then remove the parts."""
        if not self.dirty:
            return
        np = self.np
        chunks = ([np.asarray(self.base[:self.base_rows])] if self.base is not None and self.base_rows else []) + \
                 [np.load(p) for p in self.parts]
        from .checkpoint import atomic_write
        self.base = None
        path = os.path.join(self.out, EMBEDDINGS)
        if chunks:
            emb = np.concatenate(chunks, axis=0).astype(np.float32, copy=False)
            atomic_write(path, lambda tmp: _save_npy(tmp, emb))
        elif os.path.isfile(path):
            os.remove(path)
        for p in self.parts:
            os.remove(p)
        self.parts, self.dirty = [], False
        if os.path.isdir(self.parts_dir) and not os.listdir(self.parts_dir):
            os.rmdir(self.parts_dir)


def _save_npy(path: str, arr) -> None:
    import numpy as np
    with open(path, "wb") as fh:  # np.save on a name would append ".npy" to the temporary file's name
        np.save(fh, arr)


def _write_text(path: str, text: str) -> str:
    from .checkpoint import atomic_write

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
    return atomic_write(path, write)


ENGINES = ("local", "ray")


def run_folder(photos: str, out: str, weights: Optional[str] = None, generator: Optional[str] = None,
               estimator: Optional[str] = None, backbone: str = "ir50", seed: int = 0, device: Optional[str] = None,
               batch_size: int = 32, keep: str = "largest", synthesize: bool = False, detector: str = "auto",
               min_face_size: int = 20, progress: bool = True, log: Callable[[str], None] = print,
               engine: str = "local", address: Optional[str] = None, workers: Optional[int] = None) -> dict:
    """Process every photo of ``photos`` into ``out`` (see the module docstring); returns run.json's content.

    ``engine="local"`` runs the model here on ``device`` (default cpu); ``engine="ray"`` spreads the photos over
    ``workers`` Ray Data actors, one model each, on the cluster at ``address`` (default: a local Ray), on GPUs
    when ``device`` is cuda or, by default, when the cluster has them (:mod:`mtlface_fast.scale.ray_engine`).
    The output files are the same.
    """
    import numpy as np

    from .align import KEEP, FaceAligner
    from .demo import group_labels, untrained_note
    from .loading import load_model
    from .validation import check_device

    from .mtcnn import facenet_location
    facenet_location()  # the align extra, before the model loads
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if not os.path.isdir(photos):
        raise FileNotFoundError(f"photo folder not found: {photos}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if keep not in KEEP:
        raise ValueError(f"keep must be one of {KEEP}, got {keep!r}")
    if engine == "local":
        dev = check_device(device or "cpu", "--device")
    elif device not in (None, "cpu", "cuda"):  # the actors' device: one GPU each, or none
        raise ValueError(f"--device for --engine ray must be cpu or cuda (default: cuda when the cluster has GPUs), "
                         f"got {device!r}")
    if engine == "local" and (address is not None or workers is not None):
        raise ValueError("--address and --workers are for --engine ray")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ValueError(f"--workers must be a positive int, got {workers!r}")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out} exists and is not a folder")

    model, source = load_model(weights, generator, estimator, backbone, seed)
    model = model.to(dev if engine == "local" else "cpu").eval()  # ray: the driver reads the config only
    size = int(model.config["input_size"])
    labels = group_labels(int(model.config["age_group"]))
    settings = {"model": source, "config": model.config, "input_size": size, "keep": keep,
                "synthesize": bool(synthesize), "min_face_size": min_face_size,
                "detector": "mtcnn (facenet-pytorch weights)"}
    settings = json.loads(json.dumps(settings))  # compared with run.json's: tuples as lists

    run_path = os.path.join(out, RUN)
    if os.path.isfile(run_path):
        with open(run_path, encoding="utf-8") as fh:
            before = json.load(fh).get("settings", {})
        differ = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k))
        if differ:
            raise ValueError(f"{out} holds a run with other settings ({', '.join(differ)}: "
                             f"{[before.get(k) for k in differ]} there, {[settings.get(k) for k in differ]} now); "
                             f"use another --out")
    os.makedirs(out, exist_ok=True)
    _write_text(run_path, json.dumps({"settings": settings, "status": "running"}, indent=2) + "\n")
    grid_note = ""
    if weights is None:
        log(f"NOTE: no --weights given; using a {source}. Embeddings, ages and aged faces are meaningless.")
        grid_note = untrained_note(source)  # on every grid picture, where people look

    index_path = os.path.join(out, INDEX)
    records = {r["photo"]: r for r in _read_index(index_path)}
    needed = 1 + max((f["embedding_row"] for r in records.values() for f in r.get("faces", [])), default=-1)
    store = _Embeddings(out, needed)
    if store.rows < needed:  # rows lost (e.g. a removed embeddings.npy): redo the photos that refer to them
        records = {p: r for p, r in records.items()
                   if all(f["embedding_row"] < store.rows for f in r.get("faces", []))}
    # Rewrite the index with exactly the records kept (drops a line cut short by an interruption).
    _write_text(index_path, "".join(json.dumps(r) + "\n" for r in records.values()))

    todo = [p for p in list_photos(photos, out) if p not in records]
    work_options = dict(keep=keep, batch_size=batch_size, synthesize=bool(synthesize), min_face_size=min_face_size,
                        grid_note=grid_note)
    if engine == "local":
        aligner = FaceAligner(size=size, device=dev, detector=detector, min_face_size=min_face_size)
        log(f"{len(todo)} file(s) to process in {photos} ({len(records)} already done in {out}); "
            f"faces aligned to {size}x{size} by the {aligner.detector} MTCNN on {dev}, batches of {batch_size}")
        work = PhotoWork(model, aligner, **work_options)
        chunks = (work(photos, todo[s:s + batch_size], out) for s in range(0, len(todo), batch_size))
    else:
        from .scale.ray_engine import ray_photo_batches
        del model
        log(f"{len(todo)} file(s) to process in {photos} ({len(records)} already done in {out}); "
            f"faces aligned to {size}x{size}, batches of {batch_size}, on Ray Data")
        work = None
        chunks = ray_photo_batches(todo, photos, out, dict(weights=weights, generator=generator, estimator=estimator,
                                                             backbone=backbone, seed=seed),
                                   dict(work_options, detector=detector), device=device, address=address,
                                   workers=workers, log=log, progress=progress)

    from tqdm import tqdm
    index_fh = open(index_path, "a", encoding="utf-8")
    bar = tqdm(total=len(todo), unit="photo", disable=not progress, dynamic_ncols=True)
    try:
        for recs, emb in chunks:
            if emb.shape[0]:  # a batch's part is on disk before the index lines that refer to it
                start = store.append(np.ascontiguousarray(emb, dtype=np.float32))
                for r in recs:
                    for f in r["faces"]:
                        f["embedding_row"] += start
            for r in recs:
                index_fh.write(json.dumps(r) + "\n")
                records[r["photo"]] = r
            index_fh.flush()
            bar.update(len(recs))
    except KeyboardInterrupt:
        _write_text(run_path, json.dumps({"settings": settings, "status": "interrupted"}, indent=2) + "\n")
        current = getattr(work, "current", None) if engine == "local" else None
        where = (f"at photo {todo.index(current) + 1} of {len(todo)} ({current})" if current in todo
                 else f"after {bar.n} of {len(todo)} photo(s) of this run")
        raise RunInterrupted(f"interrupted {where}; {len(records)} photo(s) are recorded in {index_path} (those of "
                             f"an unfinished batch are not); rerun the same command to resume") from None
    finally:
        bar.close()
        close = getattr(chunks, "close", None)
        if close is not None:
            close()
        index_fh.close()
        store.assemble()

    done = list(records.values())
    problems = [{"photo": r["photo"], "status": r["status"], "reason": r["reason"]}
                for r in done if r["status"] != "ok"]
    summary = {
        "settings": settings,
        "photos": len(done),
        "with_faces": sum(r["status"] == "ok" for r in done),
        "faces": store.rows,
        "no_face": sum(r["status"] == "no_face" for r in done),
        "unreadable": sum(r["status"] in ("unreadable", "error") for r in done),
        "problems": problems,
        "group_labels": labels,
        "files": {"index": index_path, "embeddings": os.path.join(out, EMBEDDINGS) if store.rows else None},
        "status": "done",
    }
    _write_text(run_path, json.dumps(summary, indent=2) + "\n")
    log(f"{summary['photos']} photo(s): {summary['faces']} face(s) in {summary['with_faces']}, "
        f"{summary['no_face']} without a face, {summary['unreadable']} unreadable -> {out}")
    for p in problems[:20]:
        log(f"  {p['photo']}: {p['status']}: {p['reason']}")
    if len(problems) > 20:
        log(f"  ... and {len(problems) - 20} more in {run_path}")
    return summary
