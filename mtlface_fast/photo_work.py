"""The per-batch work of ``mtlface-fast run`` (the local engine and the Ray engine's actors) and of ``search``:
photos -> aligned faces, crops, ages, grids and embeddings (:class:`PhotoWork`)."""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Tuple


def _face_name(photo: str, k: int) -> str:
    return f"{photo}_{k}.png"  # the whole name: a.jpg and a.png are two photos


class PhotoWork:
    """The per-batch work of ``run`` (both engines) and ``search``: photos -> index records and embeddings.

    One model and one face aligner; :meth:`__call__` reads each photo, finds and aligns its faces, writes the
    crops (and with ``synthesize`` the age-group grids) under ``out`` when one is given, and encodes the faces in
    slices of ``batch_size``. A record's faces carry ``embedding_row``: the row of the returned array, counted
    from 0 for this call (the caller shifts it to the row of embeddings.npy).
    """

    def __init__(self, model, aligner, *, keep: str = "largest", batch_size: int = 32, synthesize: bool = False,
                 min_face_size: int = 20, grid_note: str = ""):
        from .demo import group_labels
        self.model, self.aligner, self.grid_note = model, aligner, grid_note
        self.keep, self.batch_size, self.synthesize, self.min_face_size = keep, batch_size, synthesize, min_face_size
        self.size = int(model.config["input_size"])
        self.age_groups = int(model.config["age_group"])
        self.labels = group_labels(self.age_groups)
        self.device = next(model.parameters()).device
        self.current: Optional[str] = None

    def __call__(self, photos: str, rels: Sequence[str], out: Optional[str] = None) -> Tuple[List[dict], "object"]:
        """Photos ``rels`` (relative to the folder ``photos``) -> (records, embeddings (faces, D) float32)."""
        import numpy as np

        records, crops = [], []
        for rel in rels:
            self.current = rel  # where a Ctrl-C stopped the run
            rec, faces = self.read_photo(photos, rel, out)
            records.append(rec)
            crops.extend(faces)
        faces = [f for r in records for f in r["faces"]]
        embs = [self.encode(crops[s:s + self.batch_size], faces[s:s + self.batch_size], out)
                for s in range(0, len(crops), self.batch_size)]
        for i, f in enumerate(faces):
            f["embedding_row"] = i
            del f["name"]
        emb = np.concatenate(embs, axis=0) if embs else np.zeros((0, 512), np.float32)
        return records, emb

    def read_photo(self, photos: str, rel: str, out: Optional[str]):
        """One photo -> (its record, its aligned crops): status ``ok``, ``no_face``, ``unreadable`` or ``error``."""
        from PIL import Image

        from .align import load_image
        from .checkpoint import atomic_write
        rec: Dict = {"photo": rel}
        try:
            arr = load_image(os.path.join(photos, rel), name=rel)
        except (ValueError, TypeError, OSError) as exc:
            rec.update(status="unreadable", reason=str(exc), faces=[])
            return rec, []
        rec.update(width=int(arr.shape[1]), height=int(arr.shape[0]))
        try:
            faces = self.aligner.align(arr, keep=self.keep)
        except (ValueError, RuntimeError) as exc:  # a photo the detector or the warp cannot handle
            rec.update(status="error", reason=f"face detection failed: {exc}", faces=[])
            return rec, []
        if not faces:
            small = min(arr.shape[:2]) < self.min_face_size
            rec.update(status="no_face", faces=[],
                       reason=(f"image {arr.shape[1]}x{arr.shape[0]} is smaller than the smallest face searched "
                               f"({self.min_face_size} px)") if small else "no face found")
            return rec, []
        rec.update(status="ok", faces=[])
        for k, face in enumerate(faces):
            name = _face_name(rel, k)
            entry = {"face": k, "name": name, "box": [round(float(v), 2) for v in face.box],
                     "landmarks": [[round(float(v), 2) for v in p] for p in face.landmarks],
                     "score": round(face.score, 5)}
            if out is not None:
                crop_path = os.path.join(out, "faces", name)
                os.makedirs(os.path.dirname(crop_path), exist_ok=True)
                atomic_write(crop_path, lambda tmp, c=face.crop: Image.fromarray(c).save(tmp, format="PNG"))
                entry["crop"] = "faces/" + name
            rec["faces"].append(entry)
        return rec, [f.crop for f in faces]

    def encode(self, crops, faces: List[dict], out: Optional[str]):
        """One model batch: ages and groups into ``faces``, grids under ``out``; returns the embeddings."""
        import torch

        from .demo import save_grid
        from .preprocess import preprocess
        from .reference.heads import age2group
        x = preprocess(list(crops), size=self.size, device=self.device)
        with torch.inference_mode():
            enc = self.model.encode(x)
            aged = self.model.synthesize_all_ages(x) if self.synthesize and out is not None else None
        for j, f in enumerate(faces):
            age = float(enc.age[j])
            f["predicted_age"] = round(age, 3)
            f["age_group"] = int(age2group(age, self.age_groups))
            f["predicted_group"] = int(enc.group_logits[j].argmax())
            if aged is not None:
                f["grid"] = "grids/" + f["name"]
                save_grid(os.path.join(out, f["grid"]), x[j], aged[j], self.labels,
                          title=f"{f['name']}: predicted age {age:.1f}", note=self.grid_note)
        return enc.embedding.float().cpu().numpy()
