"""Every export target with the authors' TPAMI release: a checkpoint in the release layout
(``mtlface_checkpoints.tar``, randomized weights, the small ir34 / 32 px configuration) loaded with
``MTLFace.from_official`` goes to ONNX (recognition with flip TTA inside the graph, synthesis with the stored
noise maps as constants; ONNX Runtime parity with the fast model and the reference), to an AOTInductor
package run from Python and from the C++ runner, to the aten-only program TensorRT consumes, and through
``mtlface-fast export``."""
import os
import subprocess

import numpy as np
import pytest
import torch

import mtlface_fast
from mtlface_fast import reference
from mtlface_fast.export import ExportSpec, example_inputs, export_aoti, export_onnx, load_aoti, load_onnx
from mtlface_fast.export.program import decompose, export_program, foreign_ops
from tests.tpami_utils import SMALL, randomize_tpami_
from tests.utils import assert_close, assert_encodes_like

MAX_BATCH = 4


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """(path of a release-layout file, fast model loaded from it, reference model loaded from it)."""
    folder = tmp_path_factory.mktemp("release")
    src = randomize_tpami_(reference.MTLFace(**SMALL), seed=21)
    path = str(folder / "mtlface_checkpoints.tar")
    torch.save(src.state_dict(), path)
    fast = mtlface_fast.MTLFace.from_official(path).eval()
    ref = reference.MTLFace.from_official(path).eval()
    assert isinstance(fast, mtlface_fast.MTLFace) and fast.config["arch"] == "tpami"
    return path, fast, ref


@pytest.fixture(scope="module")
def onnx_files(release, tmp_path_factory):
    pytest.importorskip("onnxruntime", reason="the ONNX target needs onnxruntime (pip install 'mtlface-fast[onnx]')")
    pytest.importorskip("onnxscript", reason="the ONNX target needs onnxscript (pip install 'mtlface-fast[onnx]')")
    folder = tmp_path_factory.mktemp("onnx")
    out = {}
    for entry in ("recognition", "synthesis"):
        path = str(folder / f"{entry}.onnx")
        out[entry] = path, export_onnx(release[1], path, entry, min_batch=1, max_batch=MAX_BATCH)
    return out


def test_onnx_recognition_has_flip_tta_inside(release, onnx_files):
    _, fast, ref = release
    path, spec = onnx_files["recognition"]
    assert spec == ExportSpec("recognition", 1, MAX_BATCH, MAX_BATCH, "fp32", "cpu", 32, 7, "ir34", "tpami", "onnx",
                              "tpami")
    runner = load_onnx(path)
    for batch in (1, 3):
        (images,) = example_inputs(spec, "cpu", batch=batch, seed=40 + batch)
        embedding, age = runner(images)
        assert_encodes_like(embedding, age, images, fast, ref)  # encode() flips by default for TPAMI
        with torch.no_grad():
            single = fast.encode(images, flip=False)
        # the mirrored view is in the graph: the result is not the single-view one
        assert float((embedding - single.embedding).abs().max()) > 1e-3
        assert torch.allclose(embedding.norm(dim=1), torch.ones(batch), atol=1e-5)


def test_onnx_synthesis_uses_the_stored_noise(release, onnx_files):
    _, fast, ref = release
    path, spec = onnx_files["synthesis"]
    runner = load_onnx(path)
    images, _ = example_inputs(spec, "cpu", batch=3, seed=7)
    groups = torch.tensor([6, 0, 3])
    image = runner(images, groups)
    with torch.no_grad():
        want = fast.synthesize(images, groups)
        oracle = ref.synthesize(images, groups)
        random = fast.synthesize(images, groups, noise="random", generator=torch.Generator().manual_seed(1))
    assert_close(image, want, torch.float32, "synthesis vs fast model")
    assert_close(image, oracle, torch.float32, "synthesis vs reference")
    assert float((random - want).abs().max()) > 1e-3  # the stored maps matter, and they are what was exported


@pytest.fixture(scope="module")
def aoti_package(release, tmp_path_factory):
    import torch._inductor
    if not hasattr(torch._inductor, "aoti_compile_and_package"):
        pytest.skip("AOTInductor packaging needs torch >= 2.6")
    from tests.test_export_aoti import FAST_COMPILE
    path = str(tmp_path_factory.mktemp("aoti") / "recognition.pt2")
    spec = export_aoti(release[1], path, "recognition", min_batch=1, max_batch=MAX_BATCH, device="cpu",
                       inductor_configs=FAST_COMPILE)
    return path, spec


def test_aoti_package_and_cpp_runner(release, aoti_package, runner_binary, tmp_path):
    _, fast, ref = release
    path, spec = aoti_package
    assert spec.arch == "tpami" and spec.afd == "tpami"
    loaded = load_aoti(path)
    (images,) = example_inputs(spec, "cpu", batch=3, seed=31)
    embedding, age = loaded(images)
    assert_encodes_like(embedding, age, images, fast, ref)
    inp = str(tmp_path / "images.npy")
    np.save(inp, np.ascontiguousarray(images.numpy()))
    prefix = str(tmp_path / "out")
    done = subprocess.run([runner_binary, path, inp, "--out", prefix], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert_close(torch.from_numpy(np.load(prefix + "_embedding.npy")), embedding, torch.float32, "C++ embedding")
    assert_close(torch.from_numpy(np.load(prefix + "_age.npy")), age, torch.float32, "C++ age")


@pytest.mark.parametrize("entry", ["recognition", "synthesis"])
def test_tensorrt_program_is_aten_only_in_fp16(release, entry):
    """What export_tensorrt hands to torch_tensorrt (ops='decompose'), checked without TensorRT."""
    ep, spec = export_program(release[1], entry, min_batch=1, opt_batch=2, max_batch=4, dtype=torch.float16,
                              device="cpu")
    ep = decompose(ep)
    assert foreign_ops(ep) == [] and spec.arch == "tpami"
    images = next(n for n in ep.graph.nodes if n.op == "placeholder" and n.name == "images")
    assert images.meta["val"].dtype == torch.float16
    assert not isinstance(images.meta["val"].shape[0], int), "batch dimension was specialized"
    floats = {p.dtype for p in ep.state_dict.values() if p.is_floating_point()}
    floats |= {c.dtype for c in ep.constants.values() if isinstance(c, torch.Tensor) and c.is_floating_point()}
    assert floats == {torch.float16}, f"weights in {floats}"


def test_cli_export_takes_the_release_file(release, tmp_path, capsys):
    pytest.importorskip("onnxruntime", reason="the ONNX target needs onnxruntime")
    from mtlface_fast.cli import main
    out = str(tmp_path / "rec.onnx")
    rc = main(["export", "--target", "onnx", "--weights", release[0], "--out", out, "--max-batch", "2"])
    assert rc == 0, capsys.readouterr().err
    assert os.path.getsize(out) > 0 and load_onnx(out).spec.arch == "tpami"
