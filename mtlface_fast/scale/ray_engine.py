"""``mtlface-fast run PHOTOS --out OUT --engine ray``: the photos of a folder on Ray Data actors.

The driver lists the photos still to do (as the local engine: a rerun resumes), hands them to
``Dataset.map_batches`` over an actor pool (one model and one face aligner per actor, ``batch_size`` photos per
call, one GPU per actor when the actors run on CUDA), and writes what comes back in the input order into the
same files as the local engine (index.jsonl, embeddings.npy, run.json). The per-batch work is
:class:`mtlface_fast.photo_work.PhotoWork`, the local engine's. Actors read PHOTOS and write the crops (and grids)
into OUT themselves: on a cluster of several machines both folders must be on a file system every node mounts
at the same path, and every node needs the package (``pip install "mtlface-fast[scale]"``).
"""
from __future__ import annotations

import json
from typing import Callable, Dict, Iterator, List, Optional, Tuple

from . import connect_ray, require


class PhotoActor:
    """One Ray Data actor: a model and an aligner, built once; a batch of photo names -> records and embeddings."""

    def __init__(self, photos: str, out: str, model_args: Dict, work_args: Dict, device: str):
        from ..align import FaceAligner
        from ..photo_work import PhotoWork
        from ..loading import load_model
        work_args = dict(work_args)
        detector = work_args.pop("detector", "auto")
        model, _ = load_model(**model_args)
        model = model.to(device).eval()
        aligner = FaceAligner(size=int(model.config["input_size"]), device=device, detector=detector,
                              min_face_size=work_args["min_face_size"])
        self.work, self.photos, self.out = PhotoWork(model, aligner, **work_args), photos, out

    def __call__(self, batch: Dict) -> Dict:
        import numpy as np
        records, emb = self.work(self.photos, [str(p) for p in batch["photo"]], self.out)
        rows = []
        for r in records:  # each photo carries its own rows (faces are consecutive rows of emb)
            idx = [f["embedding_row"] for f in r["faces"]]
            rows.append(np.ascontiguousarray(emb[idx], dtype=np.float32).tobytes())
        return {"record": np.array([json.dumps(r) for r in records], dtype=object),
                "embeddings": np.array(rows, dtype=object)}


def ray_photo_batches(todo: List[str], photos: str, out: str, model_args: Dict, work_args: Dict, *,
                      device: Optional[str] = None, address: Optional[str] = None, workers: Optional[int] = None,
                      log: Callable[[str], None] = print, progress: bool = True) -> Iterator[Tuple[List[dict], object]]:
    """(records, embeddings) per batch of ``todo``, in order, computed by Ray Data actors; embedding rows count
    from 0 per batch, as :class:`mtlface_fast.photo_work.PhotoWork` returns them."""
    import os

    import numpy as np
    ray = require("ray", "--engine ray")
    require("ray.data", "--engine ray")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ValueError(f"--workers must be a positive int, got {workers!r}")
    if not todo:
        return
    started = connect_ray(address, log=log)
    try:
        res = ray.cluster_resources()
        gpus = int(res.get("GPU", 0))
        device = device or ("cuda" if gpus else "cpu")
        if device == "cuda" and not gpus:
            raise ValueError("--device cuda: the Ray cluster has no GPU")
        capacity = gpus if device == "cuda" else max(1, int(res.get("CPU", 1)))
        workers = workers or capacity
        per_actor = dict(num_gpus=1, num_cpus=1) if device == "cuda" else dict(num_cpus=1)
        log(f"Ray Data: {workers} actor(s) on {device}, {work_args['batch_size']} photo(s) per batch")
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # rows of embeddings.npy in the order of the local engine
        ctx.enable_progress_bars = bool(progress)
        batch = int(work_args["batch_size"])
        ds = ray.data.from_items([{"photo": p} for p in todo], override_num_blocks=max(1, -(-len(todo) // batch)))
        ds = ds.map_batches(PhotoActor, batch_size=batch, batch_format="numpy",
                            compute=ray.data.ActorPoolStrategy(size=workers),
                            fn_constructor_kwargs=dict(photos=os.path.abspath(photos), out=os.path.abspath(out),
                                                       model_args=model_args, work_args=work_args, device=device),
                            **per_actor)
        for result in ds.iter_batches(batch_size=batch, batch_format="numpy", prefetch_batches=1):
            records = [json.loads(s) for s in result["record"]]
            embs, row = [], 0
            for r, raw in zip(records, result["embeddings"]):
                e = np.frombuffer(raw, dtype=np.float32).reshape(len(r["faces"]), -1) if r["faces"] else None
                for f in r["faces"]:
                    f["embedding_row"] = row
                    row += 1
                if e is not None:
                    embs.append(e)
            yield records, (np.concatenate(embs, axis=0) if embs else np.zeros((0, 512), np.float32))
    finally:
        if started:
            ray.shutdown()
