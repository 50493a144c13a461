"""Run the model over image files in batches: embeddings, ages and group logits, each image once.

:class:`Embedder` loads images on a thread pool (the next batch is decoded while the model runs on the
current one), keeps every result in memory keyed by path (a pair list names most images many times), and
can persist them to an ``.npz`` cache keyed by the model's weights, the preprocessing and each file's size
and modification time. Images that cannot be decoded are recorded in :attr:`Embedder.failed` (path ->
reason) instead of stopping the run; callers exclude and report them.

Embeddings are L2-normalized. With ``flip=True`` (test-time augmentation, ``model.encode(x, flip=True)``; the
default of the TPAMI release): embedding = normalize(normalize(e(x)) + normalize(e(flip(x)))), age and group
logits are the means of the two views.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..precision import DTYPES, autocast
from ..preprocess import preprocess


def resolve_device(device: Optional[str]) -> torch.device:
    """``auto``/None -> cuda when available, else cpu; an explicit cuda request without CUDA is an error."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was requested but CUDA is not available; use --device cpu")
    return dev


def _load_one(path: str, size: int):
    try:
        return preprocess(path, size=size)[0], None
    except FileNotFoundError:
        return None, "file not found"
    except Exception as exc:  # PIL raises several types for corrupt / unsupported files
        return None, f"cannot read image: {type(exc).__name__}: {exc}"


