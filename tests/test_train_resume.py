"""Exact resume: N steps in one run equal N/2 steps, a checkpoint, a fresh start with --resume, N/2 steps."""
import math
import os
import shutil

import pytest
import torch

from mtlface_fast.train import make_config, make_synthetic_dataset, train

BASE = dict(backbone="ir34", age_group=4, sigma=0.5, num_workers=0, progress=False, log_every=1, sample_every=0,
            keep_checkpoints=5, device="cpu")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_synthetic_dataset(str(tmp_path_factory.mktemp("faces")), identities=4, images_per_identity=4,
                                  size=48, seed=2)


def _state(path):
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    return ckpt


def _assert_same(a, b):
    for group in ("modules", "optimizers", "schedulers", "scalers"):
        assert set(a.get(group, {})) == set(b.get(group, {})), group
    for name, sd in a["modules"].items():
        for k, v in sd.items():
            assert torch.equal(v, b["modules"][name][k]), f"{name}.{k}"
    for name, sd in a["optimizers"].items():
        sa, sb = sd["state"], b["optimizers"][name]["state"]
        assert set(sa) == set(sb)
        for i in sa:
            for k, v in sa[i].items():
                assert torch.equal(torch.as_tensor(v), torch.as_tensor(sb[i][k])), f"{name}[{i}].{k}"
    assert a.get("schedulers") == b.get("schedulers") and a["scalers"] == b["scalers"] and a["step"] == b["step"]


@pytest.mark.parametrize("recipe,extra", [
    ("aifr", dict(input_size=32, batch_size=2, grad_accum=2, lr=0.01, warmup_steps=2, milestones=(3,), flip=True)),
    ("fas", dict(input_size=48, batch_size=2, clip_grad=10.0, rec_weight=1.0)),  # + the reconstruction term
])
def test_resume_is_bit_exact(data, tmp_path, recipe, extra):
    full_dir, part_dir = str(tmp_path / "full"), str(tmp_path / "part")
    cfg = dict(BASE, **extra, data=data, num_iter=4, save_every=2)
    full = train(make_config(recipe, dict(cfg, output=full_dir)))
    # the interrupted run: its state after step 2, restarted in a new output folder with --resume auto
    os.makedirs(part_dir)
    shutil.copy(os.path.join(full_dir, "checkpoints", "step_00000002.pt"), os.path.join(part_dir, "last.pt"))
    resumed = train(make_config(recipe, dict(cfg, output=part_dir, resume="auto")))
    assert resumed["step"] == 4 and [h["step"] for h in resumed["history"]] == [3, 4]
    if recipe == "fas":
        assert all(math.isfinite(h["rec_loss"]) and h["rec_loss"] > 0 for h in full["history"])
    for a, b in zip(full["history"][2:], resumed["history"]):
        for k in a:
            if k != "images_per_s":
                assert a[k] == b[k], (a["step"], k)
    _assert_same(_state(os.path.join(full_dir, "last.pt")), _state(os.path.join(part_dir, "last.pt")))


def test_resume_errors(data, tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        train(make_config("aifr", dict(BASE, input_size=32, data=data, output=str(tmp_path), batch_size=2,
                                       num_iter=1, resume=str(tmp_path / "missing.pt"))))
