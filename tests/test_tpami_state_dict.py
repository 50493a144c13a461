"""The TPAMI model's state dict is the release's (843 keys, shapes from the documented layout) and loads strictly."""
import json
import os

import pytest
import torch

import mtlface_fast
from mtlface_fast import reference as ref
from tests.tpami_utils import SMALL, randomize_tpami_

IR50_UNITS = (3, 4, 14, 3)
STAGES = ((64, 64), (64, 128), (128, 256), (256, 512))


def _bn(out, prefix, c):
    for name in ("weight", "bias", "running_mean", "running_var"):
        out[f"{prefix}.{name}"] = (c,)
    out[f"{prefix}.num_batches_tracked"] = ()


def release_layout(age_group: int = 7):
    """Every key and shape of ``mtlface_checkpoints.tar``, written out from the documented layout."""
    out = {}
    # decoder: latent_avg + StyleGAN2 generator at 128 px, channels 512 x4 then 256 at 128 px.
    d = "decoder.decoder"
    out["decoder.latent_avg"] = (1, 1, 512)
    for i in range(1, 9):
        out[f"{d}.style.{i}.weight"], out[f"{d}.style.{i}.bias"] = (512, 512), (512,)
    out[f"{d}.input.input"] = (1, 512, 4, 4)

    def styled(prefix, cin, cout, up):
        out[f"{prefix}.conv.weight"] = (1, cout, cin, 3, 3)
        if up:
            out[f"{prefix}.conv.blur.kernel"] = (4, 4)
        out[f"{prefix}.conv.modulation.weight"], out[f"{prefix}.conv.modulation.bias"] = (cin, 512), (cin,)
        out[f"{prefix}.noise.weight"], out[f"{prefix}.activate.bias"] = (1,), (cout,)

    def to_rgb(prefix, cin, up):
        if up:
            out[f"{prefix}.upsample.kernel"] = (4, 4)
        out[f"{prefix}.conv.weight"] = (1, 3, cin, 1, 1)
        out[f"{prefix}.conv.modulation.weight"], out[f"{prefix}.conv.modulation.bias"] = (cin, 512), (cin,)
        out[f"{prefix}.bias"] = (1, 3, 1, 1)

    styled(f"{d}.conv1", 512, 512, False)
    to_rgb(f"{d}.to_rgb1", 512, False)
    cin = 512
    for level, cout in enumerate((512, 512, 512, 512, 256)):
        styled(f"{d}.convs.{2 * level}", cin, cout, True)
        styled(f"{d}.convs.{2 * level + 1}", cout, cout, False)
        to_rgb(f"{d}.to_rgbs.{level}", cout, True)
        cin = cout
    for i, r in enumerate((4, 8, 8, 16, 16, 32, 32, 64, 64, 128, 128)):
        out[f"{d}.noises.noise_{i}"] = (1, 1, r, r)
    # encoder: IR-50 trunk, output layer, TPAMI AFD, styles, U-Net steps, lateral convs, ICMs.
    e = "encoder"
    out[f"{e}.input_layer.0.weight"] = (64, 3, 3, 3)
    _bn(out, f"{e}.input_layer.1", 64)
    out[f"{e}.input_layer.2.weight"] = (64,)
    for k, (units, (cin, depth)) in enumerate(zip(IR50_UNITS, STAGES), start=1):
        for u in range(units):
            p = f"{e}.block{k}.{u}"
            c = cin if u == 0 else depth
            _bn(out, f"{p}.res_layer.0", c)
            out[f"{p}.res_layer.1.weight"] = (depth, c, 3, 3)
            _bn(out, f"{p}.res_layer.2", depth)
            out[f"{p}.res_layer.3.weight"] = (depth,)
            out[f"{p}.res_layer.4.weight"] = (depth, depth, 3, 3)
            _bn(out, f"{p}.res_layer.5", depth)
            if u == 0 and cin != depth:
                out[f"{p}.shortcut_layer.0.weight"] = (depth, cin, 1, 1)
                _bn(out, f"{p}.shortcut_layer.1", depth)
    _bn(out, f"{e}.output_layer.0", 512)
    out[f"{e}.output_layer.3.weight"], out[f"{e}.output_layer.3.bias"] = (512, 25088), (512,)
    _bn(out, f"{e}.output_layer.4", 512)
    out[f"{e}.fsm.spatial.0.weight"] = (1, 2, 7, 7)
    _bn(out, f"{e}.fsm.spatial.1", 1)
    out[f"{e}.fsm.channel.0.weight"] = (896, 14336, 1, 1)
    out[f"{e}.fsm.channel.2.weight"] = (512, 896, 1, 1)
    _bn(out, f"{e}.fsm.channel.3", 512)
    for i in range(12):
        n_convs = 2 if i < 3 else 3 if i < 7 else 5
        for c in range(n_convs):
            out[f"{e}.styles.{i}.convs.{2 * c}.weight"] = (512, 512, 3, 3)
            out[f"{e}.styles.{i}.convs.{2 * c}.bias"] = (512,)
        out[f"{e}.styles.{i}.linear.weight"], out[f"{e}.styles.{i}.linear.bias"] = (512, 512), (512,)
    for n, (xc, cin, cout) in enumerate(((512, 768, 256), (256, 384, 128), (128, 192, 64)), start=1):
        p = f"{e}.upsample{n}"
        for seq, idx, c in (("conv", 2, cin), ("conv", 5, cout), ("conv2", 2, cout), ("conv2", 5, cout)):
            out[f"{p}.{seq}.{idx}.weight"], out[f"{p}.{seq}.{idx}.bias"] = (cout, c, 3, 3), (cout,)
        out[f"{p}.shortcut.weight"], out[f"{p}.shortcut.bias"] = (cout, xc, 1, 1), (cout,)
    out[f"{e}.latlayer1.weight"], out[f"{e}.latlayer1.bias"] = (512, 256, 3, 3), (512,)
    out[f"{e}.latlayer2.weight"], out[f"{e}.latlayer2.bias"] = (512, 64, 3, 3), (512,)
    for n, (c, dim) in enumerate(((512, 800), (256, 400), (128, 200)), start=1):
        p = f"{e}.aging{n}"
        out[f"{p}.conv1.0.weight"], out[f"{p}.conv1.0.bias"] = (dim, c, 1, 1), (dim,)
        out[f"{p}.router._unit_mapping"] = (age_group, dim)
        for k in range(4):
            for conv in ("conv1", "conv2"):
                out[f"{p}.transform.{k}.{conv}.0.weight"] = (dim, dim, 3, 3)
                out[f"{p}.transform.{k}.{conv}.0.bias"] = (dim,)
            out[f"{p}.transform.{k}.router1._unit_mapping"] = (age_group, dim)
            out[f"{p}.transform.{k}.router2._unit_mapping"] = (age_group, dim)
        out[f"{p}.conv2.0.weight"], out[f"{p}.conv2.0.bias"] = (c, dim, 1, 1), (c,)
    # age estimator with the expectation buffer.
    a = "age_estimator"
    _bn(out, f"{a}.age_output_layer.0", 512)
    out[f"{a}.age_output_layer.2.weight"], out[f"{a}.age_output_layer.2.bias"] = (512, 25088), (512,)
    out[f"{a}.age_output_layer.4.weight"], out[f"{a}.age_output_layer.4.bias"] = (101, 512), (101,)
    out[f"{a}.group_output_layer.weight"], out[f"{a}.group_output_layer.bias"] = (age_group, 101), (age_group,)
    out[f"{a}.expectation"] = (101,)
    return out


