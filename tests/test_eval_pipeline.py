"""The evaluation pipeline on real faces that ship with scikit-image: the Embedder against the reference
model, flip TTA, known-answer verification / identification / age runs, synthesis, the CLI and bad inputs."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import mtlface_fast
from mtlface_fast import reference as ref
from mtlface_fast.eval.embed import Embedder
from mtlface_fast.eval.runner import evaluate
from tests.utils import assert_close, randomize_

N_FACES = 6


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    """Six LFW crops (25x25 grayscale) and the astronaut's face as files, each with an identical copy
    under another name, plus a mirrored astronaut and a corrupt file."""
    from skimage import data

    from mtlface_fast.demo import default_face
    d = tmp_path_factory.mktemp("faces")
    lfw = data.lfw_subset()[:N_FACES]  # the first 100 are faces
    names = []
    for i, a in enumerate(lfw):
        Image.fromarray((a * 255).round().astype(np.uint8)).save(d / f"lfw{i}.png")
        names.append(f"lfw{i}.png")
    default_face().save(d / "astro.png")
    names.append("astro.png")
    for n in names:
        shutil.copy(d / n, d / f"copy_{n}")
    default_face().transpose(Image.FLIP_LEFT_RIGHT).save(d / "astro_mirror.png")
    (d / "corrupt.png").write_bytes(b"not an image")
    return d, names


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return randomize_(mtlface_fast.MTLFace(backbone="ir34", input_size=112), seed=3).eval()


def _pair_file(d, names):
    """Interleaved same (a file and its copy) / different (two faces) pairs, a missing file, a corrupt one."""
    lines = []
    n = len(names)
    for i in range(n):
        lines.append(f"{names[i]} copy_{names[i]} 1")
        lines.append(f"{names[i]} {names[(i + 1) % n]} 0")
    lines.insert(3, "lfw0.png gone.png 1")          # line 4: missing
    lines.insert(6, "corrupt.png lfw1.png 0")       # line 7: unreadable
    (d / "pairs.txt").write_text("\n".join(lines) + "\n")
    return d / "pairs.txt"


def test_embedder_matches_the_reference_and_caches(faces, model):
    d, names = faces
    paths = [str(d / n) for n in names]
    emb = Embedder(model, batch_size=3, progress=False)
    enc = emb.encode_paths(paths + paths[:2])  # duplicates are encoded once
    assert emb.n_forward_images == len(names) and enc["embedding"].shape == (len(names) + 2, 512)
    r = ref.MTLFace(backbone="ir34", input_size=112)
    r.load_state_dict(model.state_dict())
    with torch.no_grad():
        e = r.eval().encode(mtlface_fast.preprocess(paths))
    expect = torch.nn.functional.normalize(e.embedding, dim=1)
    assert_close(torch.from_numpy(enc["embedding"][: len(names)]), expect, name="embedding")
    assert_close(torch.from_numpy(enc["age"][: len(names)]), e.age, name="age")
    assert_close(torch.from_numpy(enc["group_logits"][: len(names)]), e.group_logits, name="group_logits")
    np.testing.assert_allclose(np.linalg.norm(enc["embedding"], axis=1), 1.0, rtol=1e-5)
    emb.encode_paths(paths)
    assert emb.n_forward_images == len(names)  # all cached
    out = emb.encode_paths([str(d / "corrupt.png"), str(d / "absent.png")])
    assert out["paths"] == [] and set(emb.failed) == {str(d / "corrupt.png"), str(d / "absent.png")}
    assert "cannot read image" in emb.failed[str(d / "corrupt.png")]
    assert emb.failed[str(d / "absent.png")] == "file not found"


def test_flip_tta(faces, model):
    d, _ = faces
    emb = Embedder(model, batch_size=2, flip=True, progress=False)
    enc = emb.encode_paths([str(d / "astro.png"), str(d / "astro_mirror.png")])
    # flip TTA is symmetric: a face and its mirror image get the same embedding and age
    np.testing.assert_allclose(enc["embedding"][0], enc["embedding"][1], atol=1e-4)
    np.testing.assert_allclose(enc["age"][0], enc["age"][1], rtol=1e-4)
    x = mtlface_fast.preprocess(str(d / "astro.png"))
    with torch.no_grad():
        a, b = model.encode(x), model.encode(torch.flip(x, dims=[3]))
    n = torch.nn.functional.normalize
    expect = n(n(a.embedding, dim=1) + n(b.embedding, dim=1), dim=1)
    assert_close(torch.from_numpy(enc["embedding"][:1]), expect, name="flip embedding")
    assert_close(torch.from_numpy(enc["age"][:1]), (a.age + b.age) / 2, name="flip age")


def test_verification_identification_age_run(faces, model, tmp_path):
    d, names = faces
    pairs = _pair_file(d, names)
    ids = tmp_path / "ids.txt"
    ids.write_text("".join(f"{d / n} id{i} {10 + 9 * i}\n{d / ('copy_' + n)} id{i} {12 + 9 * i}\n"
                           for i, n in enumerate(names)) + f"{d / 'gone.png'} idX 30\n")
    ages = tmp_path / "ages.txt"
    ages.write_text("".join(f"{d / n} {20 + 5 * i}\n" for i, n in enumerate(names)) + f"{d / 'gone.png'} 40\n")
    logs = []
    rep = evaluate(model, pairs=[("toy", str(pairs))], identify=str(ids), ages=str(ages), out=str(tmp_path / "o"),
                   batch_size=4, progress=False, log=logs.append)
    v = rep["verification"]["toy"]
    # a face against its identical copy (cosine 1) beats any two different faces: perfect accuracy
    assert v["accuracy"] == 1.0 and v["n_pairs"] == 2 * len(names) and v["n_genuine"] == len(names)
    p = v["pairs"]
    assert p["n_total"] == 2 * len(names) + 2 and p["n_excluded"] == 2
    assert p["missing"] == [{"line": 4, "path": str(d / "gone.png")}]
    assert p["unreadable"][0]["line"] == 7 and p["unreadable"][0]["path"] == str(d / "corrupt.png")
    assert p["n_missing_files"] == 1 and p["n_unreadable_files"] == 1
    text = "\n".join(logs)
    assert "line 4:" in text and "gone.png" in text and "line 7:" in text and "1 of 16 pair(s) excluded" in text
    # ages of the originals only: pairs with a copy have no gap; neighbours differ by 5 years, the last by 30
    gap = v["by_age_gap"]
    assert gap["n_unknown"] == len(names) and gap["bins"]["0-10"]["n_pairs"] == len(names) - 1
    assert gap["bins"]["30-40"]["n_pairs"] == 1 and gap["bins"]["0-10"]["accuracy"] == 1.0
    # leave-one-out: each image's only same-identity partner is its identical copy -> rank 1
    i = rep["identification"]["loo"]
    assert i["rank1"] == 1.0 and i["n_identified"] == 2 * len(names) and i["n_missing"] == 1
    # age: MAE is the mean absolute error of the model's own predictions
    a = rep["age"]
    with torch.no_grad():
        pred = model.encode(mtlface_fast.preprocess([str(d / n) for n in names])).age.numpy()
    true = np.array([20 + 5 * i for i in range(len(names))])
    assert a["n"] == len(names) and a["n_missing"] == 1
    assert a["mae"] == pytest.approx(float(np.abs(pred - true).mean()), rel=1e-4)
    # files
    on_disk = json.loads((tmp_path / "o" / "report.json").read_text())
    assert on_disk["verification"]["toy"]["accuracy"] == 1.0
    md = (tmp_path / "o" / "summary.md").read_text()
    assert "| toy | 14 | 2 | 10 | 100.00 |" in md and "## Identification" in md and "## Age estimation" in md
    assert Image.open(tmp_path / "o" / "roc.png").size == (640, 480)
    assert Image.open(tmp_path / "o" / "cmc.png").size == (640, 480)


def test_synthesis_and_gallery_augmentation(faces, tmp_path):
    d, names = faces
    torch.manual_seed(0)
    m = randomize_(mtlface_fast.MTLFace(backbone="ir34", input_size=32), seed=5).eval()
    ids = tmp_path / "ids.txt"
    ids.write_text(f"{d / names[0]} a - probe\n{d / ('copy_' + names[0])} a - gallery\n{d / names[1]} b - probe\n")
    rep = evaluate(m, synthesis=[str(d / names[0])], identify=str(ids), split="role", augment_gallery=True,
                   out=str(tmp_path / "o"), batch_size=2, progress=False, log=lambda *_: None)
    s = rep["synthesis"]
    assert s["n_faces"] == 1 and len(s["identity_cosine_per_group"]) == 7 and len(s["mean_age_per_group"]) == 7
    # one number by hand: identity cosine and estimated age of the face re-rendered at group 3
    x = mtlface_fast.preprocess([str(d / names[0])], size=32)
    with torch.no_grad():
        aged = m.synthesize(x, 3).clamp(-1, 1)
        real, out = m.encode(x), m.encode(aged)
    cos = float(torch.nn.functional.cosine_similarity(real.embedding, out.embedding))
    assert s["identity_cosine_per_group"][3] == pytest.approx(cos, abs=1e-4)
    assert s["mean_age_per_group"][3] == pytest.approx(float(out.age), abs=1e-3)
    sheet = Image.open(tmp_path / "o" / "contact_sheet.png")
    assert sheet.size[0] == 8 * (32 + 4) + 4
    # augmented gallery: the same probes, more gallery entries (the image + its 7 synthesized ages)
    plain, aug = rep["identification"]["role"], rep["identification"]["role+synthesized"]
    assert plain["n_gallery"] == 1 and aug["n_gallery"] == 8 and aug["n_identified"] == plain["n_identified"] == 1
    assert plain["unmatched_probes"] == aug["unmatched_probes"] == [1]  # identity b is not in the gallery
    assert plain["rank1"] == aug["rank1"] == 1.0
    assert "## Synthesis" in (tmp_path / "o" / "summary.md").read_text()


def test_cli_eval_end_to_end_and_errors(faces, tmp_path, capsys):
    from mtlface_fast.cli import main
    d, names = faces
    pairs = _pair_file(d, names)
    out = tmp_path / "cli"
    rc = main(["eval", "--backbone", "ir34", "--pairs", f"mine={pairs}", "--out", str(out), "--no-progress",
               "--batch-size", "8", "--device", "cpu", "--flip", "--cache", str(tmp_path / "emb.npz")])
    assert rc == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["run"]["flip"] is True and rep["verification"]["mine"]["pairs"]["n_excluded"] == 2
    assert "random initialization" in rep["model"]["source"]
    captured = capsys.readouterr().out
    assert "NOTE: no --weights" in captured and "mine: accuracy" in captured
    # the cache is reused by a second run with the same model
    rc = main(["eval", "--backbone", "ir34", "--pairs", str(pairs), "--out", str(out), "--no-progress",
               "--device", "cpu", "--flip", "--cache", str(tmp_path / "emb.npz")])
    assert rc == 0 and f"{2 * N_FACES + 2} entries reused" in capsys.readouterr().out
    # bad input: clear messages, exit status 2
    (tmp_path / "empty.txt").write_text("")
    assert main(["eval", "--pairs", str(tmp_path / "empty.txt"), "--out", str(out), "--device", "cpu"]) == 2
    assert "is empty" in capsys.readouterr().err
    assert main(["eval", "--out", str(out), "--device", "cpu"]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err
    assert main(["eval", "--pairs", str(tmp_path / "nope.txt"), "--device", "cpu", "--out", str(out)]) == 2
    assert "pair list not found" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["eval", "--pairs", str(pairs), "--device", "cuda", "--out", str(out)]) == 2
        assert "CUDA is not available" in capsys.readouterr().err


def test_embedder_bad_arguments(model):
    with pytest.raises(ValueError, match="batch_size"):
        Embedder(model, batch_size=0)
    with pytest.raises(ValueError, match="dtype"):
        Embedder(model, dtype="int8")
    with pytest.raises(ValueError, match="workers"):
        Embedder(model, workers=0)
    with pytest.raises(ValueError, match="nothing to evaluate"):
        evaluate(model, out="unused")
    assert not os.path.exists("unused")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_embedder_on_cuda_matches_the_cpu_reference(faces, model):
    d, names = faces
    paths = [str(d / n) for n in names]
    r = ref.MTLFace(backbone="ir34", input_size=112)
    r.load_state_dict(model.state_dict())
    with torch.no_grad():
        e = r.eval().encode(mtlface_fast.preprocess(paths))
    expect = torch.nn.functional.normalize(e.embedding, dim=1)
    gpu = mtlface_fast.MTLFace(backbone="ir34", input_size=112)
    gpu.load_state_dict(model.state_dict())
    gpu = gpu.cuda().eval()
    enc = Embedder(gpu, batch_size=4, progress=False).encode_paths(paths)
    # TF32 may be on for convolutions: compare at the low-precision tolerance
    assert_close(torch.from_numpy(enc["embedding"]), expect, dtype=torch.float16, name="cuda fp32 embedding")
    assert_close(torch.from_numpy(enc["age"]), e.age, dtype=torch.float16, name="cuda fp32 age")
    enc = Embedder(gpu, batch_size=4, dtype="bf16", progress=False).encode_paths(paths)
    cos = (torch.from_numpy(enc["embedding"]) * expect).sum(1)
    assert (cos > 0.98).all(), f"bf16 embeddings drift from fp32: cosine {cos.min():.4f}"
