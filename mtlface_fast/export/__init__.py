"""Deployment of MTLFace: ONNX, AOTInductor (``.pt2`` + the C++ runner) and TensorRT.

Two entry points are exported, each with a dynamic batch dimension:
``recognition`` (images -> embedding, age) and ``synthesis`` (images, target_group -> image).
Every target stores an :class:`ExportSpec` with the artifact and its loader refuses inputs outside it.
See docs/DEPLOY.md.
"""
from .program import (ENTRIES, ExportSpec, Recognition, Synthesis, decompose, decomposition_table,
                      example_inputs, export_program, foreign_ops)
from .onnx import OnnxModel, export_onnx, load_onnx

__all__ = ["ENTRIES", "ExportSpec", "Recognition", "Synthesis", "decompose", "decomposition_table",
           "example_inputs", "export_program", "foreign_ops", "export_onnx", "load_onnx", "OnnxModel"]
