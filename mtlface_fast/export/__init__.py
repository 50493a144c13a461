"""Deployment of MTLFace: ONNX, AOTInductor (``.pt2`` + the C++ runner) and TensorRT.

Two entry points are exported, each with a dynamic batch dimension:
``recognition`` (images -> embedding, age) and ``synthesis`` (images, target_group -> image).
Every target stores an :class:`ExportSpec` with the artifact and its loader refuses inputs outside it.
Optional dependencies (onnx/onnxruntime/onnxscript, torch_tensorrt) are imported only when a target
needs them, with the install hint in the error. See docs/DEPLOY.md.
"""
from .aoti import AotiModel, export_aoti, load_aoti
from .onnx import OnnxModel, export_onnx, load_onnx
from .program import (ENTRIES, ExportSpec, Recognition, Synthesis, decompose, decomposition_table,
                      example_inputs, export_program, foreign_ops)
from .tensorrt import TensorRTEngine, export_tensorrt, load_engine, load_tensorrt_program, tensorrt_available

TARGETS = ("onnx", "aoti", "tensorrt")

__all__ = ["ENTRIES", "TARGETS", "ExportSpec", "Recognition", "Synthesis", "decompose", "decomposition_table",
           "example_inputs", "export_program", "foreign_ops", "export_onnx", "load_onnx", "OnnxModel",
           "export_aoti", "load_aoti", "AotiModel", "export_tensorrt", "load_engine", "load_tensorrt_program",
           "TensorRTEngine", "tensorrt_available"]
