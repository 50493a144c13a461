"""TensorRT target. Without torch_tensorrt or a GPU: the graph TensorRT would consume (decomposed, aten only, in
the requested dtype), the refusals with the install hint, and a clean skip of the throughput variant. With both:
engines in fp16/bf16/fp32 with a dynamic batch, parity with the PyTorch model, the exported-program form, and
the batch-range refusal at run time."""
import argparse
import copy

import pytest
import torch

from mtlface_fast import MTLFace
from mtlface_fast.errors import MissingDependencyError
from mtlface_fast.export import (decompose, example_inputs, export_program, export_tensorrt, foreign_ops,
                                 load_engine, load_tensorrt_program, tensorrt_available)
from mtlface_fast.export.tensorrt import INSTALL_HINT
from tests.utils import check_low_precision, randomize_

TRT_OK, TRT_REASON = tensorrt_available()
needs_trt = pytest.mark.skipif(not TRT_OK, reason=f"TensorRT tests need torch_tensorrt and a CUDA GPU: {TRT_REASON}")


def test_tensorrt_graph_is_aten_only_in_requested_dtype(dtype=torch.float16):
    """What export_tensorrt hands to torch_tensorrt, checked without TensorRT: only aten ops, weights and
    image input in the engine's dtype, the batch dimension symbolic."""
    model = MTLFace(backbone="ir34").eval()
    ep, spec = export_program(model, "recognition", min_batch=1, opt_batch=4, max_batch=8, dtype=dtype,
                              device="cpu")
    ep = decompose(ep)
    assert foreign_ops(ep) == []
    images = next(n for n in ep.graph.nodes if n.op == "placeholder" and n.name == "images")
    value = images.meta["val"]
    assert value.dtype == dtype
    assert not isinstance(value.shape[0], int), "batch dimension was specialized"
    floats = {p.dtype for p in ep.state_dict.values() if p.is_floating_point()}
    assert floats == {dtype}, f"weights in {floats}, expected {dtype}"


@pytest.mark.skipif(TRT_OK, reason="checks the error given when torch_tensorrt or a GPU is missing")
def test_tensorrt_missing_gives_install_hint(tmp_path):
    model = MTLFace(backbone="ir34")
    assert "torch-tensorrt" in TRT_REASON or "GPU" in TRT_REASON
    with pytest.raises(MissingDependencyError, match="the TensorRT target is unavailable"):
        export_tensorrt(model, str(tmp_path / "m.engine"))
    if "torch_tensorrt" in TRT_REASON:
        assert INSTALL_HINT in TRT_REASON


def test_tensorrt_argument_refusals(tmp_path):
    model = MTLFace(backbone="ir34")
    with pytest.raises(ValueError, match="path must end in .engine"):
        export_tensorrt(model, str(tmp_path / "m.onnx"))
    with pytest.raises(ValueError, match="dtype must be one of"):
        export_tensorrt(model, str(tmp_path / "m.engine"), dtype=torch.int8)
    with pytest.raises(ValueError, match="ops must be one of"):
        export_tensorrt(model, str(tmp_path / "m.engine"), ops="fused")
    with pytest.raises(ValueError, match="program_path must end in .pt2"):
        export_tensorrt(model, str(tmp_path / "m.engine"), program_path=str(tmp_path / "m.ep"))
    with pytest.raises(FileNotFoundError, match="TensorRT engine not found"):
        load_engine(str(tmp_path / "missing.engine"))
    (tmp_path / "bare.engine").write_bytes(b"\0")
    with pytest.raises(ValueError, match="was not written by mtlface_fast.export.export_tensorrt"):
        load_engine(str(tmp_path / "bare.engine"))


def test_throughput_tensorrt_variant_skips_cleanly_when_unavailable(monkeypatch):
    from mtlface_fast import throughput
    monkeypatch.setattr("mtlface_fast.export.tensorrt_available", lambda: (False, "no TensorRT here"))
    args = argparse.Namespace(device="cpu", dtype="fp16", tasks="encode", variants="ours_tensorrt", batch="1",
                              backbone="ir34", input_size=32, age_group=7, warmup=0, iters=1, seed=0)
    payload = throughput.run(args)
    assert payload["results"] == []
    assert payload["settings"]["skipped_variants"] == {"ours_tensorrt": "no TensorRT here"}


# -- on a GPU with torch_tensorrt -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gpu_model():
    return randomize_(MTLFace(backbone="ir50"), seed=11).eval().cuda()


@needs_trt
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_tensorrt_recognition_engine_parity(gpu_model, tmp_path, dtype):
    path = str(tmp_path / "recognition.engine")
    program = str(tmp_path / "recognition_trt.pt2")
    spec = export_tensorrt(gpu_model, path, "recognition", min_batch=1, opt_batch=8, max_batch=16, dtype=dtype,
                           program_path=program if dtype == torch.float16 else None)
    engine = load_engine(path)
    lowp = copy.deepcopy(gpu_model).to(dtype)
    for batch in (1, 5, 16):
        (images,) = example_inputs(spec, "cuda", batch=batch, seed=batch)
        embedding, age = engine(images)
        with torch.no_grad():
            want = gpu_model.encode(images.float())
            low = lowp.encode(images)
        check_low_precision(embedding, want.embedding, low.embedding, dtype, f"{dtype} embedding, batch {batch}")
        check_low_precision(age, want.age, low.age, dtype, f"{dtype} age, batch {batch}")
    with pytest.raises(ValueError, match="batch size 17 is outside the range"):
        engine(*example_inputs(spec, "cuda", batch=17))
    if dtype == torch.float16:
        loaded = load_tensorrt_program(program)
        (images,) = example_inputs(spec, "cuda", batch=3, seed=3)
        embedding, age = loaded(images)
        with torch.no_grad():
            want = gpu_model.encode(images.float())
            low = lowp.encode(images)
        check_low_precision(embedding, want.embedding, low.embedding, dtype, "exported-program form embedding")


@needs_trt
def test_tensorrt_synthesis_engine_parity(gpu_model, tmp_path):
    path = str(tmp_path / "synthesis.engine")
    spec = export_tensorrt(gpu_model, path, "synthesis", min_batch=1, opt_batch=4, max_batch=8, dtype=torch.float16)
    engine = load_engine(path)
    images, _ = example_inputs(spec, "cuda", batch=3, seed=5)
    groups = torch.tensor([0, 6, 3], device="cuda")
    image = engine(images, groups)
    with torch.no_grad():
        want = gpu_model.synthesize(images.float(), groups)
        low = copy.deepcopy(gpu_model).half().synthesize(images, groups)
    check_low_precision(image, want, low, torch.float16, "fp16 synthesis")
    with pytest.raises(ValueError, match=r"target_group values must be in \[0, 7\)"):
        engine(images, groups + 5)
