"""Face detection (the real MTCNN and its shipped weights), 5-point alignment, bad photos, and the folder command.

The detector is facenet-pytorch's (the ``align`` extra, in the ``test`` extra): these tests fail, never skip, when it
is missing. Over the CPU build of torch, torchvision cannot be imported, so the detector runs facenet-pytorch's
networks and weights with plain torch (mtlface_fast.mtcnn); test_torch_cascade_matches_facenet_pytorch checks that
path against facenet-pytorch's own MTCNN code.
"""
import json
import math
import os
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

import mtlface_fast
from mtlface_fast import align as A
from mtlface_fast import mtcnn as M

# MTCNN's landmarks on scikit-image's astronaut photo (eyes, nose tip, mouth corners), measured with facenet-pytorch.
ASTRONAUT_LANDMARKS = np.array([[205.0, 101.7], [246.8, 103.7], [224.7, 129.0], [201.7, 139.2], [245.3, 141.9]])


@pytest.fixture(scope="module")
def aligner():
    return A.FaceAligner(size=112)


@pytest.fixture(scope="module")
def astronaut():
    return data.astronaut()


def two_faces():
    """The astronaut (top half, at half size) beside her mirror image: two faces, the second's landmarks the first's
    mirrored (MTCNN is not exactly mirror-symmetric: a few pixels)."""
    a = np.array(Image.fromarray(data.astronaut()[:256]).resize((256, 128), Image.BILINEAR))
    return np.concatenate([a, a[:, ::-1]], axis=1)


def mirrored(points, width):
    p = np.asarray(points, np.float64).copy()
    p[:, 0] = width - 1 - p[:, 0]
    return p[[1, 0, 2, 4, 3]]  # left and right swap


# -- the detector ---------------------------------------------------------------------------------------------------
def test_real_detector_is_installed():
    folder = M.facenet_location()  # raises AlignExtraMissing when the extra is missing: a failure, not a skip
    for name in ("pnet", "rnet", "onet"):
        assert os.path.isfile(os.path.join(folder, "data", f"{name}.pt"))
    detector = M.load_mtcnn()
    assert detector.name == ("facenet" if M.torchvision_error() is None else "torch")


def test_astronaut_one_face_with_landmarks(aligner, astronaut):
    faces = aligner.align(astronaut, keep="all")
    assert len(faces) == 1
    f = faces[0]
    assert f.score > 0.99
    np.testing.assert_allclose(f.landmarks, ASTRONAUT_LANDMARKS, atol=1.0)
    x1, y1, x2, y2 = f.box
    assert x1 < f.landmarks[:, 0].min() and f.landmarks[:, 0].max() < x2
    assert y1 < f.landmarks[:, 1].min() and f.landmarks[:, 1].max() < y2
    assert f.crop.shape == (112, 112, 3) and f.crop.dtype == np.uint8


@pytest.mark.parametrize("name", ["chelsea", "coffee"])
def test_no_face_in_a_cat_or_a_coffee_cup(aligner, name):
    assert aligner.align(getattr(data, name)(), keep="all") == []
    assert aligner.align(getattr(data, name)()[::2, ::2], keep="all") == []


def test_lfw_subset_faces_and_non_faces(aligner):
    """scikit-image's 100 LFW faces and 100 non-faces (25x25, upscaled x4): MTCNN finds 97 and no false hit."""
    x = data.lfw_subset()
    found = []
    for img in x:
        img = np.array(Image.fromarray((img * 255).round().astype(np.uint8)).resize((100, 100), Image.BILINEAR))
        found.append(len(aligner.detect(img)[0]) > 0)
    assert sum(found[:100]) >= 94 and sum(found[100:]) <= 1


def test_two_face_composite(aligner):
    img = two_faces()
    faces = aligner.align(img, keep="all")
    assert len(faces) == 2
    assert all(f.score > 0.99 for f in faces)
    left, right = sorted(faces, key=lambda f: f.box[0])
    half = (ASTRONAUT_LANDMARKS + 0.5) / 2 - 0.5  # pixel centres of the half-size photo
    np.testing.assert_allclose(left.landmarks, half, atol=1.5)
    np.testing.assert_allclose(right.landmarks, mirrored(half, img.shape[1]), atol=3.0)
    assert len(aligner.align(img)) == 1  # keep="largest"
    assert faces[0].area >= faces[1].area


