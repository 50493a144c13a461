"""What a new user runs into: a CPU install without triton, input checks (without host syncs on CUDA), loader
errors that name the file, one-line CLI errors, numpy scalars, the demo's picture and log line."""
import ast
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import mtlface_fast
from mtlface_fast import demo, validation
from mtlface_fast.errors import (CheckpointError, MissingDependencyError, MTLFaceError, TrainingDivergedError,
                                 UsageError)
from tests.utils import randomize_

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(backbone="ir34", input_size=32, age_group=7)


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    return randomize_(mtlface_fast.MTLFace(**SMALL), seed=7).eval()


def _images(b=2, size=32, seed=0):
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed)).clamp(-1, 1)


def _run(code: str, env=None):
    e = dict(os.environ, **(env or {}))
    e.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=e, capture_output=True, text=True,
                          timeout=300)


# -- install -----------------------------------------------------------------------------------------------------------
def _setup_kwargs():
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    return {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg in ("install_requires", "extras_require")}


def test_triton_is_not_a_requirement_of_a_cpu_install():
    kw = _setup_kwargs()
    assert not [r for r in kw["install_requires"] if r.lower().startswith("triton")], kw["install_requires"]
    assert any(r.startswith("triton") for r in kw["extras_require"]["test"])  # the interpreter tests


def test_cpu_default_path_never_imports_triton():
    code = ("import sys, torch, mtlface_fast\n"
            "assert 'torch' in sys.modules\n"
            "m = mtlface_fast.MTLFace(backbone='ir34', input_size=32, age_group=4).eval()\n"
            "x = mtlface_fast.preprocess(torch.rand(1, 3, 40, 40), size=32)\n"
            "with torch.no_grad():\n"
            "    m.encode(x); m.synthesize(x, 1); m.synthesize_all_ages(x)\n"
            "    mtlface_fast.MTLFace(arch='tpami', backbone='ir34', input_size=32, age_group=4).eval().encode(x)\n"
            "from mtlface_fast.benchmark import environment; environment('cpu')\n"
            "print('triton' in sys.modules)\n")
    out = _run(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_help_does_not_import_torch():
    code = ("import sys, time, io, contextlib\nt = time.perf_counter()\nfrom mtlface_fast.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()) as buf:\n"
            "    try:\n        main(['--help'])\n    except SystemExit as e:\n        assert e.code == 0\n"
            "assert 'bench' in buf.getvalue() and 'train' in buf.getvalue()\n"
            "print('torch' in sys.modules)\n")
    out = _run(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


# -- image checks ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value,match", [(255.0, "far outside"), (1e38, "far outside"), (-20.0, "far outside"),
                                         (float("inf"), "NaN or infinite"), (float("nan"), "NaN or infinite")])
def test_images_far_outside_the_normalized_range_are_refused(small_model, value, match):
    x = _images(2)
    x[1, 0, 3, 4] = value
    for call in (small_model, small_model.encode, lambda t: small_model.synthesize(t, 0)):
        with pytest.raises(ValueError, match=match):
            call(x)
    pixels = torch.rand(1, 3, 32, 32) * 255  # [0, 255] floats
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        small_model(pixels)
    with torch.no_grad():  # the documented range and N(0, 1)-style inputs pass
        small_model(torch.randn(2, 3, 32, 32))


class _NoHostReads:
    """Makes every host read of a tensor value an error while active (the checks' device branch must not sync)."""
    NAMES = ("__bool__", "item", "__int__", "__float__", "tolist", "__index__")

    def __enter__(self):
        self.saved = {n: getattr(torch.Tensor, n) for n in self.NAMES}
        for n in self.NAMES:
            setattr(torch.Tensor, n, lambda *a, _n=n, **k: (_ for _ in ()).throw(AssertionError(f"host read {_n}")))
        return self

    def __exit__(self, *exc):
        for n, f in self.saved.items():
            setattr(torch.Tensor, n, f)


def test_device_branch_reads_nothing_on_the_host_and_still_refuses_bad_values():
    good, groups = _images(2), torch.tensor([0, 6])
    with _NoHostReads():
        validation.check_image_values(good, immediate=False)
        validation.check_group_values(groups, 7, immediate=False)
        with pytest.raises(AssertionError, match="host read"):  # the harness does catch a read
            bool(good.sum() > 0)
    # on CPU tensors torch._assert_async fails at once; on CUDA at the next synchronization
    bad = good.clone()
    bad[0, 0, 0, 0] = 255.0
    for t in (bad, torch.full_like(good, float("nan"))):
        with pytest.raises(RuntimeError, match="un-normalized"):
            validation.check_image_values(t, immediate=False)
    with pytest.raises(RuntimeError, match=r"\[0, 7\)"):
        validation.check_group_values(torch.tensor([0, 7]), 7, immediate=False)


