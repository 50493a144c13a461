"""Every command takes the authors' TPAMI release file: ``mtlface-fast run / eval / bench --weights
mtlface_checkpoints.tar`` (demo and export are covered in test_tpami_state_dict.py and test_export_tpami.py).
The file is in the release layout (small configuration, randomized weights)."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import mtlface_fast
from mtlface_fast import reference
from mtlface_fast.cli import main
from tests.tpami_utils import SMALL, randomize_tpami_


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("release") / "mtlface_checkpoints.tar")
    torch.save(randomize_tpami_(reference.MTLFace(**SMALL), seed=9).state_dict(), path)
    return path


def test_bench_times_the_release_file(release, tmp_path, capsys):
    rc = main(["bench", "--weights", release, "--device", "cpu", "--tasks", "encode,synthesize", "--batch", "1",
               "--variants", "reference,ours", "--warmup", "0", "--iters", "1", "--out", str(tmp_path)])
    assert rc == 0, capsys.readouterr().err
    (name,) = [f for f in os.listdir(tmp_path) if f.endswith(".json")]
    payload = json.load(open(tmp_path / name))
    s = payload["settings"]
    assert (s["arch"], s["backbone"], s["input_size"]) == ("tpami", "ir34", 32) and payload["complete"]
    assert {(r["task"], r["variant"]) for r in payload["results"]} == {
        ("encode", "reference"), ("encode", "ours"), ("synthesize", "reference"), ("synthesize", "ours")}


def test_eval_embeds_with_the_release_file(release, tmp_path, capsys):
    from skimage import data
    d = tmp_path / "faces"
    d.mkdir()
    for i, a in enumerate(data.lfw_subset()[:4]):
        Image.fromarray((a * 255).round().astype(np.uint8)).save(d / f"f{i}.png")
    (d / "pairs.txt").write_text("f0.png f0.png 1\nf0.png f1.png 0\nf2.png f2.png 1\nf2.png f3.png 0\n")
    out = tmp_path / "out"
    rc = main(["eval", "--weights", release, "--pairs", str(d / "pairs.txt"), "--out", str(out), "--no-progress",
               "--device", "cpu", "--batch-size", "4"])
    assert rc == 0, capsys.readouterr().err
    rep = json.loads((out / "report.json").read_text())
    assert "official checkpoint" in rep["model"]["source"]
    assert rep["model"]["config"]["arch"] == "tpami" and rep["model"]["cls"] == "MTLFace"
    assert rep["verification"]


def test_run_processes_a_folder_with_the_release_file(release, tmp_path, capsys):
    from skimage import data
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(np.array(Image.fromarray(data.astronaut()).resize((160, 160)))).save(photos / "a.png")
    out = tmp_path / "out"
    assert main(["run", str(photos), "--out", str(out), "--weights", release, "--no-progress"]) == 0
    emb = np.load(out / "embeddings.npy")
    assert emb.shape == (1, 512)
    model = mtlface_fast.MTLFace.from_official(release).eval()
    (row,) = [json.loads(line) for line in open(out / "index.jsonl")]
    crop = np.asarray(Image.open(out / row["faces"][0]["crop"]))
    with torch.inference_mode():
        want = model.encode(mtlface_fast.preprocess([crop], size=32)).embedding.numpy()
    np.testing.assert_allclose(emb, want, rtol=1e-4, atol=1e-5)
    assert abs(float(np.linalg.norm(emb[0])) - 1.0) < 1e-4  # the release's flip-TTA embedding is normalized
