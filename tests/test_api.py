"""Public API: state dict, checkpoints, preprocess, bad inputs, synthesis, the demo."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import mtlface_fast
from mtlface_fast import reference as ref
from tests.utils import assert_close, randomize_

SMALL = dict(backbone="ir34", input_size=32, age_group=7)


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    return randomize_(mtlface_fast.MTLFace(**SMALL), seed=7).eval()


def _images(b=2, size=32, seed=0):
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed)).clamp(-1, 1)


# -- module tree and keys ------------------------------------------------------------------------------------------
def test_state_dict_keys_are_official_under_prefixes():
    m = ref.MTLFace()
    sd = m.state_dict()
    assert len(sd) == 720  # ir50: backbone 482 + estimation 11 + generator 227
    prefixes = {k.split(".")[0] for k in sd}
    assert prefixes == {"backbone", "estimation_network", "generator"}
    assert sum(k.startswith("backbone.") for k in sd) == 482
    assert sum(k.startswith("generator.") for k in sd) == 227
    assert sd["backbone.fsm.channel.0.weight"].shape == (448, 7168, 1, 1)
    assert sd["backbone.output_layer.3.weight"].shape == (512, 25088)
    assert sd["generator.router._unit_mapping"].shape == (7, 819)
    assert sd["generator.transform.3.conv2.0.weight"].shape == (819, 819, 3, 3)
    assert sd["estimation_network.group_output_layer.weight"].shape == (7, 101)
    assert "backbone.block1.0.shortcut_layer.0.weight" not in sd  # MaxPool shortcut: no keys
    assert sum(p.numel() for p in m.backbone.parameters()) == 47_028_388
    assert sum(p.numel() for p in m.generator.parameters()) == 54_041_920
    # the fast model has the same keys
    assert list(mtlface_fast.MTLFace().state_dict()) == list(sd)


@pytest.mark.parametrize("name,keys", [("ir34", 338), ("ir64", 410), ("ir101", 932), ("irse101", 1030)])
def test_backbone_variants_key_counts(name, keys):
    assert len(ref.AIResNet(112, name).state_dict()) == keys


def test_input_size_is_a_parameter():
    m = ref.MTLFace(backbone="ir34", input_size=64).eval()
    out = m.encode(torch.randn(1, 3, 64, 64))
    assert out.x_id.shape == (1, 512, 4, 4) and out.embedding.shape == (1, 512)
    assert m.state_dict()["backbone.output_layer.3.weight"].shape == (512, 512 * 16)


# -- encode / synthesize --------------------------------------------------------------------------------------------
def test_encode_fields(small_model):
    x = _images(3)
    r = small_model.encode(x)
    assert r.embedding.shape == (3, 512) and r.age.shape == (3,) and r.group_logits.shape == (3, 7)
    assert r.x_id.shape == r.x_age.shape == (3, 512, 2, 2) and r.age_logits.shape == (3, 101)
    assert r.age.dtype == torch.float32 and ((r.age >= 0) & (r.age <= 100)).all()
    torch.testing.assert_close(r.age, ref.dex_age(r.age_logits))
    torch.testing.assert_close(small_model(x), r.embedding)
    # the same as the official backbone forward (which runs contiguous, not channels_last: fp32 tolerance)
    emb, x_id, x_age = small_model.backbone(x, return_age=True)
    assert_close(r.embedding, emb, name="embedding")
    assert_close(r.x_id, x_id, name="x_id")


def test_synthesize_all_ages_equals_per_group_calls(small_model):
    x = _images(3)
    with torch.no_grad():
        all_ages = small_model.synthesize_all_ages(x)
        assert all_ages.shape == (3, 7, 3, 32, 32)
        # the fast model runs the generator once on B*G: batch-size-dependent conv rounding, fp32 tolerance
        for g in range(7):
            assert_close(all_ages[:, g], small_model.synthesize(x, g), name=f"group {g}")
        mixed = torch.tensor([6, 0, 3])
        out = small_model.synthesize(x, mixed)
        for i, g in enumerate(mixed.tolist()):
            assert_close(out[i], all_ages[i, g], name=f"sample {i}")


def test_synthesize_calls_the_official_generator_signature(small_model):
    x = _images(2)
    cond = torch.tensor([1, 4])
    with torch.no_grad():  # (as synthesize: inference features, the layout and path it takes)
        f = small_model.features(x)
        expected = small_model.generator(x, *f, cond)
        torch.testing.assert_close(small_model.synthesize(x, cond), expected)


# -- checkpoints ----------------------------------------------------------------------------------------------------
def test_save_and_from_pretrained_round_trip(small_model, tmp_path):
    path = small_model.save_pretrained(str(tmp_path / "m"))
    assert sorted(os.listdir(path)) == ["config.json", "model.safetensors"]
    loaded = mtlface_fast.MTLFace.from_pretrained(path).eval()
    assert loaded.config == small_model.config
    x = _images(2)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(x).embedding, small_model.encode(x).embedding, rtol=0, atol=0)
    for k, v in small_model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        mtlface_fast.MTLFace.from_pretrained(str(tmp_path))


def _official_files(model, tmp_path, ddp=True):
    pre = "module." if ddp else ""
    paths = {}
    for name, module in (("backbone", model.backbone), ("generator", model.generator),
                         ("estimation_network", model.estimation_network)):
        paths[name] = str(tmp_path / f"{name}-36000")
        torch.save({pre + k: v for k, v in module.state_dict().items()}, paths[name])
    return paths


@pytest.mark.parametrize("ddp", [True, False])
def test_from_official_checkpoint_files(small_model, tmp_path, ddp):
    p = _official_files(small_model, tmp_path, ddp)
    loaded = mtlface_fast.MTLFace.from_official(p["backbone"], p["generator"], p["estimation_network"]).eval()
    assert loaded.config == small_model.config
    x = _images(2)
    with torch.no_grad():
        a, b = loaded.encode(x), small_model.encode(x)
        torch.testing.assert_close(a.embedding, b.embedding, rtol=0, atol=0)
        torch.testing.assert_close(a.age, b.age, rtol=0, atol=0)
        torch.testing.assert_close(loaded.synthesize(x, 2), small_model.synthesize(x, 2), rtol=0, atol=0)


def test_from_official_infers_variant_and_sigma(tmp_path):
    torch.manual_seed(1)
    m = ref.MTLFace(backbone="ir34", input_size=32, age_group=5, afd="tpami", sigma=0.3)
    p = _official_files(m, tmp_path)
    loaded = ref.MTLFace.from_official(p["backbone"], p["generator"])
    assert loaded.config["afd"] == "tpami" and loaded.config["age_group"] == 5
    assert loaded.config["backbone"] == "ir34" and loaded.config["input_size"] == 32
    assert ref.router_windows(128, 5, loaded.config["sigma"]) == ref.router_windows(128, 5, 0.3)


def test_from_official_names_missing_and_unexpected_keys(small_model, tmp_path):
    state = {k: v for k, v in small_model.backbone.state_dict().items() if k != "block2.1.res_layer.1.weight"}
    state["block9.extra"] = torch.zeros(1)
    torch.save(state, tmp_path / "bb")
    with pytest.raises(ValueError, match=r"missing key\(s\): block2.1.res_layer.1.weight") as err:
        ref.MTLFace.from_official(str(tmp_path / "bb"))
    assert "block9.extra" in str(err.value)
    shape = dict(small_model.backbone.state_dict())
    shape["input_layer.2.weight"] = torch.zeros(3)
    torch.save(shape, tmp_path / "bb2")
    with pytest.raises(ValueError, match="input_layer.2.weight: checkpoint"):
        ref.MTLFace.from_official(str(tmp_path / "bb2"))
    with pytest.raises(FileNotFoundError):
        ref.MTLFace.from_official(str(tmp_path / "nope"))


def test_checkpoints_load_with_weights_only(tmp_path):
    torch.save({"fsm.channel.0.weight": torch.zeros(1), "evil": object()}, tmp_path / "bad", pickle_protocol=2)
    with pytest.raises(Exception):
        ref.MTLFace.from_official(str(tmp_path / "bad"))


def test_atomic_write_leaves_no_partial_file(tmp_path):
    from mtlface_fast.checkpoint import atomic_write, torch_save_atomic

    target = tmp_path / "ckpt.pt"
    torch_save_atomic({"a": torch.ones(2)}, str(target))

    def broken(tmp):
        open(tmp, "wb").write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(str(target), broken)
    assert torch.equal(torch.load(target, weights_only=True)["a"], torch.ones(2))
    assert os.listdir(tmp_path) == ["ckpt.pt"]
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(target).st_mode & 0o777 == 0o666 & ~umask  # the mode of a plain open(), not owner-only


@pytest.mark.parametrize("keep_suffix", [False, True])
def test_atomic_write_temporary_name(tmp_path, keep_suffix):
    """The writer sees a hidden temporary file beside the target, ending in the target's suffix on request."""
    from mtlface_fast.checkpoint import atomic_write

    seen = []

    def write(tmp):
        seen.append(tmp)
        open(tmp, "w").write("x")

    target = tmp_path / "sub" / "model.pt2"
    assert atomic_write(target, write, keep_suffix=keep_suffix) == str(target)
    name = os.path.basename(seen[0])
    assert os.path.dirname(seen[0]) == str(tmp_path / "sub") and name.startswith(".model")
    assert name.endswith(".pt2" if keep_suffix else ".tmp") and name != "model.pt2"
    assert os.listdir(tmp_path / "sub") == ["model.pt2"] and open(target).read() == "x"

    def broken(tmp):
        open(tmp, "w").write("partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, broken, keep_suffix=keep_suffix)
    assert os.listdir(tmp_path / "sub") == ["model.pt2"] and open(target).read() == "x"


# -- preprocess ---------------------------------------------------------------------------------------------------
def test_preprocess_inputs_agree(tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "face.png")
    expected = torch.from_numpy(arr).permute(2, 0, 1).float().div(255).sub(0.5).div(0.5)[None]
    for item in (arr, Image.fromarray(arr), str(tmp_path / "face.png"), tmp_path / "face.png",
                 torch.from_numpy(arr).permute(2, 0, 1).contiguous()):
        out = mtlface_fast.preprocess(item)
        assert out.shape == (1, 3, 112, 112) and out.dtype == torch.float32
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    batch = mtlface_fast.preprocess([arr, arr])
    assert batch.shape == (2, 3, 112, 112)
    assert batch.min() >= -1 and batch.max() <= 1


def test_preprocess_resizes():
    img = Image.new("RGB", (200, 300), (255, 0, 0))
    out = mtlface_fast.preprocess(img, size=112)
    assert out.shape == (1, 3, 112, 112)
    torch.testing.assert_close(out[0, :, 50, 50], torch.tensor([1.0, -1.0, -1.0]))
    out2 = mtlface_fast.preprocess(torch.rand(2, 3, 64, 64), size=32)
    assert out2.shape == (2, 3, 32, 32)


@pytest.mark.parametrize("bad,err", [
    (np.zeros((8, 8, 3), dtype=np.float32), TypeError),
    (np.zeros((8, 8, 5), dtype=np.uint8), ValueError),
    (torch.zeros(2, 4, 8, 8), ValueError),
    (torch.zeros(1, 3, 8, 8, dtype=torch.int32), TypeError),
    ("/no/such/face.png", FileNotFoundError),
    (42, TypeError),
    ([], ValueError),
])
def test_preprocess_bad_input(bad, err):
    with pytest.raises(err):
        mtlface_fast.preprocess(bad)


# -- bad input to the model -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad,err,match", [
    (torch.randn(3, 32, 32), ValueError, "rank 4"),
    (torch.randn(1, 4, 32, 32), ValueError, "3 channels"),
    (torch.randn(1, 3, 48, 48), ValueError, "32x32"),
    (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), TypeError, "floating"),
    (torch.randn(1, 3, 32, 32, dtype=torch.float64), TypeError, "dtype"),
    (torch.randn(0, 3, 32, 32), ValueError, "empty"),
    (torch.full((1, 3, 32, 32), float("nan")), ValueError, "NaN"),
    (np.zeros((1, 3, 32, 32), np.float32), TypeError, "torch.Tensor"),
    (torch.randn(1, 3, 32, 32, device="meta"), ValueError, "meta"),
])
def test_model_rejects_bad_images(small_model, bad, err, match):
    for call in (small_model, small_model.encode, lambda x: small_model.synthesize(x, 0),
                 small_model.synthesize_all_ages):
        with pytest.raises(err, match=match):
            call(bad)


