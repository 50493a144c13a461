"""Training data: the official list-file format, Pillow decoding, the official transform and sampler.

List file (official ``dataset/{name}.txt``): one image per line, space-separated, no header:
``id filename age gender`` (gender 1 male, 0 female; filename relative to the image folder).

Every random choice of the input pipeline is a pure function of (seed, position in the sample stream):
the sampler's permutation (official: ``randperm`` seeded ``seed + epoch``), each sample's flip, and the
FAS target group and image. Runs are therefore reproducible whatever the number of workers, and a resumed
run reads exactly the samples the uninterrupted run would have read.
"""
from __future__ import annotations

import os
import random
import sys
import warnings
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, Sampler

from ..reference.heads import age2group, check_age_group

MIN_AGE, MAX_AGE = 0.0, 150.0


@dataclass
class FaceList:
    """Parsed list file: parallel arrays, identities remapped to 0..C-1 (``classes[label]`` is the raw id)."""
    paths: List[str]
    labels: np.ndarray      # (N,) int64, contiguous class index
    ages: np.ndarray        # (N,) float32, years
    genders: np.ndarray     # (N,) int64
    classes: List[str]      # raw identity of each class index
    skipped: List[str]      # "file:line: reason" of every rejected row
    where: List[str]        # "file:line" of every kept row

    def __len__(self):
        return len(self.paths)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def read_list_file(path: str, root: Optional[str] = None, *, check_files: bool = True,
                   verbose: bool = True) -> FaceList:
    """Parse a list file; rows with a bad age, too few columns or a missing image are reported and skipped.

    Raises:
        FileNotFoundError: the list file does not exist.
        ValueError: the list holds no usable row.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"data: expected a path to a list file, got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data: list file not found: {path}")
    root = os.fspath(root) if root else os.path.dirname(os.path.abspath(path))
    paths, ids, ages, genders, skipped, rows = [], [], [], [], [], []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            parts = line.split()
            if not parts:
                continue
            where = f"{path}:{lineno}"
            if len(parts) < 3:
                skipped.append(f"{where}: expected 'id filename age gender', got {line.strip()!r}")
                continue
            ident, name, age_s = parts[0], parts[1], parts[2]
            try:
                age = float(age_s)
            except ValueError:
                age = float("nan")
            if not np.isfinite(age) or not MIN_AGE <= age <= MAX_AGE:
                skipped.append(f"{where}: bad age {age_s!r} (expected a number in [{MIN_AGE:g}, {MAX_AGE:g}])")
                continue
            gender = 0
            if len(parts) >= 4:
                try:
                    gender = int(float(parts[3]))
                except ValueError:
                    skipped.append(f"{where}: bad gender {parts[3]!r} (expected 0 or 1)")
                    continue
            full = name if os.path.isabs(name) else os.path.join(root, name)
            if check_files and not os.path.isfile(full):
                skipped.append(f"{where}: image not found: {full}")
                continue
            paths.append(full)
            rows.append(where)
            ids.append(ident)
            ages.append(age)
            genders.append(gender)
    for msg in skipped if verbose else ():
        print(f"warning: skipped {msg}", file=sys.stderr)
    if not paths:
        raise ValueError(f"data: {path} holds no usable row ({len(skipped)} rejected); expected lines "
                         f"'id filename age gender'")
    try:
        classes = sorted(set(ids), key=lambda s: (0, int(s)) if s.lstrip("-").isdigit() else (1, s))
    except ValueError:
        classes = sorted(set(ids))
    index = {c: i for i, c in enumerate(classes)}
    return FaceList(paths, np.asarray([index[i] for i in ids], dtype=np.int64), np.asarray(ages, dtype=np.float32),
                    np.asarray(genders, dtype=np.int64), [str(c) for c in classes], skipped, rows)


def load_image(path: str, size: int, flip: bool) -> torch.Tensor:
    """The official transform: RGB, (flip), resize to size x size, [0, 1] -> normalize(0.5, 0.5): (3, S, S).

    The file is read by :func:`mtlface_fast.preprocess.read_image` (EXIF orientation, 16-bit and float images)."""
    from ..preprocess import read_image

    img = read_image(path)
    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    arr = np.asarray(img, dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1).div(255.0).sub(0.5).div(0.5).contiguous()


def sample_rng(seed: int, position: int, stream: int = 0) -> random.Random:
    """A private RNG for one sample of the stream (flip, FAS target), independent of workers and resumes."""
    return random.Random((int(seed) * 1_000_003 + int(stream)) * 4_294_967_311 + int(position))


class FaceDataset(Dataset):
    """Items are addressed as ``(index, position)``: ``position`` in the sample stream seeds the flip and the
    FAS target. A file that fails to decode is reported and replaced by the next decodable row; the item's
    ``skipped`` field counts the replacements so that the loop can report a total.

    Item: dict(image (3,S,S), label, age, gender, skipped[, target_image, target_group]).
    """

    def __init__(self, faces: FaceList, input_size: int, age_group: int, *, flip: bool = True, seed: int = 0,
                 with_targets: bool = False):
        self.faces, self.size, self.flip, self.seed = faces, int(input_size), bool(flip), int(seed)
        self.age_group = check_age_group(age_group)
        self.groups = age2group(faces.ages, age_group)
        self.with_targets = with_targets
        self.group_members = [np.flatnonzero(self.groups == g) for g in range(age_group)]
        self.target_groups = [g for g in range(age_group) if len(self.group_members[g])]
        if with_targets and len(self.target_groups) < age_group:
            empty = [g for g in range(age_group) if not len(self.group_members[g])]
            warnings.warn(f"age groups {empty} have no image in {len(faces)} rows; FAS targets are drawn from "
                          f"groups {self.target_groups} only")
        self._reported = set()

    def __len__(self):
        return len(self.faces)

    def _decode(self, index: int, flip: bool) -> Tuple[torch.Tensor, int, int]:
        """(image, index actually used, number of undecodable rows passed over)."""
        n = len(self.faces)
        for k in range(n):
            i = (index + k) % n
            path = self.faces.paths[i]
            try:
                return load_image(path, self.size, flip), i, k
            except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
                if path not in self._reported:
                    self._reported.add(path)
                    print(f"warning: skipped {self.faces.where[i]}: corrupt image {path}: {exc}", file=sys.stderr)
        raise ValueError("data: no image of the list can be decoded")

    def __getitem__(self, item):
        index, position = item if isinstance(item, tuple) else (item, item)
        rng = sample_rng(self.seed, position)
        flip = self.flip and rng.random() < 0.5
        image, i, skipped = self._decode(int(index), flip)
        out = dict(image=image, label=int(self.faces.labels[i]), age=float(self.faces.ages[i]),
                   gender=int(self.faces.genders[i]), skipped=skipped)
        if self.with_targets:
            group = self.target_groups[rng.randrange(len(self.target_groups))]
            members = self.group_members[group]
            j = int(members[rng.randrange(len(members))])
            target, _, skipped_t = self._decode(j, self.flip and rng.random() < 0.5)
            out.update(target_image=target, target_group=group, skipped=skipped + skipped_t)
        return out


def balance_weights(faces: FaceList, mode: str, age_group: int) -> Optional[torch.Tensor]:
    """Per-row sampling weights: uniform over identities or age groups (inverse frequency), or None."""
    if mode == "none":
        return None
    keys = faces.labels if mode == "identity" else age2group(faces.ages, age_group)
    counts = np.bincount(keys)
    return torch.as_tensor(1.0 / counts[keys], dtype=torch.double)


class StepSampler(Sampler):
    """The official ``RandomSampler`` (``common/sampler.py``), rank-aware and resumable.

    The global stream is the concatenation of ``randperm(n)`` seeded ``seed + epoch`` (n = len rounded
    down to the global batch; trailing rows are never drawn, as in the official code), or a multinomial
    draw with ``weights``. Step ``k`` uses stream positions ``[k*GB, (k+1)*GB)`` with GB = global batch;
    the rank ``r`` takes every ``world``-th of them starting at ``r`` (official subsampling). Yields
    ``(index, position)`` pairs; starts at ``start_step``.
    """

    def __init__(self, length: int, batch_size: int, num_steps: int, *, world_size: int = 1, rank: int = 0,
                 start_step: int = 0, seed: int = 0, weights: Optional[torch.Tensor] = None):
        self.global_batch = batch_size * world_size
        if length < self.global_batch:
            raise ValueError(f"data: {length} usable rows is fewer than one global batch ({self.global_batch})")
        self.length, self.num_steps, self.world, self.rank = length, num_steps, world_size, rank
        self.start, self.seed, self.weights = start_step, seed, weights

    def stream(self) -> List[int]:
        total = self.num_steps * self.global_batch
        if self.weights is not None:
            g = torch.Generator().manual_seed(self.seed)
            return torch.multinomial(self.weights, total, True, generator=g).tolist()
        n = self.length - self.length % self.global_batch
        out: List[int] = []
        epoch = 0
        while len(out) < total:
            g = torch.Generator().manual_seed(self.seed + epoch)
            out.extend(torch.randperm(n, generator=g).tolist())
            epoch += 1
        return out[:total]

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        stream = self.stream()
        begin = self.start * self.global_batch + self.rank
        for pos in range(begin, len(stream), self.world):
            yield stream[pos], pos

    def __len__(self):
        return (self.num_steps - self.start) * self.global_batch // self.world


def collate(items: Sequence[Dict]) -> Dict[str, torch.Tensor]:
    out = {}
    for key in items[0]:
        vals = [it[key] for it in items]
        if isinstance(vals[0], torch.Tensor):
            out[key] = torch.stack(vals)
        elif isinstance(vals[0], float):
            out[key] = torch.tensor(vals, dtype=torch.float32)
        else:
            out[key] = torch.tensor(vals, dtype=torch.long)
    return out


def make_loader(dataset: FaceDataset, sampler: StepSampler, batch_size: int, num_workers: int,
                pin_memory: bool) -> torch.utils.data.DataLoader:
    """Per-process loader: batches of ``batch_size`` from ``sampler``, workers, pinned memory, drop_last."""
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                                       pin_memory=pin_memory, drop_last=True, collate_fn=collate,
                                       persistent_workers=False)