def _stub_torchvision(monkeypatch, batched_nms):
    """Stand-ins for the two torchvision functions facenet-pytorch imports, for this test only."""
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith(("torchvision.", "facenet_pytorch"))]:
        monkeypatch.delitem(sys.modules, name)
    tv, ops, boxes = (types.ModuleType(n) for n in ("torchvision", "torchvision.ops", "torchvision.ops.boxes"))
    tr, fn = types.ModuleType("torchvision.transforms"), types.ModuleType("torchvision.transforms.functional")
    boxes.batched_nms = batched_nms
    fn.to_tensor = lambda pic: torch.from_numpy(np.asarray(pic)).permute(2, 0, 1).float().div(255)
    tv.ops, ops.boxes, tv.transforms, tr.functional = ops, boxes, tr, fn
    for m in (tv, ops, boxes, tr, fn):
        monkeypatch.setitem(sys.modules, m.__name__, m)


def reference_nms(boxes, scores, threshold):
    """torchvision's CPU nms kernel, written out: visit boxes by descending score, drop those overlapping a kept one
    by IoU > threshold (areas without the +1 pixel)."""
    b, s = boxes.double().numpy(), scores.numpy()
    order = np.argsort(-s, kind="stable")
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    suppressed, keep = np.zeros(len(b), bool), []
    for i in order:
        if suppressed[i]:
            continue
        keep.append(i)
        w = np.clip(np.minimum(b[i, 2], b[:, 2]) - np.maximum(b[i, 0], b[:, 0]), 0, None)
        h = np.clip(np.minimum(b[i, 3], b[:, 3]) - np.maximum(b[i, 1], b[:, 1]), 0, None)
        iou = w * h / (area[i] + area - w * h)
        suppressed |= iou > threshold
    return torch.as_tensor(keep, dtype=torch.long)


@pytest.fixture
def fresh_imports():
    """Modules imported during the test (facenet-pytorch over stand-ins) are forgotten afterwards."""
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name == "torchvision" or name.startswith(("torchvision.", "facenet_pytorch")):
            del sys.modules[name]


def test_torch_cascade_matches_facenet_pytorch(monkeypatch, fresh_imports):
    """The torch-only cascade against facenet-pytorch's own detect_face and networks (its real torchvision where it
    imports, else stand-ins for batched_nms / to_tensor) on photos with 1, 2 and 0 faces."""
    if M.torchvision_error() is None:
        import torchvision  # noqa: F401
    else:
        def batched_nms(boxes, scores, idxs, threshold):
            assert bool((idxs == idxs[0]).all()) if len(idxs) else True  # one image at a time
            return reference_nms(boxes, scores, threshold)
        _stub_torchvision(monkeypatch, batched_nms)
    from facenet_pytorch import MTCNN

    theirs = MTCNN(keep_all=True, select_largest=False)
    ours = M.TorchMTCNN()
    wrapped = M.FacenetMTCNN()  # the "facenet" detector: facenet-pytorch's MTCNN behind the same interface
    small = np.array(Image.fromarray(data.astronaut()).resize((200, 200), Image.BILINEAR))
    for img in (data.astronaut(), two_faces(), small, data.coffee()[::2, ::2]):
        with M.limited_cpu_threads(torch.device("cpu"), 1):
            boxes, probs, points = theirs.detect(img, landmarks=True)
        b, p = ours.detect(img)
        wb, wp = wrapped.detect(img)
        none = boxes is None
        expected = np.c_[np.zeros((0, 4)) if none else np.asarray(boxes, np.float32),
                         np.zeros(0) if none else np.asarray(probs, np.float32)]
        np.testing.assert_array_equal(wb, expected.astype(np.float32))
        assert wp.shape == (len(wb), 5, 2)
        if boxes is None:
            assert len(b) == 0
            continue
        o1, o2 = np.argsort(np.asarray(boxes, np.float64)[:, 0]), np.argsort(b[:, 0])
        np.testing.assert_allclose(b[o2, :4], np.asarray(boxes, np.float32)[o1], rtol=0, atol=1e-3)
        np.testing.assert_allclose(b[o2, 4], np.asarray(probs, np.float32)[o1], rtol=0, atol=1e-5)
        np.testing.assert_allclose(p[o2], np.asarray(points, np.float32)[o1], rtol=0, atol=1e-3)


