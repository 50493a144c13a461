"""TensorRT through torch_tensorrt (extra ``trt``): a serialized ``.engine`` and an exported-program form.

How the fused ops reach TensorRT (``ops=``):

* ``"decompose"`` (default): every ``mtlface_fast::`` op is replaced by its aten decomposition
  (:func:`mtlface_fast.export.program.decompose`), so the graph holds only aten ops that TensorRT converts
  natively and TensorRT fuses them itself. The engine is self-contained: it runs from Python, from C++
  (``nvinfer1::IRuntime::deserializeCudaEngine``) and with ``trtexec``.
* ``"plugin"``: the fused ops stay and become TensorRT Quick-Deploy plugins generated from their
  ``torch.library`` definitions (``torch_tensorrt.dynamo.conversion.plugins.custom_op``) that launch our
  Triton kernels. Only where the installed torch_tensorrt/TensorRT support them (torch_tensorrt's
  ``qdp_plugin`` feature; it is off for TensorRT 10.14/10.15, i.e. torch_tensorrt 2.10/2.11), and such JIT
  plugins call back into Python at run time.

Precision: the program is exported with weights and images in the requested dtype (fp32, fp16, bf16) and
compiled strongly typed where torch_tensorrt offers it (``use_explicit_typing``), else with
``enabled_precisions``. Batch: ``torch_tensorrt.Input(min_shape, opt_shape, max_shape)`` from the spec.
The spec is written beside each artifact (``<file>.json``) and checked by :func:`load_engine`.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import os
from typing import Dict, Optional, Tuple

import torch

from ..checkpoint import atomic_write
from ..errors import MissingDependencyError
from .program import (DTYPES, EXPORT_ATEN_DECOMPOSITIONS, ExportSpec, decompose, dtype_name,
                      example_inputs, export_program, foreign_ops)

INSTALL_HINT = ('pip install "mtlface-fast[trt]" -- torch-tensorrt of the same minor version as torch '
                '(e.g. torch-tensorrt==2.11.* for torch 2.11), with TensorRT from NVIDIA\'s package index '
                '(pip install --extra-index-url https://pypi.nvidia.com tensorrt-cu13); a CUDA GPU is required')
OP_MODES = ("decompose", "plugin")


def tensorrt_available() -> Tuple[bool, str]:
    """(True, "") when torch_tensorrt imports and a CUDA GPU is present, else (False, the reason)."""
    if importlib.util.find_spec("torch_tensorrt") is None:
        return False, f"torch_tensorrt is not installed ({INSTALL_HINT})"
    try:
        importlib.import_module("torch_tensorrt")
    except Exception as exc:  # the wheel imports libnvinfer eagerly; a missing library raises a bare Exception
        return False, f"torch_tensorrt does not import: {exc} ({INSTALL_HINT})"
    if not torch.cuda.is_available():
        return False, "TensorRT needs a CUDA GPU and none is available"
    return True, ""


def _require():
    ok, reason = tensorrt_available()
    if not ok:
        raise MissingDependencyError(f"the TensorRT target is unavailable: {reason}")
    return importlib.import_module("torch_tensorrt")


def _trt_inputs(torch_tensorrt, spec: ExportSpec):
    side = spec.input_size
    shapes = [lambda b: (b, 3, side, side)]
    dtypes = [DTYPES[spec.dtype]]
    if spec.entry == "synthesis":
        shapes.append(lambda b: (b,))
        dtypes.append(torch.int64)
    return [torch_tensorrt.Input(min_shape=shape(spec.min_batch), opt_shape=shape(spec.opt_batch),
                                 max_shape=shape(spec.max_batch), dtype=dtype) for shape, dtype in zip(shapes, dtypes)]


def _precision_kwargs(fn, spec: ExportSpec) -> Dict:
    """Strong typing (the exported graph's dtypes decide) where the API has it, else enabled_precisions."""
    params = inspect.signature(fn).parameters
    if "use_explicit_typing" in params:
        return {"use_explicit_typing": True}
    return {"enabled_precisions": {DTYPES[spec.dtype]}}


def _input_kwargs(fn, inputs) -> Dict:
    return {"arg_inputs": inputs} if "arg_inputs" in inspect.signature(fn).parameters else {"inputs": inputs}


def _register_plugins(torch_tensorrt, ep) -> None:
    from torch_tensorrt._features import ENABLED_FEATURES
    if not getattr(ENABLED_FEATURES, "qdp_plugin", False):
        raise MissingDependencyError("ops='plugin' needs TensorRT Quick-Deploy plugins, which this "
                                     "torch_tensorrt/TensorRT does not enable (off for TensorRT 10.14/10.15); "
                                     "use ops='decompose'")
    from torch_tensorrt.dynamo.conversion import plugins
    for name in foreign_ops(ep):
        if name.startswith("mtlface_fast::"):
            plugins.custom_op(name, supports_dynamic_shapes=True)


def _write_spec(path: str, spec: ExportSpec) -> None:
    atomic_write(path + ".json", lambda tmp: open(tmp, "w").write(spec.to_json() + "\n"))


def _read_spec(path: str) -> ExportSpec:
    side = path + ".json"
    if not os.path.isfile(side):
        raise ValueError(f"{path} has no {os.path.basename(side)} beside it: it was not written by "
                         f"mtlface_fast.export.export_tensorrt")
    with open(side) as fh:
        return ExportSpec.from_json(fh.read())


def export_tensorrt(model, path: str, entry: str = "recognition", *, min_batch: int = 1,
                    opt_batch: Optional[int] = None, max_batch: int = 64, dtype=torch.float16, ops: str = "decompose",
                    program_path: Optional[str] = None, **compile_kwargs) -> ExportSpec:
    """Build a TensorRT engine for ``entry`` of ``model`` and write it to ``path`` (``.engine``).

    Args:
        model: an :class:`mtlface_fast.MTLFace`; exported on the current CUDA device.
        path: the serialized engine (``.engine``; the spec goes to ``path + ".json"``).
        entry: ``"recognition"`` or ``"synthesis"``.
        min_batch, opt_batch, max_batch: the engine's optimization profile on the batch dimension.
        dtype: fp32, fp16 (default) or bf16.
        ops: ``"decompose"`` or ``"plugin"`` (see the module docstring).
        program_path: also write the torch_tensorrt-compiled program there (``.pt2``; ``torch_tensorrt.save``,
            exported-program format, loadable with :func:`load_tensorrt_program`).
        compile_kwargs: passed on to torch_tensorrt (e.g. ``workspace_size``, ``optimization_level``).

    Returns:
        The :class:`ExportSpec` written beside the engine.
    """
    path = os.fspath(path)
    if not path.endswith(".engine"):
        raise ValueError(f"path must end in .engine (a serialized TensorRT engine), got {path!r}")
    name = dtype_name(dtype)
    if ops not in OP_MODES:
        raise ValueError(f"ops must be one of {OP_MODES}, got {ops!r}")
    if program_path is not None and not os.fspath(program_path).endswith(".pt2"):
        raise ValueError(f"program_path must end in .pt2 (torch.export archive), got {program_path!r}")
    torch_tensorrt = _require()
    ep, spec = export_program(model, entry, min_batch=min_batch, opt_batch=opt_batch, max_batch=max_batch,
                              dtype=name, device=torch.device("cuda", torch.cuda.current_device()))
    spec = spec.replace(target="tensorrt")
    if ops == "decompose":
        ep = decompose(ep, what="the TensorRT engine (ops='decompose')")
    else:
        ep = ep.run_decompositions(dict(EXPORT_ATEN_DECOMPOSITIONS))
        _register_plugins(torch_tensorrt, ep)
    inputs = _trt_inputs(torch_tensorrt, spec)
    convert = torch_tensorrt.dynamo.convert_exported_program_to_serialized_trt_engine
    engine = convert(ep, **_input_kwargs(convert, inputs), **_precision_kwargs(convert, spec), **compile_kwargs)
    engine = bytes(engine)
    atomic_write(path, lambda tmp: open(tmp, "wb").write(engine))
    _write_spec(path, spec)
    if program_path is not None:
        compile_fn = torch_tensorrt.dynamo.compile
        compiled = compile_fn(ep, **_input_kwargs(compile_fn, inputs), **_precision_kwargs(compile_fn, spec),
                              min_block_size=1, **compile_kwargs)
        sample = list(example_inputs(spec, "cuda"))
        save = torch_tensorrt.save
        kw = {"arg_inputs": sample} if "arg_inputs" in inspect.signature(save).parameters else {"inputs": sample}
        atomic_write(program_path, lambda tmp: save(compiled, tmp, output_format="exported_program", **kw),
                     keep_suffix=True)
        _write_spec(os.fspath(program_path), spec)
    return spec


_TRT_TO_TORCH = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32,
                 "INT64": torch.int64, "INT8": torch.int8, "BOOL": torch.bool}