@pytest.mark.parametrize("group,err,match", [
    (7, ValueError, r"\[0, 7\)"),
    (-1, ValueError, r"\[0, 7\)"),
    (torch.tensor([0, 9]), ValueError, r"\[0, 7\)"),
    (torch.tensor([0.0, 1.0]), TypeError, "integer"),
    (torch.tensor([0, 1, 2]), ValueError, r"shape \(2,\)"),
    (2.0, TypeError, "int or a LongTensor"),
    (True, TypeError, "bool"),
])
def test_model_rejects_bad_target_group(small_model, group, err, match):
    with pytest.raises(err, match=match):
        small_model.synthesize(_images(2), group)


@pytest.mark.parametrize("kwargs,match", [
    (dict(backbone="resnet50"), "backbone"), (dict(afd="eccv"), "afd"), (dict(sigma=0.0), "sigma"),
    (dict(sigma=1.5), "sigma"), (dict(age_group=3), "age_group"), (dict(input_size=100), "input_size"),
])
def test_constructor_rejects_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mtlface_fast.MTLFace(**kwargs)


# -- backend switch ---------------------------------------------------------------------------------------------------
def test_backend_switch(monkeypatch):
    from mtlface_fast import backend

    monkeypatch.delenv("MTLFACE_FAST_BACKEND", raising=False)
    assert mtlface_fast.get_backend() == "auto"
    with mtlface_fast.use_backend("torch"):
        assert mtlface_fast.get_backend() == "torch"
        with mtlface_fast.use_backend("triton"):
            assert mtlface_fast.get_backend() == "triton"
        assert not backend.use_triton_for(torch.zeros(1))
    monkeypatch.setenv("MTLFACE_FAST_BACKEND", "torch")
    assert mtlface_fast.get_backend() == "torch"
    monkeypatch.setenv("MTLFACE_FAST_BACKEND", "cuda")
    with pytest.raises(ValueError, match="MTLFACE|backend"):
        mtlface_fast.get_backend()
    with pytest.raises(ValueError, match="backend"):
        with mtlface_fast.use_backend("fast"):
            pass