def test_nms_semantics():
    # IoU of [0,0,10,10] and [0,0,10,h] is h / 10: kept at exactly the threshold, dropped above it.
    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 7], [0, 0, 10, 7.5], [20, 20, 30, 30]], dtype=torch.float32)
    scores = torch.tensor([0.9, 0.8, 0.85, 0.1])
    assert M.nms(boxes, scores, 0.7).tolist() == [0, 1, 3]
    assert M.nms(boxes, scores, 0.74).tolist() == [0, 1, 3]
    assert M.nms(boxes, scores, 0.75).tolist() == [0, 2, 3]  # IoU(1, 2) = 70 / 75
    assert M.nms(boxes, scores, 0.95).tolist() == [0, 2, 1, 3]
    assert M.nms(boxes[:0], scores[:0], 0.5).numel() == 0
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(300, 2, generator=g) * 100
    rand = torch.cat([xy, xy + 5 + torch.rand(300, 2, generator=g) * 40], dim=1)
    s = torch.rand(300, generator=g)
    for thr in (0.3, 0.5, 0.7):
        assert torch.equal(M.nms(rand, s, thr), reference_nms(rand, s, thr))
        if M.torchvision_error() is None:
            import torchvision
            assert torch.equal(M.nms(rand, s, thr), torchvision.ops.nms(rand, s, thr))
    # facenet-pytorch's "Min" NMS: overlap over the smaller box with +1 pixel areas; the inner box goes.
    inner = torch.tensor([[0, 0, 99, 99], [10, 10, 49, 49], [200, 200, 219, 219]], dtype=torch.float32)
    assert sorted(M.nms_min(inner, torch.tensor([0.9, 0.95, 0.5]), 0.7).tolist()) == [1, 2]


# -- the warp -------------------------------------------------------------------------------------------------------
def test_template_and_scaling():
    np.testing.assert_allclose(A.template(112)[0], [38.2946, 51.6963])
    np.testing.assert_allclose(A.template(224), 2 * A.TEMPLATE_112)
    for bad in (0, -3, 112.0, True):
        with pytest.raises(ValueError, match="size"):
            A.template(bad)


def test_warp_against_a_hand_computed_similarity():
    # crop = s * R(theta) @ photo + t, written out by hand; the landmarks are the template pulled back through it.
    s, theta, t = 0.8, math.radians(17.0), np.array([-30.0, 12.0])
    c, n = math.cos(theta), math.sin(theta)
    M_true = np.array([[s * c, -s * n, t[0]], [s * n, s * c, t[1]], [0, 0, 1]])
    landmarks = (np.linalg.inv(M_true) @ np.c_[A.TEMPLATE_112, np.ones(5)].T).T[:, :2]
    np.testing.assert_allclose(A.similarity_matrix(landmarks, 112), M_true, atol=1e-9)
    M_224 = A.similarity_matrix(landmarks, 224)
    np.testing.assert_allclose(M_224, np.diag([2, 2, 1]) @ M_true, atol=1e-9)

    # A photo whose channels are linear in x and y: bilinear sampling reproduces them exactly (up to rounding).
    h, w = 200, 240
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    photo = np.stack([0.5 * xx + 0.3 * yy + 10, 0.9 * yy + 5, 200 - 0.6 * xx], axis=-1)
    crop = A.align_crop(np.rint(photo).astype(np.uint8), landmarks, 112)
    assert crop.shape == (112, 112, 3) and crop.dtype == np.uint8
    v, u = np.mgrid[0:112, 0:112].astype(np.float64)
    src = np.linalg.inv(M_true) @ np.stack([u.ravel(), v.ravel(), np.ones(u.size)])
    sx, sy = src[0].reshape(112, 112), src[1].reshape(112, 112)
    expected = np.stack([0.5 * sx + 0.3 * sy + 10, 0.9 * sy + 5, 200 - 0.6 * sx], axis=-1)
    inside = (sx >= 0) & (sx <= w - 1) & (sy >= 0) & (sy <= h - 1)
    outside = (sx < -1) | (sx > w) | (sy < -1) | (sy > h)
    assert inside.sum() > 5000 and outside.sum() > 500  # the test sees both
    assert np.abs(crop[inside].astype(np.float64) - expected[inside]).max() <= 1.0
    assert (crop[outside] == 0).all()  # black outside the photo, as the official warpAffine(borderValue=0)