class TensorRTEngine:
    """A serialized engine from :func:`export_tensorrt`, run with the TensorRT Python API on the current stream."""

    def __init__(self, path: str):
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"TensorRT engine not found: {path}")
        self.spec = _read_spec(path)
        _require()
        trt = importlib.import_module("tensorrt")
        self._trt = trt
        self.path = path
        with open(path, "rb") as fh:
            blob = fh.read()
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(blob)
        if self.engine is None:
            raise ValueError(f"TensorRT could not deserialize {path} (built by another TensorRT version or GPU?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(self.input_names) != len(self.spec.input_names) or \
                len(self.output_names) != len(self.spec.output_names):
            raise ValueError(f"{path}: engine has inputs {self.input_names} / outputs {self.output_names}, the spec "
                             f"expects {self.spec.input_names} / {self.spec.output_names}")

    def _dtype(self, name: str) -> torch.dtype:
        kind = self.engine.get_tensor_dtype(name).name
        if kind not in _TRT_TO_TORCH:
            raise ValueError(f"engine tensor {name} has unsupported dtype {kind}")
        return _TRT_TO_TORCH[kind]

    def __call__(self, *inputs: torch.Tensor):
        self.spec.check_inputs(*inputs)
        device = torch.device("cuda", torch.cuda.current_device())
        keep = []
        for name, tensor in zip(self.input_names, inputs):
            t = tensor.to(device=device, dtype=self._dtype(name)).contiguous()
            keep.append(t)
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        outs = []
        for name in self.output_names:
            out = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=self._dtype(name), device=device)
            self.context.set_tensor_address(name, out.data_ptr())
            outs.append(out)
        stream = torch.cuda.current_stream(device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT execution of {self.path} failed")
        # The outputs are ready in stream order, like those of any torch op on the current stream.
        return tuple(outs) if len(outs) > 1 else outs[0]


def load_engine(path: str) -> TensorRTEngine:
    """Load a ``.engine`` written by :func:`export_tensorrt`; inputs are checked against its spec."""
    return TensorRTEngine(path)


class _CheckedProgram:
    def __init__(self, module, spec: ExportSpec):
        self.module, self.spec = module, spec

    def __call__(self, *inputs: torch.Tensor):
        self.spec.check_inputs(*inputs)
        return self.module(*inputs)


def load_tensorrt_program(path: str):
    """Load the exported-program form written with ``program_path=`` (``torch_tensorrt.load``)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"TensorRT program not found: {path}")
    spec = _read_spec(path)
    torch_tensorrt = _require()
    loaded = torch_tensorrt.load(path)
    module = loaded.module() if hasattr(loaded, "module") else loaded
    return _CheckedProgram(module, spec)


def spec_of(path: str) -> Dict:
    """The spec stored beside a TensorRT artifact, as a dict (no TensorRT needed)."""
    return json.loads(_read_spec(os.fspath(path)).to_json())