class Embedder:
    """Batched, cached encoding of image files with one model.

    Args:
        model: an :class:`mtlface_fast.MTLFace` (or the reference), already on ``device``.
        device: where the model lives.
        batch_size: images per forward.
        flip: horizontal-flip test-time augmentation (``model.encode``'s ``flip``); None: the architecture's
            default (on for the TPAMI release, as its ``encode``; off for the CVPR model).
        dtype: ``fp32`` (exact), ``bf16`` or ``fp16`` (autocast, for throughput on GPU).
        workers: image-decoding threads.
        progress: show a tqdm bar on stderr.
    """

    def __init__(self, model, device=None, batch_size: int = 64, flip: Optional[bool] = None, dtype: str = "fp32",
                 workers: int = 4, progress: bool = True):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be a positive int, got {workers!r}")
        if flip is not None and not isinstance(flip, bool):
            raise ValueError(f"flip must be True, False or None, got {flip!r}")
        self.model = model.eval()
        flip = model.architecture.default_flip if flip is None else flip
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.batch_size, self.flip, self.dtype, self.workers, self.progress = batch_size, flip, dtype, workers, progress
        self.size = model.config["input_size"]
        self.age_group = model.config["age_group"]
        self._cache: Dict[str, Tuple[np.ndarray, float, np.ndarray]] = {}
        self.failed: Dict[str, str] = {}
        self.n_forward_images = 0
        self.seconds = 0.0

    # -- tensors ---------------------------------------------------------------------------------------------
    def autocast(self):
        """The precision context of every forward: autocast to bf16/fp16; for fp32, autocast disabled (exact
        even inside an enclosing autocast)."""
        if self.dtype == "fp32":
            return torch.autocast(self.device.type, enabled=False)
        return autocast(self.device, self.dtype)

    @torch.inference_mode()
    def encode_tensor(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, 3, S, S) normalized images on the model's device -> (embedding (B, D) normalized, age (B,),
        group_logits (B, G)), all float32."""
        with self.autocast():
            r = self.model.encode(x, flip=self.flip)  # flip TTA: normalize(normalize(v) + normalize(v_mirrored))
        self.n_forward_images += x.size(0) * (2 if self.flip else 1)
        return F.normalize(r.embedding.float(), dim=1), r.age.float(), r.group_logits.float()

    # -- files -----------------------------------------------------------------------------------------------
    def encode_paths(self, paths: Sequence[str], desc: str = "embedding") -> Dict[str, np.ndarray]:
        """Encode every readable image of ``paths`` (each unique path once, cached across calls).

        Returns ``{"paths": [...], "embedding": (N, D), "age": (N,), "group_logits": (N, G)}`` over the
        readable paths, in the given order (duplicates kept); unreadable ones go to :attr:`failed`.
        """
        import time

        todo = list(dict.fromkeys(p for p in paths if p not in self._cache and p not in self.failed))
        if todo:
            t0 = time.perf_counter()
            bar = None
            if self.progress:
                from tqdm import tqdm
                bar = tqdm(total=len(todo), desc=desc, unit="img", file=sys.stderr, dynamic_ncols=True)
            batches = [todo[i:i + self.batch_size] for i in range(0, len(todo), self.batch_size)]
            with ThreadPoolExecutor(self.workers) as pool:
                def load(batch):
                    return list(pool.map(lambda p: _load_one(p, self.size), batch))
                with ThreadPoolExecutor(1) as prefetch:
                    nxt = prefetch.submit(load, batches[0])
                    for i, batch in enumerate(batches):
                        loaded = nxt.result()
                        if i + 1 < len(batches):
                            nxt = prefetch.submit(load, batches[i + 1])
                        ok = [(p, t) for p, (t, err) in zip(batch, loaded) if t is not None]
                        for p, (t, err) in zip(batch, loaded):
                            if t is None:
                                self.failed[p] = err
                        if ok:
                            x = torch.stack([t for _, t in ok])
                            if self.device.type == "cuda":
                                x = x.pin_memory()
                            emb, age, lg = self.encode_tensor(x.to(self.device, non_blocking=True))
                            emb, age, lg = emb.cpu().numpy(), age.cpu().numpy(), lg.cpu().numpy()
                            for j, (p, _) in enumerate(ok):
                                self._cache[p] = (emb[j], float(age[j]), lg[j])
                        if bar is not None:
                            bar.update(len(batch))
            if bar is not None:
                bar.close()
            self.seconds += time.perf_counter() - t0
        good = [p for p in paths if p in self._cache]
        if not good:
            return dict(paths=[], embedding=np.zeros((0, 0), np.float32), age=np.zeros(0, np.float32),
                        group_logits=np.zeros((0, self.age_group), np.float32))
        return dict(paths=good, embedding=np.stack([self._cache[p][0] for p in good]),
                    age=np.array([self._cache[p][1] for p in good], dtype=np.float32),
                    group_logits=np.stack([self._cache[p][2] for p in good]))

    def load_images(self, paths: Sequence[str]) -> Tuple[List[str], Optional[torch.Tensor]]:
        """Decode images (for synthesis): (readable paths, (N, 3, S, S) tensor or None); failures recorded."""
        with ThreadPoolExecutor(self.workers) as pool:
            loaded = list(pool.map(lambda p: _load_one(p, self.size), paths))
        ok = []
        for p, (t, err) in zip(paths, loaded):
            if t is None:
                self.failed[p] = err
            else:
                ok.append((p, t))
        return [p for p, _ in ok], (torch.stack([t for _, t in ok]) if ok else None)

    # -- persistent cache ------------------------------------------------------------------------------------
    def fingerprint(self) -> str:
        """Hash of everything an embedding depends on: weights, config, flip, dtype (computed once)."""
        if getattr(self, "_fingerprint", None) is not None:
            return self._fingerprint
        h = hashlib.sha256()
        h.update(json.dumps(dict(config=self.model.config, flip=self.flip, dtype=self.dtype,
                                 cls=type(self.model).__name__), sort_keys=True).encode())
        for k, v in self.model.state_dict().items():
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        self._fingerprint = h.hexdigest()
        return self._fingerprint

    @staticmethod
    def _stamp(p: str) -> str:
        try:
            st = os.stat(p)
        except OSError:
            return ""
        return f"{st.st_size}:{st.st_mtime_ns}"

    def load_cache(self, path: str) -> int:
        """Adopt the entries of an ``.npz`` cache written for the same model; returns how many were used."""
        if not os.path.isfile(path):
            return 0
        with np.load(path, allow_pickle=False) as z:
            if str(z["fingerprint"]) != self.fingerprint():
                return 0
            n = 0
            for p, st, e, a, g in zip(z["paths"], z["stamps"], z["embedding"], z["age"], z["group_logits"]):
                p = str(p)
                if st and self._stamp(p) == str(st):
                    self._cache[p] = (e, float(a), g)
                    n += 1
        return n

    def save_cache(self, path: str) -> str:
        from ..checkpoint import atomic_write
        paths = list(self._cache)
        if not paths:
            raise ValueError("nothing to cache: no image was encoded")

        def write(tmp):
            with open(tmp, "wb") as fh:
                np.savez(fh, fingerprint=np.array(self.fingerprint()), paths=np.array(paths),
                         stamps=np.array([self._stamp(p) for p in paths]),
                         embedding=np.stack([self._cache[p][0] for p in paths]),
                         age=np.array([self._cache[p][1] for p in paths], dtype=np.float32),
                         group_logits=np.stack([self._cache[p][2] for p in paths]))
        return atomic_write(path, write)