def test_aligned_crop_puts_landmarks_on_the_template(aligner, astronaut):
    """The astronaut's landmarks, taken through the fitted similarity, land within a few pixels of the template (a
    real face is not an exact similarity of it), and the crop is that warp of the photo."""
    face = aligner.align(astronaut)[0]
    m = A.similarity_matrix(face.landmarks, 112)
    moved = (m @ np.c_[face.landmarks, np.ones(5)].T).T[:, :2]
    err = np.linalg.norm(moved - A.TEMPLATE_112, axis=1)
    assert err.max() < 8.0 and err.mean() < 5.0
    assert np.array_equal(face.crop, A.warp(astronaut, m, 112))
    scale = math.hypot(m[0, 0], m[1, 0])
    assert abs(scale - 1.0) < 0.3 and abs(math.atan2(m[1, 0], m[0, 0])) < math.radians(5)  # nearly upright


def test_preprocess_align(aligner, astronaut):
    x = mtlface_fast.preprocess(astronaut, align=True)
    crop = aligner.align(astronaut)[0].crop
    assert torch.equal(x, mtlface_fast.preprocess(crop))
    x32 = mtlface_fast.preprocess([astronaut, astronaut], size=32, align=True)
    assert x32.shape == (2, 3, 32, 32)
    t = torch.from_numpy(astronaut).permute(2, 0, 1)
    assert torch.equal(mtlface_fast.preprocess(t[None], align=True), x)
    with pytest.raises(ValueError, match="no face found in image 1"):
        mtlface_fast.preprocess([astronaut, data.chelsea()], align=True)


# -- bad photos -----------------------------------------------------------------------------------------------------
def test_bad_photos(aligner, astronaut, tmp_path):
    with pytest.raises(ValueError, match="empty"):
        aligner.align(np.zeros((0, 0, 3), np.uint8))
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        aligner.align(str(tmp_path / "empty.jpg"))
    (tmp_path / "notes.txt").write_text("not a photo\n")
    with pytest.raises(ValueError, match="not an image file"):
        aligner.align(str(tmp_path / "notes.txt"))
    with pytest.raises(FileNotFoundError, match="missing.png"):
        aligner.align(str(tmp_path / "missing.png"))
    with pytest.raises(TypeError, match="uint8"):
        aligner.align(astronaut.astype(np.float64))
    with pytest.raises(ValueError, match="shape"):
        aligner.align(astronaut[..., :2])
    with pytest.raises(TypeError, match="cannot read a photo from"):
        aligner.align([1, 2, 3])
    with pytest.raises(ValueError, match="keep"):
        aligner.align(astronaut, keep="biggest")
    assert aligner.align(np.full((1, 1, 3), 128, np.uint8), keep="all") == []  # 1x1: no face, no crash
    assert aligner.align(np.full((19, 40), 128, np.uint8), keep="all") == []


def test_grayscale_rgba_tensor_and_file_photos(aligner, astronaut, tmp_path):
    ref = aligner.align(astronaut)[0]
    gray = np.asarray(Image.fromarray(astronaut).convert("L"))
    for img in (gray, Image.fromarray(gray)):
        faces = aligner.align(img)
        assert len(faces) == 1 and faces[0].crop.shape == (112, 112, 3)
        assert (faces[0].crop[..., 0] == faces[0].crop[..., 2]).all()  # gray stays gray
        np.testing.assert_allclose(faces[0].landmarks, ASTRONAUT_LANDMARKS, atol=4.0)
    rgba = np.concatenate([astronaut, np.full(astronaut.shape[:2] + (1,), 255, np.uint8)], axis=-1)
    for img in (rgba, Image.fromarray(rgba, "RGBA"), torch.from_numpy(astronaut).permute(2, 0, 1),
                torch.from_numpy(astronaut).permute(2, 0, 1).float() / 255):
        faces = aligner.align(img)
        np.testing.assert_allclose(faces[0].landmarks, ref.landmarks, atol=1e-4)
        assert np.abs(faces[0].crop.astype(int) - ref.crop).max() <= 1
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    np.testing.assert_allclose(aligner.align(str(tmp_path / "rgba.png"))[0].landmarks, ref.landmarks, atol=1e-4)
    # A file stored on its side with EXIF orientation 6 (display rotated 90 degrees clockwise) is read upright.
    sideways = Image.fromarray(astronaut).transpose(Image.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    sideways.save(tmp_path / "sideways.png", exif=exif)
    assert np.array_equal(A.load_image(str(tmp_path / "sideways.png")), astronaut)


def test_missing_or_wrong_extra_names_it(monkeypatch):
    import importlib.metadata
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "facenet_pytorch" else real(name, *a))
    with pytest.raises(M.AlignExtraMissing, match=r"'align' extra.*mtlface-fast\[align\]"):
        A.FaceAligner()
    with pytest.raises(ImportError):  # AlignExtraMissing is an ImportError
        mtlface_fast.preprocess(np.zeros((64, 64, 3), np.uint8), size=48, align=True)
    monkeypatch.setattr(importlib.util, "find_spec", real)
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "2.6.0")
    with pytest.raises(M.AlignExtraMissing, match="2.6.0"):
        M.load_mtcnn()
    monkeypatch.undo()
    with pytest.raises(ValueError, match="detector"):
        M.load_mtcnn("dlib")
    with pytest.raises(ValueError, match="min_face_size"):
        M.load_mtcnn(min_face_size=5)