def _meta_model(**kw):
    with torch.device("meta"):
        return ref.MTLFace(arch="tpami", **kw)


def test_layout_is_the_release_843_keys():
    layout = release_layout()
    assert len(layout) == 843
    assert sum(1 for k in layout if k.startswith("decoder.")) == 118
    assert sum(1 for k in layout if k.startswith("encoder.")) == 713
    state = _meta_model().state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == layout
    prefixes = [k.split(".")[0] for k in state]
    assert prefixes == sorted(prefixes, key=["decoder", "encoder", "age_estimator"].index), "top-level order"
    m = _meta_model()
    assert sum(p.numel() for p in m.parameters()) == 271_606_376
    assert not m.encoder.output_layer[4].weight.requires_grad and m.encoder.output_layer[4].bias.requires_grad


def test_release_file_loads_strictly(tmp_path):
    """A file in the release layout (random values, every key) loads with weights_only=True, strictly."""
    layout = release_layout()
    g = torch.Generator().manual_seed(0)
    state = {}
    for k, shape in layout.items():
        state[k] = (torch.randint(0, 5, shape, generator=g) if k.endswith("num_batches_tracked")
                    else torch.rand(shape, generator=g) + 0.1)
    path = tmp_path / "mtlface_checkpoints.tar"
    torch.save(state, path)
    model = mtlface_fast.reference.MTLFace.from_official(str(path))
    assert type(model) is mtlface_fast.reference.MTLFace
    assert model.config == dict(arch="tpami", backbone="ir50", input_size=112, age_group=7, afd="tpami", sigma=0.125)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    return randomize_tpami_(ref.MTLFace(**SMALL), seed=0).eval()


