"""AOTInductor on CPU: a recognition package with a dynamic batch, its parity with the fast model and the
reference, and the C++ runner (CMakeLists.txt, cpp/mtlface_infer.cpp) built against the wheel's libtorch
and compared with Python.

The package is the ir34 backbone at input_size 32: the smallest graph and weights that exercise every
layer (an ir50 / 112 px compile takes several minutes on two CPU cores; shapes do not change the code).
"""
import copy
import os
import subprocess

import numpy as np
import pytest
import torch

import torch._inductor
import torch._inductor.config
from mtlface_fast import MTLFace, reference
from mtlface_fast.export import ExportSpec, example_inputs, export_aoti, load_aoti
from tests.utils import assert_close, assert_encodes_like, check_low_precision, randomize_

INPUT_SIZE = 32
MAX_BATCH = 4
# Compile the (large, straight-line) wrapper function without optimization: the kernels are unaffected.
FAST_COMPILE = ({"aot_inductor.compile_wrapper_opt_level": "O0"}
                if hasattr(torch._inductor.config.aot_inductor, "compile_wrapper_opt_level") else {})

pytestmark = pytest.mark.skipif(not hasattr(torch._inductor, "aoti_compile_and_package"),
                                reason="AOTInductor packaging needs torch >= 2.6")


@pytest.fixture(scope="module")
def models():
    fast = randomize_(MTLFace(backbone="ir34", input_size=INPUT_SIZE), seed=5).eval()
    ref = reference.MTLFace(backbone="ir34", input_size=INPUT_SIZE).eval()
    ref.load_state_dict(fast.state_dict())
    return fast, ref


@pytest.fixture(scope="module")
def package(models, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("aoti") / "recognition.pt2")
    spec = export_aoti(models[0], path, "recognition", min_batch=1, max_batch=MAX_BATCH, device="cpu",
                       inductor_configs=FAST_COMPILE)
    return path, spec


@pytest.fixture(scope="module")
def loaded(package):
    return load_aoti(package[0])


@pytest.mark.parametrize("batch", [1, 3, MAX_BATCH])
def test_aoti_recognition_parity(models, package, loaded, batch):
    fast, ref = models
    path, spec = package
    assert spec == ExportSpec("recognition", 1, MAX_BATCH, MAX_BATCH, "fp32", "cpu", INPUT_SIZE, 7, "ir34", "cvpr",
                              "aoti")
    assert loaded.spec == spec
    (images,) = example_inputs(spec, "cpu", batch=batch, seed=20 + batch)
    embedding, age = loaded(images)
    assert_encodes_like(embedding, age, images, fast, ref)


def test_aoti_refusals(models, package, loaded, tmp_path):
    fast, _ = models
    path, spec = package
    model = loaded
    with pytest.raises(ValueError, match=rf"batch size {MAX_BATCH + 1} is outside the range"):
        model(*example_inputs(spec, "cpu", batch=MAX_BATCH + 1))
    with pytest.raises(ValueError, match=r"images must have shape \(B, 3, 32, 32\)"):
        model(torch.zeros(2, 3, 112, 112))
    with pytest.raises(ValueError, match="AOTInductor CPU packages are fp32 only, got dtype bf16"):
        export_aoti(fast, str(tmp_path / "x.pt2"), dtype=torch.bfloat16, device="cpu")
    with pytest.raises(ValueError, match="path must end in .pt2"):
        export_aoti(fast, str(tmp_path / "x.so"))
    with pytest.raises(FileNotFoundError, match="AOTInductor package not found"):
        load_aoti(str(tmp_path / "missing.pt2"))


def _npy(path, array):
    np.save(path, np.ascontiguousarray(array))
    return str(path)


def test_cpp_runner_matches_python(package, loaded, runner_binary, tmp_path):
    path, spec = package
    (images,) = example_inputs(spec, "cpu", batch=3, seed=31)
    embedding, age = loaded(images)
    inp = _npy(tmp_path / "images.npy", images.numpy())
    prefix = str(tmp_path / "out")
    done = subprocess.run([runner_binary, path, inp, "--out", prefix], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("image ") == 3 and "age" in done.stdout
    cpp_embedding = torch.from_numpy(np.load(prefix + "_embedding.npy"))
    cpp_age = torch.from_numpy(np.load(prefix + "_age.npy"))
    assert_close(cpp_embedding, embedding, torch.float32, "C++ embedding vs Python package")
    assert_close(cpp_age, age, torch.float32, "C++ age vs Python package")


def test_cpp_runner_refusals(package, runner_binary, tmp_path):
    path, spec = package

    def run(*args):
        return subprocess.run([runner_binary, *args], capture_output=True, text=True, timeout=300)

    too_many = _npy(tmp_path / "big.npy", example_inputs(spec, "cpu", batch=MAX_BATCH + 1)[0].numpy())
    done = run(path, too_many)
    assert done.returncode == 2 and f"batch size {MAX_BATCH + 1} is outside the range" in done.stderr
    wrong_size = _npy(tmp_path / "wrong.npy", np.zeros((1, 3, 16, 16), np.float32))
    done = run(path, wrong_size)
    assert done.returncode == 2 and "images must be float32 (B, 3, 32, 32)" in done.stderr
    doubles = _npy(tmp_path / "f64.npy", np.zeros((1, 3, 32, 32), np.float64))
    done = run(path, doubles)
    assert done.returncode == 2 and "is not supported" in done.stderr
    ok = _npy(tmp_path / "ok.npy", example_inputs(spec, "cpu", batch=1)[0].numpy())
    done = run(path, ok, "--target-group", "3")
    assert done.returncode == 2 and "--target-group is for synthesis packages" in done.stderr
    done = run(path)
    assert done.returncode == 2 and "usage: mtlface_infer" in done.stderr
    done = run(str(tmp_path / "model.engine"), ok)  # the default build has no TensorRT
    assert done.returncode == 2 and "built without TensorRT" in done.stderr
    not_ours = str(tmp_path / "foreign.pt2")
    with open(not_ours, "wb") as fh:
        fh.write(b"not a package")
    done = run(not_ours, ok)
    assert done.returncode != 0 and "error" in done.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a CUDA AOTInductor package needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_aoti_cuda_package_parity(tmp_path, dtype):
    fast = randomize_(MTLFace(backbone="ir34"), seed=6).eval().cuda()
    path = str(tmp_path / "recognition_cuda.pt2")
    spec = export_aoti(fast, path, "recognition", min_batch=1, opt_batch=8, max_batch=32, dtype=dtype, device="cuda")
    assert spec.device == "cuda" and spec.dtype == {torch.float32: "fp32", torch.float16: "fp16"}[dtype]
    model = load_aoti(path)
    lowp = copy.deepcopy(fast).to(dtype)
    for batch in (1, 7, 32):
        (images,) = example_inputs(spec, "cuda", batch=batch, seed=batch)
        embedding, age = model(images)
        with torch.no_grad():
            want = fast.encode(images.float())
            low = lowp.encode(images)
        tag = f"cuda {dtype}, batch {batch}"
        check_low_precision(embedding, want.embedding, low.embedding, dtype, f"{tag} embedding")
        check_low_precision(age, want.age, low.age, dtype, f"{tag} age")
