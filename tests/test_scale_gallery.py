"""FAISS galleries over run folders: exact and IVF indexes, growth without re-embedding, search of photos and folders
(both architectures: a CVPR save_pretrained folder and a TPAMI release-layout file), errors that name the problem."""
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image
from skimage import data

from mtlface_fast.cli import main
from mtlface_fast.folder import run_folder
from mtlface_fast.scale import gallery as G
from tests.scale_utils import ARCHS, make_photos, read_index, save_model

faiss = pytest.importorskip("faiss", reason="the scale extra (in the test extra)")  # CI installs it


@pytest.fixture(scope="module", params=ARCHS)
def arch_run(request, tmp_path_factory):
    """(arch, weights, photos, out): a finished local run over the test photos."""
    root = tmp_path_factory.mktemp(f"gallery_{request.param}")
    weights = save_model(request.param, root)
    photos = make_photos(root / "photos")
    run_folder(photos, str(root / "out"), weights=weights, keep="all", batch_size=4, progress=False, log=lambda m: None)
    return request.param, weights, photos, str(root / "out")


def _copy(out, tmp_path):
    dst = str(tmp_path / "out")
    shutil.copytree(out, dst)
    return dst


def test_exact_gallery_finds_each_face_and_grows_without_re_embedding(arch_run, tmp_path):
    arch, weights, photos, out = arch_run
    out = _copy(out, tmp_path)
    meta = G.build_gallery(out, log=lambda m: None)
    assert meta["type"] == "flat" and meta["rows"] == 3 and meta["bytes_per_face"] == 2048
    gallery = G.Gallery(out)
    emb = np.load(os.path.join(out, "embeddings.npy"))
    idx = read_index(out)
    # Every gallery face is its own nearest neighbour, score 1 (cosine of unit vectors).
    for rec in idx.values():
        for f in rec["faces"]:
            best = gallery.search(emb[f["embedding_row"]][None], 1)[0][0]
            assert (best["photo"], best["face"]) == (rec["photo"], f["face"])
            assert abs(best["score"] - 1.0) < 1e-5

    # The query photo is embedded by the same model: the astronaut finds herself first.
    results = G.search_photos(os.path.join(photos, "astronaut.png"), out, top_k=3, weights=weights, backbone="ir34")
    assert len(results) == 1 and len(results[0]["matches"]) == 3
    top = results[0]["matches"][0]
    assert (top["photo"], top["face"], top["rank"]) == ("astronaut.png", 0, 1) and top["score"] > 0.9999
    assert [m["rank"] for m in results[0]["matches"]] == [1, 2, 3]
    assert results[0]["matches"][0]["score"] >= results[0]["matches"][1]["score"] >= results[0]["matches"][2]["score"]

    # New photos: the run embeds only them, the index adds only their rows; the old vectors stay as they were.
    old = faiss.read_index(os.path.join(out, "gallery", "index.faiss")).reconstruct_n(0, 3)
    Image.fromarray(data.astronaut()).resize((160, 160)).save(os.path.join(photos, "..", "new.png"))
    extra = tmp_path / "more"
    shutil.copytree(photos, extra)
    shutil.copy(os.path.join(photos, "..", "new.png"), extra / "new.png")
    logs = []
    run_folder(str(extra), out, weights=weights, keep="all", batch_size=4, progress=False, log=logs.append)
    assert any(m.startswith("1 file(s) to process") for m in logs)
    assert np.array_equal(np.load(os.path.join(out, "embeddings.npy"))[:3], emb)
    meta = G.build_gallery(out, log=logs.append)
    assert meta["rows"] == 4 and "1 new face(s) added" in logs[-1]
    index = faiss.read_index(os.path.join(out, "gallery", "index.faiss"))
    assert index.ntotal == 4 and np.array_equal(index.reconstruct_n(0, 3), old)
    found = G.search_photos(str(extra / "new.png"), out, top_k=1, weights=weights, backbone="ir34")
    assert (found[0]["matches"][0]["photo"], found[0]["matches"][0]["face"]) == ("new.png", 0)


def test_search_a_folder_with_the_command_line(arch_run, tmp_path, capsys):
    arch, weights, photos, out = arch_run
    out = _copy(out, tmp_path)
    assert main(["index", out]) == 0
    assert "3 face(s), IndexFlatIP" in capsys.readouterr().out
    target = tmp_path / "results.jsonl"
    assert main(["search", photos, "--index", out, "--top-k", "2", "--weights", weights, "--output", str(target)]) == 0
    lines = [json.loads(x) for x in target.read_text().splitlines()]
    ok = [r for r in lines if r["status"] == "ok"]
    assert sorted((r["query"], r["face"]) for r in ok) == [("astronaut.png", 0), ("sub/pair.jpg", 0),
                                                           ("sub/pair.jpg", 1)]
    for r in ok:  # the same photo, the same model: each face finds itself
        assert (r["matches"][0]["photo"], r["matches"][0]["face"]) == (r["query"], r["face"])
        assert len(r["matches"]) == 2 and len(r["box"]) == 4
    assert {r["query"]: r["status"] for r in lines if r["status"] != "ok"} == {
        "cat.png": "no_face", "tiny.png": "no_face", "notes.txt": "unreadable", "empty.jpg": "unreadable"}
    # Standard output when no --output; a wrong model is refused with the difference named.
    assert main(["search", os.path.join(photos, "astronaut.png"), "--index", out, "--weights", weights]) == 0
    assert json.loads(capsys.readouterr().out)["matches"][0]["photo"] == "astronaut.png"
    assert main(["search", os.path.join(photos, "astronaut.png"), "--index", out, "--backbone", "ir34"]) == 2
    assert "embedded by another model" in capsys.readouterr().err