# -- the folder command ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    from tests.utils import randomize_
    torch.manual_seed(0)
    model = randomize_(mtlface_fast.MTLFace(backbone="ir34", input_size=32, age_group=4, sigma=0.5), seed=3)
    return model.save_pretrained(str(tmp_path_factory.mktemp("w") / "model"))


def _photos(folder):
    folder.mkdir()
    (folder / "sub").mkdir()
    Image.fromarray(np.array(Image.fromarray(data.astronaut()).resize((200, 200), Image.BILINEAR))).save(
        folder / "astronaut.png")
    Image.fromarray(np.array(Image.fromarray(two_faces()).resize((300, 150), Image.BILINEAR))).save(
        folder / "sub" / "pair.jpg", quality=95)
    Image.fromarray(np.array(Image.fromarray(data.chelsea()).resize((150, 100)))).save(folder / "cat.png")
    Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(folder / "tiny.png")
    (folder / "notes.txt").write_text("not a photo\n")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / ".hidden.png").write_bytes(b"")


def _run(photos, out, weights, **kw):
    from mtlface_fast.folder import run_folder
    logs = []
    kw.setdefault("batch_size", 4)
    summary = run_folder(str(photos), str(out), weights=weights, keep="all", progress=False, log=logs.append, **kw)
    return summary, logs


def _index(out):
    return {r["photo"]: r for r in map(json.loads, (out / "index.jsonl").read_text().splitlines())}


def test_folder_end_to_end_and_bad_files(weights, tmp_path):
    photos, out = tmp_path / "photos", tmp_path / "out"
    _photos(photos)
    summary, logs = _run(photos, out, weights, synthesize=True)
    idx = _index(out)
    assert sorted(idx) == ["astronaut.png", "cat.png", "empty.jpg", "notes.txt", "sub/pair.jpg", "tiny.png"]
    status = {p: r["status"] for p, r in idx.items()}
    assert status == {"astronaut.png": "ok", "sub/pair.jpg": "ok", "cat.png": "no_face", "tiny.png": "no_face",
                      "notes.txt": "unreadable", "empty.jpg": "unreadable"}
    assert "not an image" in idx["notes.txt"]["reason"] and "empty" in idx["empty.jpg"]["reason"]
    assert "smaller than the smallest face" in idx["tiny.png"]["reason"]
    assert idx["cat.png"]["reason"] == "no face found"
    assert len(idx["astronaut.png"]["faces"]) == 1 and len(idx["sub/pair.jpg"]["faces"]) == 2
    assert summary["faces"] == 3 and summary["no_face"] == 2 and summary["unreadable"] == 2
    assert {p["photo"] for p in summary["problems"]} == {"cat.png", "tiny.png", "notes.txt", "empty.jpg"}

    # Every face: its crop at the model's input size, its grid, and its embedding / age in the right row.
    emb = np.load(out / "embeddings.npy")
    assert emb.shape == (3, 512) and emb.dtype == np.float32
    faces = [f for r in idx.values() for f in r["faces"]]
    assert sorted(f["embedding_row"] for f in faces) == [0, 1, 2]
    model = mtlface_fast.MTLFace.from_pretrained(weights).eval()
    crops = [np.asarray(Image.open(out / f["crop"])) for f in faces]
    assert all(c.shape == (32, 32, 3) for c in crops)  # the model's input size
    with torch.inference_mode():
        enc = model.encode(mtlface_fast.preprocess(crops, size=32))
    for i, f in enumerate(faces):
        np.testing.assert_allclose(emb[f["embedding_row"]], enc.embedding[i].numpy(), rtol=1e-4, atol=1e-4)
        assert abs(f["predicted_age"] - float(enc.age[i])) < 1e-2
        assert f["age_group"] == int(mtlface_fast.age2group(f["predicted_age"], 4))
        assert f["predicted_group"] == int(enc.group_logits[i].argmax())
        assert Image.open(out / f["grid"]).size[0] > 5 * 32
        assert len(f["landmarks"]) == 5 and f["score"] > 0.9

    # A rerun skips everything.
    _, logs = _run(photos, out, weights, synthesize=True)
    assert any(line.startswith("0 file(s) to process") for line in logs)
    assert _index(out) == idx and np.array_equal(np.load(out / "embeddings.npy"), emb)

    # Other settings would mix two runs in one file: refused.
    with pytest.raises(ValueError, match="other settings"):
        _run(photos, out, weights, synthesize=False)


