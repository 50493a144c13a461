"""ONNX export: checker, standard operators only, dynamic batch, ONNX Runtime (CPU) parity with the fast model
and the reference on randomized weights, and the errors it gives."""
import os

import pytest
import torch

from mtlface_fast import MTLFace, reference
from mtlface_fast.export import ExportSpec, example_inputs, export_onnx, load_onnx
from tests.utils import assert_close, assert_encodes_like, randomize_

onnx = pytest.importorskip("onnx", reason="the ONNX target needs onnx (pip install 'mtlface-fast[onnx]')")
pytest.importorskip("onnxruntime", reason="the ONNX target needs onnxruntime (pip install 'mtlface-fast[onnx]')")
pytest.importorskip("onnxscript", reason="the ONNX target needs onnxscript (pip install 'mtlface-fast[onnx]')")

MAX_BATCH = 4


@pytest.fixture(scope="module")
def models():
    fast = randomize_(MTLFace(backbone="ir34"), seed=3).eval()
    ref = reference.MTLFace(backbone="ir34").eval()
    ref.load_state_dict(fast.state_dict())
    return fast, ref


@pytest.fixture(scope="module")
def exported(models, tmp_path_factory):
    folder = tmp_path_factory.mktemp("onnx")
    out = {}
    for entry in ("recognition", "synthesis"):
        path = str(folder / f"{entry}.onnx")
        spec = export_onnx(models[0], path, entry, min_batch=1, max_batch=MAX_BATCH)
        out[entry] = (path, spec)
    return out


def _standard_ops_only(path):
    proto = onnx.load(path)
    onnx.checker.check_model(proto, full_check=True)
    domains = {node.domain for node in proto.graph.node}
    assert domains <= {"", "ai.onnx"}, f"non-standard ONNX domains in the graph: {domains}"
    batch_dims = {inp.name: inp.type.tensor_type.shape.dim[0] for inp in proto.graph.input}
    batch_dims.update({out.name: out.type.tensor_type.shape.dim[0] for out in proto.graph.output})
    for name, dim in batch_dims.items():
        assert dim.dim_param == "batch" and not dim.dim_value, f"{name}: batch is not the dynamic dim 'batch' ({dim})"
    return proto


@pytest.mark.parametrize("batch", [1, 3])
def test_onnx_recognition_parity(models, exported, batch):
    fast, ref = models
    path, spec = exported["recognition"]
    assert spec == ExportSpec("recognition", 1, MAX_BATCH, MAX_BATCH, "fp32", "cpu", 112, 7, "ir34", "cvpr", "onnx")
    _standard_ops_only(path)
    runner = load_onnx(path)
    assert runner.spec == spec
    (images,) = example_inputs(spec, "cpu", batch=batch, seed=10 + batch)
    embedding, age = runner(images)
    assert_encodes_like(embedding, age, images, fast, ref)


def test_onnx_synthesis_parity(models, exported):
    fast, ref = models
    path, spec = exported["synthesis"]
    _standard_ops_only(path)
    runner = load_onnx(path)
    images, _ = example_inputs(spec, "cpu", batch=3, seed=7)
    groups = torch.tensor([6, 0, 3])
    image = runner(images, groups)
    with torch.no_grad():
        want = fast.synthesize(images, groups)
        oracle = ref.synthesize(images, groups)
    assert_close(image, want, torch.float32, "synthesis vs fast model")
    assert_close(image, oracle, torch.float32, "synthesis vs reference")


def test_onnx_runner_refuses_inputs_outside_the_spec(exported):
    path, spec = exported["synthesis"]
    runner = load_onnx(path)
    images, groups = example_inputs(spec, "cpu", batch=2)
    with pytest.raises(ValueError, match=rf"batch size {MAX_BATCH + 1} is outside the range"):
        runner(*example_inputs(spec, "cpu", batch=MAX_BATCH + 1))
    with pytest.raises(ValueError, match=r"target_group values must be in \[0, 7\)"):
        runner(images, torch.tensor([0, 7]))
    with pytest.raises(TypeError, match="images must be torch.float32"):
        runner(images.double(), groups)


def test_onnx_export_refusals(models, tmp_path):
    fast, _ = models
    path = str(tmp_path / "x.onnx")
    with pytest.raises(ValueError, match="ONNX target exports fp32 only, got dtype fp16"):
        export_onnx(fast, path, dtype=torch.float16)
    with pytest.raises(ValueError, match="opset must be an int >= 17"):
        export_onnx(fast, path, opset=11)
    with pytest.raises(ValueError, match="entry must be one of"):
        export_onnx(fast, path, "embedding")
    assert not os.path.exists(path)
    with pytest.raises(FileNotFoundError, match="ONNX file not found"):
        load_onnx(str(tmp_path / "missing.onnx"))
    blank = onnx.helper.make_model(onnx.helper.make_graph([], "g", [], []))
    onnx.save(blank, path)
    with pytest.raises(ValueError, match="was not written by mtlface_fast.export.export_onnx"):
        load_onnx(path)
