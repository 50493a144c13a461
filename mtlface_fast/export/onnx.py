"""ONNX: the decomposed exported program through ``torch.onnx.export`` (dynamo exporter), dynamic batch.

The graph holds only standard ONNX operators: fused ops are replaced by their aten decompositions first
(:func:`mtlface_fast.export.program.decompose`). The export spec is stored in the model's
``metadata_props`` under ``mtlface_fast.export_spec``; :func:`load_onnx` reads it back and checks inputs.
fp32 only: that is what the parity checks of this target cover (ONNX Runtime's CPU provider runs fp32).
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch

from ..checkpoint import atomic_write
from ..errors import MissingDependencyError
from .program import SPEC_KEY, ExportSpec, decompose, dtype_name, export_program

INSTALL_HINT = 'pip install "mtlface-fast[onnx]"  (onnx, onnxruntime, onnxscript)'
DEFAULT_OPSET = 18


def _require(module: str):
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(f"the ONNX target needs the '{module}' package ({exc}); install it with: "
                                     f"{INSTALL_HINT}") from None


def export_onnx(model, path: str, entry: str = "recognition", *, min_batch: int = 1, opt_batch: Optional[int] = None,
                max_batch: int = 64, dtype=torch.float32, opset: int = DEFAULT_OPSET, check: bool = True) -> ExportSpec:
    """Write ``entry`` of ``model`` as an ONNX file with a dynamic batch in ``[min_batch, max_batch]``.

    Args:
        model: an :class:`mtlface_fast.MTLFace`; exported from a CPU fp32 copy when it lives elsewhere.
        path: the ``.onnx`` file (written atomically; weights inside the file).
        entry: ``"recognition"`` (images -> embedding, age) or ``"synthesis"`` (images, target_group -> image).
        dtype: fp32 only (anything else is refused).
        opset: ONNX opset (default 18).
        check: run ``onnx.checker.check_model`` on the written file.

    Returns:
        The :class:`ExportSpec` stored in the file.
    """
    if dtype_name(dtype) != "fp32":
        raise ValueError(f"the ONNX target exports fp32 only, got dtype {dtype_name(dtype)}; export fp32 and let the "
                         f"runtime reduce precision, or use the TensorRT target for fp16/bf16")
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < 17:
        raise ValueError(f"opset must be an int >= 17, got {opset!r}")
    _require("onnxscript")
    ep, spec = export_program(model, entry, min_batch=min_batch, opt_batch=opt_batch, max_batch=max_batch,
                              dtype=torch.float32, device="cpu")
    spec = spec.replace(target="onnx")
    ep = decompose(ep, what="the ONNX export")
    program = torch.onnx.export(ep, (), dynamo=True, opset_version=opset, input_names=list(spec.input_names),
                                output_names=list(spec.output_names), optimize=True, verbose=False)
    if spec.min_batch != spec.max_batch:
        _name_batch_dim(program.model)
    program.model.metadata_props[SPEC_KEY] = spec.to_json()
    atomic_write(path, lambda tmp: program.save(tmp, external_data=False))
    if check:
        _require("onnx").checker.check_model(os.fspath(path))
    return spec


def _name_batch_dim(model, name: str = "batch") -> None:
    """Call the symbolic batch dimension (``s0``, ``s34``, ... after tracing) ``batch`` on every value."""
    from onnxscript import ir
    first = model.graph.inputs[0].shape
    if first is None or not isinstance(first[0], ir.SymbolicDim):
        return
    old = first[0].value
    values = list(model.graph.inputs) + list(model.graph.outputs) + [out for node in model.graph for out in node.outputs]
    for value in values:
        if value.shape is not None:
            value.shape = ir.Shape([ir.SymbolicDim(name) if isinstance(d, ir.SymbolicDim) and d.value == old else d
                                    for d in value.shape])


def read_spec(path: str) -> ExportSpec:
    """The :class:`ExportSpec` stored in an ONNX file written by :func:`export_onnx`."""
    onnx = _require("onnx")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"ONNX file not found: {path}")
    proto = onnx.load(os.fspath(path), load_external_data=False)
    props = {p.key: p.value for p in proto.metadata_props}
    if SPEC_KEY not in props:
        raise ValueError(f"{path} was not written by mtlface_fast.export.export_onnx (no {SPEC_KEY} metadata)")
    return ExportSpec.from_json(props[SPEC_KEY])


class OnnxModel:
    """An ONNX Runtime session over a file from :func:`export_onnx`: torch tensors in, torch tensors out."""

    def __init__(self, path: str, providers: Optional[Sequence[str]] = None):
        ort = _require("onnxruntime")
        self.spec = read_spec(path)
        self.path = os.fspath(path)
        self.session = ort.InferenceSession(self.path, providers=list(providers or ["CPUExecutionProvider"]))

    def __call__(self, *inputs: torch.Tensor):
        self.spec.check_inputs(*inputs)
        feeds = {name: t.detach().cpu().contiguous().numpy() for name, t in zip(self.spec.input_names, inputs)}
        outs = [torch.from_numpy(o) for o in self.session.run(list(self.spec.output_names), feeds)]
        return tuple(outs) if len(outs) > 1 else outs[0]


def load_onnx(path: str, providers: Optional[Sequence[str]] = None) -> OnnxModel:
    """Open an ONNX file written by :func:`export_onnx` (default provider: CPU)."""
    return OnnxModel(path, providers)
