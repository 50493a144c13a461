"""``mtlface-fast run --engine ray``: a real local Ray (2 CPUs) started here, 2 Ray Data actors, both architectures.

The Ray engine must write what the local engine writes: the same index.jsonl (faces, boxes, crops, ages, bad files
with the same reasons), embeddings equal to 1e-5, and a rerun resumes.
"""
import os
import shutil

import numpy as np
import pytest

from mtlface_fast.cli import main
from mtlface_fast.folder import run_folder
from tests.scale_utils import ARCHS, make_photos, read_index, save_model, start_ray

ray = pytest.importorskip("ray", reason="the scale extra (in the test extra)")  # CI installs it


@pytest.fixture(scope="module")
def local_ray():
    started = start_ray()
    yield started
    started.shutdown()


@pytest.fixture(scope="module", params=ARCHS)
def local_run(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"ray_{request.param}")
    weights = save_model(request.param, root)
    photos = make_photos(root / "photos")
    run_folder(photos, str(root / "local"), weights=weights, keep="all", batch_size=2, progress=False,
               log=lambda m: None)
    return weights, photos, str(root / "local")


def _same_run(a_out, b_out, a_photos=None, b_photos=None):
    """Same photos, records, faces and crops; embeddings equal to 1e-5. Reasons name the photo folder given."""
    a, b = read_index(a_out), read_index(b_out)
    for r in b.values():
        if a_photos and "reason" in r:
            r["reason"] = r["reason"].replace(b_photos, a_photos)
    assert sorted(a) == sorted(b)
    ea, eb = np.load(os.path.join(a_out, "embeddings.npy")), np.load(os.path.join(b_out, "embeddings.npy"))
    assert ea.shape == eb.shape
    for photo in a:
        fa, fb = a[photo]["faces"], b[photo]["faces"]
        strip = lambda r: {k: v for k, v in r.items() if k != "faces"}  # noqa: E731
        assert strip(a[photo]) == strip(b[photo])
        assert [{k: v for k, v in f.items() if k != "embedding_row"} for f in fa] == \
               [{k: v for k, v in f.items() if k != "embedding_row"} for f in fb]
        for x, y in zip(fa, fb):
            np.testing.assert_allclose(eb[y["embedding_row"]], ea[x["embedding_row"]], rtol=0, atol=1e-5)
            assert os.path.isfile(os.path.join(b_out, y["crop"]))


def test_ray_engine_writes_what_the_local_engine_writes(local_ray, local_run, tmp_path):
    weights, photos, local_out = local_run
    out = str(tmp_path / "ray")
    logs = []
    summary = run_folder(photos, out, weights=weights, keep="all", batch_size=2, progress=False, log=logs.append,
                         engine="ray", workers=2)
    assert any("2 actor(s) on cpu" in m for m in logs)
    _same_run(local_out, out)
    assert read_index(out) == read_index(local_out)  # same order of rows too
    assert summary["problems"] == run_folder(photos, local_out, weights=weights, keep="all", batch_size=2,
                                             progress=False, log=lambda m: None)["problems"]
    assert {p["photo"] for p in summary["problems"]} == {"cat.png", "tiny.png", "notes.txt", "empty.jpg"}
    assert not os.path.exists(os.path.join(out, ".embedding_parts"))


def test_ray_engine_resumes_and_adds_photos(local_ray, local_run, tmp_path):
    weights, photos, local_out = local_run
    part = tmp_path / "part"
    make_photos(part, extra=False)  # astronaut.png and sub/pair.jpg only
    out = str(tmp_path / "ray")
    run_folder(str(part), out, weights=weights, keep="all", batch_size=2, progress=False, log=lambda m: None,
               engine="ray", workers=2)
    before = np.load(os.path.join(out, "embeddings.npy"))
    assert before.shape == (3, 512)
    shutil.rmtree(part)
    shutil.copytree(photos, part)
    logs = []
    run_folder(str(part), out, weights=weights, keep="all", batch_size=2, progress=False, log=logs.append,
               engine="ray", workers=2)
    assert any(m.startswith("4 file(s) to process") for m in logs)  # the 4 photos not done before
    assert np.array_equal(np.load(os.path.join(out, "embeddings.npy")), before)  # no face was new
    _same_run(local_out, out, photos, str(part))
    logs.clear()
    run_folder(str(part), out, weights=weights, keep="all", batch_size=2, progress=False, log=logs.append,
               engine="ray", workers=2)
    assert any(m.startswith("0 file(s) to process") for m in logs)


def test_ray_engine_command_line(local_ray, local_run, tmp_path, capsys):
    weights, photos, local_out = local_run
    out = str(tmp_path / "cli")
    assert main(["run", photos, "--out", out, "--weights", weights, "--all-faces", "--batch-size", "3",
                 "--engine", "ray", "--workers", "2", "--no-progress"]) == 0
    assert "3 face(s) in 2" in capsys.readouterr().out
    _same_run(local_out, out)
    assert main(["run", photos, "--out", str(tmp_path / "o2"), "--weights", weights, "--workers", "2"]) == 2
    assert "--address and --workers are for --engine ray" in capsys.readouterr().err
    assert main(["run", photos, "--out", str(tmp_path / "o3"), "--weights", weights, "--engine", "ray",
                 "--workers", "0"]) == 2
    assert "--workers must be a positive int" in capsys.readouterr().err
    assert main(["run", photos, "--out", str(tmp_path / "o4"), "--weights", weights, "--engine", "ray",
                 "--device", "cuda:3"]) == 2
    assert "must be cpu or cuda" in capsys.readouterr().err