def test_checks_pick_the_branch_by_device(monkeypatch):
    assert validation.immediate_checks(torch.zeros(1))
    meta = torch.zeros(1, device="meta")
    assert not validation.immediate_checks(meta)
    monkeypatch.setenv(validation.SYNC_CHECKS_ENV, "1")
    assert validation.immediate_checks(meta)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: checks that the CUDA checks do not sync")
def test_cuda_checks_do_not_synchronize(small_model):
    model = mtlface_fast.MTLFace(**SMALL).cuda().eval()
    x, groups = _images(2).cuda(), torch.tensor([0, 6], device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        validation.check_images(x, input_size=32, device=x.device, dtype=torch.float32)
        validation.check_target_group(groups, batch=2, age_group=7, device=x.device)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    with torch.no_grad():
        model.synthesize(x, groups)
    torch.cuda.synchronize()


def test_numpy_scalars_are_accepted(small_model):
    cfg = mtlface_fast.MTLFace(backbone="ir34", input_size=np.int64(32), age_group=np.int32(4),
                               sigma=np.float32(0.5)).config
    assert cfg["input_size"] == 32 and type(cfg["input_size"]) is int and cfg["age_group"] == 4
    assert cfg["sigma"] == pytest.approx(0.5) and type(cfg["sigma"]) is float
    json.dumps(cfg)
    x = _images(2)
    with torch.no_grad():
        torch.testing.assert_close(small_model.synthesize(x, np.int64(3)), small_model.synthesize(x, 3))


@pytest.mark.parametrize("kwargs,match", [
    (dict(age_group=7.0), "age_group must be an int"), (dict(input_size=32.0), "input_size"),
    (dict(sigma="0.1"), "sigma"), (dict(sigma=np.float32(1.5)), r"got 1\.5$"), (dict(backbone=None), "backbone"),
])
def test_constructor_errors_are_clear(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mtlface_fast.MTLFace(**kwargs)


# -- preprocess --------------------------------------------------------------------------------------------------------
def test_preprocess_refuses_out_of_range_floats_sizes_and_non_images(tmp_path):
    with pytest.raises(ValueError, match=r"\[0, 1\].*got values in \[0\.\d+, 2\d\d"):
        mtlface_fast.preprocess(torch.rand(1, 3, 32, 32) * 255)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        mtlface_fast.preprocess(torch.rand(3, 32, 32) * 2 - 1)  # already normalized
    with pytest.raises(ValueError, match="multiple of 16"):
        mtlface_fast.preprocess(torch.rand(1, 3, 32, 32), size=100)
    (tmp_path / "notes.txt").write_text("not an image\n")
    with pytest.raises(ValueError, match="notes.txt: not an image"):
        mtlface_fast.preprocess(str(tmp_path / "notes.txt"))
    with pytest.raises(IsADirectoryError, match="directory"):
        mtlface_fast.preprocess(str(tmp_path))
    out = mtlface_fast.preprocess(torch.rand(1, 3, 40, 40), size=32)
    assert out.shape == (1, 3, 32, 32) and out.min() >= -1 and out.max() <= 1


# -- loaders ----------------------------------------------------------------------------------------------------------
def _official(model, tmp_path):
    path = str(tmp_path / "backbone-36000")
    torch.save(model.backbone.state_dict(), path)
    return path


def test_official_loader_errors_name_the_file(small_model, tmp_path):
    good = _official(small_model, tmp_path)
    raw = open(good, "rb").read()
    cases = {
        "empty": (b"", "is empty"),
        "notes.txt": (b"id filename age\n101 a.jpg 30\n", "not a readable torch checkpoint"),
        "truncated.pt": (raw[: len(raw) // 2], "not a readable torch checkpoint"),
    }
    for name, (data, match) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(CheckpointError, match=match) as err:
            mtlface_fast.MTLFace.from_official(str(path))
        assert str(path) in str(err.value)
    with pytest.raises(CheckpointError, match="is a directory") as err:
        mtlface_fast.MTLFace.from_official(str(tmp_path))
    assert str(tmp_path) in str(err.value)
    with pytest.raises(FileNotFoundError, match="nope"):
        mtlface_fast.MTLFace.from_official(str(tmp_path / "nope"))
    torch.save({"a": torch.zeros(1), "b": test_official_loader_errors_name_the_file}, tmp_path / "code.pt")
    with pytest.raises(CheckpointError, match="code.pt holds objects other than tensors"):
        mtlface_fast.MTLFace.from_official(str(tmp_path / "code.pt"))
    torch.save({"a": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="other.pt: not an MTLFace backbone"):
        mtlface_fast.MTLFace.from_official(str(tmp_path / "other.pt"))


def test_non_finite_weights_are_refused_at_load(small_model, tmp_path):
    state = dict(small_model.backbone.state_dict())
    state["block1.0.res_layer.1.weight"] = state["block1.0.res_layer.1.weight"].clone()
    state["block1.0.res_layer.1.weight"][0, 0, 0, 0] = float("nan")
    torch.save(state, tmp_path / "nan-backbone")
    with pytest.raises(CheckpointError, match=r"nan-backbone holds NaN or infinite values in 1 tensor\(s\): "
                                              r"block1.0.res_layer.1.weight"):
        mtlface_fast.MTLFace.from_official(str(tmp_path / "nan-backbone"))
    folder = small_model.save_pretrained(str(tmp_path / "saved"))
    from safetensors.torch import load_file, save_file
    w = os.path.join(folder, "model.safetensors")
    tensors = load_file(w)
    key = next(k for k, v in tensors.items() if v.is_floating_point() and k.startswith("generator."))
    tensors[key][0] = float("inf")
    save_file(tensors, w)
    with pytest.raises(CheckpointError, match="model.safetensors holds NaN or infinite"):
        mtlface_fast.MTLFace.from_pretrained(folder)


def test_saved_model_errors_name_the_file(small_model, tmp_path):
    folder = small_model.save_pretrained(str(tmp_path / "m"))
    cfg, weights = os.path.join(folder, "config.json"), os.path.join(folder, "model.safetensors")
    good_cfg, good_w = open(cfg).read(), open(weights, "rb").read()
    for text, match in (("{not json", "config.json is not valid JSON"), ("[1, 2]", "must hold a JSON object"),
                        (json.dumps({"format": "mtlface_fast", "backbone": "ir34", "colour": 1}),
                         "config.json does not describe a model"),
                        (json.dumps({"backbone": "ir34"}), "not written by save_pretrained")):
        open(cfg, "w").write(text)
        with pytest.raises(CheckpointError, match=match):
            mtlface_fast.MTLFace.from_pretrained(folder)
    open(cfg, "w").write(good_cfg)
    open(weights, "wb").write(good_w[: len(good_w) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors is not a readable safetensors file") as err:
        mtlface_fast.MTLFace.from_pretrained(folder)
    assert weights in str(err.value)
    with pytest.raises(CheckpointError, match="is a file; from_pretrained reads a folder"):
        mtlface_fast.MTLFace.from_pretrained(weights)
    with pytest.raises(FileNotFoundError, match="saved model folder not found"):
        mtlface_fast.MTLFace.from_pretrained(str(tmp_path / "nope"))


# -- the command line -------------------------------------------------------------------------------------------------
def test_cli_known_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    from mtlface_fast.cli import main

    (tmp_path / "notes.txt").write_text("hello\n")
    (tmp_path / "empty.pt").write_bytes(b"")
    for argv, match in ((["demo", "--image", str(tmp_path / "notes.txt")], "notes.txt: not an image"),
                        (["demo", "--weights", str(tmp_path / "empty.pt")], "empty.pt is empty")):
        assert main(argv + ["--out", str(tmp_path / "out"), "--backbone", "ir34"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and match in err and "Traceback" not in err, err
        for debug in (["--debug"] + argv, argv + ["--debug"]):  # --debug before or after the subcommand
            with pytest.raises((ValueError, OSError)):
                main(debug + ["--out", str(tmp_path / "out"), "--backbone", "ir34"])


@pytest.mark.parametrize("error", [MissingDependencyError("the demo needs frobnicate: pip install frobnicate"),
                                   UsageError("--frob must be positive, got -1"),
                                   TrainingDivergedError("step 3: loss is nan (lower the learning rate)")])
def test_cli_package_errors_are_one_line_with_exit_code_2(monkeypatch, capsys, tmp_path, error):
    from mtlface_fast.cli import main

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(demo, "run_demo", fail)
    assert main(["demo", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"mtlface-fast demo: error: {error} (--debug for the traceback)", err
    with pytest.raises(type(error)):
        main(["demo", "--out", str(tmp_path), "--debug"])


def test_cli_runtime_errors_print_their_traceback_and_cause_with_exit_code_1(tmp_path):
    # A RuntimeError that is not the package's own (torch, CUDA, Triton) is a failure to investigate: the
    # command must not shorten it to one line.
    code = ("import sys\nfrom mtlface_fast import demo\nfrom mtlface_fast.cli import main\n"
            "def fail(*args, **kwargs):\n"
            "    try:\n        raise ValueError('the inner cause')\n"
            "    except ValueError as exc:\n        raise RuntimeError('boom') from exc\n"
            f"demo.run_demo = fail\nsys.exit(main(['demo', '--out', {str(tmp_path)!r}]))\n")
    out = _run(code)
    assert out.returncode == 1, (out.returncode, out.stderr)
    assert "Traceback (most recent call last)" in out.stderr and "RuntimeError: boom" in out.stderr, out.stderr
    assert "ValueError: the inner cause" in out.stderr and "direct cause" in out.stderr, out.stderr
    assert "error: boom" not in out.stderr and "--debug for the traceback" not in out.stderr, out.stderr


def test_package_errors_are_also_the_builtins_callers_catch():
    from mtlface_fast.mtcnn import AlignExtraMissing
    for cls, builtin in ((CheckpointError, ValueError), (UsageError, ValueError), (MissingDependencyError, RuntimeError),
                         (TrainingDivergedError, RuntimeError), (AlignExtraMissing, ImportError),
                         (AlignExtraMissing, RuntimeError)):
        assert issubclass(cls, MTLFaceError) and issubclass(cls, builtin), (cls, builtin)


# -- the demo ---------------------------------------------------------------------------------------------------------
def test_wrap_text_fits_the_width():
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text = "age head 48.3 years, group head 0-10 (random initialization (seed 0); NOT a trained model)"
    for width in (60, 150, 292, 2000):
        lines = demo.wrap_text(draw, text, width)
        assert all(draw.textlength(line) <= width for line in lines), (width, lines)
        assert "".join(lines).replace(" ", "") == text.replace(" ", "")
    assert len(demo.wrap_text(draw, text, 2000)) == 1


def test_demo_labels_both_heads_and_says_when_synthesis_changes_nothing(small_model, tmp_path):
    folder = small_model.save_pretrained(str(tmp_path / "w"))
    lines = []
    report = demo.run_demo(None, str(tmp_path / "out"), weights=folder, log=lines.append)
    line = next(s for s in lines if s.startswith("age head"))
    g_age, g_head = report["group_of_predicted_age"], report["predicted_group"]
    assert f"(group {g_age}, {report['group_labels'][g_age]})" in line
    assert f"group head: group {g_head} ({report['group_labels'][g_head]})" in line
    grid = Image.open(report["files"]["grid"])
    assert grid.width == 8 * 36 + 4  # input + 7 groups at 32 pixels: the title is wrapped, not cut
    assert report["max_residual"] >= 0


@pytest.mark.parametrize("shift,equal", [(0.0, True), (1e-4, True), (0.2, False)])
def test_demo_says_so_when_the_aged_faces_equal_the_input(small_model, tmp_path, monkeypatch, shift, equal):
    class Shifted(type(small_model)):
        def synthesize_all_ages(self, images, **kw):  # input + a uniform residual of ``shift``
            return images[:, None].repeat(1, self.age_group, 1, 1, 1) + shift

    model = Shifted(**SMALL)
    model.load_state_dict(small_model.state_dict())
    monkeypatch.setattr(demo, "load_model", lambda *a, **k: (model, "test model"))
    lines = []
    report = demo.run_demo(None, str(tmp_path / "out"), weights="given", log=lines.append)
    assert report["aged_faces_equal_input"] is equal
    assert report["max_residual"] == pytest.approx(shift, abs=1e-6)
    assert any(s.startswith("NOTE: The aged faces equal the input") for s in lines) is equal
    plain = demo.save_grid(str(tmp_path / "plain.png"), torch.zeros(3, 32, 32), torch.zeros(7, 3, 32, 32),
                           report["group_labels"], title=demo.demo_title(report, "test model"))
    taller = Image.open(report["files"]["grid"]).height > Image.open(plain).height
    assert taller is equal  # the note's lines on the picture
