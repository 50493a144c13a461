"""Graph preparation shared by the export targets: decompositions, foreign-op detection, argument checks."""
import pytest
import torch
import torch.nn.functional as F
from torch.library import custom_op, triton_op

from mtlface_fast import MTLFace, reference
from mtlface_fast.export import ExportSpec, decompose, decomposition_table, example_inputs, export_program, foreign_ops
from mtlface_fast.export.program import _adaptive_max_pool2d, _uniform_windows
from mtlface_fast.kernels.utils import DECOMPOSITIONS


@custom_op("mtlface_export_test::_scale", mutates_args=())
def _scale(x: torch.Tensor, a: float) -> torch.Tensor:
    return x * a + 0.5


@_scale.register_fake
def _(x, a):
    return torch.empty_like(x)


@triton_op("mtlface_export_test::_shift", mutates_args=())
def _shift(x: torch.Tensor, b: float) -> torch.Tensor:
    return x - b


class _Toy(torch.nn.Module):
    def forward(self, x):
        return torch.ops.mtlface_export_test._shift(torch.ops.mtlface_export_test._scale(x, 2.0), 3.0) * x


def _toy_program():
    batch = torch.export.Dim("batch", min=1, max=8)
    return torch.export.export(_Toy(), (torch.randn(2, 5),), dynamic_shapes=({0: batch},), strict=False)


@pytest.fixture
def toy_decompositions(monkeypatch):
    monkeypatch.setitem(DECOMPOSITIONS, torch.ops.mtlface_export_test._scale.default, lambda x, a: x * a + 0.5)
    monkeypatch.setitem(DECOMPOSITIONS, torch.ops.mtlface_export_test._shift.default, lambda x, b: x - b)
    return DECOMPOSITIONS


def test_decompose_refuses_ops_without_decomposition():
    ep = _toy_program()
    assert foreign_ops(ep) == ["mtlface_export_test::_scale", "mtlface_export_test::_shift"]
    with pytest.raises(ValueError, match=r"mtlface_export_test::_scale, mtlface_export_test::_shift"):
        decompose(ep)


def test_decompose_replaces_fused_ops_by_aten(toy_decompositions):
    ep = decompose(_toy_program())
    assert foreign_ops(ep) == []
    x = torch.randn(7, 5)  # a batch other than the traced one
    expected = ((x * 2.0 + 0.5) - 3.0) * x
    torch.testing.assert_close(ep.module()(x), expected)


def test_keep_triton_ops_leaves_only_triton_ops(toy_decompositions):
    table = decomposition_table(keep_triton_ops=True)
    assert torch.ops.mtlface_export_test._scale.default in table
    assert torch.ops.mtlface_export_test._shift.default not in table
    ep = decompose(_toy_program(), keep_triton_ops=True)
    assert foreign_ops(ep) == ["mtlface_export_test::_shift"]


@pytest.mark.parametrize("size,out", [(7, 1), (7, 2), (7, 3), (8, 3), (5, 4), (14, 3)])
def test_adaptive_max_pool2d_decomposition(size, out):
    x = torch.randn(2, 6, size, size + 1)
    values, indices = _adaptive_max_pool2d(x, [out, out])
    ref_values, ref_indices = F.adaptive_max_pool2d(x, out, return_indices=True)
    torch.testing.assert_close(values, ref_values, rtol=0, atol=0)
    assert torch.equal(indices, ref_indices)  # random inputs: no ties


def test_uniform_windows():
    assert _uniform_windows(7, 2) == (4, 3)
    assert _uniform_windows(7, 3) == (3, 2)
    assert _uniform_windows(7, 1) == (7, 1)
    assert _uniform_windows(8, 3) is None


def test_export_program_dynamic_batch_matches_model():
    torch.manual_seed(0)
    model = MTLFace(backbone="ir34").eval()
    ep, spec = export_program(model, "recognition", min_batch=1, max_batch=4)
    assert spec == ExportSpec("recognition", 1, 4, 4, "fp32", "cpu", 112, 7, "ir34", "cvpr")
    assert foreign_ops(ep) == []  # the model holds no fused op here; test_export_onnx checks the decomposed graph
    for batch in (1, 3):
        (x,) = example_inputs(spec, "cpu", batch=batch, seed=batch)
        emb, age = ep.module()(x)
        with torch.no_grad():
            ref = model.encode(x)
        torch.testing.assert_close(emb, ref.embedding, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(age, ref.age, rtol=1e-5, atol=1e-5)


def test_export_program_restores_training_mode():
    model = reference.MTLFace(backbone="ir34").train()
    export_program(model, "recognition", min_batch=2, max_batch=2)
    assert model.training


def test_export_program_argument_errors():
    model = MTLFace(backbone="ir34")
    with pytest.raises(TypeError, match="model must be an mtlface_fast.MTLFace"):
        export_program(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="entry must be one of"):
        export_program(model, "detection")
    with pytest.raises(ValueError, match="min_batch <= opt_batch <= max_batch"):
        export_program(model, min_batch=4, max_batch=2)
    with pytest.raises(ValueError, match="max_batch must be a positive int"):
        export_program(model, max_batch=0)
    with pytest.raises(ValueError, match="dtype must be one of"):
        export_program(model, dtype=torch.int8)


def test_spec_checks_inputs():
    spec = ExportSpec("synthesis", 1, 4, 4, "fp32", "cpu", 112, 7, "ir50", "cvpr")
    images, groups = example_inputs(spec, "cpu", batch=2)
    spec.check_inputs(images, groups)
    with pytest.raises(ValueError, match=r"batch size 5 is outside the range .* \[1, 4\]"):
        spec.check_inputs(*example_inputs(spec, "cpu", batch=5))
    with pytest.raises(TypeError, match="images must be torch.float32"):
        spec.check_inputs(images.half(), groups)
    with pytest.raises(ValueError, match=r"images must have shape \(B, 3, 112, 112\)"):
        spec.check_inputs(images[:, :, :64], groups)
    with pytest.raises(TypeError, match="target_group must be an int64 tensor of shape"):
        spec.check_inputs(images, groups.int())
    with pytest.raises(ValueError, match=r"target_group values must be in \[0, 7\)"):
        spec.check_inputs(images, groups + 6)
    with pytest.raises(TypeError, match="takes 2 input"):
        spec.check_inputs(images)
    assert ExportSpec.from_json(spec.to_json()) == spec
    with pytest.raises(ValueError, match="not an mtlface_fast export spec"):
        ExportSpec.from_json("{}")


def test_cli_export_refuses_bad_arguments(tmp_path, capsys):
    from mtlface_fast.cli import main
    assert main(["export", "--target", "onnx", "--out", str(tmp_path / "m.pt2")]) == 2
    assert "--out for --target onnx must end in .onnx" in capsys.readouterr().err
    assert main(["export", "--target", "aoti", "--out", str(tmp_path / "m.pt2"), "--program", "x.ep"]) == 2
    assert "--program is for --target tensorrt" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", "--target", "coreml", "--out", "m.mlmodel"])
