"""Shared by the tests of mtlface_fast.scale: small models of both architectures saved as a user has them (a
save_pretrained folder for CVPR, a file in the TPAMI release layout), a photo folder, a local Ray."""
from __future__ import annotations

import json
import os

import numpy as np
import torch
from PIL import Image
from skimage import data

import mtlface_fast
from tests.tpami_utils import randomize_tpami_
from tests.utils import randomize_

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHS = ("cvpr", "tpami")
# The face aligner works at the model's input size; 112 is the size the official models use.
SMALL = {"cvpr": dict(backbone="ir34", input_size=112, age_group=4),
         "tpami": dict(arch="tpami", backbone="ir34", input_size=112, age_group=4)}


def save_model(arch: str, folder) -> str:
    """A randomized small model of ``arch``, saved as its users hold it; returns the --weights value."""
    torch.manual_seed(0)
    if arch == "cvpr":
        model = randomize_(mtlface_fast.MTLFace(**SMALL["cvpr"]), seed=3)
        return model.save_pretrained(os.path.join(str(folder), "model"))
    model = randomize_tpami_(mtlface_fast.reference.MTLFace(**SMALL["tpami"]), seed=5)
    path = os.path.join(str(folder), "mtlface_checkpoints.tar")
    torch.save(model.state_dict(), path)  # the authors' release layout: encoder./decoder./age_estimator. keys
    return path


def two_faces():
    """The astronaut's top half beside its mirror image: two faces in one photo."""
    a = np.array(Image.fromarray(data.astronaut()[:256]).resize((256, 128), Image.BILINEAR))
    return np.concatenate([a, a[:, ::-1]], axis=1)


def make_photos(folder, extra: bool = True) -> str:
    """Photos with one face, two faces, none, a cat, and files that are not photos."""
    os.makedirs(os.path.join(str(folder), "sub"), exist_ok=True)
    Image.fromarray(data.astronaut()).resize((200, 200), Image.BILINEAR).save(
        os.path.join(str(folder), "astronaut.png"))
    Image.fromarray(two_faces()).resize((300, 150), Image.BILINEAR).save(os.path.join(str(folder), "sub", "pair.jpg"),
                                                                         quality=95)
    if extra:
        Image.fromarray(data.chelsea()).resize((150, 100)).save(os.path.join(str(folder), "cat.png"))
        Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(os.path.join(str(folder), "tiny.png"))
        with open(os.path.join(str(folder), "notes.txt"), "w") as fh:
            fh.write("not a photo\n")
        open(os.path.join(str(folder), "empty.jpg"), "wb").close()
    return str(folder)


def read_index(out) -> dict:
    with open(os.path.join(str(out), "index.jsonl"), encoding="utf-8") as fh:
        return {r["photo"]: r for r in map(json.loads, fh.read().splitlines())}


def start_ray():
    """A local Ray on 2 CPUs whose workers import this checkout's package."""
    import ray
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": ROOT, "MTLFACE_TEST_THREADS": "1"}})
    return ray