def test_missing_extra_and_misshaped_keys_are_named(small_model, tmp_path):
    state = dict(small_model.state_dict())
    del state["encoder.aging2.router._unit_mapping"]
    state["decoder.extra"] = torch.zeros(1)
    state["decoder.decoder.convs.3.noise.weight"] = torch.zeros(2)
    torch.save(state, tmp_path / "a.tar")
    with pytest.raises(ValueError, match=r"missing key\(s\): encoder.aging2.router._unit_mapping") as err:
        ref.MTLFace.from_official(str(tmp_path / "a.tar"))
    assert "unexpected key(s): decoder.extra" in str(err.value)
    assert "decoder.decoder.convs.3.noise.weight: checkpoint (2,) vs model (1,)" in str(err.value)
    with pytest.raises(ValueError, match="generator_ckpt"):
        ref.MTLFace.from_official(small_model.state_dict(), generator_ckpt=str(tmp_path / "a.tar"))


def test_from_official_small_round_trip_and_fast_class(small_model, tmp_path):
    model = small_model
    state = {"module." + k: v for k, v in model.state_dict().items()}  # DDP prefixes are stripped
    torch.save(state, tmp_path / "m.tar")
    loaded = ref.MTLFace.from_official(str(tmp_path / "m.tar")).eval()
    assert loaded.config == dict(arch="tpami", backbone="ir34", input_size=32, age_group=7, afd="tpami", sigma=0.125)
    fast = mtlface_fast.MTLFace.from_official(str(tmp_path / "m.tar")).eval()
    assert type(fast) is mtlface_fast.MTLFace and fast.config["arch"] == "tpami"
    assert isinstance(fast, ref.MTLFace) and isinstance(loaded, ref.MTLFace) and not isinstance(loaded, mtlface_fast.MTLFace)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(x).embedding, model.encode(x).embedding, rtol=0, atol=0)
        torch.testing.assert_close(loaded.synthesize(x, 3), model.synthesize(x, 3), rtol=0, atol=0)


def test_save_and_from_pretrained(small_model, tmp_path):
    model = small_model
    path = model.save_pretrained(str(tmp_path / "saved"))
    with open(os.path.join(path, "config.json")) as fh:
        assert json.load(fh)["arch"] == "tpami"
    loaded = ref.MTLFace.from_pretrained(path)
    assert isinstance(loaded, ref.MTLFace) and loaded.config == model.config
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k


def test_constructor_arguments():
    with pytest.raises(ValueError, match="arch must be one of"):
        ref.MTLFace(arch="iccv")
    with pytest.raises(ValueError, match="age_group"):
        _meta_model(age_group=3)
    with pytest.raises(ValueError, match="input_size"):
        _meta_model(input_size=100)
    assert type(ref.MTLFace(backbone="ir34", input_size=32)) is ref.MTLFace  # the CVPR default is unchanged


def test_demo_runs_on_a_release_layout_file(small_model, tmp_path, capsys):
    from mtlface_fast.cli import main

    torch.save(small_model.state_dict(), tmp_path / "mtlface_checkpoints.tar")
    rc = main(["demo", "--weights", str(tmp_path / "mtlface_checkpoints.tar"), "--out", str(tmp_path / "out")])
    assert rc == 0, capsys.readouterr().err
    with open(tmp_path / "out" / "demo.json") as fh:
        report = json.load(fh)
    assert report["config"]["arch"] == "tpami" and "official checkpoint" in report["weights"]
    assert 0.0 <= report["predicted_age"] <= 100.0 and abs(report["embedding_norm"] - 1.0) < 1e-4
    assert os.path.getsize(tmp_path / "out" / "demo_grid.png") > 0