def _synthetic_run(out, n, d=512, clusters=50, seed=0):
    """A run folder with ``n`` clustered unit vectors (what index/search read), photos named p<i>.jpg."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, d)).astype(np.float32)
    x = centers[rng.integers(0, clusters, n)] + 0.35 * rng.standard_normal((n, d)).astype(np.float32)
    os.makedirs(out, exist_ok=True)
    np.save(os.path.join(out, "embeddings.npy"), x.astype(np.float32))
    with open(os.path.join(out, "index.jsonl"), "w") as fh:
        for i in range(n):
            fh.write(json.dumps({"photo": f"p{i}.jpg", "status": "ok", "faces": [{"face": 0, "embedding_row": i}]})
                     + "\n")
    with open(os.path.join(out, "run.json"), "w") as fh:
        json.dump({"settings": {"config": {"arch": "cvpr"}}, "status": "done"}, fh)
    return x


def test_ivf_gallery_recall_against_exact_search_and_growth(tmp_path):
    out = str(tmp_path / "run")
    x = _synthetic_run(out, 6000)
    meta = G.build_gallery(out, exact_max=5000, log=lambda m: None)
    assert meta["type"] == "ivf" and meta["nlist"] == 77 and meta["rows"] == 6000
    assert meta["recall"]["recall_at_k"] >= 0.99 and meta["bytes_per_face"] == 2056
    assert meta["recall"]["tried"][-1]["nprobe"] == meta["nprobe"]
    # Independent check: fresh queries near the data, exact top-10 by numpy, recall of the loaded gallery.
    gallery = G.Gallery(out)
    rng = np.random.default_rng(1)
    q = x[rng.choice(6000, 200, replace=False)] + 0.2 * rng.standard_normal((200, 512)).astype(np.float32)
    xn, qn = G.normalized(x), G.normalized(q)
    exact = np.argsort(-(qn @ xn.T), axis=1, kind="stable")[:, :10]
    got = np.array([[int(m["photo"][1:-4]) for m in row] for row in gallery.search(q, 10)])
    assert G.recall_at_k(got, exact) >= 0.99

    # Growth keeps the cells and re-measures the recall.
    more = _synthetic_run(str(tmp_path / "bigger"), 6500)
    np.save(os.path.join(out, "embeddings.npy"), np.concatenate([x, more[6000:]]))
    shutil.copy(os.path.join(tmp_path, "bigger", "index.jsonl"), os.path.join(out, "index.jsonl"))
    grown = G.build_gallery(out, exact_max=5000, log=lambda m: None)
    assert grown["rows"] == 6500 and grown["nlist"] == 77 and grown["recall"]["recall_at_k"] >= 0.99
    assert G.Gallery(out).index.ntotal == 6500
    assert G.build_gallery(out, kind="flat", rebuild=True, log=lambda m: None)["type"] == "flat"


def test_recall_at_k_counts_the_overlap():
    assert G.recall_at_k(np.array([[1, 2, 3]]), np.array([[3, 2, 1]]), k=3) == 1.0
    assert G.recall_at_k(np.array([[1, 2, -1], [4, 5, 6]]), np.array([[1, 9, 8], [6, 5, 4]]), k=3) == 4 / 6


def test_bad_input_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="run folder not found"):
        G.build_gallery(str(tmp_path / "nope"))
    out = str(tmp_path / "run")
    _synthetic_run(out, 100)
    with open(os.path.join(out, "run.json"), "w") as fh:
        json.dump({"settings": {}, "status": "running"}, fh)
    with pytest.raises(ValueError, match="has not finished"):
        G.build_gallery(out)
    with open(os.path.join(out, "run.json"), "w") as fh:
        json.dump({"settings": {}, "status": "done"}, fh)
    np.save(os.path.join(out, "embeddings.npy"), np.zeros((99, 512), np.float32))
    with pytest.raises(ValueError, match="inconsistent"):
        G.build_gallery(out)
    _synthetic_run(out, 100)
    with pytest.raises(ValueError, match="nlist 500 is more than the 100 vectors"):
        G.build_gallery(out, kind="ivf", nlist=500)
    with pytest.raises(FileNotFoundError, match="no gallery"):
        G.Gallery(out)
    G.build_gallery(out, log=lambda m: None)
    with pytest.raises(ValueError, match="top-k must be a positive int"):
        G.Gallery(out).search(np.ones((1, 512), np.float32), 0)
    with pytest.raises(ValueError, match="NaN"):
        G.Gallery(out).search(np.full((1, 512), np.nan, np.float32), 1)
    with pytest.raises(ValueError, match="holds a flat index"):
        G.build_gallery(out, kind="ivf")
    empty = str(tmp_path / "empty")
    os.makedirs(empty)
    open(os.path.join(empty, "index.jsonl"), "w").write(json.dumps({"photo": "a", "status": "no_face",
                                                                    "faces": []}) + "\n")
    json.dump({"status": "done", "settings": {}}, open(os.path.join(empty, "run.json"), "w"))
    assert main(["index", empty]) == 2
    with pytest.raises(FileNotFoundError, match="query photo or folder not found"):
        G.search_photos(str(tmp_path / "missing.jpg"), out)


def test_the_core_never_imports_the_scale_engines():
    """import mtlface_fast, the model, run's code and the command's parser stay free of ray, faiss and tritonclient."""
    import subprocess
    import sys
    code = ("import sys, mtlface_fast; from mtlface_fast import folder, cli; cli.build_parser().parse_args(['index', "
            "'x']); m = mtlface_fast.MTLFace(backbone='ir34'); "
            "bad = sorted({k.split('.')[0] for k in sys.modules} & {'ray', 'faiss', 'tritonclient'}); "
            "print(bad); sys.exit(1 if bad else 0)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