# -- the demo -----------------------------------------------------------------------------------------------------
def test_demo_writes_png_and_json(tmp_path, capsys):
    from mtlface_fast.cli import main

    rc = main(["demo", "--out", str(tmp_path), "--backbone", "ir34"])
    assert rc == 0
    assert "random initialization" in capsys.readouterr().out
    report = json.loads((tmp_path / "demo.json").read_text())
    assert 0 <= report["predicted_age"] <= 100 and report["embedding_norm"] > 0
    assert report["config"]["backbone"] == "ir34" and len(report["group_labels"]) == 7
    assert "NOT a trained model" in report["weights"]
    img = Image.open(tmp_path / "demo_grid.png")
    assert img.format == "PNG" and img.width > 8 * 112 and img.height >= 112


def test_demo_with_saved_weights_and_image(small_model, tmp_path):
    from mtlface_fast.demo import run_demo

    folder = small_model.save_pretrained(str(tmp_path / "w"))
    Image.fromarray(np.full((40, 40, 3), 128, np.uint8)).save(tmp_path / "f.png")
    report = run_demo(str(tmp_path / "f.png"), str(tmp_path / "out"), weights=folder, log=lambda *a: None)
    assert report["config"] == small_model.config and "saved model" in report["weights"]
    assert Image.open(report["files"]["grid"]).size[1] >= 32


def test_cli_reports_errors_cleanly(tmp_path, capsys):
    from mtlface_fast.cli import main

    assert main(["demo", "--image", str(tmp_path / "missing.png"), "--out", str(tmp_path), "--backbone",
                 "ir34"]) == 2
    assert "image file not found" in capsys.readouterr().err