def test_folder_interrupted_run_resumes_to_the_same_result_and_adds_new_photos(weights, tmp_path, monkeypatch):
    photos = tmp_path / "photos"
    _photos(photos)
    full, _ = _run(photos, tmp_path / "full", weights)
    real_align = A.FaceAligner.align
    calls = []

    def interrupted(self, image, keep="largest"):
        calls.append(1)
        if len(calls) == 3:  # sub/pair.jpg: astronaut.png's face waits for its batch, and is lost
            raise KeyboardInterrupt
        return real_align(self, image, keep)

    monkeypatch.setattr(A.FaceAligner, "align", interrupted)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        _run(photos, out, weights, batch_size=2)
    monkeypatch.setattr(A.FaceAligner, "align", real_align)
    done_before = set(_index(out))
    assert 0 < len(done_before) < 6
    with open(out / "index.jsonl", "a") as fh:  # a line cut short by the interruption
        fh.write('{"photo": "half')
    _, logs = _run(photos, out, weights)
    assert any(line.startswith(f"{6 - len(done_before)} file(s) to process") for line in logs)
    a, b = _index(tmp_path / "full"), _index(out)
    assert sorted(a) == sorted(b)
    emb_a, emb_b = np.load(tmp_path / "full" / "embeddings.npy"), np.load(out / "embeddings.npy")
    assert emb_a.shape == emb_b.shape == (3, 512)
    for photo in a:
        fa, fb = a[photo]["faces"], b[photo]["faces"]
        assert [f["box"] for f in fa] == [f["box"] for f in fb]
        for x, y in zip(fa, fb):
            np.testing.assert_allclose(emb_a[x["embedding_row"]], emb_b[y["embedding_row"]], rtol=1e-4, atol=1e-4)
    assert not (out / ".embedding_parts").exists()

    # A photo added later is the only one processed, in the next embedding row.
    Image.fromarray(np.array(Image.fromarray(data.astronaut()).resize((160, 160)))).save(photos / "again.png")
    _run(photos, out, weights)
    idx2 = _index(out)
    assert idx2["again.png"]["faces"][0]["embedding_row"] == 3
    assert {p: r for p, r in idx2.items() if p != "again.png"} == b
    assert np.array_equal(np.load(out / "embeddings.npy")[:3], emb_b)


def test_run_command_line(weights, tmp_path, capsys, monkeypatch):
    from mtlface_fast.cli import main
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(np.array(Image.fromarray(data.astronaut()).resize((160, 160)))).save(photos / "a.png")
    assert main(["run", str(photos), "--out", str(tmp_path / "out"), "--weights", weights, "--no-progress"]) == 0
    assert "1 face(s) in 1" in capsys.readouterr().out
    assert main(["run", str(tmp_path / "nope"), "--out", str(tmp_path / "o2"), "--weights", weights]) == 2
    assert "photo folder not found" in capsys.readouterr().err
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "facenet_pytorch" else real(name, *a))
    assert main(["run", str(photos), "--out", str(tmp_path / "o3")]) == 2
    err = capsys.readouterr().err
    assert "mtlface-fast[align]" in err and "Traceback" not in err
