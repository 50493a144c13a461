"""Training data: list parsing and error reports, corrupt images, the official sampler, configs, synthetic set."""
import json
import os

import pytest
import torch

from mtlface_fast.reference.heads import AGE_GROUP_THRESHOLDS, age2group
from mtlface_fast.train import make_config, make_synthetic_dataset, read_list_file
from mtlface_fast.train.config import add_arguments, config_from_args
from mtlface_fast.train.data import FaceDataset, StepSampler, collate, load_image, make_loader


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synth")
    return make_synthetic_dataset(str(folder), identities=4, images_per_identity=6, size=48, seed=1)


def test_synthetic_set_format_and_groups(synth):
    faces = read_list_file(synth)
    assert len(faces) == 24 and faces.num_classes == 4 and not faces.skipped
    img = load_image(faces.paths[0], 48, False)
    assert img.shape == (3, 48, 48) and img.min() >= -1 and img.max() <= 1 and img.std() > 0.1
    for g in AGE_GROUP_THRESHOLDS:  # every group of every grouping is populated
        assert set(age2group(faces.ages, g).tolist()) == set(range(g)), g
    # identities differ more than ages of one identity (the set is usable for recognition)
    same = (load_image(faces.paths[0], 48, False) - load_image(faces.paths[1], 48, False)).abs().mean()
    other = (load_image(faces.paths[0], 48, False) - load_image(faces.paths[6], 48, False)).abs().mean()
    assert other > same


def test_bad_rows_reported_and_skipped(tmp_path, synth, capsys):
    root = os.path.dirname(synth)
    lines = open(synth).read().splitlines()
    bad = lines[:3] + ["7 images/0000_000.png abc 1", "7 images/0000_000.png -4 1", "7 images/0000_000.png nan 0",
                       "8 images/missing.png 30 1", "onlytwo cols", ""] + lines[3:5]
    path = tmp_path / "list.txt"
    path.write_text("\n".join(bad) + "\n")
    faces = read_list_file(str(path), root)
    assert len(faces) == 5 and len(faces.skipped) == 5
    err = capsys.readouterr().err
    for lineno in (4, 5, 6, 7, 8):
        assert f"{path}:{lineno}" in err
    assert "bad age 'abc'" in err and "image not found" in err


def test_empty_or_missing_list_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="list file not found"):
        read_list_file(str(tmp_path / "nope.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="no usable row"):
        read_list_file(str(empty))
    with pytest.raises(TypeError, match="data"):
        read_list_file(3)


def test_corrupt_image_skipped_with_count(tmp_path, synth, capsys):
    root = os.path.dirname(synth)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    lines = open(synth).read().splitlines()[:4] + [f"0 {broken} 33 1"]
    path = tmp_path / "list.txt"
    path.write_text("\n".join(lines) + "\n")
    faces = read_list_file(str(path), root)
    ds = FaceDataset(faces, 32, 7, flip=False)
    item = ds[(4, 0)]
    assert item["skipped"] == 1 and item["label"] == int(faces.labels[0])  # replaced by the next decodable row
    assert f"{path}:5: corrupt image {broken}" in capsys.readouterr().err and str(broken) in ds._reported
    batch = collate([ds[(i, i)] for i in range(5)])
    assert int(batch["skipped"].sum()) == 1 and batch["image"].shape == (5, 3, 32, 32)


def test_official_sampler_order_and_rank_split():
    n, bs, steps = 10, 2, 7
    full = list(StepSampler(n, bs * 2, steps, seed=3))
    # official: randperm(n - n % global_batch) seeded seed + epoch, concatenated
    perm = [i for e in range(4) for i in torch.randperm(8, generator=torch.Generator().manual_seed(3 + e)).tolist()]
    assert [i for i, _ in full] == perm[:steps * 4]
    assert [p for _, p in full] == list(range(steps * 4))
    ranks = [list(StepSampler(n, bs, steps, world_size=2, rank=r, seed=3)) for r in range(2)]
    assert ranks[0] == full[0::2] and ranks[1] == full[1::2]
    resumed = list(StepSampler(n, bs * 2, steps, seed=3, start_step=3))
    assert resumed == full[12:] and len(StepSampler(n, bs * 2, steps, seed=3, start_step=3)) == len(resumed)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        StepSampler(3, 2, 1, world_size=2)


def test_loader_workers_match_in_process(synth):
    faces = read_list_file(synth)
    ds = FaceDataset(faces, 32, 4, seed=5, with_targets=True)

    def batches(workers):
        s = StepSampler(len(faces), 4, 2, seed=5)
        return list(make_loader(ds, s, 4, workers, pin_memory=False))
    a, b = batches(0), batches(2)
    for x, y in zip(a, b):
        for k in x:
            assert torch.equal(x[k], y[k]), k
    assert set(a[0]) == {"image", "label", "age", "gender", "skipped", "target_image", "target_group"}
    flips = [ds[(0, p)]["image"] for p in range(8)]
    assert any(not torch.equal(flips[0], f) for f in flips[1:])  # flips vary with the stream position


def test_config_file_and_flags(tmp_path):
    import argparse
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("lr: 0.05\nmilestones: [10, 20]\nbatch_size: 16\namp: bf16\n")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    cfg = config_from_args(parser.parse_args(["aifr", "--config", str(yaml_file), "--data", "x.txt", "--lr", "0.2",
                                              "--no-flip"]))
    assert (cfg.lr, cfg.milestones, cfg.batch_size, cfg.amp, cfg.flip) == (0.2, (10, 20), 16, "bf16", False)
    assert cfg.cosface_s == 64.0 and cfg.cosface_m == 0.35 and cfg.weight_decay == 5e-4  # official defaults
    json_file = tmp_path / "c.json"
    json_file.write_text(json.dumps(dict(data="x.txt", gan_weight=1.0)))
    fas = make_config("fas", file=str(json_file))
    assert fas.gan_weight == 1.0 and fas.age_weight == 10.0 and fas.betas == (0.5, 0.99)
    with pytest.raises(ValueError, match="unknown option"):
        make_config("fas", dict(data="x", lr=0.1))
    with pytest.raises(ValueError, match="batch_size: expected int"):
        make_config("aifr", dict(data="x", batch_size="many"))
    with pytest.raises(ValueError, match="age_group must be one of"):
        make_config("aifr", dict(data="x", age_group=9))
    with pytest.raises(ValueError, match="not used by recipe"):
        config_from_args(parser.parse_args(["fas", "--data", "x", "--lr", "0.1"]))
    with pytest.raises(ValueError, match="a list file is required"):
        make_config("aifr")


def test_cli_train_reports_bad_input(tmp_path, capsys):
    from mtlface_fast.cli import main
    assert main(["train", "aifr", "--data", str(tmp_path / "none.txt")]) == 2
    assert "list file not found" in capsys.readouterr().err
    assert main(["train", "fas", "--data", "x.txt", "--lr", "0.1"]) == 2
    assert "--lr" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "nosuchrecipe"])
